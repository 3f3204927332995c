"""Diffusion math against the papers' formulas and closed-form moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion


def test_linear_schedule_is_ddpm():
  s = diffusion.make_schedule("linear", 1000)
  np.testing.assert_allclose(s.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)),
                             rtol=1e-5)
  # Ho et al. quote alpha_bar_T ~ 4e-5 (so x_T is nearly pure noise).
  assert 3e-5 < float(s.alphas_cumprod[-1]) < 5e-5


def test_cosine_schedule_matches_nichol_dhariwal():
  T, s_ = 1000, 0.008
  sch = diffusion.make_schedule("cosine", T)
  f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
  want = np.array([f(t + 1) / f(0) for t in range(T)])
  # Equal until beta hits its 0.999 clip at the very end.
  np.testing.assert_allclose(sch.alphas_cumprod[:-5], want[:-5], rtol=1e-4)
  assert float(jnp.max(sch.betas)) <= 0.999 + 1e-6


def test_unknown_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
    diffusion.make_schedule("quadratic", 10)


def test_posterior_matches_gaussian_conditioning():
  """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian, for scalar data."""
  s = diffusion.make_schedule("linear", 1000)
  ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  for t in (1, 10, 500, 999):
    a_prev, beta = ac[t - 1], 1 - ac[t] / ac[t - 1]
    # x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) e1 ; x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) e2
    var_prev, cov = 1 - a_prev, math.sqrt(1 - beta) * (1 - a_prev)
    var_t = (1 - beta) * (1 - a_prev) + beta
    x0, xt = 0.3, -0.7
    mean = math.sqrt(a_prev) * x0 + cov / var_t * (xt - math.sqrt(ac[t]) * x0)
    var = var_prev - cov**2 / var_t
    m, v, _ = diffusion.q_posterior(s, jnp.array([x0]), jnp.array([xt]), jnp.array([t]))
    np.testing.assert_allclose(float(m[0]), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(v[0]), var, rtol=1e-4)


def test_q_sample_moments_match_closed_form():
  s = diffusion.make_schedule("linear", 1000)
  x0 = jnp.full((20000, 1), 0.5)
  for t in (0, 100, 999):
    tt = jnp.full((20000,), t, jnp.int32)
    xt = diffusion.q_sample(s, x0, tt, jax.random.normal(jax.random.key(t), x0.shape))
    ab = float(s.alphas_cumprod[t])
    se = math.sqrt((1 - ab) / 20000)
    assert abs(float(xt.mean()) - math.sqrt(ab) * 0.5) < 5 * se
    assert abs(float(xt.var()) / (1 - ab) - 1) < 0.05


def test_q_sample_equals_running_the_markov_chain():
  """t one-step transitions q(x_s | x_{s-1}) give q(x_t | x_0): checks alphas_cumprod."""
  s = diffusion.make_schedule("cosine", 200)
  n, t = 20000, 150
  x0 = jax.random.uniform(jax.random.key(0), (n,), minval=-1, maxval=1)
  x = x0
  for i in range(t + 1):
    z = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (n,))
    x = jnp.sqrt(1 - s.betas[i]) * x + jnp.sqrt(s.betas[i]) * z
  direct = diffusion.q_sample(s, x0, jnp.full((n,), t, jnp.int32),
                              jax.random.normal(jax.random.key(2), (n,)))
  ab = float(s.alphas_cumprod[t])
  cov_chain = float(jnp.mean(x * x0) / jnp.mean(x0 * x0))
  assert abs(cov_chain - math.sqrt(ab)) < 0.02
  assert abs(float(x.var()) - float(direct.var())) < 0.03


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_eps_x0_v_round_trips(t):
  s = diffusion.make_schedule("linear", 1000)
  k1, k2 = jax.random.split(jax.random.key(t))
  x0 = jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  tt = jnp.full((4,), t, jnp.int32)
  xt = diffusion.q_sample(s, x0, tt, eps)
  v = diffusion.eps_x0_to_v(s, xt, tt, eps, x0)
  tol = dict(atol=2e-3 if t == 0 else 1e-4)
  np.testing.assert_allclose(diffusion.eps_to_x0(s, xt, tt, eps), x0, atol=1e-4)
  np.testing.assert_allclose(diffusion.x0_to_eps(s, xt, tt, x0), eps, **tol)
  np.testing.assert_allclose(diffusion.v_to_x0(s, xt, tt, v), x0, atol=1e-4)
  np.testing.assert_allclose(diffusion.v_to_eps(s, xt, tt, v), eps, atol=1e-4)
  for kind, pred in (("epsilon", eps), ("x0", x0), ("v", v)):
    np.testing.assert_allclose(diffusion.prediction_to_eps(s, xt, tt, pred, kind), eps, **tol)
    np.testing.assert_allclose(diffusion.training_target(s, x0, tt, eps, kind), pred, atol=1e-5)


def test_loss_is_zero_for_the_true_noise_and_one_for_zero_prediction():
  s = diffusion.make_schedule("linear", 1000)
  x0 = jnp.zeros((64, 4, 4, 3))
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  t = jnp.arange(64, dtype=jnp.int32) * 15
  perfect = lambda xt, tt: diffusion.x0_to_eps(s, xt, tt, x0)  # noqa: E731
  assert float(diffusion.per_example_loss(s, perfect, x0, t, noise).max()) < 1e-5
  zero = lambda xt, tt: jnp.zeros_like(xt)  # noqa: E731
  np.testing.assert_allclose(diffusion.per_example_loss(s, zero, x0, t, noise),
                             jnp.mean(noise**2, axis=(1, 2, 3)), rtol=1e-6)


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
  bins = jnp.linspace(-1, 1, 256)
  for mean, log_scale in ((0.0, -2.0), (0.9, -4.0), (-0.3, 0.5)):
    lp = diffusion.discretized_gaussian_log_likelihood(bins, jnp.full_like(bins, mean),
                                                       jnp.full_like(bins, log_scale))
    np.testing.assert_allclose(float(jnp.exp(lp).sum()), 1.0, atol=1e-4)


def test_normal_kl_closed_form():
  kl = diffusion.normal_kl(0.0, 0.0, 1.0, math.log(4.0))
  want = math.log(2.0) + (1 + 1) / (2 * 4) - 0.5
  np.testing.assert_allclose(float(kl), want, rtol=1e-6)


def test_variational_bound_terms_match_the_closed_form_for_gaussian_data():
  """Gaussian data N(mu, s^2) and the exact E[eps | x_t]: the expected KL of each term t >= 1
  is D * coef1_t^2 * Var(x0 | x_t) / (2 * posterior_variance_t), and the prior KL has a
  closed form too. Monte Carlo over data and noise must agree within its error."""
  from tests import analytic
  s = diffusion.make_schedule("linear", 1000)
  mu, sd, n, d = 0.2, 0.3, 4096, 3
  eps_fn = analytic.gaussian_eps_fn(s, mu, sd)
  ab = np.asarray(s.alphas_cumprod, np.float64)
  for t in (1, 50, 400, 999):
    k1, k2 = jax.random.split(jax.random.key(t))
    x0 = mu + sd * jax.random.normal(k1, (n, d))
    noise = jax.random.normal(k2, (n, d))
    terms = np.asarray(diffusion.vlb_term(s, eps_fn, x0, jnp.full((n,), t, jnp.int32), noise))
    sig2 = 1 - ab[t]
    var_x0 = sd**2 * sig2 / (ab[t] * sd**2 + sig2)
    want = d * float(s.posterior_mean_coef1[t]) ** 2 * var_x0 / (2 * float(s.posterior_variance[t]))
    se = terms.std() / np.sqrt(n)
    # (+1e-5 nats: float32 rounding where the term itself is ~1e-7, at t=999)
    assert abs(terms.mean() - want) < 5 * se + 1e-3 * want + 1e-5, (t, terms.mean(), want)
  x0 = mu + sd * jax.random.normal(jax.random.key(0), (n, d))
  a2, v = ab[-1], 1 - ab[-1]
  want_prior = d * 0.5 * (-1 - np.log(v) + v + a2 * (mu**2 + sd**2))
  np.testing.assert_allclose(float(diffusion.prior_kl(s, x0).mean()), want_prior, rtol=0.05)


def test_decoder_term_matches_the_closed_form_for_a_perfect_denoiser():
  """At t=0 a perfect denoiser puts the decoder's mean on x0 exactly (coef2 = 0), so each
  pixel's likelihood is the mass of N(0, sigma^2) in +-1/255 (half-line at the edges)."""
  s = diffusion.make_schedule("linear", 1000)
  x0 = (jax.random.randint(jax.random.key(0), (64, 4, 4, 3), 0, 256) / 127.5 - 1).astype(
      jnp.float32)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  perfect = lambda xt, t: diffusion.x0_to_eps(s, xt, t, x0)  # noqa: E731
  nll = np.asarray(diffusion.vlb_term(s, perfect, x0, jnp.zeros((64,), jnp.int32), noise))
  sigma = math.exp(0.5 * float(s.posterior_log_variance_clipped[0]))
  phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
  z = (1 / 255) / sigma
  edge = np.abs(np.asarray(x0)) > 0.999
  want = np.where(edge, -math.log(phi(z)), -math.log(phi(z) - phi(-z))).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(nll, want, rtol=2e-3)
  bits_per_dim = float(nll.mean()) / (48 * math.log(2))
  assert 1.0 < bits_per_dim < 1.5  # DDPM's decoder: sigma ~ 0.0074 vs a half-bin of 0.0039


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_what_a_wrong_image_colour_costs_at_high_noise(prediction_type):
  """A prediction that is exact but for a constant colour offset delta of x0, at t = T-1 of
  the linear schedule, costs (alpha/sigma)^2 delta^2 (~4e-5 delta^2) in epsilon units,
  delta^2 / sigma^2 (~delta^2) in v units and delta^2 in x0 units. So L_simple with epsilon
  prediction all but ignores the colour of the image where a sampler decides it (the
  quickstart's grey-pulled, colour-cast grids of issue #19); configs/quickstart.py
  predicts v."""
  schedule = diffusion.make_schedule("linear", 1000)
  x0 = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1.0, maxval=1.0)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.full((4,), 999)
  delta = 0.3
  a = float(schedule.sqrt_alphas_cumprod[999])
  s = float(schedule.sqrt_one_minus_alphas_cumprod[999])

  def off_colour(x_t, tt):  # exact for the image x0 + delta seen through the same x_t
    shifted = x0 + delta
    eps = (x_t - a * shifted) / s
    return diffusion.training_target(schedule, shifted, tt, eps, prediction_type)

  loss = diffusion.per_example_loss(schedule, off_colour, x0, t, noise, prediction_type)
  want = {"epsilon": (a / s) ** 2, "v": 1 / s**2, "x0": 1.0}[prediction_type] * delta**2
  np.testing.assert_allclose(loss, want, rtol=1e-3)
  if prediction_type == "epsilon":
    assert float(loss.max()) < 1e-3 * delta**2
  from configs import quickstart
  assert quickstart.get_config().model.prediction_type == "v"
