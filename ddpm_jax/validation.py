"""The loss per timestep bucket (training metrics and held-out validation), one definition.

Timesteps [0, T) fall into ``NUM_BUCKETS`` equal buckets named by their range, e.g.
``t0-99`` ... ``t900-999`` for T=1000; training logs ``loss_<bucket>`` and the
validation loss ``val/loss_<bucket>`` (and ``val/loss_all``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, input_pipeline, models

NUM_BUCKETS = 10


def bucket_of(t, T: int):
  """Bucket index of timesteps ``t`` (numpy or jax arrays)."""
  return t * NUM_BUCKETS // T


def bucket_names(T: int) -> list[str]:
  return [f"t{i * T // NUM_BUCKETS}-{(i + 1) * T // NUM_BUCKETS - 1}" for i in range(NUM_BUCKETS)]


def bucket_sums(losses, t, T: int):
  """(sum of losses, count) per bucket, on device: (NUM_BUCKETS,) each."""
  b = bucket_of(t, T)
  return (jax.ops.segment_sum(losses, b, NUM_BUCKETS),
          jax.ops.segment_sum(jnp.ones_like(losses), b, NUM_BUCKETS))


def bucket_means(sums, counts, T: int) -> dict:
  """{bucket name: mean loss} for buckets that saw any example."""
  sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
  return {name: float(s / c) for name, s, c in zip(bucket_names(T), sums, counts) if c}


class ValidationLoss:
  """Eps-MSE (the training loss) on held-out images, per timestep bucket, and over all.

  The images, their timesteps (spread evenly over [0, T)) and the noise are fixed,
  so values at different steps of a run differ only through the parameters. One
  forward pass per image, jitted on this process's first device (no other process
  takes part). ``batches`` (and ``labels``) are kept for other held-out measures (the
  bound).

  A class-conditional model is measured as it is trained: with each image's label
  (``all``, ``t0-99``, ...); its unconditional branch (the null label, which guidance
  and label dropout train) is reported beside it (``uncond_all``, ``uncond_t0-99``, ...).
  """

  def __init__(self, config, model, schedule, source, num_examples: int, batch_size: int):
    self.T = schedule.num_timesteps
    self.num_classes = int(model.num_classes or 0)
    self.conditional = self.num_classes > 0 and bool(getattr(source, "class_names", ()))
    batches = list(input_pipeline.eval_batches(source, batch_size, num_examples,
                                               with_labels=self.conditional))
    if self.conditional:
      self.batches = [jnp.asarray(x) for x, _ in batches]
      self.labels = [jnp.asarray(y) for _, y in batches]
    else:
      self.batches = [jnp.asarray(x) for x in batches]
      self.labels = [None] * len(self.batches)
    n = sum(len(x) for x in self.batches)
    self.t = (np.arange(n) * self.T // max(n, 1)).astype(np.int32)
    key = jax.random.key(12345)
    self.noise = [jax.random.normal(jax.random.fold_in(key, b), x.shape)
                  for b, x in enumerate(self.batches)]
    self._loss = jax.jit(lambda p, x, t, z, y: diffusion.per_example_loss(
        schedule, lambda xt, tt: models.apply(model, p, xt, tt, y), x, t, z,
        config.model.prediction_type))

  def null_labels(self, batch) -> jax.Array:
    return models.null_labels(self.num_classes, len(batch))

  def _measure(self, params, labels) -> dict:
    losses, start = [], 0
    for x, z, y in zip(self.batches, self.noise, labels):
      t = jnp.asarray(self.t[start:start + len(x)])
      losses.append(np.asarray(self._loss(params, x, t, z, y), np.float64))
      start += len(x)
    if not losses:
      return {}
    losses = np.concatenate(losses)
    b = bucket_of(self.t, self.T)
    out = bucket_means(np.bincount(b, losses, NUM_BUCKETS), np.bincount(b, None, NUM_BUCKETS),
                       self.T)
    out["all"] = float(losses.mean())
    return out

  def __call__(self, params) -> dict:
    out = self._measure(params, self.labels)
    if self.conditional:
      uncond = self._measure(params, [self.null_labels(x) for x in self.batches])
      out.update({f"uncond_{k}": v for k, v in uncond.items()})
    return out
