"""Evaluation of a workdir: ``python main.py --mode=eval --workdir DIR``.

For each evaluated checkpoint (``eval.checkpoints``: latest, all, or a list of steps)
it writes ``<workdir>/eval/<step>.json`` (``<step>_<eval.name>.json`` when named),
TensorBoard scalars under ``<workdir>/tensorboard/eval``, and prints a short table.

Held-out likelihood:
  * bits/dim: the variational bound of Ho et al. 2020 (prior KL + KL terms for
    t >= 1 + discretised decoder at t = 0) on 8-bit data, divided by D ln 2. With
    ``eval.timesteps_per_image = K > 0`` the prior and decoder terms are exact and the
    KL terms of t >= 1 are estimated with one timestep in each of K quadratically
    spaced strata per image (``strata``); each image's estimate is unbiased and the
    standard error is over images (it includes the data's own spread). K = 0 sums all
    T terms exactly.
  * eps-MSE per tenth of the timesteps (``ValidationLoss``, also logged during
    training every ``training.eval_every_steps``).

Sample quality (``eval.num_samples`` > 0 samples with the ``sampling`` settings,
quantised to uint8 as saved images are; ``eval.num_reference`` training images):
  * FID and KID on the FID Inception-v3 when ``eval.inception_weights`` names the
    weights file; otherwise reported as unavailable, never estimated;
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

import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax import diffusion, features, images, input_pipeline, metrics, models
from ddpm_jax import sample as sample_lib
from ddpm_jax.config_lib import ConfigError

_DEFAULTS = {"checkpoints": "latest", "num_examples": 256, "batch_size": 64,
             "timesteps_per_image": 16, "num_samples": 0, "num_reference": 1024, "pr_k": 3,
             "nn_max_train": 50_000, "inception_weights": None, "inception_sha256": "6726825d",
             "name": ""}


def settings(config) -> dict:
  """``config.eval`` with defaults for fields that configs saved by older versions lack."""
  e = config.get("eval", None)
  return {k: (e.get(k, v) if e is not None else v) for k, v in _DEFAULTS.items()}


def strata(T: int, k: int) -> np.ndarray:
  """Boundaries 1 = b_0 < ... < b_m = T of m <= k strata over t = 1..T-1, quadratically
  spaced: narrow strata at small t, where the KL terms are large and change fast."""
  b = np.unique(np.round(1 + (T - 1) * (np.arange(k + 1) / k) ** 2).astype(np.int64))
  return b


def stratified_timesteps(key, n: int, T: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(m, n) int32 timesteps, row j uniform in stratum [b_j, b_{j+1}) of ``strata``, and
  the (m,) stratum widths that weight them (so the weighted sum is unbiased)."""
  b = strata(T, k)
  u = np.asarray(jax.random.uniform(key, (len(b) - 1, n)))
  lo, width = b[:-1, None], np.diff(b)[:, None]
  t = np.minimum(lo + np.floor(u * width), b[1:, None] - 1).astype(np.int32)
  return t, np.diff(b).astype(np.float64)


def make_term_fn(schedule, eps_fn_p):
  """Jitted ``term(params, x0, t, noise)`` -> per-image vlb term; build once, reuse."""
  return jax.jit(lambda p, x, t, z: diffusion.vlb_term(schedule, eps_fn_p(p), x, t, z))


def bound_per_image(schedule, term, params, x0, key, k: int, on_term=None):
  """Per-image variational bound in nats (float64 on the host); ``term`` from make_term_fn.

  k = 0: every t. k > 0: the prior and the decoder term (t = 0) exactly, and the KL
  terms of t = 1..T-1 from k quadratically spaced strata, one t per stratum and image.
  """
  T = schedule.num_timesteps
  n = x0.shape[0]
  total = np.asarray(diffusion.prior_kl(schedule, x0), np.float64)
  if k <= 0:  # exact: every t
    rows, weights = np.repeat(np.arange(T, dtype=np.int32)[:, None], n, 1), np.ones(T)
  else:
    t, w = stratified_timesteps(key, n, T, k)
    rows = np.concatenate([np.zeros((1, n), np.int32), t])
    weights = np.concatenate([[1.0], w])
  for j, (t, w) in enumerate(zip(rows, weights)):
    z = jax.random.normal(jax.random.fold_in(key, j + 1), x0.shape)
    total += w * np.asarray(term(params, x0, jnp.asarray(t), z), np.float64)
    if on_term is not None:
      on_term(1)
  return total


def eps_fn_for(config, model, schedule):
  """``eps_fn_p(params) -> eps_fn(x_t, t)`` whatever the network predicts."""
  def eps_fn_p(p):
    return lambda x, t: diffusion.prediction_to_eps(
        schedule, x, t, model.apply({"params": p}, x, t, train=False),
        config.model.prediction_type)
  return eps_fn_p


class ValidationLoss:
  """Eps-MSE (the training loss) on held-out images, per tenth of the timesteps.

  The images, their timesteps (spread evenly over [0, T)) and the noise are fixed,
  so values at different steps of a run differ only through the parameters. Cheap:
  one forward pass per image.
  """

  def __init__(self, config, model, schedule, source, num_examples: int, batch_size: int):
    self.T = schedule.num_timesteps
    self.batches = [jnp.asarray(x) for x in
                    input_pipeline.eval_batches(source, batch_size, num_examples)]
    n = sum(len(x) for x in self.batches)
    self.t = (np.arange(n) * self.T // max(n, 1)).astype(np.int32)
    key = jax.random.key(12345)
    self.noise = [jax.random.normal(jax.random.fold_in(key, b), x.shape)
                  for b, x in enumerate(self.batches)]
    self._loss = jax.jit(lambda p, x, t, z: diffusion.per_example_loss(
        schedule, lambda xt, tt: model.apply({"params": p}, xt, tt, train=False), x, t, z,
        config.model.prediction_type))

  def __call__(self, params) -> dict:
    losses, start = [], 0
    for x, z in zip(self.batches, self.noise):
      t = jnp.asarray(self.t[start:start + len(x)])
      losses.append(np.asarray(self._loss(params, x, t, z), np.float64))
      start += len(x)
    if not losses:
      return {}
    losses = np.concatenate(losses)
    buckets = self.t * 10 // self.T
    out = {}
    for i in range(10):
      sel = buckets == i
      if sel.any():
        out[f"t{i * self.T // 10}-{(i + 1) * self.T // 10 - 1}"] = float(losses[sel].mean())
    out["all"] = float(losses.mean())
    return out


def checkpoint_steps(workdir: str, which) -> list[int]:
  """The checkpoint steps named by ``eval.checkpoints``: latest, all, or "1000,2000"."""
  from ddpm_jax import checkpoint as ckpt_lib
  mngr = ckpt_lib.make_manager(workdir, read_only=True, async_save=False)
  have = sorted(mngr.all_steps())
  if not have:
    raise sample_lib.NoCheckpointError(
        f"no checkpoint in {ckpt_lib.checkpoint_dir(workdir)!r}: train first with "
        f"`python main.py --config CONFIG --workdir {workdir}`")
  which = str(which or "latest").strip()
  if which == "latest":
    return have[-1:]
  if which == "all":
    return have
  try:
    want = [int(s) for s in which.replace(" ", "").split(",") if s]
  except ValueError:
    raise ConfigError(f"eval.checkpoints={which!r}: use latest, all or steps like "
                      "1000,2000") from None
  missing = [s for s in want if s not in have]
  if missing:
    raise ConfigError(f"eval.checkpoints: no checkpoint at steps {missing}; have {have}")
  return want


def _load_uint8(source, n: int, batch_size: int = 256) -> np.ndarray:
  return np.concatenate([images.to_uint8(x) for x in
                         input_pipeline.eval_batches(source, batch_size, n)])


def _cache_dir(config, workdir) -> str:
  from ddpm_jax import datasets
  d = os.path.join(datasets.data_dir(config), "ddpm_jax_stats")
  try:
    os.makedirs(d, exist_ok=True)
    if os.access(d, os.W_OK):
      return d
  except OSError:
    pass
  d = os.path.join(workdir, "eval", "cache")
  os.makedirs(d, exist_ok=True)
  return d


def reference_features(config, workdir, extractor, ref_u8: np.ndarray) -> np.ndarray:
  """Features of the reference images, cached per data set, split, N and extractor."""
  d = config.data
  ident = json.dumps({"dataset": d.dataset, "folder": d.get("folder"),
                      "manual_dir": d.get("manual_dir"), "size": d.image_size,
                      "split": d.train_split, "n": len(ref_u8), "extractor": extractor.fingerprint,
                      "pixels": hashlib.sha1(ref_u8.tobytes()).hexdigest()}, sort_keys=True)
  key = hashlib.sha1(ident.encode()).hexdigest()[:16]
  path = os.path.join(_cache_dir(config, workdir), f"{extractor.name}_{len(ref_u8)}_{key}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["features"]
  feats = extractor(ref_u8)
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=feats, ident=ident)
    os.replace(tmp, path)
  return feats


def sample_metrics(config, workdir, samples_u8, ctx) -> dict:
  """Precision/recall, KID, Frechet distances, colour and memorisation for uint8 samples."""
  ev = ctx["settings"]
  report = {"num_samples": int(len(samples_u8)), "num_reference": int(len(ctx["ref_u8"]))}
  for ext in ctx["extractors"]:
    ref = ctx["ref_feats"][ext.name]
    fake = ext(samples_u8)
    mu1, s1 = metrics.gaussian_stats(ref)
    mu2, s2 = metrics.gaussian_stats(fake)
    fd = metrics.frechet_distance(mu1, s1, mu2, s2)
    # Subsets of half the smaller set (at most 1000): with subsets as large as the sets
    # every subset would be the same and the spread would say nothing.
    kid_mean, kid_std = metrics.kid(ref, fake, subset_size=min(1000, min(len(ref), len(fake)) // 2))
    pr = metrics.precision_recall(ref, fake, k=ev["pr_k"])
    if ext.name == "inception":
      report.update(fid=fd, kid=kid_mean, kid_std=kid_std, precision_inception=pr["precision"],
                    recall_inception=pr["recall"])
    else:
      report.update({f"precision_{ext.name}": pr["precision"], f"recall_{ext.name}": pr["recall"],
                     f"kid_{ext.name}": kid_mean, f"kid_{ext.name}_std": kid_std,
                     f"fd_{ext.name}": fd})
  if "fid" not in report:
    report["fid"] = report["kid"] = ctx["fid_unavailable"]
  report["colour"] = metrics.colour_stats(samples_u8, ctx["ref_u8"])
  report["colour_w1_mean"] = float(np.mean([c["w1"] for c in report["colour"].values()]))
  dist, idx = metrics.nearest_neighbours(samples_u8, ctx["train_u8"])
  base = ctx["heldout_nn"]
  report["memorisation"] = {
      "train_images_searched": int(len(ctx["train_u8"])),
      "sample_nn_rms_median": float(np.median(dist)),
      "heldout_nn_rms_median": float(np.median(base)),
      "ratio_median": float(np.median(dist) / np.median(base)),
      "frac_samples_closer_than_1pct_heldout": float((dist < np.percentile(base, 1)).mean()),
  }
  report["_nearest"] = (dist, idx)
  return report


def _save_nearest(path, samples_u8, train_u8, dist, idx, n: int = 8):
  """The n samples closest to a training image (top row) above those images."""
  order = np.argsort(dist)[:n]
  grid = images.make_grid(np.concatenate([samples_u8[order], train_u8[idx[order]]]), ncols=n)
  images.save_png(path, grid, scale=max(1, 64 // samples_u8.shape[1]))


def _flat_scalars(report: dict) -> dict:
  out = {"eval/bits_per_dim": report["bits_per_dim"]}
  for k, v in report["val_loss_per_t_bucket"].items():
    out[f"eval/val_loss_{k}"] = v
  for k, v in report.items():
    if isinstance(v, float) and k not in ("bits_per_dim", "bits_per_dim_stderr"):
      out[f"eval/{k}"] = v
  for k, v in report.get("memorisation", {}).items():
    if isinstance(v, float):
      out[f"eval/memorisation_{k}"] = v
  return out


def _print_table(r: dict) -> None:
  print(f"step {r['step']}: {r['bits_per_dim']:.3f} +- {r['bits_per_dim_stderr'] or 0:.3f} "
        f"bits/dim on {r['num_images']} {r['split']} images ({r['bound']})")
  for name, v in r["val_loss_per_t_bucket"].items():
    print(f"  eps-MSE {name:>10s}: {v:.4f}")
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


def evaluate(config, workdir: str) -> list[dict]:
  """Evaluates the checkpoints ``eval.checkpoints`` names; returns their reports."""
  from tqdm import tqdm

  from ddpm_jax import run_utils
  ev = settings(config)
  workdir = os.path.abspath(workdir)
  steps = checkpoint_steps(workdir, ev["checkpoints"])
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  eps_fn_p = eps_fn_for(config, model, schedule)
  T = schedule.num_timesteps
  k = int(ev["timesteps_per_image"])
  source = input_pipeline.get_source(config, config.data.eval_split)
  val_loss = ValidationLoss(config, model, schedule, source, ev["num_examples"], ev["batch_size"])
  term = make_term_fn(schedule, eps_fn_p)
  is_main = jax.process_index() == 0

  ctx = None
  if ev["num_samples"] > 0:
    ctx = {"settings": ev, "extractors": [features.random_conv()],
           "fid_unavailable": "unavailable: set eval.inception_weights to the path of "
                              "pt_inception-2015-12-05-6726825d.pth"}
    if ev["inception_weights"]:
      ctx["extractors"].append(features.inception(ev["inception_weights"],
                                                  ev["inception_sha256"]))
    train_src = input_pipeline.get_source(config, config.data.train_split)
    ctx["train_u8"] = _load_uint8(train_src, ev["nn_max_train"])
    ctx["ref_u8"] = ctx["train_u8"][:ev["num_reference"]]
    ctx["ref_feats"] = {e.name: reference_features(config, workdir, e, ctx["ref_u8"])
                        for e in ctx["extractors"]}
    heldout = _load_uint8(source, ev["num_examples"])
    ctx["heldout_nn"] = metrics.nearest_neighbours(heldout, ctx["train_u8"])[0]
    sampler = sample_lib.Sampler(config, model, schedule)

  writer = run_utils.MetricWriter(workdir, enabled=is_main, name="eval")
  reports = []
  try:
    for step in steps:
      params, _ = sample_lib.load_params(config, workdir, step)
      key = jax.random.key(config.sampling.seed)
      bounds = []
      # The held-out batches ValidationLoss already holds; progress counts network calls.
      terms = T if k <= 0 else len(strata(T, k))
      with tqdm(total=len(val_loss.batches) * terms, desc=f"bits/dim @{step}", unit="call",
                disable=not is_main) as bar:
        for b, x0 in enumerate(val_loss.batches):
          bounds.append(bound_per_image(schedule, term, params, x0, jax.random.fold_in(key, b),
                                        k, on_term=bar.update))
      nats = np.concatenate(bounds)
      dims = config.data.image_size ** 2 * config.data.num_channels
      bpd = nats / (dims * math.log(2))
      report = {
          "step": int(step), "num_images": int(len(bpd)), "split": config.data.eval_split,
          "bits_per_dim": float(bpd.mean()),
          "bits_per_dim_stderr": float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1
          else None,
          "bound": ("exact over all T" if k <= 0 else
                    f"prior and decoder exact, KL terms from {k} stratified timesteps per image"),
          "val_loss_per_t_bucket": {n: v for n, v in val_loss(params).items() if n != "all"},
          "params": "ema" if config.sampling.use_ema else "raw",
      }
      if ctx is None:
        report["fid"] = report["kid"] = "not computed: eval.num_samples is 0"
      else:
        s = config.sampling
        report["sampler"] = (f"{s.sampler}, {s.num_steps} steps, eta {s.eta}, "
                             f"seed {s.seed}" if s.sampler != "ddpm" else f"ddpm, {T} steps")
        samples_u8 = images.to_uint8(sample_lib.generate(
            config, sampler, params, ev["num_samples"], desc="eval samples")[0])
        report.update(sample_metrics(config, workdir, samples_u8, ctx))
        dist, idx = report.pop("_nearest")
      if is_main:
        out_dir = os.path.join(workdir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"{step}_{ev['name']}" if ev["name"] else f"{step}")
        if ctx is not None:
          _save_nearest(f"{stem}_nearest.png", samples_u8, ctx["train_u8"], dist, idx)
          images.save_png(f"{stem}_samples.png", images.make_grid(samples_u8[:64]),
                          scale=max(1, 64 // config.data.image_size))
        with open(f"{stem}.json", "w") as f:
          json.dump(report, f, indent=2)
        if not ev["name"]:  # named evaluations are side studies: kept out of the curves
          writer.scalars(step, _flat_scalars(report))
        _print_table(report)
        logging.info("wrote %s.json", stem)
      reports.append(report)
  finally:
    writer.close()
  return reports
