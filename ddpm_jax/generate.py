"""Generation from a trained model: the compiled, pmapped ``Sampler``, the global sampling
loop ``generate`` that every process runs, and ``load_params`` from a workdir.

Each sample's starting noise is ``normal(fold_in(key(seed), i))`` for sample index
``i``, so the same seed gives the same images whatever the batch size, device or
process count (exactly so for the deterministic samplers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import diffusion, images, models, parallel, progress, sampling, state
from ddpm_jax.errors import NoCheckpointError


def make_eps_fn(config, model, schedule, params, labels=None, guidance_scale: float = 1.0):
  """``eps_fn(x_t, t)`` of the network, with classifier-free guidance for labelled models.

  eps = eps(x, null) + w (eps(x, y) - eps(x, null)); w = 0 is unconditional, 1 plain
  conditional. With 0 < w != 1 both branches go through the network in one batched call.
  """
  prediction_type = config.model.prediction_type
  null = model.num_classes

  def eps_of(x, t, y):
    pred = models.apply(model, params, x, t, y).astype(jnp.float32)
    return diffusion.prediction_to_eps(schedule, x, t, pred, prediction_type)

  if not model.num_classes or labels is None:
    return lambda x, t: eps_of(x, t, None)
  w = float(guidance_scale)
  if w == 0.0:
    return lambda x, t: eps_of(x, t, jnp.full_like(labels, null))
  if w == 1.0:
    return lambda x, t: eps_of(x, t, labels)

  def guided(x, t):
    both = eps_of(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([labels, jnp.full_like(labels, null)]))
    cond, uncond = jnp.split(both, 2)
    return uncond + w * (cond - uncond)
  return guided


class Sampler:
  """A compiled, pmapped sampler for one config; reused across batches and parameters."""

  def __init__(self, config, model, schedule, num_frames: int = 0):
    s = config.sampling
    self.config, self.schedule, self.num_frames = config, schedule, num_frames
    self.model = model
    self.shape = (config.data.image_size, config.data.image_size, config.data.num_channels)

    def sample_fn(params, x_T, key, labels):
      key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS))
      eps_fn = make_eps_fn(config, model, schedule, params, labels,
                           s.get("guidance_scale", 1.0))
      return sampling.sample(s.sampler, eps_fn, schedule, x_T, key, num_steps=s.num_steps,
                             eta=s.eta, spacing=s.spacing, variance=s.ddpm_variance,
                             clip_x0=s.clip_x0, num_frames=num_frames)

    def invert_fn(params, x0, labels):
      eps_fn = make_eps_fn(config, model, schedule, params, labels, 1.0)
      return sampling.ddim_invert(eps_fn, schedule, x0, num_steps=s.num_steps,
                                  spacing=sampling.resolve_spacing("ddim", s.spacing))

    self._p_sample = parallel.pmap(sample_fn, in_axes=(0, 0, None, 0))
    self._p_invert = parallel.pmap(invert_fn)
    self._replicated = (None, None)

  def noise(self, seed: int, indices: np.ndarray) -> jax.Array:
    key = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), self.shape))(
        jnp.asarray(indices))

  def _params(self, params):
    if self._replicated[0] is not params:
      self._replicated = (params, parallel.replicate(params))
    return self._replicated[1]

  def _labels(self, labels, n: int):
    """Labels per device; the null label where none are given."""
    if labels is None:
      labels = np.full((n,), self.model.num_classes, np.int32)
    return np.asarray(labels, np.int32).reshape(jax.local_device_count(), -1)

  def __call__(self, params, indices: np.ndarray, seed: int, batch_key: int, labels=None):
    """Samples for global sample ``indices`` (a multiple of the local device count).

    Returns host arrays: samples (N, H, W, C) and, with frames, (F, 2, N, H, W, C).
    """
    n_dev = jax.local_device_count()
    x_T = self.noise(seed, indices).reshape((n_dev, -1) + self.shape)
    key = jax.random.fold_in(jax.random.key(seed + 1), batch_key)
    out = self._p_sample(self._params(params), x_T, key, self._labels(labels, len(indices)))
    if self.num_frames:
      x0, frames = jax.device_get(out)
      frames = np.moveaxis(frames, 0, 2)  # (F, 2, dev, B, ...) after moving device axis
      return x0.reshape((-1,) + self.shape), frames.reshape(frames.shape[:2] + (-1,) + self.shape)
    return np.asarray(jax.device_get(out)).reshape((-1,) + self.shape), None

  def _per_device(self, fn, params, x, labels=None):
    """Runs a pmapped ``fn(params, x_dev, labels_dev)`` over a host batch, padded to the
    device count."""
    n_dev, n = jax.local_device_count(), len(x)
    pad = -n % n_dev
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    if labels is not None:
      labels = np.concatenate([np.asarray(labels, np.int32), np.zeros((pad,), np.int32)])
    out = fn(self._params(params), x.reshape((n_dev, -1) + x.shape[1:]),
             self._labels(labels, len(x)))
    return np.asarray(jax.device_get(out)).reshape((-1,) + x.shape[1:])[:n]

  def from_noise(self, params, x_T: np.ndarray, batch_key: int = 0, labels=None) -> np.ndarray:
    """Samples from given starting noise (N, H, W, C); frames are not recorded."""
    key = jax.random.fold_in(jax.random.key(self.config.sampling.seed + 1), batch_key)

    def fn(p, x, y):
      out = self._p_sample(p, x, key, y)
      return out[0] if self.num_frames else out
    return self._per_device(fn, params, np.asarray(x_T, np.float32), labels)

  def invert(self, params, x0: np.ndarray, labels=None) -> np.ndarray:
    """DDIM inversion of images in [-1, 1] to starting noise x_T."""
    return self._per_device(self._p_invert, params, np.asarray(x0, np.float32), labels)

  def grid(self, params, num: int = 16, seed: int = 0) -> np.ndarray:
    """A uint8 grid of ``num`` samples, drawn by every process (each its slice)."""
    x, _ = generate(self.config, self, params, num, seed=seed, show_progress=False)
    return images.make_grid(images.to_uint8(x))


def load_params(config, workdir: str, step: int | None = None):
  """The (EMA, if ``sampling.use_ema``) parameters of the newest readable checkpoint (or of
  ``step``), and its step."""
  mngr = ckpt_lib.make_manager(workdir, read_only=True, async_save=False)
  template = state.abstract_train_state(config)
  restored, step = ckpt_lib.restore_newest(mngr, workdir, template,
                                           None if step is None else [step])
  if restored is None:
    raise NoCheckpointError(f"no readable checkpoint in {ckpt_lib.checkpoint_dir(workdir)!r}: "
                            f"train first with `python main.py --config CONFIG --workdir "
                            f"{workdir}`")
  return (restored.ema_params if config.sampling.use_ema else restored.params), step


def generate(config, sampler: Sampler, params, num: int, first_sampler: Sampler | None = None,
             desc: str = "sampling", labels=None, seed: int | None = None,
             show_progress: bool = True):
  """``num`` samples in [-1, 1], in global batches of ``sampling.batch_size``: each process
  draws its slice of every batch and every process gets all of them.

  ``labels`` (length ``num``) conditions labelled models. ``first_sampler`` (one that
  records frames) draws the first batch; its frames are returned too (None otherwise).
  Sample i depends only on (seed, i) (and its label).
  """
  s = config.sampling
  seed = s.seed if seed is None else seed
  n_dev = jax.local_device_count()
  batch = s.batch_size if num >= s.batch_size else -(-num // jax.device_count()) * \
      jax.device_count()
  local_batch = parallel.check_batch_size(batch, "sampling.batch_size") * n_dev
  num_batches = -(-num // batch)
  if labels is not None:
    labels = np.resize(np.asarray(labels, np.int32), num_batches * batch)
  samples, frames = [], None
  with progress.Progress(num_batches, desc, "batch",
                         enabled=show_progress and parallel.is_main()) as bar:
    for b in range(num_batches):
      start = b * batch + jax.process_index() * local_batch
      idx = np.arange(start, start + local_batch)
      use = first_sampler if (b == 0 and first_sampler is not None) else sampler
      x, f = use(params, idx, seed, b, None if labels is None else labels[idx])
      if f is not None:
        frames = f
      samples.append(parallel.allgather(x))
      bar.update(1)
  return np.concatenate(samples)[:num], frames
