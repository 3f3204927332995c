"""Generation modes of the CLI: sample (grids, single PNGs, raw arrays, denoising GIFs),
interpolate and reconstruct. Every process runs them; process 0 writes the files into
``<workdir>/samples/<name>/`` (local or ``gs://``).
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from ddpm_jax import config_lib, diffusion, fs, images, input_pipeline, models, parallel, sampling
from ddpm_jax.generate import Sampler, generate, load_params


def default_name(config, step: int) -> str:
  s = config.sampling
  steps = config.diffusion.num_timesteps if s.sampler == "ddpm" else s.num_steps
  eta = f"_eta{s.eta:g}" if s.sampler == "ddim" else ""
  return f"step{step}_{s.sampler}{steps}{eta}_seed{s.seed}"


def sample_and_save(config, workdir: str) -> str:
  """Samples ``sampling.num_samples`` images from the workdir's latest checkpoint.

  Writes into ``<workdir>/samples/<name>/``: grid.png, images/NNNNN.png, samples.npz
  (uint8 images and float32 samples in [-1, 1]), and, with ``sampling.num_frames``,
  denoise.gif (x_t over the trajectory) and denoise_x0.gif (predicted x0).
  Returns the output folder.
  """
  s = config.sampling
  params, model, schedule, out_dir, step = _setup(config, workdir, "")
  gif_sampler = Sampler(config, model, schedule, num_frames=s.num_frames) if s.num_frames else None
  x, frames = generate(config, Sampler(config, model, schedule), params, s.num_samples,
                       first_sampler=gif_sampler)
  if parallel.is_main():
    u8 = images.to_uint8(x)
    scale = images.display_scale(config.data.image_size)
    images.save_png(fs.join(out_dir, "grid.png"), images.make_grid(u8), scale=scale)
    for i, img in enumerate(u8):
      images.save_png(fs.join(out_dir, "images", f"{i:05d}.png"), img)
    fs.save_npz(fs.join(out_dir, "samples.npz"), images=u8, samples=x)
    fs.write_json(fs.join(out_dir, "sampling.json"), settings_report(config, schedule, step))
    if frames is not None:
      n = min(len(u8), 16, frames.shape[2])
      for which, name in ((0, "denoise.gif"), (1, "denoise_x0.gif")):
        seq = [images.make_grid(images.to_uint8(fr[which][:n])) for fr in frames]
        images.save_gif(fs.join(out_dir, name), seq, scale=scale)
    logging.info("wrote %d samples to %s", len(u8), out_dir)
  return out_dir


def _setup(config, workdir, what):
  """Validated config -> (params, model, schedule, output folder of this mode)."""
  config_lib.validate(config, jax.device_count())
  params, step = load_params(config, workdir)
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  name = config.sampling.name or "_".join(filter(None, [what, default_name(config, step)]))
  return params, model, schedule, fs.join(fs.normalize(workdir), "samples", name), step


def settings_report(config, schedule, step: int) -> dict:
  """What produced a folder of samples: checkpoint step, sampler, the timesteps it used."""
  s = config.sampling
  return {"checkpoint_step": int(step), "sampler": s.sampler, "num_steps": int(s.num_steps),
          "spacing": sampling.resolve_spacing(s.sampler, s.spacing), "eta": float(s.eta),
          "clip_x0": bool(s.clip_x0), "seed": int(s.seed), "use_ema": bool(s.use_ema),
          "timesteps": sampling.timesteps_used(s.sampler, schedule, s.num_steps,
                                               s.spacing).tolist()}


def interpolate_and_save(config, workdir: str, num_pairs: int = 4, num_points: int = 9) -> str:
  """Spherical interpolation between pairs of noise seeds, sampled deterministically.

  Writes strip.png (one row per pair, ``num_points`` columns from seed A to seed B)
  and interpolation.gif (the rows moving from A to B and back).
  """
  config.sampling.eta = 0.0
  params, model, schedule, out_dir, _ = _setup(config, workdir, "interpolate")
  sampler = Sampler(config, model, schedule)
  seed = config.sampling.seed
  a = sampler.noise(seed, np.arange(num_pairs))
  b = sampler.noise(seed, np.arange(num_pairs, 2 * num_pairs))
  w = np.linspace(0.0, 1.0, num_points)
  x_T = np.stack([np.asarray(sampling.slerp(a, b, np.full(num_pairs, wi))) for wi in w], 1)
  x = sampler.from_noise(params, x_T.reshape((-1,) + sampler.shape))
  u8 = images.to_uint8(x).reshape((num_pairs, num_points) + sampler.shape)
  scale = images.display_scale(config.data.image_size)
  if parallel.is_main():
    images.save_png(fs.join(out_dir, "strip.png"),
                    images.make_grid(u8.reshape((-1,) + sampler.shape), ncols=num_points),
                    scale=scale)
    frames = [images.make_grid(u8[:, i], ncols=num_pairs) for i in range(num_points)]
    images.save_gif(fs.join(out_dir, "interpolation.gif"), frames + frames[-2:0:-1],
                    duration_ms=150, scale=scale, hold_last_ms=150)
    fs.save_npz(fs.join(out_dir, "interpolation.npz"), images=u8, weights=w)
  return out_dir


def reconstruct_and_save(config, workdir: str) -> str:
  """DDIM-inverts held-out images to x_T and samples them back.

  Uses ``sampling.num_samples`` images of ``data.eval_split``. Writes originals.png,
  reconstructions.png, error.png (|difference|, amplified 4x) and error.json (mean
  squared error and PSNR in [0, 255] units, the number of steps and images).
  """
  config.sampling.eta = 0.0
  config.sampling.sampler = "ddim"
  params, model, schedule, out_dir, _ = _setup(config, workdir, "reconstruct")
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
  if parallel.is_main():
    scale = images.display_scale(config.data.image_size)
    err = np.clip(np.abs(orig_u8.astype(int) - rec_u8) * 4, 0, 255).astype(np.uint8)
    for name, arr in (("originals", orig_u8), ("reconstructions", rec_u8), ("error", err)):
      images.save_png(fs.join(out_dir, f"{name}.png"), images.make_grid(arr), scale=scale)
    fs.write_json(fs.join(out_dir, "error.json"), report)
    logging.info("reconstruction with %d steps: PSNR %.2f dB", report["num_steps"],
                 report["psnr_db"])
  return out_dir
