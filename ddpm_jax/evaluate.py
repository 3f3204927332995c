"""Evaluation of a workdir: bits/dim on held-out data and per-timestep validation loss.

Bits per dimension is the variational bound of Ho et al. 2020 (prior KL + KL terms for
t >= 1 + discretised decoder at t = 0) on 8-bit data, divided by D ln 2. With
``eval.timesteps_per_image = K > 0`` it is estimated with K stratified timesteps per
image (stratum k covers [k T/K, (k+1) T/K)); each image's estimate is unbiased and the
reported standard error is over images (it includes the data's own spread). K = 0
sums all T terms exactly. FID/KID need the Inception weights file, which is not
supported yet: they are reported as unavailable, never estimated.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax import diffusion, input_pipeline, models
from ddpm_jax import sample as sample_lib


def _eval_settings(config):
  e = config.get("eval", {})
  return (int(e.get("num_examples", 256)), int(e.get("batch_size", 64)),
          int(e.get("timesteps_per_image", 16)))


def stratified_timesteps(key, n: int, T: int, k: int) -> np.ndarray:
  """(k, n) int32 timesteps: row j uniform in [j T/k, (j+1) T/k)."""
  u = np.asarray(jax.random.uniform(key, (k, n)))
  lo = np.arange(k)[:, None] * T / k
  return np.minimum(np.floor(lo + u * T / k), T - 1).astype(np.int32)


def make_term_fn(schedule, eps_fn_p):
  """Jitted ``term(params, x0, t, noise)`` -> per-image vlb term; build once, reuse."""
  return jax.jit(lambda p, x, t, z: diffusion.vlb_term(schedule, eps_fn_p(p), x, t, z))


def bound_per_image(schedule, term, params, x0, key, k: int):
  """Per-image variational bound in nats (float64 on the host); ``term`` from make_term_fn."""
  T = schedule.num_timesteps
  n = x0.shape[0]
  total = np.asarray(diffusion.prior_kl(schedule, x0), np.float64)
  if k <= 0:  # exact: every t
    rows, weight = np.repeat(np.arange(T, dtype=np.int32)[:, None], n, 1), 1.0
  else:
    rows, weight = stratified_timesteps(key, n, T, k), T / k
  for j, t in enumerate(rows):
    z = jax.random.normal(jax.random.fold_in(key, j + 1), x0.shape)
    total += weight * np.asarray(term(params, x0, jnp.asarray(t), z), np.float64)
  return total


def evaluate(config, workdir: str) -> dict:
  """Writes ``<workdir>/eval/<step>.json`` and returns the report."""
  num, batch, k = _eval_settings(config)
  params, step = sample_lib.load_params(config, workdir)
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)

  def eps_fn_p(p):
    return lambda x, t: diffusion.prediction_to_eps(
        schedule, x, t, model.apply({"params": p}, x, t, train=False),
        config.model.prediction_type)

  source = input_pipeline.get_source(config, config.data.eval_split)
  key = jax.random.key(config.sampling.seed)
  bounds, mse_sum, mse_cnt = [], np.zeros(10), np.zeros(10)
  loss = jax.jit(lambda p, x, t, z: diffusion.per_example_loss(
      schedule, lambda xt, tt: model.apply({"params": p}, xt, tt, train=False), x, t, z,
      config.model.prediction_type))
  T = schedule.num_timesteps
  term = make_term_fn(schedule, eps_fn_p)
  from tqdm import tqdm
  batches = input_pipeline.eval_batches(source, batch, num)
  total = -(-min(num, len(source)) // batch)
  for b, x0 in enumerate(tqdm(batches, total=total, desc="eval", unit="batch",
                              disable=jax.process_index() != 0)):
    x0 = jnp.asarray(x0)
    bkey = jax.random.fold_in(key, b)
    bounds.append(bound_per_image(schedule, term, params, x0, bkey, k))
    t = jnp.asarray((np.arange(x0.shape[0]) * T // x0.shape[0]).astype(np.int32))  # even spread
    z = jax.random.normal(jax.random.fold_in(key, 10**6 + b), x0.shape)
    losses = np.asarray(loss(params, x0, t, z))
    buckets = np.asarray(t) * 10 // T
    np.add.at(mse_sum, buckets, losses)
    np.add.at(mse_cnt, buckets, 1)
  nats = np.concatenate(bounds)
  dims = config.data.image_size ** 2 * config.data.num_channels
  bpd = nats / (dims * math.log(2))
  report = {
      "step": int(step), "num_images": int(len(bpd)), "split": config.data.eval_split,
      "bits_per_dim": float(bpd.mean()),
      "bits_per_dim_stderr": float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1
      else None,
      "bound": "exact over all T" if k <= 0 else f"{k} stratified timesteps per image",
      "val_loss_per_t_bucket": {f"t{i * T // 10}-{(i + 1) * T // 10 - 1}":
                                float(mse_sum[i] / mse_cnt[i]) for i in range(10) if mse_cnt[i]},
      "fid": "unavailable: no Inception weights support yet", "kid": "unavailable",
  }
  if jax.process_index() == 0:
    out = os.path.join(os.path.abspath(workdir), "eval", f"{step}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
      json.dump(report, f, indent=2)
    logging.info("wrote %s", out)
    print(f"step {step}: {report['bits_per_dim']:.3f} +- {report['bits_per_dim_stderr'] or 0:.3f} "
          f"bits/dim on {report['num_images']} {report['split']} images ({report['bound']})")
    for name, v in report["val_loss_per_t_bucket"].items():
      print(f"  eps-MSE {name:>10s}: {v:.4f}")
  return report
