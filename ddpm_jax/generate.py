"""Generation from a trained model: the compiled, pmapped ``Sampler``, the global sampling
loop ``generate`` that every process runs.

Keys: sample ``i``'s starting noise is ``normal(fold_in(key(seed), i))``, a function of
(seed, i) alone. The noise a stochastic sampler (DDPM, DDIM with eta > 0) adds on the
way comes from ``fold_in(fold_in(key(seed + 1), batch), device)`` (``batch``: the global
batch number in ``generate``, the first index of the batch in ``Sampler.run``), drawn
for the device's whole slice. So the deterministic samplers (DDIM with eta = 0,
DPM-Solver++) give the same images for a seed whatever the batch size, device or
process count; the stochastic ones do for a fixed batch size and device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax import (
  config_lib,
  consistency,
  diffusion,
  images,
  models,
  parallel,
  progress,
  sampling,
  timesteps,
)
from ddpm_jax.errors import ConfigError


def make_eps_fn(model, schedule, params, prediction_type: str, labels=None,
                guidance_scale: float = 1.0):
  """``eps_fn(x_t, t)`` of the network, which predicts ``prediction_type``; with labels,
  classifier-free guidance of scale ``guidance_scale`` (``sampling.guided_eps_fn``: one
  batched call for both branches)."""

  def eps_of(x, t, y):
    pred = models.apply(model, params, x, t, y).astype(jnp.float32)
    return diffusion.prediction_to_eps(schedule, x, t, pred, prediction_type)

  if not model.num_classes or labels is None:
    return lambda x, t: eps_of(x, t, None)
  return sampling.guided_eps_fn(eps_of, labels, model.num_classes, guidance_scale)


def student_timesteps(config, num_timesteps: int, t_start: int | None = None):
  """A distilled student's own DDIM grid (a tuple), from ``t_start`` when given (which must
  be on it: see ``snap_to_grid``); None for other models, or where the config asks for
  another sampler, step count or spacing than the student was trained for."""
  if not config.distill.round:
    return None
  s, n = config.sampling, int(config.distill.teacher_steps) // 2
  if sampling.canonical_sampler(s.sampler) != "ddim" or s.num_steps != n or \
      s.spacing != "trailing":
    return None
  return tuple(int(t) for t in timesteps.student(num_timesteps, n, t_start))


def snap_to_grid(config, num_timesteps: int, t: int) -> int:
  """For a distilled student (``student_timesteps``): the level of its grid image-to-image
  starts from, the highest at or below ``t`` (the lowest if all are above); ``t`` otherwise."""
  grid = student_timesteps(config, num_timesteps)
  return t if grid is None else timesteps.snap(grid, t)


def plan_for(config, schedule, *, t_start: int | None = None, frames: bool = False,
             inpaint: bool = False):
  """The sampling plan of ``config``: the one place generation reads ``config.sampling``
  for how to sample. ``t_start``: image-to-image from that level, with the steps' density
  of a full run (``timesteps.steps_from``); ``frames``: record ``sampling.num_frames``;
  ``inpaint``: ``sampling.resample_steps`` RePaint jumps. A distilled student samples on
  its own grid where the config asks for the sampler it was trained for. A consistency-tuned
  workdir (its saved config names ``consistency.teacher``) gets a ``consistency.Plan``
  instead (``consistency_plan``)."""
  if config.consistency.teacher:
    return consistency_plan(config, schedule, t_start=t_start, inpaint=inpaint)
  s, T = config.sampling, schedule.num_timesteps
  grid = student_timesteps(config, T, t_start)
  num_steps = s.num_steps if t_start is None else timesteps.steps_from(s.num_steps, t_start, T)
  resample = int(config.sampling.resample_steps) if inpaint else 1
  return sampling.make_plan(
      s.sampler, schedule, num_steps=num_steps, spacing=s.spacing, t_start=t_start,
      timesteps=grid, distilled=grid is not None, eta=float(s.eta),
      variance=s.ddpm_variance, clip_x0=bool(s.clip_x0),
      guidance_scale=float(config.sampling.guidance_scale),
      resample_steps=resample, num_frames=int(s.num_frames) if frames else 0)


def consistency_plan(config, schedule, *, t_start: int | None = None, inpaint: bool = False):
  """A tuned workdir's plan: ``consistency.num_steps`` calls (1 by default), image to image
  from ``t_start``; no denoising GIF (``num_frames`` 0: there is no trajectory), no
  inpainting (a ConfigError: RePaint's resampling needs a diffusion model's steps). A
  labelled model samples its labels as given: ECT trains no guided target."""
  if inpaint:
    raise ConfigError("--mode=inpaint needs a diffusion model's steps (RePaint): a consistency-"
                      "tuned workdir cannot; inpaint with its teacher, "
                      f"{config.consistency.teacher}")
  if config.model.num_classes and float(config.sampling.guidance_scale) != 1.0 and \
      parallel.is_main():
    logging.info("a consistency model samples its labels unguided (guidance scale 1; the "
                 "config has sampling.guidance_scale=%s)", config.sampling.guidance_scale)
  cc = config.consistency
  return consistency.make_plan(schedule, cc.num_steps, cc.mid_sigmas, t_start=t_start,
                               clip_x0=bool(config.sampling.clip_x0), teacher=cc.teacher)


class Sampler:
  """A compiled, pmapped sampler of one plan (``plan_for(config, schedule)`` by default);
  reused across batches and parameters.

  Entry points: ``__call__`` (samples for global sample indices: the noise of sample i is
  drawn from (seed, i)), ``run`` (from given starting points), ``invert`` (DDIM
  inversion on the plan's timesteps) and ``grid``. One key rule for the sampler's own
  randomness (eta > 0, DDPM): batch ``batch_key`` uses ``fold_in(key(seed + 1),
  batch_key)``, then the device index.

  A plan with a ``t_start`` makes it an image-to-image sampler (it starts from x at that
  timestep). ``run(..., known=, mask=)`` keeps known pixels (inpainting), with the plan's
  RePaint ``resample_steps``.
  """

  def __init__(self, config, model, schedule, plan: sampling.Plan | None = None):
    config = config_lib.with_defaults(config)  # a public entry: fields it lacks get defaults
    self.plan = plan_for(config, schedule) if plan is None else plan
    self.config, self.schedule, self.model = config, schedule, model
    self.num_frames = self.plan.num_frames
    self.shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    plan, pt = self.plan, config.model.prediction_type

    def sample_fn(params, x_T, key, labels, known, mask):
      key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS))
      if plan.sampler == "consistency":  # known, mask: None (plan_for refused inpainting)
        return consistency.run_plan(plan, model, schedule, pt, params, x_T, key,
                                    labels if model.num_classes else None)
      eps_fn = make_eps_fn(model, schedule, params, pt, labels, plan.guidance_scale)
      return sampling.sample(plan, eps_fn, schedule, x_T, key, known=known, mask=mask)

    def invert_fn(params, x0, labels):
      eps_fn = make_eps_fn(model, schedule, params, pt, labels, 1.0)
      return sampling.ddim_invert(eps_fn, schedule, x0, plan=plan)

    self._p_sample = parallel.pmap(sample_fn, in_axes=(0, 0, None, 0, 0, 0))
    self._p_invert = parallel.pmap(invert_fn)
    self._replicated = (None, None)

  def timesteps(self) -> np.ndarray:
    """The timesteps the model is called at, in order (the plan's)."""
    return np.asarray(self.plan.timesteps, np.int32)

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
      labels = models.null_labels(self.model.num_classes, n)
    return np.asarray(labels, np.int32).reshape(jax.local_device_count(), -1)

  def _key(self, seed: int | None, batch_key: int) -> jax.Array:
    seed = self.config.sampling.seed if seed is None else seed
    return jax.random.fold_in(jax.random.key(seed + 1), batch_key)

  def __call__(self, params, indices: np.ndarray, seed: int, batch_key: int, labels=None):
    """Samples for global sample ``indices`` (a multiple of the local device count).

    Returns host arrays: samples (N, H, W, C) and, with frames, (F, 2, N, H, W, C).
    """
    n_dev = jax.local_device_count()
    x_T = self.noise(seed, indices).reshape((n_dev, -1) + self.shape)
    key = self._key(seed, batch_key)
    out = self._p_sample(self._params(params), x_T, key, self._labels(labels, len(indices)),
                         None, None)
    if self.num_frames:
      x0, frames = jax.device_get(out)
      frames = np.moveaxis(frames, 0, 2)  # (F, 2, dev, B, ...) after moving device axis
      return x0.reshape((-1,) + self.shape), frames.reshape(frames.shape[:2] + (-1,) + self.shape)
    return np.asarray(jax.device_get(out)).reshape((-1,) + self.shape), None

  def _per_device(self, fn, params, x, labels=None, *extra):
    """Runs a pmapped ``fn(params, x, labels, *extra)`` over host batches (N, ...), padded to
    and split over the local devices; returns (N, ...) host arrays."""
    n_dev, n = jax.local_device_count(), len(x)
    pad = -n % n_dev
    split = lambda a: None if a is None else np.concatenate(  # noqa: E731
        [a, np.zeros((pad,) + a.shape[1:], a.dtype)]).reshape((n_dev, -1) + a.shape[1:])
    if labels is not None:
      labels = np.concatenate([np.asarray(labels, np.int32), np.zeros((pad,), np.int32)])
    out = fn(self._params(params), split(x), self._labels(labels, n + pad),
             *(split(e) for e in extra))
    return np.asarray(jax.device_get(out)).reshape((-1,) + x.shape[1:])[:n]

  def run(self, params, x_start: np.ndarray, batch_key: int = 0, labels=None, known=None,
          mask=None, seed: int | None = None) -> np.ndarray:
    """Samples from given starting points (N, H, W, C): noise, or x at ``t_start``; with
    ``known`` images and their ``mask`` (1 = keep), inpainting. Frames are not returned.
    ``seed`` defaults to ``sampling.seed``."""
    key = self._key(seed, batch_key)

    def fn(p, x, y, k, m):
      out = self._p_sample(p, x, key, y, k, m)
      return out[0] if self.num_frames else out
    as32 = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
    return self._per_device(fn, params, as32(x_start), labels, as32(known), as32(mask))

  def invert(self, params, x0: np.ndarray, labels=None) -> np.ndarray:
    """DDIM inversion of images in [-1, 1] to starting noise x_T (a diffusion model's)."""
    if self.plan.sampler == "consistency":
      raise ConfigError("DDIM inversion (--mode=reconstruct, interpolate_images) needs a "
                        "diffusion model's ODE: a consistency-tuned workdir has none; use its "
                        f"teacher, {self.config.consistency.teacher}")
    return self._per_device(self._p_invert, params, np.asarray(x0, np.float32), labels)

  def grid(self, params, num: int = 16, seed: int = 0, labels=None) -> np.ndarray:
    """A uint8 grid of ``num`` samples, drawn by every process (each its slice)."""
    x, _ = generate(self.config, self, params, num, seed=seed, show_progress=False,
                    labels=labels)
    return images.make_grid(images.to_uint8(x))


def parse_labels(spec, names: tuple, num: int) -> np.ndarray:
  """``sampling.labels`` -> a label per sample: "all" (each class in turn), a class name or
  index, or a comma-separated list of them, cycled over the ``num`` samples."""
  text = str(spec if spec is not None else "all").strip()
  if text == "all":
    wanted = list(range(len(names)))
  else:
    wanted = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
      if item in names:
        wanted.append(names.index(item))
      elif item.isdigit() and int(item) < len(names):
        wanted.append(int(item))
      else:
        raise ConfigError(f"sampling.labels: {item!r} is not a class of this model; its "
                          f"classes are {', '.join(names)} (or 0-{len(names) - 1}, or all)")
  return np.resize(np.asarray(wanted, np.int32), num)


def generate(config, sampler: Sampler, params, num: int, first_sampler: Sampler | None = None,
             desc: str = "sampling", labels=None, seed: int | None = None,
             show_progress: bool = True):
  """``num`` samples in [-1, 1], in global batches of ``sampling.batch_size``: each process
  draws its slice of every batch and every process gets all of them.

  ``labels`` (length ``num``) conditions labelled models. ``first_sampler`` (one that
  records frames) draws the first batch; its frames are returned too (None otherwise).
  Sample i's starting noise depends only on (seed, i); see the module docstring for the
  noise of stochastic samplers.
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
