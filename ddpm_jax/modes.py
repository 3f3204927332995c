"""Generation modes of the CLI. Every process runs them (each samples its slice); process 0
writes the files into ``<workdir>/samples/<name>/`` (local or ``gs://``).

  sample               grids, single PNGs, raw arrays, denoising GIFs (labels + guidance
                       for class-conditional models)
  interpolate          slerp between noise seeds
  reconstruct          DDIM inversion of held-out images and back
  inpaint              fill masked regions of input images (RePaint resampling)
  img2img              SDEdit: noise input images to t = strength * T, denoise
  interpolate_images   DDIM-invert two real images, slerp the latents, decode
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import (
  config_lib,
  datasets,
  diffusion,
  fs,
  generate,
  images,
  input_pipeline,
  models,
  parallel,
  sampling,
  writers,
)
from ddpm_jax.errors import ConfigError, InputError
from ddpm_jax.generate import Sampler

MASKS = ("center", "left", "strokes")


SETTINGS_FILE = "sampling.json"  # in every output folder: what made it (see settings_report)


def default_name(plan: sampling.Plan, step: int, seed: int, conditional: bool) -> str:
  """The output folder's name: the step, the plan's sampler and model calls, eta (DDIM),
  guidance (labelled models) and the seed."""
  eta = f"_eta{plan.eta:g}" if plan.sampler == "ddim" else ""
  guide = f"_w{plan.guidance_scale:g}" if conditional else ""
  return f"step{step}_{plan.sampler}{plan.num_steps}{eta}{guide}_seed{seed}"


def mode_config(config, mode: str, **forced):
  """The config a mode runs with, completed (``config_lib.complete``: a copy, the caller's
  is left alone, with the fields it lacks from ``configs/default.py``, validated) with the
  sampler's canonical name and the ``sampling`` fields the mode needs (``forced``); each
  forced value that differs from the user's is said once."""
  config = config_lib.with_defaults(config)  # the forced values first: complete() checks them
  s = config.sampling
  s.sampler = sampling.canonical_sampler(s.sampler)
  for field, value in forced.items():
    if s[field] != value:
      if parallel.is_main():
        logging.info("--mode=%s uses sampling.%s=%r (the config has %r)", mode, field, value,
                     s[field])
      s[field] = value
  return config_lib.complete(config, jax.device_count(), training=False)


def all_settings(config, step: int, mode: str, **extra) -> dict:
  """Every setting a mode's output depends on: the checkpoint step, the mode, the whole
  ``sampling`` section and the diffusion schedule (plus ``extra``)."""
  out = {"mode": mode, "checkpoint_step": int(step), "sampling": config.sampling.to_dict(),
         "diffusion": config.diffusion.to_dict()}
  if config.distill.round:  # a distilled student
    out["distill"] = config.distill.to_dict()
  return {**out, **extra}


def _setup(config, workdir, what, mode, **extra):
  """A mode's config (``mode_config``) -> (params, model, schedule, output folder of this
  mode, step).

  The folder is ``<workdir>/samples/<name>``, or ``<name>-2``, ... where ``<name>`` holds
  results made with other settings (``writers.unclaimed``)."""
  params, step = ckpt_lib.load_params(config, workdir)
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  name = config.sampling.name or "_".join(filter(None, [what, default_name(
      generate.plan_for(config, schedule), step, config.sampling.seed,
      bool(config.model.num_classes))]))
  base = fs.join(fs.normalize(workdir), "samples", name)
  out_dir = writers.unclaimed(lambda k: base if k == 1 else f"{base}-{k}",
                      lambda d: fs.join(d, SETTINGS_FILE),
                      all_settings(config, step, mode, **extra))
  return params, model, schedule, out_dir, step


def settings_report(config, plan: sampling.Plan, step: int, mode: str, labels=None,
                    names=(), **extra) -> dict:
  """What produced a folder of samples, from the plan that ran (``Plan.report``: sampler,
  spacing, eta, clipping, the number of model calls per sample and the timesteps, DDPM's
  every step), the checkpoint step, seed and parameters, and under "settings" every
  setting (``all_settings``)."""
  s = config.sampling
  report = {"checkpoint_step": int(step), **plan.report(), "seed": int(s.seed),
            "use_ema": bool(s.use_ema)}
  if config.distill.round:
    d = config.distill
    report["distilled"] = {"round": int(d.round), "teacher_steps": int(d.teacher_steps),
                           "student_steps": int(d.teacher_steps) // 2,
                           "teacher": d.round_teacher, "first_teacher": d.teacher,
                           "on_its_grid": plan.distilled}
  if labels is not None:
    report.update(guidance_scale=float(plan.guidance_scale), classes=list(names),
                  labels=[names[i] for i in labels])
  report["settings"] = json.loads(json.dumps(all_settings(config, step, mode, **extra)))
  return report


def _labels(config, model, workdir: str, num: int):
  """(a label per sample, class names) for a class-conditional model; (None, ()) otherwise."""
  if not model.num_classes:
    return None, ()
  names = ckpt_lib.class_names(workdir, model.num_classes)
  return generate.parse_labels(config.sampling.labels, names, num), names


def sample_and_save(config, workdir: str) -> str:
  """Samples ``sampling.num_samples`` images from the workdir's newest checkpoint.

  Writes into ``<workdir>/samples/<name>/``: grid.png, images/NNNNN.png, samples.npz
  (uint8 images, float32 samples in [-1, 1], labels of a class-conditional model),
  sampling.json, and, with ``sampling.num_frames``, denoise.gif (x_t over the
  trajectory) and denoise_x0.gif (predicted x0). Returns the output folder.
  """
  config = mode_config(config, "sample")
  s = config.sampling
  params, model, schedule, out_dir, step = _setup(config, workdir, "", "sample")
  labels, names = _labels(config, model, workdir, s.num_samples)
  sampler = Sampler(config, model, schedule)
  gif_sampler = (Sampler(config, model, schedule, generate.plan_for(config, schedule,
                                                                    frames=True))
                 if s.num_frames else None)
  x, frames = generate.generate(config, sampler, params, s.num_samples, first_sampler=gif_sampler,
                                labels=labels)
  if parallel.is_main():
    u8 = images.to_uint8(x)
    scale = images.display_scale(config.data.image_size)
    ncols = None
    if labels is not None and str(s.labels).strip() == "all":  # column j: class j mod C
      ncols = len(names) * max(1, round(8 / len(names)))
    images.save_png(fs.join(out_dir, "grid.png"), images.make_grid(u8, ncols), scale=scale)
    for i, img in enumerate(u8):
      images.save_png(fs.join(out_dir, "images", f"{i:05d}.png"), img)
    extra = {} if labels is None else {"labels": labels}
    fs.save_npz(fs.join(out_dir, "samples.npz"), images=u8, samples=x, **extra)
    fs.write_json(fs.join(out_dir, SETTINGS_FILE),
                  settings_report(config, sampler.plan, step, "sample", labels, names))
    if frames is not None:
      n = min(len(u8), 16, frames.shape[2])
      for which, name in ((0, "denoise.gif"), (1, "denoise_x0.gif")):
        seq = [images.make_grid(images.to_uint8(fr[which][:n])) for fr in frames]
        images.save_gif(fs.join(out_dir, name), seq, scale=scale)
    logging.info("wrote %d samples to %s", len(u8), out_dir)
  return out_dir


def _save_strips(out_dir, u8, num_rows: int, num_points: int, scale: int, **arrays) -> None:
  """strip.png (a row per pair, ``num_points`` columns) and interpolation.gif."""
  shape = u8.shape[-3:]
  u8 = u8.reshape((num_rows, num_points) + shape)
  images.save_png(fs.join(out_dir, "strip.png"),
                  images.make_grid(u8.reshape((-1,) + shape), ncols=num_points), scale=scale)
  frames = [images.make_grid(u8[:, i], ncols=num_rows) for i in range(num_points)]
  images.save_gif(fs.join(out_dir, "interpolation.gif"), frames + frames[-2:0:-1],
                  duration_ms=150, scale=scale, hold_last_ms=150)
  fs.save_npz(fs.join(out_dir, "interpolation.npz"), images=u8, **arrays)


def _slerp_path(a, b, num_points: int) -> tuple[np.ndarray, np.ndarray]:
  """(num_pairs * num_points, ...) latents from each a[i] to b[i], and the weights."""
  w = np.linspace(0.0, 1.0, num_points)
  path = np.stack([np.asarray(sampling.slerp(a, b, np.full(len(a), wi))) for wi in w], 1)
  return path.reshape((-1,) + a.shape[1:]), w


def interpolate_and_save(config, workdir: str, num_pairs: int = 4, num_points: int = 9) -> str:
  """Spherical interpolation between pairs of noise seeds, sampled deterministically.

  Writes strip.png (one row per pair, ``num_points`` columns from seed A to seed B)
  and interpolation.gif (the rows moving from A to B and back).
  """
  config = mode_config(config, "interpolate", eta=0.0)
  extra = dict(num_pairs=num_pairs, num_points=num_points)
  params, model, schedule, out_dir, step = _setup(config, workdir, "interpolate", "interpolate",
                                                  **extra)
  sampler = Sampler(config, model, schedule)
  seed = config.sampling.seed
  a = sampler.noise(seed, np.arange(num_pairs))
  b = sampler.noise(seed, np.arange(num_pairs, 2 * num_pairs))
  x_T, w = _slerp_path(a, b, num_points)
  labels, _ = _labels(config, model, workdir, num_pairs)
  x = sampler.run(params, x_T, labels=None if labels is None else
                         np.repeat(labels, num_points))
  if parallel.is_main():
    _save_strips(out_dir, images.to_uint8(x), num_pairs, num_points,
                 images.display_scale(config.data.image_size), weights=w)
    fs.write_json(fs.join(out_dir, SETTINGS_FILE),
                  settings_report(config, sampler.plan, step, "interpolate", **extra))
  return out_dir


def reconstruct_and_save(config, workdir: str) -> str:
  """DDIM-inverts held-out images to x_T and samples them back.

  Uses ``sampling.num_samples`` images of ``data.eval_split``. Writes originals.png,
  reconstructions.png, error.png (|difference|, amplified 4x) and error.json (mean
  squared error and PSNR in [0, 255] units, the number of steps and images).
  """
  config = mode_config(config, "reconstruct", eta=0.0, sampler="ddim")
  params, model, schedule, out_dir, step = _setup(config, workdir, "reconstruct", "reconstruct")
  source = datasets.get_source(config, config.data.eval_split)
  x0 = np.concatenate(list(input_pipeline.eval_batches(source, 64, config.sampling.num_samples)))
  sampler = Sampler(config, model, schedule)
  x_T = sampler.invert(params, x0)
  rec = sampler.run(params, x_T)
  orig_u8, rec_u8 = images.to_uint8(x0), images.to_uint8(rec)
  mse = float(np.mean((orig_u8.astype(np.float64) - rec_u8) ** 2))
  report = {"num_steps": sampler.plan.num_steps, "num_images": len(x0),
            "mse_uint8": mse, "psnr_db": float(10 * np.log10(255.0**2 / max(mse, 1e-10))),
            "x_T_std": float(x_T.std())}
  if parallel.is_main():
    scale = images.display_scale(config.data.image_size)
    err = np.clip(np.abs(orig_u8.astype(int) - rec_u8) * 4, 0, 255).astype(np.uint8)
    for name, arr in (("originals", orig_u8), ("reconstructions", rec_u8), ("error", err)):
      images.save_png(fs.join(out_dir, f"{name}.png"), images.make_grid(arr), scale=scale)
    fs.write_json(fs.join(out_dir, "error.json"), report)
    fs.write_json(fs.join(out_dir, SETTINGS_FILE),
                  settings_report(config, sampler.plan, step, "reconstruct"))
    logging.info("reconstruction with %d steps: PSNR %.2f dB", report["num_steps"],
                 report["psnr_db"])
  return out_dir


# ----------------------------------------------------------------------- inputs and masks

def input_files(spec) -> list[str]:
  """``sampling.inputs``: a folder (searched recursively) or comma-separated image files."""
  if not spec:
    raise InputError("this mode needs input images: --config.sampling.inputs=FOLDER or "
                     "--config.sampling.inputs=a.png,b.jpg")
  items = [x.strip() for x in str(spec).split(",") if x.strip()]
  if len(items) == 1 and fs.is_dir(items[0]):  # a folder, local or gs://
    files = [f for f in fs.walk_files(items[0]) if f.lower().endswith(images.EXTENSIONS)]
    if not files:
      raise InputError(f"sampling.inputs: no image files ({', '.join(images.EXTENSIONS)}) "
                       f"under {items[0]!r}")
    return files
  for f in items:
    if not fs.exists(f):
      raise InputError(f"sampling.inputs: {f!r} does not exist")
  return items


def load_inputs(files: list[str], size: int) -> np.ndarray:
  """uint8 (N, size, size, 3), decoded and resized like training data."""
  out = []
  for f in files:
    try:
      out.append(images.load_rgb(f, size))
    except Exception as e:  # noqa: BLE001  (corrupt, truncated, not an image)
      raise InputError(f"sampling.inputs: cannot read {f!r} as an image "
                       f"({type(e).__name__}: {str(e)[:80]})") from None
  return np.stack(out)


def builtin_mask(kind: str, size: int, seed: int) -> np.ndarray:
  """(size, size) float 0/1, 1 = known pixel: "center" hides the centre square (half the
  side), "left" the left half, "strokes" four random thick strokes."""
  m = np.ones((size, size), np.float32)
  if kind == "center":
    q = size // 4
    m[q:size - q, q:size - q] = 0
  elif kind == "left":
    m[:, :size // 2] = 0
  elif kind == "strokes":
    rng = np.random.default_rng([seed, 20261126])
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
      pts = [tuple(rng.uniform(0, size, 2)) for _ in range(3)]
      draw.line(pts, fill=0, width=max(1, size // 10))
    m = (np.asarray(img) >= 128).astype(np.float32)
  else:
    raise ConfigError(f"sampling.mask={kind!r}: use one of {MASKS}, or sampling.mask_dir")
  return m


def load_masks(config, files: list[str]) -> np.ndarray:
  """(N, S, S, 1) 0/1 masks, 1 = keep: a file per input in ``sampling.mask_dir`` (same file
  name, any image format, white = keep) or the built-in ``sampling.mask``."""
  s, size = config.sampling, config.data.image_size
  if not s.mask_dir:
    return np.stack([builtin_mask(s.mask, size, s.seed + i) for i in range(len(files))])[..., None]
  masks = []
  for f in files:
    stem = os.path.splitext(os.path.basename(f))[0]
    cands = [n for n in fs.listdir(s.mask_dir) if os.path.splitext(n)[0] == stem]
    if not cands:
      raise InputError(f"sampling.mask_dir: no mask named {stem}.* for input {f!r} in "
                       f"{s.mask_dir!r}")
    try:
      grey = images.load_grey(fs.join(s.mask_dir, cands[0]), size)  # bombs refused there
    except Exception as e:  # noqa: BLE001
      raise InputError(f"sampling.mask_dir: cannot read {cands[0]!r} as an image ({e})") from None
    masks.append((grey >= 128).astype(np.float32))
  return np.stack(masks)[..., None]


def _batched(fn, n: int, batch: int):
  """Concatenated fn(start, stop) over [0, n) in batches."""
  return np.concatenate([fn(i, min(i + batch, n)) for i in range(0, n, batch)])


def inpaint_and_save(config, workdir: str) -> str:
  """Fills the unknown region of each input image (``sampling.inputs``) given its mask.

  Known pixels are re-noised to every step's level and the rest is denoised with
  ``sampling.resample_steps`` RePaint jumps; at the end the known pixels are exactly the
  input's. Writes originals.png, masked.png (unknown region grey), results.png,
  grid.png (a row each: original, masked, result), images/NNNNN.png and inpaint.npz.
  """
  config = mode_config(config, "inpaint")
  s = config.sampling
  sampling.check_resampling(s.sampler, s.resample_steps)
  files = input_files(s.inputs)
  params, model, schedule, out_dir, step = _setup(config, workdir, "inpaint", "inpaint")
  orig = load_inputs(files, config.data.image_size)
  mask = np.broadcast_to(load_masks(config, files), orig.shape[:3] + (1,)).astype(np.float32)
  labels, names = _labels(config, model, workdir, len(orig))
  sampler = Sampler(config, model, schedule, generate.plan_for(config, schedule, inpaint=True))
  x_T = np.asarray(sampler.noise(s.seed, np.arange(len(orig))))
  known = images.to_float(orig)
  mask_c = np.broadcast_to(mask, orig.shape)
  result = _batched(lambda a, b: sampler.run(params, x_T[a:b], a, None if labels is None else
                                             labels[a:b], known[a:b], mask_c[a:b]),
                    len(orig), s.batch_size)
  if parallel.is_main():
    res_u8 = images.to_uint8(result)
    masked = np.where(mask_c > 0.5, orig, 128).astype(np.uint8)
    scale = images.display_scale(config.data.image_size)
    for name, arr in (("originals", orig), ("masked", masked), ("results", res_u8)):
      images.save_png(fs.join(out_dir, f"{name}.png"), images.make_grid(arr), scale=scale)
    rows = np.concatenate([orig, masked, res_u8])
    images.save_png(fs.join(out_dir, "grid.png"), images.make_grid(rows, ncols=len(orig)),
                    scale=scale)
    for i, img in enumerate(res_u8):
      images.save_png(fs.join(out_dir, "images", f"{i:05d}.png"), img)
    extra = {} if labels is None else {"labels": labels}
    fs.save_npz(fs.join(out_dir, "inpaint.npz"), originals=orig, masks=mask[..., 0] > 0.5,
                results=res_u8, samples=result, **extra)
    report = settings_report(config, sampler.plan, step, "inpaint", labels, names)
    report.update(inputs=files, mask=s.mask_dir or s.mask,
                  resample_steps=sampler.plan.resample_steps)
    fs.write_json(fs.join(out_dir, SETTINGS_FILE), report)
    logging.info("inpainted %d images into %s", len(orig), out_dir)
  return out_dir


def t_start_of(strength: float, num_timesteps: int) -> int:
  """The timestep img2img starts from: t = strength * T (in [0, T-1])."""
  return int(min(num_timesteps - 1, max(0, round(strength * num_timesteps) - 1)))


def img2img_and_save(config, workdir: str) -> str:
  """SDEdit (Meng et al. 2022): each input is noised to t = ``sampling.strength`` * T with
  ``q_sample`` and denoised from there with the configured sampler (its steps spread
  over [0, t]). Strength 1 is sampling from noise; small strengths stay close to the
  input. Writes inputs.png, results.png, strip.png (input above result) and img2img.npz.
  """
  config = mode_config(config, "img2img")
  s = config.sampling
  files = input_files(s.inputs)
  params, model, schedule, out_dir, step = _setup(config, workdir, f"img2img{s.strength:g}",
                                                  "img2img")
  orig = load_inputs(files, config.data.image_size)
  labels, names = _labels(config, model, workdir, len(orig))
  t = generate.snap_to_grid(config, schedule.num_timesteps,
                            t_start_of(s.strength, schedule.num_timesteps))
  sampler = Sampler(config, model, schedule, generate.plan_for(config, schedule, t_start=t))
  noise = np.asarray(sampler.noise(s.seed, np.arange(len(orig))))
  x_t = np.asarray(diffusion.q_sample(schedule, images.to_float(orig),
                                      np.full(len(orig), t, np.int32), noise))
  result = _batched(lambda a, b: sampler.run(params, x_t[a:b], a, None if labels is None else
                                             labels[a:b]), len(orig), s.batch_size)
  if parallel.is_main():
    res_u8 = images.to_uint8(result)
    scale = images.display_scale(config.data.image_size)
    images.save_png(fs.join(out_dir, "inputs.png"), images.make_grid(orig), scale=scale)
    images.save_png(fs.join(out_dir, "results.png"), images.make_grid(res_u8), scale=scale)
    images.save_png(fs.join(out_dir, "strip.png"),
                    images.make_grid(np.concatenate([orig, res_u8]), ncols=len(orig)),
                    scale=scale)
    extra = {} if labels is None else {"labels": labels}
    fs.save_npz(fs.join(out_dir, "img2img.npz"), inputs=orig, results=res_u8, samples=result,
                **extra)
    report = settings_report(config, sampler.plan, step, "img2img", labels, names)
    report.update(inputs=files, strength=float(s.strength), t_start=t)
    fs.write_json(fs.join(out_dir, SETTINGS_FILE), report)
    logging.info("img2img of %d images (t = %d) into %s", len(orig), t, out_dir)
  return out_dir


def interpolate_images_and_save(config, workdir: str, num_points: int = 9) -> str:
  """Interpolation between real images: inputs (``sampling.inputs``) are taken in pairs,
  DDIM-inverted to noise, the noises slerped, and each point decoded with deterministic
  DDIM. Writes strip.png (a row per pair), interpolation.gif and interpolation.npz."""
  config = mode_config(config, "interpolate_images", eta=0.0, sampler="ddim")
  files = input_files(config.sampling.inputs)
  if len(files) < 2:
    raise InputError("interpolate_images needs at least two input images (taken in pairs)")
  if len(files) % 2:
    logging.warning("an odd number of inputs: %s is not used", files[-1])
    files = files[:-1]
  params, model, schedule, out_dir, step = _setup(config, workdir, "interpolate_images",
                                                  "interpolate_images", num_points=num_points)
  orig = load_inputs(files, config.data.image_size)
  labels, _ = _labels(config, model, workdir, len(orig))
  sampler = Sampler(config, model, schedule)
  x_T = sampler.invert(params, images.to_float(orig), labels)
  path, w = _slerp_path(x_T[0::2], x_T[1::2], num_points)
  x = sampler.run(params, path, labels=None if labels is None else
                         np.repeat(labels[0::2], num_points))
  if parallel.is_main():
    _save_strips(out_dir, images.to_uint8(x), len(files) // 2, num_points,
                 images.display_scale(config.data.image_size), weights=w, inputs=orig)
    report = settings_report(config, sampler.plan, step, "interpolate_images",
                             num_points=num_points)
    report.update(inputs=files)
    fs.write_json(fs.join(out_dir, SETTINGS_FILE), report)
  return out_dir


MODES = {"sample": sample_and_save, "interpolate": interpolate_and_save,
         "reconstruct": reconstruct_and_save, "inpaint": inpaint_and_save,
         "img2img": img2img_and_save, "interpolate_images": interpolate_images_and_save}
