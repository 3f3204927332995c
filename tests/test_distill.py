"""Progressive distillation: the math against closed forms and an exact teacher, the rounds'
configs, and the command on a tiny model (kill -9 mid-round, the student against DDIM)."""

import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import config_lib, diffusion, distill, generate, sampling
from ddpm_jax.errors import ConfigError
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
  x0 = np.asarray(distill.two_step_target(schedule, jnp.asarray(z), jnp.asarray(t),
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
    _, t_end, z_end = distill.teacher_two_steps(schedule, teacher_eps, x, grid, j, False)
    x0 = distill.two_step_target(schedule, x, t, t_end, z_end)
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
  np.testing.assert_allclose(distill.loss_weight(schedule, t, "truncated_snr"),
                             np.maximum(snr, 1), rtol=1e-4)
  np.testing.assert_allclose(distill.loss_weight(schedule, t, "snr_plus_one"), snr + 1,
                             rtol=1e-4)
  with pytest.raises(ConfigError, match="distill.weighting"):
    distill.loss_weight(schedule, t, "snr")


def _distill_config(**kw):
  from configs import distill as distill_config
  c = distill_config.get_config()
  for k, v in kw.items():
    section, leaf = k.split(".")
    c[section][leaf] = v
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
  assert config_lib.setting(teacher, "distill.round") == 0


# ------------------------------------------------------------------ the command, tiny

def _checkpoints(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _ddim(workdir, num_steps: int, seed: int = 7, num: int = 64):
  """Samples of a workdir's EMA parameters with deterministic DDIM on the trailing grid
  (a student's own grid at its own step count), the same noise for every call."""
  from ddpm_jax import models
  config = distill.saved_config(str(workdir))
  s = config.sampling
  s.sampler, s.spacing, s.eta, s.num_steps, s.batch_size = "ddim", "trailing", 0.0, num_steps, 32
  params, _ = ckpt_lib.load_params(config, str(workdir))
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  sampler = generate.Sampler(config, models.create_model(config), schedule)
  x, _ = generate.generate(config, sampler, params, num, seed=seed, show_progress=False)
  return x


def test_distillation_resumes_bitwise_after_kill_9_and_its_students_beat_ddim(tmp_path, data_dir):
  """Two rounds (8 -> 4 -> 2 steps) of a v-prediction teacher: killed with SIGKILL mid-round 1
  and rerun, both students equal an uninterrupted run's bit for bit; each student at its
  step count is closer to the teacher's 32-step samples (same noise) than the teacher's
  own DDIM at that count."""
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
  rerun = run_main(*flags, "--workdir", str(killed), cwd=tmp_path)
  resumed = re.search(r"resumed from step (\d+)", rerun.stderr)
  assert resumed and int(resumed.group(1)) >= 8, rerun.stderr[-3000:]
  for n in (4, 2):
    config = distill.saved_config(str(killed / f"steps{n}"))
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
