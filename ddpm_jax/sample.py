"""Sampling from a trained workdir: grids, single PNGs, raw arrays and denoising GIFs.

Each sample's starting noise is ``normal(fold_in(key(seed), i))`` for sample index
``i``, so the same seed gives the same images whatever the batch size or device
count (exactly so for the deterministic samplers).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import diffusion, images, models, parallel, sampling


class NoCheckpointError(FileNotFoundError):
  pass


class Sampler:
  """A compiled, pmapped sampler for one config; reused across batches and parameters."""

  def __init__(self, config, model, schedule, num_frames: int = 0):
    s = config.sampling
    self.config, self.schedule, self.num_frames = config, schedule, num_frames
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    self.shape = shape
    apply = lambda p, x, t: model.apply({"params": p}, x, t, train=False)  # noqa: E731

    def sample_fn(params, x_T, key):
      key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS))
      eps_fn = sampling.model_eps_fn(apply, params, schedule, config.model.prediction_type)
      return sampling.sample(s.sampler, eps_fn, schedule, x_T, key, num_steps=s.num_steps,
                             eta=s.eta, spacing=s.spacing, variance=s.ddpm_variance,
                             clip_x0=s.clip_x0, num_frames=num_frames)

    self._p_sample = parallel.pmap(sample_fn, in_axes=(0, 0, None))
    self._replicated = (None, None)

  def noise(self, seed: int, indices: np.ndarray) -> jax.Array:
    key = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), self.shape))(
        jnp.asarray(indices))

  def _params(self, params):
    if self._replicated[0] is not params:
      self._replicated = (params, parallel.replicate(params))
    return self._replicated[1]

  def __call__(self, params, indices: np.ndarray, seed: int, batch_key: int):
    """Samples for global sample ``indices`` (a multiple of the local device count).

    Returns host arrays: samples (N, H, W, C) and, with frames, (F, 2, N, H, W, C).
    """
    n_dev = jax.local_device_count()
    x_T = self.noise(seed, indices).reshape((n_dev, -1) + self.shape)
    key = jax.random.fold_in(jax.random.key(seed + 1), batch_key)
    out = self._p_sample(self._params(params), x_T, key)
    if self.num_frames:
      x0, frames = jax.device_get(out)
      frames = np.moveaxis(frames, 0, 2)  # (F, 2, dev, B, ...) after moving device axis
      return x0.reshape((-1,) + self.shape), frames.reshape(frames.shape[:2] + (-1,) + self.shape)
    return np.asarray(jax.device_get(out)).reshape((-1,) + self.shape), None

  def grid(self, params, num: int = 16, seed: int = 0) -> np.ndarray:
    """A uint8 grid of ``num`` samples (num rounded up to the device count)."""
    n_dev = jax.local_device_count()
    num = -(-num // n_dev) * n_dev
    x, _ = self(params, np.arange(num), seed, 0)
    return images.make_grid(images.to_uint8(x))


def default_name(config, step: int) -> str:
  s = config.sampling
  steps = config.diffusion.num_timesteps if s.sampler == "ddpm" else s.num_steps
  eta = f"_eta{s.eta:g}" if s.sampler == "ddim" else ""
  return f"step{step}_{s.sampler}{steps}{eta}_seed{s.seed}"


def load_params(config, workdir: str, step: int | None = None):
  """The (EMA, if ``sampling.use_ema``) parameters of the latest checkpoint, and its step."""
  mngr = ckpt_lib.make_manager(workdir, read_only=True, async_save=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise NoCheckpointError(f"no checkpoint in {ckpt_lib.checkpoint_dir(workdir)!r}: train first "
                            f"with `python main.py --config CONFIG --workdir {workdir}`")
  from ddpm_jax import train
  model = models.create_model(config)
  tx = train.make_optimizer(config)
  template = jax.eval_shape(lambda: train.create_train_state(config, model, tx, jax.random.key(0)))
  state = ckpt_lib.restore(mngr, template, step)
  return (state.ema_params if config.sampling.use_ema else state.params), step


def sample_and_save(config, workdir: str) -> str:
  """Samples ``sampling.num_samples`` images from the workdir's latest checkpoint.

  Writes into ``<workdir>/samples/<name>/``: grid.png, images/NNNNN.png, samples.npz
  (uint8 images and float32 samples in [-1, 1]), and, with ``sampling.num_frames``,
  denoise.gif (x_t over the trajectory) and denoise_x0.gif (predicted x0).
  Returns the output folder.
  """
  from ddpm_jax import config_lib
  s = config.sampling
  config_lib.validate(config, jax.device_count())
  params, step = load_params(config, workdir)
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  out_dir = os.path.join(os.path.abspath(workdir), "samples", s.name or default_name(config, step))
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  n_dev, n_proc = jax.local_device_count(), jax.process_count()
  local_batch = parallel.check_batch_size(s.batch_size, "sampling.batch_size") * n_dev
  num_batches = -(-s.num_samples // s.batch_size)
  gif_sampler = Sampler(config, model, schedule, num_frames=s.num_frames) if s.num_frames else None
  sampler = Sampler(config, model, schedule)
  from tqdm import tqdm
  samples, frames = [], None
  for b in tqdm(range(num_batches), desc="sampling", unit="batch",
                disable=jax.process_index() != 0):
    start = b * s.batch_size + jax.process_index() * local_batch
    idx = np.arange(start, start + local_batch)
    use = gif_sampler if (b == 0 and gif_sampler is not None) else sampler
    x, f = use(params, idx, s.seed, b)
    if f is not None:
      frames = f
    if n_proc > 1:
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x).reshape((-1,) + x.shape[1:])
    samples.append(x)
  x = np.concatenate(samples)[:s.num_samples]
  if jax.process_index() == 0:
    u8 = images.to_uint8(x)
    scale = max(1, 128 // config.data.image_size)
    images.save_png(os.path.join(out_dir, "grid.png"), images.make_grid(u8), scale=scale)
    for i, img in enumerate(u8):
      images.save_png(os.path.join(out_dir, "images", f"{i:05d}.png"), img)
    np.savez_compressed(os.path.join(out_dir, "samples.npz"), images=u8, samples=x)
    if frames is not None:
      n = min(len(u8), 16, frames.shape[2])
      for which, name in ((0, "denoise.gif"), (1, "denoise_x0.gif")):
        seq = [images.make_grid(images.to_uint8(fr[which][:n])) for fr in frames]
        images.save_gif(os.path.join(out_dir, name), seq, scale=scale)
    logging.info("wrote %d samples to %s", len(u8), out_dir)
  return out_dir
