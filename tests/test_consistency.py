"""Easy consistency tuning (ECT): the boundary condition, the parameterisation against exact
Gaussian consistency functions, the objective's schedule, loss and gradient path, the
multistep sampler, and the driver on the tiny config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import ndtr

from ddpm_jax import consistency as cm
from ddpm_jax import diffusion
from tests import analytic

MU, S = 0.3, 0.5  # Gaussian data N(MU, S^2) per dimension
TYPES = ("epsilon", "v", "x0")


@pytest.fixture(scope="module")
def lv():
  return cm.levels(diffusion.make_schedule("linear", 1000))


def _posterior_mean(x_ve, sig):
  """E[x0 | x0 + sig eps] for x0 ~ N(MU, S^2): the exact denoiser."""
  return MU + S**2 / (S**2 + sig**2) * (x_ve - MU)


def _exact_f(lv, x_ve, sig):
  """The exact consistency function to sigma_min: the probability-flow ODE maps the marginal
  N(MU, S^2 + sig^2) monotonically onto N(MU, S^2 + sigma_min^2)."""
  return MU + jnp.sqrt((S**2 + lv.sigma_min**2) / (S**2 + sig**2)) * (x_ve - MU)


def _net_for(lv, denoiser, prediction_type):
  """A "network" net(x_vp, t) whose x0-prediction is ``denoiser(x_ve, sigma)``, written in the
  project's VP conventions (x_t = a x0 + s eps, v = a eps - s x0), not the module's scalings."""
  def net(x_vp, t):
    sig = cm.sigma_at(lv, t).reshape((-1,) + (1,) * (x_vp.ndim - 1))
    ab = 1.0 / (1.0 + sig**2)
    a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    d = denoiser(x_vp / a, sig)
    eps = (x_vp - a * d) / s
    return {"epsilon": eps, "x0": d, "v": a * eps - s * d}[prediction_type]
  return net


def _consistency_net(lv, prediction_type, delta=0.0):
  """The net whose consistency function (by our parameterisation) is the exact one, plus
  ``delta`` times a perturbation: D = x + (f* - x)/kappa."""
  def denoiser(x, sig):
    kappa = (sig - lv.sigma_min) / sig
    f = _exact_f(lv, x, sig) + delta * kappa * (0.5 * x + 1.0)
    return x + jnp.where(kappa > 0, (f - x) / jnp.where(kappa > 0, kappa, 1.0), 0.0)
  return _net_for(lv, denoiser, prediction_type)


# ------------------------------------------------------------------ levels and parameterisation

def test_levels_are_the_schedules_sigmas_and_timesteps_invert_them(lv):
  """sigma(t) = sqrt((1 - ab_t)/ab_t) at the integer timesteps (x_vp / sqrt(ab) is x0 +
  sigma eps); timestep_at inverts sigma_at (the network is told the level it is at)."""
  ab = diffusion.make_schedule("linear", 1000).alphas_cumprod_np()
  t = np.array([0, 1, 10, 500, 999])
  np.testing.assert_allclose(cm.sigma_at(lv, t), np.sqrt((1 - ab[t]) / ab[t]), rtol=2e-5)
  assert float(lv.sigma_min) == pytest.approx(np.sqrt((1 - ab[0]) / ab[0]), rel=1e-6)
  tf = jnp.array([0.0, 0.25, 3.6, 499.7, 998.9])
  np.testing.assert_allclose(cm.timestep_at(lv, cm.sigma_at(lv, tf)), tf, atol=2e-3)
  assert list(cm.int_timestep(lv, cm.sigma_at(lv, tf))) == [0, 0, 4, 500, 999]


@pytest.mark.parametrize("prediction_type", TYPES)
def test_the_boundary_condition_holds_exactly_for_any_network(lv, prediction_type):
  """f(x, sigma_min) = x bit for bit whatever the network outputs (CM eq. 2); just above
  sigma_min the network counts."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)) * 3
  wild = lambda x_vp, t: jnp.sin(7 * x_vp) * 50 + t[:, None, None, None]  # noqa: E731
  at_min = cm.consistency_fn(wild, lv, prediction_type, x, jnp.full((4,), lv.sigma_min))
  np.testing.assert_array_equal(at_min, x)
  above = cm.consistency_fn(wild, lv, prediction_type, x, jnp.full((4,), 2 * lv.sigma_min))
  assert float(jnp.max(jnp.abs(above - x))) > 1e-2


def test_at_the_start_f_is_the_teachers_denoiser_whatever_its_parameterisation(lv):
  """The three parameterisations of the same (exact) teacher give the same f, and f - D =
  -(sigma_min/sigma)(D - x): the tuning starts from the teacher's x0-prediction."""
  x = jax.random.normal(jax.random.key(1), (6, 16)) * 2
  sig = jnp.array([0.011, 0.05, 0.3, 1.0, 10.0, 150.0])
  d = _posterior_mean(x, sig[:, None])
  for pt in TYPES:
    f = cm.consistency_fn(_net_for(lv, _posterior_mean, pt), lv, pt, x, sig)
    np.testing.assert_allclose(f, d - lv.sigma_min / sig[:, None] * (d - x), rtol=1e-4,
                               atol=1e-4, err_msg=pt)


@pytest.mark.parametrize("prediction_type", TYPES)
def test_a_model_of_the_exact_consistency_function_maps_x_T_to_the_odes_end(lv, prediction_type):
  """The network of the exact consistency function, through our parameterisation, maps x_T to
  where the probability-flow ODE takes it (tests/analytic.py's solution to the data, carried
  to sigma_min on the same trajectory), in one step."""
  schedule = diffusion.make_schedule("linear", 1000)
  x_T = np.asarray(jax.random.normal(jax.random.key(2), (64, 4)))
  one = cm.sample(_consistency_net(lv, prediction_type), lv, prediction_type, x_T,
                  jax.random.key(3))
  to_data = analytic.gaussian_ode_solution(schedule, x_T, MU, S)
  to_min = MU + np.sqrt(S**2 + float(lv.sigma_min)**2) / S * (to_data - MU)
  np.testing.assert_allclose(one, to_min, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ the objective's pieces

def test_r_follows_ects_sigmoid_mapping_and_the_gap_shrinks_by_q_per_stage(lv):
  """ECT's t_to_r_sigmoid, written out in numpy: r = t (1 - (1 + k sigmoid(-b t))/q^(a+1)),
  clamped (at sigma_min here); r < t; each stage divides the gap by q."""
  t = np.array([0.02, 0.3, 1.0, 5.0, 80.0], np.float32)
  for stage in (0, 3, 7):
    ref = t * (1 - (1 + 8 / (1 + np.exp(t))) / 2.0 ** (stage + 1))
    r = cm.sigma_r(jnp.asarray(t), stage, lv.sigma_min, 2.0, 8.0, 1.0)
    np.testing.assert_allclose(r, np.maximum(ref, float(lv.sigma_min)), rtol=1e-5)
    assert np.all(np.asarray(r) < t)
  g5, g6 = (t - np.asarray(cm.sigma_r(jnp.asarray(t), a, lv.sigma_min, 2.0, 8.0, 1.0))
            for a in (5, 6))
  np.testing.assert_allclose(g5 / g6, 2.0, rtol=1e-3)


def test_sigma_t_is_ects_lognormal_restricted_to_the_schedule(lv):
  """log sigma_t ~ N(-1.1, 2^2) conditioned on [sigma_min, sigma_max]: empirical CDF at a
  few points against the truncated normal's."""
  keys = jax.random.split(jax.random.key(4), 20000)
  sig = np.asarray(jax.vmap(lambda k: cm.sample_sigma(k, lv, -1.1, 2.0))(keys))
  assert sig.min() >= float(lv.sigma_min) and sig.max() <= float(lv.sigma_max)
  cdf = lambda s: ndtr((np.log(s) + 1.1) / 2.0)  # noqa: E731
  lo, hi = cdf(lv.sigma_min), cdf(lv.sigma_max)
  for s in (0.05, 0.3, 1.0, 5.0):
    assert np.mean(sig <= s) == pytest.approx(float((cdf(s) - lo) / (hi - lo)), abs=0.012)


def test_pseudo_huber_and_the_weight():
  """c = 0: the L2 norm (ECT's CIFAR-10 runs), with a finite gradient at 0; c > 0:
  sqrt(||d||^2 + c^2) - c; w = 1/(t - r), 0 where t = r."""
  d = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(cm.pseudo_huber(d, 0.0), [5.0, 0.0])
  np.testing.assert_allclose(cm.pseudo_huber(d, 1.0), [np.sqrt(26) - 1, 0.0], rtol=1e-6)
  g = jax.grad(lambda d: cm.pseudo_huber(d, 0.0).sum())(d)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[1] == 0)
  np.testing.assert_allclose(cm.ect_weight(jnp.array([1.0, 0.5]), jnp.array([0.75, 0.5])),
                             [4.0, 0.0])


def test_the_gradient_flows_through_the_t_branch_only(lv):
  """A net with one weight for levels above timestep 300 and another below: with t above and
  r below, the loss has a gradient in the first only (stop-gradient at r, ECT's no_grad)."""
  def net_of(p):
    return lambda x, t: x * jnp.where(t > 300, p["hi"], p["lo"])[:, None]
  x0 = jax.random.normal(jax.random.key(5), (8, 6))
  noise = jax.random.normal(jax.random.key(6), (8, 6))
  sig_t, sig_r = jnp.full((8,), float(cm.sigma_at(lv, 400))), jnp.full((8,), 0.5)
  assert float(cm.timestep_at(lv, 0.5)[()]) < 300
  grad = jax.grad(lambda p: cm.ect_losses(net_of(p), lv, "epsilon", x0, noise, sig_t, sig_r,
                                          0.0).mean())({"hi": 0.7, "lo": 0.2})
  assert grad["lo"] == 0.0 and abs(float(grad["hi"])) > 1e-3


def test_the_exact_consistency_function_is_where_the_ect_gradient_vanishes(lv):
  """E[d loss / d delta] for f* + delta h: ~0 at delta = 0 once the gap is small (the exact
  function is a stationary point of consistency training), and pointing back to 0 from
  delta = +-0.2 (common random numbers for all deltas)."""
  B, D = 4096, 32
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  x0 = MU + S * jax.random.normal(k1, (B, D))
  noise = jax.random.normal(k2, (B, D))
  sig_t = jax.vmap(lambda k: cm.sample_sigma(k, lv, -1.1, 2.0))(jax.random.split(k3, B))

  @jax.jit
  def grad_at(delta, stage):
    sig_r = cm.sigma_r(sig_t, stage, lv.sigma_min, 2.0, 8.0, 1.0)
    f = lambda d: cm.ect_losses(_consistency_net(lv, "epsilon", d), lv, "epsilon",  # noqa: E731
                                x0, noise, sig_t, sig_r, 0.0).mean()
    return jax.grad(f)(delta)
  g0, gp, gm = (float(grad_at(d, 7)) for d in (0.0, 0.2, -0.2))
  assert gp > 0 > gm, (g0, gp, gm)
  assert abs(g0) < 0.05 * min(gp, -gm), (g0, gp, gm)


# ------------------------------------------------------------------ sampling

def test_multistep_sampling_keeps_the_marginal_and_is_deterministic_given_the_key(lv):
  """With the exact f, re-noising x0 to tau (sqrt(tau^2 - sigma_min^2) z) and applying f keeps
  x0 ~ N(MU, S^2 + sigma_min^2) after 2 and 3 steps (a step that re-noised wrongly or not at
  all would shrink or widen it); the same key gives the same samples, another key others."""
  net = _consistency_net(lv, "v")
  x_T = jax.random.normal(jax.random.key(8), (20000, 4))
  run = {n: jax.jit(lambda x, k, mids=cm.default_mid_sigmas(lv, n): cm.sample(net, lv, "v", x, k,
                                                                             mids))
         for n in (2, 3)}
  for n in (2, 3):
    x = np.asarray(run[n](x_T, jax.random.key(9)))
    assert x.mean() == pytest.approx(MU, abs=0.01)
    assert x.std() == pytest.approx(np.sqrt(S**2 + float(lv.sigma_min)**2), rel=0.01)
  assert cm.default_mid_sigmas(lv, 2) == (0.821,)
  a, b, c = (run[2](x_T, jax.random.key(k)) for k in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


# ------------------------------------------------------------------ in the trainer

# A U-Net smaller than the tiny config's, 4x4 images: a third of its compile time.
SMALL = {"model.ch_mult": (1,), "model.attn_resolutions": (), "data.image_size": 4}


def _random_params(model, size: int, seed: int = 0):
  """Tiny U-Net parameters drawn in numpy (nothing to compile), every leaf nonzero (the
  output layer starts at zero, which would make every level's f alike)."""
  from ddpm_jax import models
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), size, 3))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (float("scale" in jax.tree_util.keystr(path))
                       + 0.2 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def test_each_step_of_a_dispatch_trains_at_its_own_stage_of_the_gap_schedule():
  """Two steps in one dispatch (``steps_per_dispatch`` 2, 2 microbatches), at steps 3 and 4
  of a schedule that halves the gap every 2 steps: each step's loss is ECT's at its own
  stage (1, then 2), written from the pieces (lognormal sigma_t, r at stage step // 2, one
  noise draw) with the keys the step draws; the trainer hands the objective its step (a
  stage stuck at 0, or the dispatch's first step for both, gives other losses). The
  learning rate is 0 at the first update (warm-up), so both steps see the same weights."""
  from ddpm_jax import consistency_tuning, models, train
  from ddpm_jax import state as state_lib
  from tests.conftest import tiny_config
  cfg = tiny_config(**SMALL, **{"consistency.teacher": "t",
                                "consistency.double_every_steps": 2,
                                "training.microbatches": 2, "optim.warmup_steps": 4})
  schedule = diffusion.make_schedule("linear", 100)
  model, lv = models.create_model(cfg), cm.levels(schedule)
  params = _random_params(model, 4)
  tx = state_lib.make_optimizer(cfg)
  st = state_lib.TrainState(step=jnp.int32(3), params=params, ema_params=params,
                            opt_state=tx.init(params))
  obj = consistency_tuning.objective(cfg, model, schedule, params)
  steps = jax.jit(train.make_multi_step(
      train.make_train_step(cfg, model, schedule, tx, axis_name=None, objective=obj), 2))
  x0 = jax.random.uniform(jax.random.key(1), (2, 8, 4, 4, 3), minval=-1, maxval=1)
  key = jax.random.key(2)
  _, metrics = steps(st, x0, key)

  @jax.jit
  def ect_loss(x0, example_keys, stage):
    sig_t = jax.vmap(lambda k: cm.sample_sigma(jax.random.fold_in(k, 0), lv, -1.1, 2.0))(
        example_keys)
    sig_r = cm.sigma_r(sig_t, stage, lv.sigma_min, 2.0, 8.0, 1.0)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(
        example_keys)
    net = cm.model_net(model, params, None)
    return cm.ect_losses(net, lv, "epsilon", x0, noise, sig_t, sig_r, 0.0).mean()

  for i, step in enumerate((3, 4)):
    example_key = train.step_key(key, step)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(example_key, jnp.arange(8))
    want = [float(ect_loss(x0[i], keys, a)) for a in (0, 1, 2)]
    got, other = float(metrics["loss"][i]), [w for a, w in enumerate(want) if a != step // 2]
    assert abs(got - want[step // 2]) < 0.05 * min(abs(got - w) for w in other), (step, got, want)


# ------------------------------------------------------------------ the command, tiny

def _teacher(workdir, data_dir):
  """A teacher workdir with one checkpoint (step 0) of random weights, written in-process:
  nothing to train (the tuning's mechanics do not need a good teacher). Its model is
  ``SMALL`` (the tuning's too: it is the teacher's)."""
  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import models
  from ddpm_jax import state as state_lib
  from tests.conftest import tiny_config
  config = tiny_config(**SMALL, **{"data.data_dir": data_dir})
  params = _random_params(models.create_model(config), 4)
  tx = state_lib.make_optimizer(config)
  st = state_lib.TrainState(step=np.int32(0), params=params, ema_params=params,
                            opt_state=jax.device_get(tx.init(params)))
  mngr = ckpt_lib.make_manager(str(workdir), async_save=False)
  ckpt_lib.save(mngr, 0, st, config, force=True)
  mngr.wait_until_finished()
  return config


def test_tuning_resumes_bitwise_after_kill_9_and_samples_in_one_call(tmp_path, data_dir):
  """--mode=consistency on the tiny config, 6 steps whose gap halves every 2: killed with
  SIGKILL after its first checkpoint and rerun, the final state equals an uninterrupted
  run's bit for bit (the resumed steps are at their own stages). --mode=sample on the tuned
  workdir runs the consistency sampler: 1 network call, at sigma_max, the samples those of
  f(x_T, sigma_max) with the EMA weights; sampling.json says so; with
  consistency.num_steps=2 the second call is at ECT's 0.821."""
  import json
  import os
  import time

  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import consistency, models, modes
  from tests import cli
  from tests.test_main import run_main
  teacher = tmp_path / "teacher"
  _teacher(teacher, data_dir)
  flags = ["--mode=consistency", *cli.tiny_flags(data_dir),
           f"--config.consistency.teacher={teacher}", "--config.training.num_train_steps=6",
           "--config.consistency.double_every_steps=2",
           "--config.training.checkpoint_every_steps=2"]
  straight = run_main(*flags, "--workdir", str(tmp_path / "straight"), cwd=tmp_path)
  assert straight.stdout.strip().splitlines()[-1] == str(tmp_path / "straight")
  killed = tmp_path / "killed"
  job = cli.main_py(*flags, "--workdir", str(killed), cwd=tmp_path)
  ckpts = killed / "checkpoints"
  while job.proc.poll() is None and not (ckpts.is_dir() and any(
      n.isdigit() for n in os.listdir(ckpts))):
    time.sleep(0.05)
  job.proc.kill()
  job.finish()
  done = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  assert done and done[-1] < 6, done
  rerun = run_main(*flags, "--workdir", str(killed), cwd=tmp_path)
  assert "resumed from step" in rerun.stderr, rerun.stderr[-3000:]
  config = ckpt_lib.saved_config(str(killed))
  assert config.consistency.teacher == str(teacher)
  step_a, a = cli.final_state(tmp_path / "straight", config)
  step_b, b = cli.final_state(killed, config)
  assert step_a == step_b == 6
  cli.assert_same_state(a, b)

  out = run_main("--mode=sample", "--workdir", str(killed), cwd=tmp_path).stdout
  folder = out.strip().splitlines()[-1]
  assert os.path.basename(folder) == "step6_consistency1_seed0"
  record = json.load(open(os.path.join(folder, "sampling.json")))
  schedule = diffusion.make_schedule("linear", 100)
  lv = cm.levels(schedule)
  assert (record["sampler"], record["num_steps"], record["network_calls"]) == (
      "consistency", 1, 1)
  np.testing.assert_allclose(record["sigmas"], [float(lv.sigma_max)], rtol=1e-6)
  model = models.create_model(config)
  params, _ = ckpt_lib.load_params(config, str(killed))
  x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                             (4, 4, 3)))(jnp.arange(8))
  plan = cm.make_plan(schedule, 1, clip_x0=config.sampling.clip_x0)  # the saved config's
  want = consistency.sampler(plan, model, schedule, config.model.prediction_type)(
      params, x_T, jax.random.key(1))
  np.testing.assert_allclose(np.load(os.path.join(folder, "samples.npz"))["samples"], want,
                             atol=1e-3)  # f(x_T) cancels x_T (|x_T| ~ sigma_max = 221)
  config.consistency.num_steps = 2
  two = modes.sample_and_save(config, str(killed))
  record = json.load(open(os.path.join(two, "sampling.json")))
  assert (record["sampler"], record["network_calls"]) == ("consistency", 2)
  np.testing.assert_allclose(record["sigmas"], [float(lv.sigma_max), 0.821], rtol=1e-6)


def test_a_tuned_workdirs_plan_refuses_what_needs_a_diffusion_models_steps():
  """plan_for on a tuned config: a consistency plan (1 call at sigma_max; image to image
  from the input's own level, with only the mid levels below it); inpainting and DDIM
  inversion are one ConfigError each that names the teacher; an untuned config keeps its
  diffusion plan."""
  from ddpm_jax import generate, models
  from ddpm_jax.errors import ConfigError
  from tests.conftest import tiny_config
  cfg = tiny_config(**SMALL, **{"consistency.teacher": "runs/the_teacher",
                                "consistency.num_steps": 2})
  schedule = diffusion.make_schedule("linear", 100)
  lv = cm.levels(schedule)
  plan = generate.plan_for(cfg, schedule)
  assert plan.sampler == "consistency" and plan.num_steps == 2
  np.testing.assert_allclose(plan.sigmas, [float(lv.sigma_max), 0.821], rtol=1e-6)
  low = generate.plan_for(cfg, schedule, t_start=5)  # sigma(5) < 0.821: no mid level left
  assert low.sigmas == (pytest.approx(float(cm.sigma_at(lv, 5))),) and not low.from_noise
  with pytest.raises(ConfigError, match="runs/the_teacher"):
    generate.plan_for(cfg, schedule, inpaint=True)
  sampler = generate.Sampler(cfg, models.create_model(cfg), schedule)
  with pytest.raises(ConfigError, match="runs/the_teacher"):
    sampler.invert(None, np.zeros((1, 4, 4, 3), np.float32))
  assert generate.plan_for(tiny_config(**SMALL), schedule).sampler == "ddim"
