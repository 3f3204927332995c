"""Analytic denoisers: the exact E[eps | x_t] for Gaussian and Gaussian-mixture data.

For data x0 ~ sum_k w_k N(mu_k, s_k^2) (independently per dimension) and
x_t = a x0 + sig eps (a = sqrt(ab_t), sig = sqrt(1 - ab_t)), x_t given component k is
N(a mu_k, a^2 s_k^2 + sig^2), and E[eps | x_t, k] = sig (x_t - a mu_k) / (a^2 s_k^2 + sig^2).
"""

import jax
import jax.numpy as jnp
import numpy as np


def mixture_eps_fn(schedule, weights, means, stds):
  w, mu, s = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))

  def eps_fn(x, t):
    ab = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))[..., None]
    a, sig2 = jnp.sqrt(ab), 1 - ab
    var = a**2 * s**2 + sig2  # per component
    xk = x[..., None]
    logp = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (xk - a * mu) ** 2 / var
    r = jax.nn.softmax(logp, axis=-1)
    return jnp.sum(r * jnp.sqrt(sig2) * (xk - a * mu) / var, axis=-1)
  return eps_fn


def gaussian_eps_fn(schedule, mean, std):
  return mixture_eps_fn(schedule, [1.0], [mean], [std])


def mixture_moments(weights, means, stds):
  w, mu, s = (np.asarray(v, np.float64) for v in (weights, means, stds))
  m = np.sum(w * mu)
  return m, np.sqrt(np.sum(w * (s**2 + mu**2)) - m**2)


def gaussian_ode_solution(schedule, x_T, mean, std):
  """Where the probability-flow ODE takes x_T (at t = T-1) for Gaussian data: the monotone
  map between the Gaussian marginals N(a mu, a^2 s^2 + sig^2) and N(mu, s^2)."""
  ab = float(schedule.alphas_cumprod[-1])
  a = np.sqrt(ab)
  return mean + std * (np.asarray(x_T) - a * mean) / np.sqrt(a**2 * std**2 + 1 - ab)


def gaussian_cov_eps_fn(schedule, mean, cov):
  """E[eps | x_t] for x0 ~ N(mean, cov) over the last axis (D dims, correlated):
  x_t = a x0 + sig eps has covariance a^2 cov + sig^2 I, so
  E[eps | x_t] = sig (a^2 cov + sig^2 I)^-1 (x_t - a mean)."""
  mean, cov = jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32)
  eye = jnp.eye(cov.shape[0])

  def eps_fn(x, t):
    ab = schedule.alphas_cumprod[t][:, None, None]
    a, sig2 = jnp.sqrt(ab), 1 - ab
    prec = jnp.linalg.inv(a**2 * cov + sig2 * eye)  # (B, D, D)
    return jnp.sqrt(sig2[:, 0]) * jnp.einsum("bij,bj->bi", prec, x - a[:, 0] * mean)
  return eps_fn


def gaussian_posterior_mean(schedule, x_t, t, mean, std):
  """E[x0 | x_t] for x0 ~ N(mean, std^2) per dimension (t an int): the shrinkage
  mean + a s^2 (x_t - a mean) / (a^2 s^2 + sig^2), in float64."""
  ab = float(np.asarray(schedule.alphas_cumprod, np.float64)[t])
  a = np.sqrt(ab)
  return mean + a * std**2 * (np.asarray(x_t, np.float64) - a * mean) / (a**2 * std**2 + 1 - ab)


def constant_x0_eps_fn(schedule, x0_fn):
  """A denoiser whose x0 prediction is ``x0_fn(x, t)`` (any values, also outside [-1, 1]):
  eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)."""
  def eps_fn(x, t):
    ab = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - jnp.sqrt(ab) * x0_fn(x, t)) / jnp.sqrt(1 - ab)
  return eps_fn
