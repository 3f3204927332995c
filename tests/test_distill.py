"""Progressive distillation: the math against closed forms and an exact teacher, the rounds'
configs, and the command on a tiny model (kill -9 mid-round, the pinned teacher, the student
against DDIM)."""

import hashlib
import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import config_lib, diffusion, distill, generate, models, objectives, sampling, train
from ddpm_jax.errors import ConfigError
from ddpm_jax.pinning import PIN_FILE
from tests import analytic
from tests.conftest import tiny_config


@pytest.mark.parametrize("T", [1000, 100])
def test_each_grid_is_every_other_level_of_the_one_with_twice_the_steps(T):
  n = 64
  while n > 1:
    grid, half = sampling.distilled_grid(T, n), sampling.distilled_grid(T, n // 2)
    assert len(grid) == n + 1 and grid[0] == T - 1 and grid[-1] == -1
    assert np.all(np.diff(grid) < 0)
    np.testing.assert_array_equal(grid[::2], half)
    n //= 2
  np.testing.assert_array_equal(sampling.distilled_grid(1000, 4), [999, 749, 499, 249, -1])


def test_one_ddim_step_with_the_target_lands_on_the_teachers_two_step_result():
  """Song et al. 2021, eq. 12 with sigma = 0, written out here: x_end = sqrt(ab_end) x0 +
  sqrt(1 - ab_end) (z - sqrt(ab_t) x0) / sqrt(1 - ab_t), with x0 the target."""
  schedule = diffusion.make_schedule("linear", 1000)
  ab = np.append(np.asarray(schedule.alphas_cumprod, np.float64), 1.0)  # ab[-1]: the data
  rng = np.random.default_rng(0)
  t = np.array([999, 500, 250, 30, 2], np.int32)
  t_end = np.array([749, 0, -1, 10, -1], np.int32)
  z = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
  z_end = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
  x0 = np.asarray(objectives.two_step_target(schedule, jnp.asarray(z), jnp.asarray(t),
                                          jnp.asarray(t_end), jnp.asarray(z_end)), np.float64)
  a_t, a_e = (np.sqrt(ab[v]).reshape(-1, 1, 1, 1) for v in (t, t_end))
  s_t, s_e = (np.sqrt(1 - ab[v]).reshape(-1, 1, 1, 1) for v in (t, t_end))
  landed = a_e * x0 + s_e * (z - a_t * x0) / s_t
  np.testing.assert_allclose(landed, z_end, atol=2e-4 * np.abs(z_end).max())
  np.testing.assert_allclose(x0[t_end == -1], z_end[t_end == -1], atol=1e-5)  # x~ = z_end


def _exact_student(schedule, teacher_eps, n_teacher):
  """The student distillation aims at: at level 2j of the teacher's grid, the x0 whose one
  DDIM step is the teacher's two (as eps, for the sampler)."""
  grid = jnp.asarray(sampling.distilled_grid(schedule.num_timesteps, n_teacher))

  def eps_fn(x, t):
    j = jnp.argmax(grid[None, ::2] == t[:, None], axis=1)  # t is level 2j
    _, t_end, z_end = objectives.teacher_two_steps(schedule, teacher_eps, x, grid, j, False)
    x0 = objectives.two_step_target(schedule, x, t, t_end, z_end)
    return diffusion.x0_to_eps(schedule, x, t, x0)
  return eps_fn


def test_exact_students_sample_on_their_grid_what_the_teacher_samples_on_its_own():
  """Two rounds with the exact target: 2 student steps on the student's grid (the sampler's
  explicit timesteps) reproduce the teacher's 8-step DDIM (trailing spacing); a wrong
  target, a grid that does not nest, or a sampler off the grid does not."""
  schedule = diffusion.make_schedule("linear", 1000)
  teacher = analytic.mixture_eps_fn(schedule, [0.3, 0.7], [-0.6, 0.5], [0.2, 0.3])
  x_T = jax.random.normal(jax.random.key(0), (64, 2, 2, 1))
  key = jax.random.key(1)
  want = sampling.ddim_sample(teacher, schedule, x_T, key, num_steps=8, spacing="trailing")
  student = _exact_student(schedule, teacher, 8)
  grandchild = _exact_student(schedule, student, 4)
  for fn, n in ((student, 4), (grandchild, 2)):
    ts = tuple(int(t) for t in sampling.distilled_grid(1000, n)[:-1])
    got = sampling.ddim_sample(fn, schedule, x_T, key, timesteps=ts)
    np.testing.assert_allclose(got, want, atol=2e-4)
    own = sampling.ddim_sample(teacher, schedule, x_T, key, num_steps=n, spacing="trailing")
    assert float(jnp.abs(own - want).max()) > 50 * float(jnp.abs(got - want).max())
  off_grid = sampling.ddim_sample(student, schedule, x_T, key, num_steps=4, spacing="uniform")
  assert float(jnp.abs(off_grid - want).max()) > 0.05


def test_the_loss_weight_is_truncated_snr_or_snr_plus_one():
  schedule = diffusion.make_schedule("linear", 1000)
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  t = jnp.array([0, 100, 300, 999])
  snr = ab[np.asarray(t)] / (1 - ab[np.asarray(t)])
  assert snr[1] > 1 > snr[2]  # both sides of SNR = 1 are covered
  np.testing.assert_allclose(objectives.loss_weight(schedule, t, "truncated_snr"),
                             np.maximum(snr, 1), rtol=1e-4)
  np.testing.assert_allclose(objectives.loss_weight(schedule, t, "snr_plus_one"), snr + 1,
                             rtol=1e-4)
  with pytest.raises(ConfigError, match="distill.weighting"):
    objectives.loss_weight(schedule, t, "snr")


# ------------------------------------------------------------------ the objective, closed form

def _random_params(model, seed: int):
  """Tiny U-Net parameters drawn in numpy (nothing to compile): every leaf nonzero (the
  output layer starts at zero, which would make every prediction 0 and every level alike),
  norm scales near 1."""
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 8, 3))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (float("scale" in jax.tree_util.keystr(path))
                       + 0.2 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def round_case():
  """A round 16 -> 8 steps on T = 100 (truncated SNR > 1 only on its last two student
  levels): an epsilon teacher, a v student (the same U-Net) with other weights, 32
  examples; no warmup, so a first train step moves the student. ``loss(student, teacher,
  keys)``: the objective's (mean, (per-example losses, t)) and gradients, compiled once."""
  teacher_config = tiny_config(**{"model.prediction_type": "epsilon"})
  cfg = distill.round_config(_distill_config(**{"distill.teacher": "t", "optim.warmup_steps": 0,
                                                "optim.lr_schedule": "constant"}),
                             teacher_config, "t", 1, 16, {})
  schedule = diffusion.make_schedule("linear", 100)
  model = models.create_model(cfg)
  x0 = jax.random.uniform(jax.random.key(2), (32, 8, 8, 3), minval=-1, maxval=1)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(32))
  teacher = _random_params(model, 0)
  obj = distill.objective(cfg, model, schedule, teacher_config, teacher)

  def mean_loss(params, teacher, keys):
    losses, t = obj.loss(params, x0, None, keys, jax.random.key(4), teacher)
    return losses.mean(), (losses, t)
  return dict(cfg=cfg, schedule=schedule, model=model, teacher=teacher,
              student=_random_params(model, 1), x0=x0, keys=keys, obj=obj,
              net=jax.jit(lambda p, x, t: models.apply(model, p, x, t)),
              loss=jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)))


def _algorithm_2(c, student, t, keys=None):
  """Salimans & Ho's Algorithm 2 written out in float64 for the case's examples (their
  ``keys``, the case's by default) drawn at levels ``t``: the teacher's two clipped DDIM
  steps t -> t' -> t'', the x~ whose one step from t lands on their end, the weight
  max(SNR_t, 1) at t and the v student's x^ at t. Per-example losses; the networks'
  outputs are the only thing not computed here."""
  ab = np.append(np.asarray(c["schedule"].alphas_cumprod, np.float64), 1.0)  # [-1]: data
  grid = sampling.distilled_grid(100, 16)
  j = np.searchsorted(-grid[::2], -t)
  assert np.array_equal(grid[2 * j], t)  # drawn on the student's levels, 2j of the teacher's
  shape = (-1, 1, 1, 1)
  a, s = (lambda u: np.sqrt(ab[u]).reshape(shape)), (lambda u: np.sqrt(1 - ab[u]).reshape(shape))
  net = lambda p, x, u: np.asarray(c["net"](p, jnp.asarray(x, jnp.float32),  # noqa: E731
                                            jnp.asarray(u, jnp.int32)), np.float64)
  keys = c["keys"] if keys is None else keys
  eps = np.asarray(objectives.example_noise(keys, (8, 8, 3)), np.float64)
  z = a(t) * np.asarray(c["x0"], np.float64) + s(t) * eps
  zk = z
  for k in (2 * j, 2 * j + 1):  # the teacher's two steps, clipping its x0
    u, nxt = grid[k], grid[k + 1]
    e = net(c["teacher"], zk, u)
    x = np.clip((zk - s(u) * e) / a(u), -1, 1)
    e = (zk - a(u) * x) / s(u)
    zk = a(nxt) * x + s(nxt) * e
  end = grid[2 * j + 2]
  ratio = s(end) / s(t)
  target = (zk - ratio * z) / (a(end) - ratio * a(t))
  x_hat = a(t) * z - s(t) * net(student, z, t)
  w = np.maximum(ab[t] / (1 - ab[t]), 1.0).reshape(shape)
  return (w * np.square(x_hat - target)).reshape(len(t), -1).mean(1)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _moved(params, direction: np.ndarray, h: float):
  """``params`` + h * ``direction`` (a flat vector in ``_flat``'s order)."""
  leaves, tree = jax.tree.flatten(params)
  parts = np.split(direction, np.cumsum([x.size for x in leaves])[:-1])
  return jax.tree.unflatten(tree, [(x + h * p.reshape(x.shape)).astype(np.float32)
                                   for x, p in zip(leaves, parts, strict=True)])


def test_the_objective_is_algorithm_2_in_value_and_gradient_and_the_teacher_gets_none(round_case):
  """Each example's loss is w_t ||x~ - x^||^2 with x~ from the teacher's two DDIM steps from
  the student's level t, w_t = max(SNR_t, 1) at t (not at the end level), the student told
  t. The gradient is that of this loss with the teacher held fixed (central differences
  along two directions): x~ is a constant, the teacher frozen, and its parameters get
  exactly no gradient."""
  c = round_case
  (mean, (losses, t)), (grad, teacher_grad) = c["loss"](c["student"], c["teacher"], c["keys"])
  t = np.asarray(t)
  assert {87, 24, 11} <= set(t.tolist())  # w = 1 at both ends of a step; SNR > 1 at t
  want = _algorithm_2(c, c["student"], t)
  np.testing.assert_allclose(losses, want, rtol=2e-4)
  np.testing.assert_allclose(mean, want.mean(), rtol=2e-4)
  g, h = _flat(grad), 1e-2
  for d in (g, np.random.default_rng(5).standard_normal(g.size)):
    d = d / np.linalg.norm(d)
    slope = (_algorithm_2(c, _moved(c["student"], d, h), t).mean()
             - _algorithm_2(c, _moved(c["student"], d, -h), t).mean()) / (2 * h)
    np.testing.assert_allclose(g @ d, slope, rtol=1e-2)
  assert not np.any(_flat(teacher_grad))


def test_a_train_step_leaves_the_teacher_as_it_was_and_trains_against_it(round_case):
  """Two train steps from the student = teacher start: the teacher's arrays are unchanged,
  the student moved, and step 2's loss is Algorithm 2's with the moved student against the
  original teacher (a teacher that followed the student would give another value)."""
  from ddpm_jax import state as state_lib
  c = round_case
  cfg, model, teacher = c["cfg"], c["model"], c["teacher"]
  tx = state_lib.make_optimizer(cfg)
  st = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=teacher, ema_params=teacher,
                            opt_state=tx.init(teacher))  # as a round starts its student
  before = jax.tree.map(np.array, teacher)
  step = jax.jit(train.make_train_step(cfg, model, c["schedule"], tx, axis_name=None,
                                       objective=c["obj"]))
  key, x0 = jax.random.key(5), c["x0"]
  st1, _ = step(st, x0, key, teacher)
  st2, metrics = step(st1, x0, key, teacher)
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(a, b)
  moved = np.linalg.norm(_flat(st1.params) - _flat(before)) / np.linalg.norm(_flat(before))
  assert moved > 1e-4
  example_key = train.step_key(key, 1)  # step 2's examples, as the step draws them
  keys = jax.vmap(lambda i: jax.random.fold_in(example_key, i))(jnp.arange(len(x0)))
  (_, (_, t)), _ = c["loss"](st1.params, before, keys)  # their levels
  want = _algorithm_2(c, st1.params, np.asarray(t), keys).mean()
  np.testing.assert_allclose(metrics["loss"], want, rtol=2e-4)


def _distill_config(**kw):
  from configs import distill as distill_config
  c = distill_config.get_config()
  config_lib.apply_overrides(c, kw)
  return c


def test_rounds_halve_the_steps_and_bad_settings_are_one_line():
  assert distill.round_steps(_distill_config()) == [64, 32, 16, 8]
  assert distill.round_steps(_distill_config(**{"distill.end_steps": 1})) == [64, 32, 16, 8,
                                                                               4, 2]
  for start, end in ((48, 4), (4, 4), (64, 0), (6, 4)):
    with pytest.raises(ConfigError, match="power of two"):
      distill.round_steps(_distill_config(**{"distill.start_steps": start,
                                             "distill.end_steps": end}))
  with pytest.raises(ConfigError, match="distill.teacher"):
    distill.check(_distill_config(), 1000)
  with pytest.raises(ConfigError, match="distill.teacher"):  # before anything is read
    distill.distill(_distill_config(), "/nonexistent/workdir")
  with pytest.raises(ConfigError, match="does not contain"):
    distill.check(_distill_config(**{"distill.teacher": "t", "distill.start_steps": 48,
                                     "distill.end_steps": 3}), 100)
  with pytest.raises(ConfigError, match="distill.weighting"):
    distill.check(_distill_config(**{"distill.teacher": "t", "distill.weighting": "snr"}), 1000)
  with pytest.raises(ConfigError, match="prediction_type"):
    distill.check(_distill_config(**{"distill.teacher": "t", "distill.prediction_type": "z"}),
                  1000)


def test_a_round_config_is_the_teachers_model_with_the_students_sampler():
  teacher = tiny_config(**{"model.prediction_type": "epsilon", "sampling.eta": 1.0,
                           "training.batch_size": 16})
  c = distill.round_config(_distill_config(**{"distill.teacher": "t"}), teacher, "t/steps4", 2,
                           4, {"data.folder": "/elsewhere", "training.batch_size": 8})
  assert c.model.ch == teacher.model.ch and c.data.image_size == teacher.data.image_size
  assert c.model.prediction_type == "v" and c.diffusion.num_timesteps == 100
  s = c.sampling
  assert (s.sampler, s.spacing, s.num_steps, s.eta) == ("ddim", "trailing", 2, 0.0)
  assert (c.distill.round, c.distill.teacher_steps, c.distill.round_teacher) == (2, 4, "t/steps4")
  assert c.training.num_train_steps == 1000 and c.optim.lr_schedule == "cosine"
  assert c.data.folder == "/elsewhere"
  assert generate.student_timesteps(c, 100) == (99, 49)
  assert generate.student_timesteps(c, 100, t_start=49) == (49,)
  assert [generate.snap_to_grid(c, 100, t) for t in (99, 98, 50, 49, 10)] == [99, 49, 49, 49, 49]
  off = c.copy_and_resolve_references()
  off.sampling.num_steps = 3  # asked for another count: sampled as asked, off its grid
  assert generate.student_timesteps(off, 100) is None
  assert generate.student_timesteps(teacher, 100) is None
  assert config_lib.with_defaults(teacher).distill.round == 0


# ------------------------------------------------------------------ the command, tiny

def _checkpoints(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _ddim(workdir, num_steps: int, seed: int = 7, num: int = 64):
  """Samples of a workdir's EMA parameters with deterministic DDIM on the trailing grid
  (a student's own grid at its own step count), the same noise for every call."""
  from ddpm_jax import models
  config = ckpt_lib.saved_config(str(workdir))
  s = config.sampling
  s.sampler, s.spacing, s.eta, s.num_steps, s.batch_size = "ddim", "trailing", 0.0, num_steps, 32
  params, _ = ckpt_lib.load_params(config, str(workdir))
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  sampler = generate.Sampler(config, models.create_model(config), schedule)
  x, _ = generate.generate(config, sampler, params, num, seed=seed, show_progress=False)
  return x


def _rewrite_teacher(teacher, src: int, dst: int, scale: float) -> None:
  """Writes checkpoint ``dst`` of ``teacher``: checkpoint ``src`` with its parameters (raw
  and EMA) scaled, a teacher that went on training (or was retrained) in the same workdir."""
  from ddpm_jax import state as state_lib
  config = ckpt_lib.saved_config(str(teacher))
  mngr = ckpt_lib.make_manager(str(teacher), read_only=True, async_save=False)
  st = ckpt_lib.restore(mngr, state_lib.abstract_train_state(config), src)
  scaled = lambda tree: jax.tree.map(lambda x: np.asarray(x) * scale, tree)  # noqa: E731
  st = st.replace(params=scaled(st.params), ema_params=scaled(st.ema_params))
  shutil.rmtree(teacher / "checkpoints" / str(dst), ignore_errors=True)
  mngr = ckpt_lib.make_manager(str(teacher), async_save=False)
  ckpt_lib.save(mngr, dst, st, config, force=True)
  mngr.wait_until_finished()


def _files(folder) -> dict:
  """Every file under ``folder``: its bytes' sha256 and modification time."""
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      p = os.path.join(root, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, folder)] = (hashlib.sha256(f.read()).hexdigest(),
                                           os.stat(p).st_mtime_ns)
  return out


def _assert_refused(config, workdir, match: str) -> None:
  """``distill`` refuses with one line and leaves every file of ``workdir`` as it was."""
  before = _files(workdir)
  with pytest.raises(ConfigError, match=match) as e:
    distill.distill(config, str(workdir))
  assert "\n" not in str(e.value)
  assert _files(workdir) == before


def test_distillation_resumes_bitwise_after_kill_9_and_its_students_beat_ddim(tmp_path, data_dir):
  """Two rounds (8 -> 4 -> 2 steps) of a v-prediction teacher: killed with SIGKILL mid-round 1
  and rerun, both students equal an uninterrupted run's bit for bit, though the teacher
  gained a newer checkpoint meanwhile (the round resumes with the teacher it pinned); each
  student at its step count is closer to the teacher's 32-step samples (same noise) than
  the teacher's own DDIM at that count. A rerun with another teacher, or with a teacher
  whose pinned step is gone or changed, is refused with one line, nothing written."""
  from tests import cli
  from tests.test_main import run_main, tiny_flags
  teacher = tmp_path / "teacher"
  run_main(*tiny_flags(data_dir, "--config.training.num_train_steps=100",
                       "--config.training.checkpoint_every_steps=100",
                       "--config.training.log_every_steps=50", "--config.optim.learning_rate=3e-3",
                       "--config.model.prediction_type=v"),
           "--workdir", str(teacher), cwd=tmp_path)
  steps = 24  # per round
  flags = ["--mode=distill", "--config", f"{cli.REPO}/configs/distill.py",
           f"--config.distill.teacher={teacher}", f"--config.data.data_dir={data_dir}",
           "--config.distill.start_steps=8", "--config.distill.end_steps=2",
           f"--config.training.num_train_steps={steps}", "--config.training.batch_size=16",
           "--config.training.checkpoint_every_steps=8", "--config.training.log_every_steps=8",
           "--config.optim.learning_rate=5e-4", "--config.optim.warmup_steps=4"]
  straight = run_main(*flags, "--workdir", str(tmp_path / "straight"), cwd=tmp_path)
  assert straight.stdout.strip().splitlines()[-1] == str(tmp_path / "straight" / "steps2")

  killed = tmp_path / "killed"
  job = cli.main_py(*flags, "--workdir", str(killed), cwd=tmp_path)
  first = killed / "steps4"
  while not _checkpoints(first) and job.proc.poll() is None:
    time.sleep(0.05)
  job.proc.kill()
  job.finish()
  assert 8 <= _checkpoints(first)[-1] < steps and not (killed / "steps2").exists()
  pin = json.loads((first / PIN_FILE).read_text())
  assert (pin["teacher"], pin["step"]) == (str(teacher), 100)
  _rewrite_teacher(teacher, 100, 101, 0.9)  # the teacher trained on while the round was down
  rerun = run_main(*flags, "--workdir", str(killed), cwd=tmp_path)
  resumed = re.search(r"resumed from step (\d+)", rerun.stderr)
  assert resumed and int(resumed.group(1)) >= 8, rerun.stderr[-3000:]
  assert f"teacher: {teacher} at step 100 " in rerun.stderr, rerun.stderr[-3000:]
  assert json.loads((first / PIN_FILE).read_text()) == pin
  second = json.loads((killed / "steps2" / PIN_FILE).read_text())
  assert (second["teacher"], second["step"]) == ("steps4", steps)  # the previous round's
  shutil.rmtree(teacher / "checkpoints" / "101")
  for n in (4, 2):
    config = ckpt_lib.saved_config(str(killed / f"steps{n}"))
    step_a, a = cli.final_state(tmp_path / "straight" / f"steps{n}", config)
    step_b, b = cli.final_state(killed / f"steps{n}", config)
    assert step_a == step_b == steps
    cli.assert_same_state(a, b)

  reference = _ddim(teacher, 32)
  for n in (4, 2):
    student = _ddim(killed / f"steps{n}", n)
    own = _ddim(teacher, n)
    rms = lambda x: float(np.sqrt(np.mean((x - reference) ** 2)))  # noqa: E731
    assert rms(student) < rms(own), (n, rms(student), rms(own))

  def config_for(teacher_dir):
    c = _distill_config(**{"distill.teacher": str(teacher_dir), "distill.start_steps": 8,
                           "distill.end_steps": 2, "training.num_train_steps": steps})
    c.data.data_dir = data_dir
    return c
  shutil.copytree(teacher, tmp_path / "teacher_copy")  # the same bytes at another path
  _assert_refused(config_for(tmp_path / "teacher_copy"), killed, "was started with teacher")
  _rewrite_teacher(teacher, 100, 200, 1.0)  # trained on, and kept only its newer steps
  os.rename(teacher / "checkpoints" / "100", tmp_path / "away")
  _assert_refused(config_for(teacher), killed, "checkpoint 100 .* is gone")
  shutil.rmtree(teacher / "checkpoints" / "200")
  os.rename(tmp_path / "away", teacher / "checkpoints" / "100")
  _rewrite_teacher(teacher, 100, 100, 0.9)  # retrained in place: the same step, other weights
  _assert_refused(config_for(teacher), killed, "digest differs")
