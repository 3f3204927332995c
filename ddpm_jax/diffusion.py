"""Diffusion math as pure functions over arrays; no network in here.

Notation follows Ho et al. 2020 (DDPM): ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``,
``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``. Timesteps are
0-based integers in ``[0, T)``: index ``t`` here is the paper's ``t + 1``.
"""

from __future__ import annotations

import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "x0", "v")


@flax.struct.dataclass
class Schedule:
  """Per-timestep constants of a discrete diffusion process, each of shape (T,).

  ``alphas_cumprod_prev[0]`` is 1 (x_{-1} is the clean image).
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
  name: str = flax.struct.field(pytree_node=False, default="linear")

  def alphas_cumprod_np(self) -> np.ndarray:
    """alpha_bar in float64 on the host, usable while the schedule is traced."""
    return np.cumprod(1.0 - named_betas(self.name, self.num_timesteps))


def linear_betas(num_timesteps: int) -> np.ndarray:
  """DDPM's linear schedule, 1e-4 to 0.02 at T=1000, rescaled for other T.

  The rescaling (Nichol & Dhariwal 2021) keeps the same process when T changes;
  at T=1000 this is exactly ``linspace(1e-4, 0.02, 1000)``.
  """
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
  def alpha_bar(t):
    return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta)
                   for i in range(num_timesteps)], dtype=np.float64)


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
  if name == "linear":
    betas = linear_betas(num_timesteps)
    if betas.max() >= 1.0:
      raise ValueError(f"the linear schedule needs num_timesteps > 20 (its betas are rescaled "
                       f"by 1000/T and would reach {betas.max():.2f} >= 1); use more steps or "
                       f"the cosine schedule")
    return betas
  if name == "cosine":
    return cosine_betas(num_timesteps)
  raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULES}")


def make_schedule(name: str = "linear", num_timesteps: int = 1000) -> Schedule:
  """Builds the schedule ``name`` ("linear" or "cosine") with ``num_timesteps`` steps.

  Constants are computed in float64 and stored as float32.
  """
  betas = named_betas(name, num_timesteps)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # post_var[0] is 0; the log is clipped to the next value as in Ho et al.'s code.
  post_log_var = np.log(np.append(post_var[1], post_var[1:]) if num_timesteps > 1 else betas)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(ac),
      alphas_cumprod_prev=f32(ac_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ac)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(post_log_var),
      posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
      num_timesteps=num_timesteps,
      name=name,
  )


def extract(a: jax.Array, t: jax.Array, x_shape) -> jax.Array:
  """Gathers ``a[t]`` for a (B,) index and shapes it to broadcast against ``x_shape``."""
  return a[t].reshape(t.shape + (1,) * (len(x_shape) - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) given the noise: sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
  var = extract(schedule.posterior_variance, t, x_t.shape)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
  return mean, var, log_var


# Conversions between the three parameterisations. With a = sqrt(ab_t), s = sqrt(1-ab_t):
#   x_t = a x0 + s eps,   v = a eps - s x0,   x0 = a x_t - s v,   eps = s x_t + a v.

def _a_s(schedule, t, shape):
  return (extract(schedule.sqrt_alphas_cumprod, t, shape),
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape))


def eps_to_x0(schedule, x_t, t, eps):
  a, s = _a_s(schedule, t, x_t.shape)
  return (x_t - s * eps) / a


def x0_to_eps(schedule, x_t, t, x0):
  a, s = _a_s(schedule, t, x_t.shape)
  return (x_t - a * x0) / s


def v_to_x0(schedule, x_t, t, v):
  a, s = _a_s(schedule, t, x_t.shape)
  return a * x_t - s * v


def v_to_eps(schedule, x_t, t, v):
  a, s = _a_s(schedule, t, x_t.shape)
  return s * x_t + a * v


def eps_x0_to_v(schedule, x_t, t, eps, x0):
  del x_t
  a, s = _a_s(schedule, t, eps.shape)
  return a * eps - s * x0


def prediction_to_eps(schedule, x_t, t, pred, prediction_type: str):
  """Converts a network output of ``prediction_type`` to an epsilon prediction."""
  if prediction_type == "epsilon":
    return pred
  if prediction_type == "x0":
    return x0_to_eps(schedule, x_t, t, pred)
  if prediction_type == "v":
    return v_to_eps(schedule, x_t, t, pred)
  raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def prediction_to_x0(schedule, x_t, t, pred, prediction_type: str):
  """Converts a network output of ``prediction_type`` to an x0 prediction."""
  if prediction_type == "epsilon":
    return eps_to_x0(schedule, x_t, t, pred)
  if prediction_type == "x0":
    return pred
  if prediction_type == "v":
    return v_to_x0(schedule, x_t, t, pred)
  raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def alpha_bar_at(schedule: Schedule, t: jax.Array) -> jax.Array:
  """alpha_bar_t for integer t (any shape), with t = -1 meaning the clean data (alpha_bar = 1)."""
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def training_target(schedule, x0, t, noise, prediction_type: str):
  """What a network of ``prediction_type`` should output for (x0, t, noise)."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "x0":
    return x0
  if prediction_type == "v":
    a, s = _a_s(schedule, t, x0.shape)
    return a * noise - s * x0
  raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def per_example_loss(schedule: Schedule, model_fn: Callable, x0, t, noise,
                     prediction_type: str = "epsilon") -> jax.Array:
  """L_simple (Ho et al. 2020, eq. 14) per example: mean squared error of the
  network's prediction against its target, averaged over pixels. Shape (B,)."""
  x_t = q_sample(schedule, x0, t, noise)
  pred = model_fn(x_t, t).astype(jnp.float32)
  target = training_target(schedule, x0, t, noise, prediction_type)
  return jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _std_normal_cdf(x):
  return 0.5 * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log p(x) of 8-bit data x in [-1, 1] under a Gaussian discretised to 256 bins.

  As in Ho et al. 2020 (their eq. 13): the edge bins extend to +-infinity.
  ``log_scale`` is the log standard deviation. Elementwise, in nats.
  """
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_probs = jnp.where(
      x < -0.999, log_cdf_plus,
      jnp.where(x > 0.999, log_one_minus_cdf_min,
                jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))))
  return log_probs


def vlb_term(schedule: Schedule, eps_fn: Callable, x0, t, noise) -> jax.Array:
  """One term of the variational bound (Ho et al. 2020, eq. 5), per example, in nats.

  For t >= 1: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), where p has the mean
  of q with x0 predicted from ``eps_fn`` and the posterior ("fixed small") variance.
  For t = 0: -log p(x0 | x_1) under the discretised Gaussian decoder (x0 must be
  8-bit data scaled to [-1, 1]). ``x_t`` is ``q_sample(x0, t, noise)``.
  """
  x_t = q_sample(schedule, x0, t, noise)
  eps = eps_fn(x_t, t).astype(jnp.float32)
  x0_pred = jnp.clip(eps_to_x0(schedule, x_t, t, eps), -1.0, 1.0)
  true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
  model_mean, _, model_log_var = q_posterior(schedule, x0_pred, x_t, t)
  axes = tuple(range(1, x0.ndim))
  kl = jnp.sum(normal_kl(true_mean, true_log_var, model_mean, model_log_var), axis=axes)
  nll = -jnp.sum(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var),
                 axis=axes)
  return jnp.where(t == 0, nll, kl)


def prior_kl(schedule: Schedule, x0) -> jax.Array:
  """KL(q(x_{T-1} | x0) || N(0, I)) per example, in nats (the bound's L_T)."""
  T = schedule.num_timesteps
  mean = schedule.sqrt_alphas_cumprod[T - 1] * x0
  log_var = jnp.log(1.0 - schedule.alphas_cumprod[T - 1]) * jnp.ones_like(x0)
  return jnp.sum(normal_kl(mean, log_var, 0.0, 0.0), axis=tuple(range(1, x0.ndim)))
