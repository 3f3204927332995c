"""Samplers against analytic denoisers: moments, ODE solutions, equivalences, tracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling
from tests import analytic

MEAN, STD = 0.3, 0.5
N, D = 4000, 4  # samples x dimensions: 16000 draws per moment


@pytest.fixture(scope="module")
def schedule():
  return diffusion.make_schedule("linear", 1000)


@pytest.fixture(scope="module")
def gauss(schedule):
  return analytic.gaussian_eps_fn(schedule, MEAN, STD)


def x_T(seed=0, n=N):
  return jax.random.normal(jax.random.key(seed), (n, D))


def assert_moments(x, mean, std):
  x = np.asarray(x).ravel()
  se_mean, se_std = std / np.sqrt(x.size), std / np.sqrt(2 * x.size)
  assert abs(x.mean() - mean) < 5 * se_mean, (x.mean(), mean)
  assert abs(x.std() - std) < 5 * se_std + 2e-3, (x.std(), std)


def test_ddpm_1000_steps_matches_data_moments(schedule, gauss):
  assert_moments(sampling.ddpm_sample(gauss, schedule, x_T(), jax.random.key(1)), MEAN, STD)


def test_ddpm_large_variance_also_matches(schedule, gauss):
  x = sampling.ddpm_sample(gauss, schedule, x_T(), jax.random.key(1), variance="large")
  assert_moments(x, MEAN, STD)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_1000_steps_matches_data_moments(schedule, gauss, eta):
  x = sampling.ddim_sample(gauss, schedule, x_T(), jax.random.key(2), num_steps=1000, eta=eta)
  assert_moments(x, MEAN, STD)


def test_ddim_eta1_all_steps_is_the_ddpm_sampler():
  """DDIM with all T steps and eta=1 takes DDPM's posterior steps: the two samplers' own
  trajectories from the same x_T with the same key (both draw step t's noise from
  fold_in(key, t)) agree for any eps_fn. A short (cosine) schedule keeps float32 drift small."""
  sched = diffusion.make_schedule("cosine", 10)
  eps_fn = lambda x, t: jnp.sin(3 * x) + 0.01 * t[:, None]  # noqa: E731  (any function)
  x, key = x_T(3, 256), jax.random.key(11)
  ddpm, f1 = sampling.ddpm_sample(eps_fn, sched, x, key, num_frames=10)
  ddim, f2 = sampling.ddim_sample(eps_fn, sched, x, key, num_steps=10, eta=1.0, num_frames=10)
  # Every intermediate x_t and x0 prediction (some large: x0 = x_t / sqrt(alpha_bar_t)).
  np.testing.assert_allclose(f2, f1, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(ddim, ddpm, rtol=1e-3, atol=1e-4)
  assert float(jnp.abs(ddim - sampling.ddim_sample(eps_fn, sched, x, key, num_steps=10)).max()) \
      > 0.1  # and eta matters: with eta=0 the same steps add no noise


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_step_adds_the_variance_of_its_table(variance):
  """The variance tables themselves, and what a step draws: with eps_fn = 0 and x_T = 0 on a
  2-step schedule, x_0 = sqrt(var_1) z / sqrt(alpha_bar_0), so its spread gives var_1."""
  sched = diffusion.make_schedule("cosine", 2)
  table = np.exp(np.asarray(sampling.ddpm_log_variance(sched, variance), np.float64))
  want = sched.posterior_variance if variance == "small" else sched.betas
  np.testing.assert_allclose(table[1:], np.asarray(want)[1:], rtol=1e-5)
  x = sampling.ddpm_sample(lambda x, t: jnp.zeros_like(x), sched, jnp.zeros((20000, 4)),
                           jax.random.key(0), variance=variance)
  std = float(np.std(np.asarray(x)) * np.sqrt(float(sched.alphas_cumprod[0])))
  assert abs(std - np.sqrt(table[1])) < 4 * np.sqrt(table[1]) / np.sqrt(2 * x.size)
  # small != large: the test can tell the two apart
  other = "large" if variance == "small" else "small"
  assert abs(table[1] - np.exp(float(sampling.ddpm_log_variance(sched, other)[1]))) > 1e-3


def test_logsnr_spacing_is_uniform_in_log_snr(schedule):
  ac = schedule.alphas_cumprod_np()
  lam = 0.5 * np.log(ac / (1 - ac))
  ts = sampling.timestep_sequence(1000, 20, "logsnr", ac)
  steps = np.diff(lam[ts])  # lambda rises as t falls
  assert np.all(steps > 0)
  # Equal in log-SNR up to rounding t to integers (largest near t=0, where lambda is steep).
  assert np.std(steps[1:-1]) / np.mean(steps) < 0.05
  uniform = np.diff(lam[sampling.timestep_sequence(1000, 20, "uniform")])
  assert np.std(uniform) / np.mean(uniform) > 1.0  # what uniform-in-t spacing does instead


def test_ddim_and_ddpm_agree_in_distribution_on_a_mixture(schedule):
  w, mu, s = [0.3, 0.7], [-0.6, 0.5], [0.1, 0.2]
  eps_fn = analytic.mixture_eps_fn(schedule, w, mu, s)
  m, sd = analytic.mixture_moments(w, mu, s)
  a = np.asarray(sampling.ddpm_sample(eps_fn, schedule, x_T(4), jax.random.key(5))).ravel()
  b = np.asarray(sampling.ddim_sample(eps_fn, schedule, x_T(6), jax.random.key(7),
                                      num_steps=1000, eta=1.0)).ravel()
  for x in (a, b):
    assert_moments(x, m, sd)
    assert abs(np.mean(x < 0) - 0.3) < 0.02  # mass of the left component
  # Two-sample Kolmogorov-Smirnov statistic; 0.025 is above its 0.1% critical value.
  grid = np.linspace(-1.2, 1.2, 241)
  ks = np.max(np.abs((a[:, None] <= grid).mean(0) - (b[:, None] <= grid).mean(0)))
  assert ks < 0.025, ks


def ode_errors(sampler, schedule, gauss, steps_list, **kw):
  """Mean absolute distance to the exact probability-flow ODE solution."""
  x = x_T(8, 512)
  exact = analytic.gaussian_ode_solution(schedule, x, MEAN, STD)
  return [float(np.abs(np.asarray(sampler(gauss, schedule, x, jax.random.key(0),
                                          num_steps=n, **kw)) - exact).mean())
          for n in steps_list]


def test_ddim_discretisation_error_shrinks_with_steps(schedule, gauss):
  errs = ode_errors(sampling.ddim_sample, schedule, gauss, [10, 20, 50, 100, 1000])
  assert all(a > b for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] < 0.01, errs


def test_dpm_solver_converges_to_the_same_ode_solution_faster(schedule, gauss):
  dpm = ode_errors(sampling.dpm_solver_pp_sample, schedule, gauss, [10, 20, 50, 100, 1000])
  assert all(a > b for a, b in zip(dpm, dpm[1:])), dpm
  ddim100 = ode_errors(sampling.ddim_sample, schedule, gauss, [100])[0]
  assert dpm[1] < ddim100, (dpm, ddim100)  # 20 DPM-Solver++ steps beat 100 DDIM steps
  assert dpm[-1] < 0.01


def test_dpm_solver_and_ddim_meet_on_a_mixture(schedule):
  """No closed form here: both converge to one solution as steps grow."""
  eps_fn = analytic.mixture_eps_fn(schedule, [0.3, 0.7], [-0.6, 0.5], [0.1, 0.2])
  x = x_T(9, 512)
  ref = np.asarray(sampling.dpm_solver_pp_sample(eps_fn, schedule, x, num_steps=1000))
  def gap(f, n):
    return float(np.abs(np.asarray(f(eps_fn, schedule, x, jax.random.key(0), num_steps=n))
                        - ref).mean())
  ddim = [gap(sampling.ddim_sample, n) for n in (25, 100, 500)]
  assert ddim[0] > ddim[1] > ddim[2]
  assert gap(sampling.dpm_solver_pp_sample, 20) < ddim[1]


def test_ddim_eta_adds_noise_and_zero_eta_is_deterministic(schedule, gauss):
  x = x_T(10, 64)
  a = sampling.ddim_sample(gauss, schedule, x, jax.random.key(1), num_steps=20, eta=0.0)
  b = sampling.ddim_sample(gauss, schedule, x, jax.random.key(2), num_steps=20, eta=0.0)
  np.testing.assert_array_equal(a, b)
  c = sampling.ddim_sample(gauss, schedule, x, jax.random.key(1), num_steps=20, eta=1.0)
  d = sampling.ddim_sample(gauss, schedule, x, jax.random.key(2), num_steps=20, eta=1.0)
  assert float(jnp.abs(c - d).mean()) > 0.05


@pytest.mark.parametrize("spacing", sampling.SPACINGS)
def test_timestep_sequences(spacing, schedule):
  ac = schedule.alphas_cumprod_np()
  for n in (1, 2, 3, 10, 50, 100, 1000):
    ts = sampling.timestep_sequence(1000, n, spacing, ac)
    assert len(ts) == n and ts.dtype == np.int32
    assert np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= 999
    assert ts[0] == 999, (n, ts[:3])  # every spacing starts from pure noise, one step too
  for T in (1, 2, 3, 20, 37):  # and a shortened run (img2img) starts at its own top
    for n in range(1, T + 1):
      ts = sampling.timestep_sequence(T, n, spacing, ac[:T])
      assert ts[0] == T - 1 and len(ts) == n and np.all(np.diff(ts) < 0) and ts[-1] >= 0
  assert sampling.timestep_sequence(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
  assert sampling.timestep_sequence(1000, 5, "uniform").tolist() == [999, 749, 500, 250, 0]
  assert sampling.timestep_sequence(1000, 5, "quadratic").tolist() == [999, 562, 250, 62, 0]


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
@pytest.mark.parametrize("spacing", sampling.SPACINGS)
def test_one_step_from_noise_is_the_exact_posterior_mean(schedule, gauss, sampler, spacing):
  """One step calls the model at t = T-1 on pure noise and jumps to the data: with the exact
  Gaussian denoiser that is E[x0 | x_T] = mean + a s^2 (x_T - a mean) / (a^2 s^2 + sig^2)."""
  x = x_T(20, 64)
  out = sampling.sample(sampler, gauss, schedule, x, jax.random.key(0), num_steps=1,
                        spacing=spacing, eta=1.0)
  want = analytic.gaussian_posterior_mean(schedule, x, 999, MEAN, STD)
  # float32: x0 = (x - sig eps) / a with a = 0.0064 at t = 999 costs about 1e-4
  np.testing.assert_allclose(out, want, atol=3e-4)
  assert sampling.timesteps_used(sampler, schedule, 1, spacing).tolist() == [999]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++"])
def test_a_run_from_the_top_is_the_same_with_and_without_t_start(schedule, gauss, sampler):
  """img2img at strength 1 (t_start = T-1) runs exactly the steps of sampling from noise."""
  x, key = x_T(21, 32), jax.random.key(3)
  kw = dict(num_steps=10, eta=0.5)
  plain = sampling.sample(sampler, gauss, schedule, x, key, **kw)
  np.testing.assert_array_equal(
      sampling.sample(sampler, gauss, schedule, x, key, t_start=999, **kw), plain)


def test_bad_step_counts_are_clear_errors():
  """Each is a UserError (one line from main.py), not a bare ValueError."""
  from ddpm_jax.errors import UserError
  with pytest.raises(UserError, match="num_steps must be in"):
    sampling.timestep_sequence(1000, 0)
  with pytest.raises(UserError, match="unknown timestep spacing"):
    sampling.timestep_sequence(1000, 10, "cubic")
  with pytest.raises(UserError, match="unknown sampling.sampler"):
    sampling.sample("euler", lambda x, t: x, diffusion.make_schedule("linear", 100),
                    jnp.zeros((1, 2)), jax.random.key(0))
  with pytest.raises(UserError, match="variance must be"):
    sampling.ddpm_log_variance(diffusion.make_schedule("linear", 100), "medium")


def test_sampler_traces_the_model_once_and_reuses_the_compiled_scan(schedule):
  traces = []

  def eps_fn(x, t):
    traces.append(1)  # runs only while tracing
    return 0.1 * x

  for seed in range(3):  # new inputs, same shapes: no new trace
    sampling.ddim_sample(eps_fn, schedule, x_T(seed, 8), jax.random.key(seed), num_steps=50)
  assert len(traces) == 1
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def counted(x, t):
    return 0.1 * x

  for seed in range(3):
    sampling.dpm_solver_pp_sample(counted, schedule, x_T(seed, 8), num_steps=25)


def test_frames_record_the_trajectory(schedule, gauss):
  x = x_T(11, 16)
  out, frames = sampling.ddim_sample(gauss, schedule, x, jax.random.key(0), num_steps=10,
                                     num_frames=5)
  assert frames.shape == (5, 2, 16, D)
  np.testing.assert_allclose(frames[-1, 0], out)  # last frame is the final sample
  plain = sampling.ddim_sample(gauss, schedule, x, jax.random.key(0), num_steps=10)
  np.testing.assert_allclose(out, plain, atol=1e-6)


def test_clipping_keeps_predicted_x0_in_range(schedule):
  wild = lambda x, t: -30.0 * jnp.ones_like(x)  # noqa: E731  (x0 prediction far above 1)
  for sampler in ("ddpm", "ddim", "dpm_solver++"):
    _, frames = sampling.sample(sampler, wild, schedule, x_T(12, 8), jax.random.key(0),
                                num_steps=10, clip_x0=True, num_frames=4)
    assert float(jnp.abs(frames[:, 1]).max()) <= 1.0 + 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++"])
def test_clipping_equals_a_denoiser_that_predicts_the_clipped_x0(sampler):
  """Clipping the x0 prediction is exactly a denoiser that predicted the clipped x0: both
  x0 and the eps recomputed from it. A denoiser predicting x0 = 1.5 (and -2, and 0.3
  in range) with clipping gives, trajectory and all, what one predicting 1 (-1, 0.3)
  without clipping gives, for every sampler (eta > 0: the noise term too)."""
  sched = diffusion.make_schedule("cosine", 20)
  wild = jnp.array([1.5, -2.0, 0.3, 4.0])
  wild_x0 = lambda x, t: jnp.broadcast_to(wild + 0.01 * x, x.shape)  # noqa: E731
  tame_x0 = lambda x, t: jnp.clip(wild_x0(x, t), -1.0, 1.0)  # noqa: E731
  x, key = x_T(22, 16), jax.random.key(4)
  run = lambda x0_fn, clip: sampling.sample(  # noqa: E731
      sampler, analytic.constant_x0_eps_fn(sched, x0_fn), sched, x, key, num_steps=7,
      eta=0.7, clip_x0=clip, num_frames=7)
  (clipped, f_clipped), (tame, f_tame) = run(wild_x0, True), run(tame_x0, False)
  # float32: x0 -> eps -> x0 at the first step (alpha_bar = 0.002) costs about 1e-4
  np.testing.assert_allclose(f_clipped, f_tame, atol=5e-4)
  np.testing.assert_allclose(clipped, tame, atol=5e-4)
  unclipped, _ = run(wild_x0, False)  # and clipping matters here
  assert float(jnp.abs(unclipped - tame).max()) > 0.1


def test_dpm_solver_pp_coefficients_on_uniform_spacing(schedule):
  """DPM-Solver++(2M) step by step in float64 (Lu et al. 2022, Algorithm 2) on uniform
  spacing, where the step ratios r_i are far from 1 (log-SNR spacing would hide an
  inverted r). The denoiser predicts x0 = g(x, t); the solver must follow
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i."""
  g = lambda x, t: 0.5 * np.sin(np.asarray(t)[:, None] / 97.0) + 0.3 * np.tanh(x)  # noqa: E731
  eps_fn = analytic.constant_x0_eps_fn(
      schedule, lambda x, t: 0.5 * jnp.sin(t[:, None] / 97.0) + 0.3 * jnp.tanh(x))
  x = np.asarray(x_T(23, 8), np.float64)
  out = sampling.dpm_solver_pp_sample(eps_fn, schedule, jnp.asarray(x, jnp.float32),
                                      num_steps=6, spacing="uniform")
  ts = sampling.timestep_sequence(1000, 6, "uniform")
  ac = np.asarray(schedule.alphas_cumprod, np.float64)
  lam = 0.5 * np.log(ac / (1 - ac))
  hs = np.diff(lam[ts])  # h_i > 0: lambda rises as t falls
  r = hs[:-1] / hs[1:]
  assert np.abs(np.log(r)).max() > 0.5, r  # far from 1: an inverted r shows
  x0_prev = None
  for i, t in enumerate(ts):
    x0 = g(x, np.full(len(x), t))
    if i == len(ts) - 1:  # last step to the data: first order, x = x0
      x = x0
      break
    tp = ts[i + 1]
    h = lam[tp] - lam[t]
    d = x0 if i == 0 else (1 + 0.5 / (hs[i - 1] / h)) * x0 - 0.5 / (hs[i - 1] / h) * x0_prev
    x = np.sqrt((1 - ac[tp]) / (1 - ac[t])) * x - np.sqrt(ac[tp]) * np.expm1(-h) * d
    x0_prev = x0
  # float32 solver vs float64 here: 2e-4; an inverted r is off by 0.2
  np.testing.assert_allclose(out, x, atol=1e-3)


def test_ddim_inversion_round_trip_error_falls_with_steps(schedule, gauss):
  x0 = MEAN + STD * jax.random.normal(jax.random.key(13), (256, D))
  errs = []
  for n in (10, 50, 200):
    x_T_inv = sampling.ddim_invert(gauss, schedule, x0, num_steps=n)
    back = sampling.ddim_sample(gauss, schedule, x_T_inv, jax.random.key(0), num_steps=n)
    errs.append(float(jnp.abs(back - x0).mean()))
  assert errs[0] > errs[1] > errs[2], errs
  assert errs[-1] < 0.02  # data std is 0.5
  # The inverted noise is (close to) standard normal, as x_T should be.
  x_T_inv = sampling.ddim_invert(gauss, schedule, x0, num_steps=200)
  assert abs(float(x_T_inv.std()) - 1.0) < 0.1 and abs(float(x_T_inv.mean())) < 0.1


def test_slerp_endpoints_and_norm():
  a, b = x_T(14, 4), x_T(15, 4)
  np.testing.assert_allclose(sampling.slerp(a, b, jnp.zeros(4)), a, atol=1e-5)
  np.testing.assert_allclose(sampling.slerp(a, b, jnp.ones(4)), b, atol=1e-5)
  mid = sampling.slerp(a, b, jnp.full(4, 0.5))
  # For near-orthogonal high-dimensional noise, the midpoint keeps the norm (lerp would not).
  big_a, big_b = x_T(16, 2).repeat(1000, 1), x_T(17, 2).repeat(1000, 1)
  m = sampling.slerp(big_a, big_b, jnp.full(2, 0.5))
  ratio = jnp.linalg.norm(m, axis=1) / jnp.linalg.norm(big_a, axis=1)
  assert mid.shape == a.shape and float(jnp.abs(ratio - 1).max()) < 0.1


@pytest.mark.parametrize("sampler,kw", [("ddpm", dict(t_start=7)), ("ddim", dict(num_steps=4)),
                                        ("ddim", dict(timesteps=(9, 5, 2))),
                                        ("dpm_solver++", dict(num_steps=5, t_start=8))])
def test_the_plan_reports_exactly_the_levels_the_model_is_called_at(sampler, kw):
  """sampling.json is written from ``Plan.report``: the model must be called at those
  timesteps, in that order, once each (a report computed apart from the run could differ)."""
  sched = diffusion.make_schedule("cosine", 10)
  plan = sampling.make_plan(sampler, sched, **kw)
  seen = []

  def eps_fn(x, t):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t, ordered=True)
    return 0.1 * x

  jax.block_until_ready(sampling.sample(plan, eps_fn, sched, x_T(0, 2), jax.random.key(0)))
  jax.effects_barrier()
  assert seen == plan.report()["timesteps"] == list(plan.timesteps)
  assert plan.report()["num_steps"] == len(seen)
