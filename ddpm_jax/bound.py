"""The variational bound of Ho et al. 2020 per image, on 8-bit data: the prior KL, the KL
terms of t >= 1 and the discretised decoder at t = 0 (the terms: ``diffusion.prior_kl`` and
``diffusion.vlb_term``), summed exactly over all T, or with the KL terms of t >= 1 estimated
from one timestep in each of K quadratically spaced strata per image (unbiased per image).
``--mode=eval`` reports it as bits/dim (``ddpm_jax.evaluate``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion


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
  """Jitted ``term(params, x0, t, noise, labels=None)`` -> per-image vlb term, with
  ``eps_fn_p(params, labels) -> eps_fn``; build once, reuse."""
  return jax.jit(lambda p, x, t, z, y=None: diffusion.vlb_term(schedule, eps_fn_p(p, y), x, t,
                                                               z))


def bound_per_image(schedule, term, params, x0, key, k: int, on_term=None, labels=None):
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
    total += w * np.asarray(term(params, x0, jnp.asarray(t), z, labels), np.float64)
    if on_term is not None:
      on_term(1)
  return total
