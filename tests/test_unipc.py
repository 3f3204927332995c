"""UniPC-bh2 (order 2): against diffusers' UniPCMultistepScheduler on an analytic denoiser, its
error against DPM-Solver++(2M) from the same noise, and its plan (multistep: no RePaint)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling
from ddpm_jax.errors import ConfigError
from tests import analytic

MEAN, STD = 0.3, 0.5
MIX = ([0.3, 0.7], [-0.6, 0.5], [0.1, 0.2])  # docs/sampling.md's mixture


@pytest.fixture(scope="module")
def schedule():
  return diffusion.make_schedule("linear", 1000)


@pytest.fixture(scope="module")
def mix(schedule):
  return analytic.mixture_eps_fn(schedule, *MIX)


def x_T(seed=8, n=512, d=4):
  return jax.random.normal(jax.random.key(seed), (n, d))


def diffusers_unipc(schedule, eps_fn, timesteps, x):
  """diffusers' UniPC-bh2 (order 2, x0 prediction, first order on the last step) from x through
  exactly ``timesteps``: its timesteps and sigmas (sqrt((1 - ab) / ab), then 0: the data) are
  set to ours, so both solvers see the same levels and the same denoiser."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = diffusers.UniPCMultistepScheduler(
      num_train_timesteps=schedule.num_timesteps, solver_order=2, solver_type="bh2",
      predict_x0=True, lower_order_final=True, trained_betas=np.asarray(schedule.betas))
  sched.set_timesteps(len(timesteps))
  ac = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(timesteps)]
  sched.timesteps = torch.tensor(np.asarray(timesteps), dtype=torch.int64)
  sched.sigmas = torch.tensor(np.append(np.sqrt((1 - ac) / ac), 0.0), dtype=torch.float32)
  xt = torch.tensor(np.asarray(x))
  for t in sched.timesteps:
    eps = eps_fn(jnp.asarray(xt.numpy()), jnp.full((xt.shape[0],), int(t), jnp.int32))
    xt = sched.step(torch.tensor(np.asarray(eps)), t, xt).prev_sample
  return xt.numpy()


@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
@pytest.mark.parametrize("steps", [5, 10])
def test_unipc_is_diffusers_unipc_bh2(schedule, mix, steps, spacing):
  """Same noise, same timesteps, the mixture's exact denoiser (non-linear in x, so the corrector's
  use of the new model output matters): our scan ends where diffusers' scheduler does. Uniform
  spacing makes the step ratios r far from 1, so an inverted r would show. Both run in float32
  with coefficients rounded in different orders: measured 1e-5 apart; a wrong sign, a missing
  corrector or bh1's B(h) = h moves the samples by more than 1e-3."""
  x = x_T(3, 64)
  ts = sampling.timesteps_used("unipc", schedule, steps, spacing)
  ours = np.asarray(sampling.unipc_sample(mix, schedule, x, num_steps=steps, spacing=spacing))
  theirs = diffusers_unipc(schedule, mix, ts, x)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(ours - np.asarray(x)).max() > 0.1  # it went somewhere


def test_unipc_beats_dpm_solver_pp_at_5_and_10_steps(schedule, mix):
  """The issue's goal on exact denoisers, same noise, logsnr spacing (both solvers' default),
  mean |x - reference|. Mixture: the reference is DPM-Solver++ at 1000 steps (UniPC at 1000 is
  5e-5 from it); UniPC must win at 5 and at 10 steps. Gaussian, against the exact ODE solution:
  UniPC wins at 5 and at 20; at 10 steps DPM-Solver++ is the closer one on this linear ODE
  (measured 0.020 vs 0.012: at so few steps the errors of both change sign with the step count),
  which this test prints and docs/sampling.md states rather than hides."""
  x = x_T()
  ref = np.asarray(sampling.dpm_solver_pp_sample(mix, schedule, x, num_steps=1000))
  gauss = analytic.gaussian_eps_fn(schedule, MEAN, STD)
  exact = analytic.gaussian_ode_solution(schedule, x, MEAN, STD)

  def err(solver, eps_fn, steps, want):
    return float(np.abs(np.asarray(solver(eps_fn, schedule, x, num_steps=steps)) - want).mean())

  errs = {(name, data, n): err(f, e, n, want)
          for name, f in (("unipc", sampling.unipc_sample),
                          ("dpm++", sampling.dpm_solver_pp_sample))
          for data, e, want in (("mixture", mix, ref), ("gaussian", gauss, exact))
          for n in (5, 10, 20)}
  for k, v in sorted(errs.items()):
    print(*k, f"{v:.5f}")
  for n in (5, 10):
    assert errs["unipc", "mixture", n] < errs["dpm++", "mixture", n], (n, errs)
  for n in (5, 20):
    assert errs["unipc", "gaussian", n] < errs["dpm++", "gaussian", n], (n, errs)


def test_unipc_plan_is_multistep_with_logsnr_spacing(schedule):
  """``make_plan("unipc")`` takes DPM-Solver++'s levels (logsnr by default) and, keeping a
  history of model outputs, refuses RePaint resampling as DPM-Solver++ does; inpainting without
  resampling runs and ends on the known pixels exactly."""
  plan = sampling.make_plan("unipc", schedule, num_steps=10)
  assert plan.sampler == "unipc" and plan.spacing == "logsnr" and plan.num_steps == 10
  assert plan.timesteps == sampling.make_plan("dpm_solver++", schedule, num_steps=10).timesteps
  assert sampling.make_plan("unipc", schedule, num_steps=4, spacing="uniform").spacing == "uniform"
  assert plan.report()["sampler"] == "unipc"
  with pytest.raises(ConfigError, match="multistep"):
    sampling.make_plan("unipc", schedule, num_steps=10, resample_steps=3)
  known = jnp.full((4, 6), 0.25)
  mask = jnp.asarray(np.arange(6) < 3, jnp.float32) * jnp.ones((4, 1))
  with pytest.raises(ConfigError, match="multistep"):
    sampling.sample("unipc", lambda x, t: x, schedule, x_T(0, 4, 6), known=known, mask=mask,
                    resample_steps=3)
  gauss = analytic.gaussian_eps_fn(schedule, MEAN, STD)
  out = np.asarray(sampling.unipc_sample(gauss, schedule, x_T(0, 4, 6), jax.random.key(1),
                                         num_steps=6, known=known, mask=mask))
  np.testing.assert_array_equal(out[:, :3], 0.25)
  assert np.isfinite(out).all() and np.abs(out[:, 3:] - 0.25).max() > 0.05
