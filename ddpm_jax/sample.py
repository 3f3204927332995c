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

    def invert_fn(params, x0):
      eps_fn = sampling.model_eps_fn(apply, params, schedule, config.model.prediction_type)
      return sampling.ddim_invert(eps_fn, schedule, x0, num_steps=s.num_steps,
                                  spacing="uniform" if s.spacing == "auto" else s.spacing)

    self._p_sample = parallel.pmap(sample_fn, in_axes=(0, 0, None))
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

  def _per_device(self, fn, params, x):
    """Runs a pmapped ``fn(params, x_dev)`` over a host batch, padded to the device count."""
    n_dev, n = jax.local_device_count(), len(x)
    pad = -n % n_dev
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    out = fn(self._params(params), x.reshape((n_dev, -1) + x.shape[1:]))
    return np.asarray(jax.device_get(out)).reshape((-1,) + x.shape[1:])[:n]

  def from_noise(self, params, x_T: np.ndarray, batch_key: int = 0) -> np.ndarray:
    """Samples from given starting noise (N, H, W, C); frames are not recorded."""
    key = jax.random.fold_in(jax.random.key(self.config.sampling.seed + 1), batch_key)
    fn = lambda p, x: self._p_sample(p, x, key)  # noqa: E731
    return self._per_device(lambda p, x: fn(p, x)[0] if self.num_frames else fn(p, x),
                            params, np.asarray(x_T, np.float32))

  def invert(self, params, x0: np.ndarray) -> np.ndarray:
    """DDIM inversion of images in [-1, 1] to starting noise x_T."""
    return self._per_device(self._p_invert, params, np.asarray(x0, np.float32))

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


def generate(config, sampler: Sampler, params, num: int, first_sampler: Sampler | None = None,
             desc: str = "sampling"):
  """``num`` samples in [-1, 1] with ``sampling.seed``, in global batches of
  ``sampling.batch_size``: each process draws its slice, every process gets all.

  ``first_sampler`` (one that records frames) draws the first batch; its frames are
  returned too (None otherwise). Sample i depends only on (seed, i).
  """
  s = config.sampling
  n_dev, n_proc = jax.local_device_count(), jax.process_count()
  local_batch = parallel.check_batch_size(s.batch_size, "sampling.batch_size") * n_dev
  from tqdm import tqdm
  samples, frames = [], None
  for b in tqdm(range(-(-num // s.batch_size)), desc=desc, unit="batch",
                disable=jax.process_index() != 0):
    start = b * s.batch_size + jax.process_index() * local_batch
    idx = np.arange(start, start + local_batch)
    use = first_sampler if (b == 0 and first_sampler is not None) else sampler
    x, f = use(params, idx, s.seed, b)
    if f is not None:
      frames = f
    if n_proc > 1:
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x).reshape((-1,) + x.shape[1:])
    samples.append(x)
  return np.concatenate(samples)[:num], frames


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
  gif_sampler = Sampler(config, model, schedule, num_frames=s.num_frames) if s.num_frames else None
  x, frames = generate(config, Sampler(config, model, schedule), params, s.num_samples,
                       first_sampler=gif_sampler)
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


def _setup(config, workdir, what):
  from ddpm_jax import config_lib
  config_lib.validate(config, jax.device_count())
  params, step = load_params(config, workdir)
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  name = config.sampling.name or f"{what}_{default_name(config, step)}"
  out_dir = os.path.join(os.path.abspath(workdir), "samples", name)
  os.makedirs(out_dir, exist_ok=True)
  return params, model, schedule, out_dir


def interpolate_and_save(config, workdir: str, num_pairs: int = 4, num_points: int = 9) -> str:
  """Spherical interpolation between pairs of noise seeds, sampled deterministically.

  Writes strip.png (one row per pair, ``num_points`` columns from seed A to seed B)
  and interpolation.gif (the rows moving from A to B and back).
  """
  config.sampling.eta = 0.0
  params, model, schedule, out_dir = _setup(config, workdir, "interpolate")
  sampler = Sampler(config, model, schedule)
  seed = config.sampling.seed
  a = sampler.noise(seed, np.arange(num_pairs))
  b = sampler.noise(seed, np.arange(num_pairs, 2 * num_pairs))
  w = np.linspace(0.0, 1.0, num_points)
  x_T = np.stack([np.asarray(sampling.slerp(a, b, np.full(num_pairs, wi))) for wi in w], 1)
  x = sampler.from_noise(params, x_T.reshape((-1,) + sampler.shape))
  u8 = images.to_uint8(x).reshape((num_pairs, num_points) + sampler.shape)
  scale = max(1, 128 // config.data.image_size)
  if jax.process_index() == 0:
    images.save_png(os.path.join(out_dir, "strip.png"),
                    images.make_grid(u8.reshape((-1,) + sampler.shape), ncols=num_points),
                    scale=scale)
    frames = [images.make_grid(u8[:, i], ncols=num_pairs) for i in range(num_points)]
    images.save_gif(os.path.join(out_dir, "interpolation.gif"), frames + frames[-2:0:-1],
                    duration_ms=150, scale=scale, hold_last_ms=150)
    np.savez_compressed(os.path.join(out_dir, "interpolation.npz"), images=u8, weights=w)
  return out_dir


def reconstruct_and_save(config, workdir: str) -> str:
  """DDIM-inverts held-out images to x_T and samples them back.

  Uses ``sampling.num_samples`` images of ``data.eval_split``. Writes originals.png,
  reconstructions.png, error.png (|difference|, amplified 4x) and error.json (mean
  squared error and PSNR in [0, 255] units, the number of steps and images).
  """
  import json

  from ddpm_jax import input_pipeline
  config.sampling.eta = 0.0
  config.sampling.sampler = "ddim"
  params, model, schedule, out_dir = _setup(config, workdir, "reconstruct")
  source = input_pipeline.get_source(config, config.data.eval_split)
  x0 = np.concatenate(list(input_pipeline.eval_batches(source, 64, config.sampling.num_samples)))
  sampler = Sampler(config, model, schedule)
  x_T = sampler.invert(params, x0)
  rec = sampler.from_noise(params, x_T)
  orig_u8, rec_u8 = images.to_uint8(x0), images.to_uint8(rec)
  mse = float(np.mean((orig_u8.astype(np.float64) - rec_u8) ** 2))
  report = {"num_steps": config.sampling.num_steps, "num_images": len(x0),
            "mse_uint8": mse, "psnr_db": float(10 * np.log10(255.0**2 / max(mse, 1e-10))),
            "x_T_std": float(x_T.std())}
  if jax.process_index() == 0:
    scale = max(1, 128 // config.data.image_size)
    err = np.clip(np.abs(orig_u8.astype(int) - rec_u8) * 4, 0, 255).astype(np.uint8)
    for name, arr in (("originals", orig_u8), ("reconstructions", rec_u8), ("error", err)):
      images.save_png(os.path.join(out_dir, f"{name}.png"), images.make_grid(arr), scale=scale)
    with open(os.path.join(out_dir, "error.json"), "w") as f:
      json.dump(report, f, indent=2)
    logging.info("reconstruction with %d steps: PSNR %.2f dB", report["num_steps"],
                 report["psnr_db"])
  return out_dir
