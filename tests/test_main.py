"""The command line, end to end, in subprocesses: train, bare --mode=sample, signals, errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO


def run_main(*args, cwd, env_extra=None, timeout=600, check=True):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def tiny_flags(data_dir, *extra):
  return ["--config", os.path.join(REPO, "configs", "tiny.py"),
          f"--config.data.data_dir={data_dir}", *extra]


OUR_FILES = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]")


def library_info_lines(stderr: str) -> list[str]:
  """absl INFO lines that did not come from ddpm_jax or main.py."""
  ours = {os.path.basename(p) for p in os.listdir(os.path.join(REPO, "ddpm_jax"))} | {"main.py"}
  return [line for line in stderr.splitlines()
          if (m := OUR_FILES.match(line)) and line[0] == "I" and m.group(1) not in ours]


def test_train_then_bare_sample_as_on_the_design_card(tmp_path, data_dir):
  """`main.py --config ... --workdir runs/` then a bare `main.py --mode=sample`."""
  train = run_main(*tiny_flags(data_dir, "--config.training.sample_every_steps=2",
                               "--config.training.eval_every_steps=2"), "--workdir", "runs/",
                   cwd=tmp_path)
  # The console: our progress lines, no library INFO chatter (orbax's checkpoint internals).
  assert [x.split(" | ")[0] for x in train.stdout.splitlines() if x.startswith("train:")] == [
      f"train: step {i}/4" for i in range(1, 5)]
  assert not library_info_lines(train.stderr), library_info_lines(train.stderr)[:5]
  assert OUR_FILES.match("I1126 12:39:29.349471 139840069225344 main.py:74] JAX")
  ckpts = sorted(os.listdir(tmp_path / "runs" / "checkpoints"))
  assert "4" in ckpts
  lines = [json.loads(x) for x in open(tmp_path / "runs" / "metrics.jsonl")]
  train_lines = [x for x in lines if "loss" in x]
  assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
  assert all(np.isfinite(x["loss"]) for x in train_lines)
  val = [x for x in lines if "val/loss_all" in x]  # held-out eps-MSE every 2 steps
  assert [x["step"] for x in val] == [2, 4] and all(np.isfinite(x["val/loss_all"]) for x in val)
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "runs" / "tensorboard"))
  grids = sorted(os.listdir(tmp_path / "runs" / "samples" / "during_training"))
  assert grids == ["step2.png", "step4.png"]  # EMA sample grids every 2 steps

  out = run_main("--mode=sample", cwd=tmp_path).stdout.strip().splitlines()[-1]
  assert os.path.isdir(out)
  grid = Image.open(os.path.join(out, "grid.png"))
  assert grid.mode == "RGB" and grid.width > 8
  assert len(os.listdir(os.path.join(out, "images"))) == 8
  data = np.load(os.path.join(out, "samples.npz"))
  assert data["images"].shape == (8, 8, 8, 3) and data["images"].dtype == np.uint8
  gif = Image.open(os.path.join(out, "denoise.gif"))
  assert gif.n_frames == 3  # sampling.num_frames in configs/tiny.py
  # Same seed, same images; the saved config is used and flags override it.
  again = run_main("--mode=sample", "--config.sampling.name=again", cwd=tmp_path)
  again_dir = again.stdout.strip().splitlines()[-1]
  np.testing.assert_array_equal(np.load(os.path.join(again_dir, "samples.npz"))["images"],
                                data["images"])
  # README's DPM-Solver++ example samples on log-SNR-spaced timesteps (spacing "auto").
  other = run_main("--mode=sample", "--config.sampling.sampler=dpm_solver++",
                   "--config.sampling.num_steps=20", "--config.sampling.num_frames=0",
                   cwd=tmp_path).stdout.strip().splitlines()[-1]
  assert "dpm_solver++20" in other and not os.path.exists(os.path.join(other, "denoise.gif"))
  used = json.load(open(os.path.join(other, "sampling.json")))
  from ddpm_jax import diffusion, sampling
  schedule = diffusion.make_schedule("linear", 100)
  assert used["spacing"] == "logsnr" and used["timesteps"] == sampling.timestep_sequence(
      100, 20, "logsnr", schedule.alphas_cumprod_np()).tolist()
  assert used["timesteps"] != sampling.timestep_sequence(100, 20, "uniform").tolist()

  interp = run_main("--mode=interpolate", cwd=tmp_path).stdout.strip().splitlines()[-1]
  strip = Image.open(os.path.join(interp, "strip.png"))
  assert strip.width > strip.height  # 4 rows of 9
  assert Image.open(os.path.join(interp, "interpolation.gif")).n_frames == 16
  rec = run_main("--mode=reconstruct", cwd=tmp_path).stdout.strip().splitlines()[-1]
  report = json.load(open(os.path.join(rec, "error.json")))
  assert report["num_images"] == 8 and np.isfinite(report["psnr_db"])
  for name in ("originals.png", "reconstructions.png", "error.png"):
    assert Image.open(os.path.join(rec, name)).size[0] > 8
  ev = run_main("--mode=eval", cwd=tmp_path)
  report = json.load(open(tmp_path / "runs" / "eval" / "4.json"))
  # An untrained 4-step model: finite, positive, and far from a perfect model.
  assert 0 < report["bits_per_dim"] < 100 and report["num_images"] == 16
  assert report["fid"].startswith("unavailable") and "bits/dim" in ev.stdout
  assert report["num_samples"] == 8 and report["num_reference"] == 64
  assert 0 <= report["precision_random_conv"] <= 1 and 0 <= report["recall_random_conv"] <= 1
  assert report["memorisation"]["train_images_searched"] == 256  # the whole tiny train split
  assert set(report["colour"]) == {"R", "G", "B"}
  assert os.path.exists(tmp_path / "runs" / "eval" / "4_nearest.png")
  assert os.path.exists(tmp_path / "runs" / "eval" / "metrics.jsonl")
  assert os.listdir(tmp_path / "runs" / "tensorboard" / "eval")

  # Out to diffusers and back in: the imported workdir samples what the run's EMA did.
  exported = run_main("--mode=export", cwd=tmp_path).stdout.strip().splitlines()[-1]
  assert exported == str(tmp_path / "runs" / "diffusers")
  assert sorted(os.listdir(exported)) == ["model_index.json", "scheduler", "unet"]
  imported = run_main("--mode=import", f"--model={exported}", "--workdir",
                      str(tmp_path / "imported"), cwd=tmp_path).stdout.strip().splitlines()[-1]
  same = ["--config.sampling.num_samples=8", "--config.sampling.batch_size=8",
          "--config.sampling.num_steps=5", "--config.sampling.num_frames=0"]
  back = run_main("--mode=sample", "--workdir", imported, *same,
                  cwd=tmp_path).stdout.strip().splitlines()[-1]
  ours = run_main("--mode=sample", *same, "--config.sampling.name=for_import",
                  cwd=tmp_path).stdout.strip().splitlines()[-1]
  np.testing.assert_allclose(np.load(os.path.join(back, "samples.npz"))["samples"],
                             np.load(os.path.join(ours, "samples.npz"))["samples"], atol=1e-5)


def test_sample_without_a_checkpoint_is_one_clear_line(tmp_path):
  proc = run_main("--mode=sample", "--workdir", str(tmp_path / "empty"), cwd=tmp_path,
                  check=False)
  assert proc.returncode != 0
  assert "error: no checkpoint in" in proc.stderr and "Traceback" not in proc.stderr


def test_the_console_entry_point_and_python_m_are_main_py():
  """pyproject's ``ddpm-jax`` script and ``python -m ddpm_jax`` run the same command line as
  main.py (which only calls it): the same modes, the same one-line refusal of a bad mode."""
  import tomllib

  from ddpm_jax import cli
  target = tomllib.loads(open(os.path.join(REPO, "pyproject.toml")).read())[
      "project"]["scripts"]["ddpm-jax"]
  assert target == "ddpm_jax.cli:run" and callable(cli.run)
  assert "cli.run()" in open(os.path.join(REPO, "main.py")).read()
  env = dict(os.environ, PYTHONPATH=REPO)
  outs = [subprocess.run([sys.executable, *entry, "--mode=nonsense"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
          for entry in (["-m", "ddpm_jax"], [os.path.join(REPO, "main.py")])]
  for out in outs:
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--mode" in out.stderr and "interpolate_images" in out.stderr  # the modes listed
  assert outs[0].stderr.replace("__main__.py", "main.py") == outs[1].stderr


def test_invalid_config_is_one_clear_line(tmp_path, data_dir):
  proc = run_main(*tiny_flags(data_dir, "--config.data.image_size=12",
                              "--config.model.ch_mult=(1,2,2,2)"),
                  "--workdir", str(tmp_path / "w"), cwd=tmp_path, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "error: data.image_size=12 must be divisible by" in proc.stderr


def test_a_run_of_no_steps_is_refused_with_one_line_before_any_work(tmp_path, data_dir):
  """num_train_steps=0 used to prepare, compile and exit 0 having done nothing: now a
  non-zero exit, the one line naming the field, and nothing written to the workdir."""
  proc = run_main(*tiny_flags(data_dir, "--config.training.num_train_steps=0"),
                  "--workdir", str(tmp_path / "w"), cwd=tmp_path, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "error: training.num_train_steps=0 must be >= 1" in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")


def test_incompatible_checkpoint_config_is_refused(tmp_path, data_dir):
  w = str(tmp_path / "w")
  run_main(*tiny_flags(data_dir, "--config.training.num_train_steps=2"), "--workdir", w,
           cwd=tmp_path)
  proc = run_main(*tiny_flags(data_dir, "--config.model.ch=16"), "--workdir", w,
                  cwd=tmp_path, check=False)
  assert proc.returncode != 0 and "model.ch=8" in proc.stderr and "Traceback" not in proc.stderr


def _wait_for(path, timeout=300):
  start = time.time()
  while not os.path.exists(path):
    if time.time() - start > timeout:
      raise TimeoutError(path)
    time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_zero_and_a_restart_resumes(tmp_path, data_dir, sig):
  w = tmp_path / "w"
  flags = tiny_flags(data_dir, "--config.training.num_train_steps=100000",
                     "--config.training.checkpoint_every_steps=100000")
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *flags,
                           "--workdir", str(w)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(w / "metrics.jsonl")
  time.sleep(1.0)
  # Another trainer on the same workdir is refused while this one runs.
  busy = run_main(*flags, "--workdir", str(w), cwd=tmp_path, check=False)
  assert busy.returncode != 0 and "in use by a running trainer" in busy.stderr
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  saved = [int(s) for s in os.listdir(w / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and saved[0] > 0
  assert not os.path.exists(w / "trainer.lock")
  resumed = run_main(*tiny_flags(data_dir, f"--config.training.num_train_steps={saved[0] + 2}"),
                     "--workdir", str(w), cwd=tmp_path)
  assert f"resumed from step {saved[0]}" in resumed.stderr


def _checkpoints(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_sigkill_at_random_moments_then_restart_is_bitwise_exact(tmp_path, data_dir):
  from tests import cli
  from tests.conftest import tiny_config
  steps = 30
  flags = tiny_flags(data_dir, f"--config.training.num_train_steps={steps}",
                     "--config.training.checkpoint_every_steps=3", "--config.model.dropout=0.1")
  run_main(*flags, "--workdir", str(tmp_path / "straight"), cwd=tmp_path)
  w = str(tmp_path / "killed")
  rng = np.random.default_rng(20261126)
  saved = 0  # newest checkpoint when the last process was killed
  for _ in range(2):
    job = cli.main_py(*flags, "--workdir", w, cwd=tmp_path)
    if saved:  # every restart resumes from a checkpoint at least as new as the last one seen
      assert int(job.wait_for(r"resumed from step (\d+)").group(1)) >= saved
    start = time.time()
    while (not _checkpoints(w) or _checkpoints(w)[-1] <= saved) and job.proc.poll() is None:
      time.sleep(0.05)  # until this run has written a new checkpoint
      assert time.time() - start < 300
    time.sleep(rng.uniform(0.0, 1.0))  # then somewhere in training or in a checkpoint write
    job.proc.kill()
    job.finish()
    assert _checkpoints(w)[-1] > saved, "the run made no new checkpoint before the kill"
    saved = _checkpoints(w)[-1]
  assert saved < steps, "the last kill came after the end: nothing left to resume"
  last = run_main(*flags, "--workdir", w, cwd=tmp_path)
  assert int(re.search(r"resumed from step (\d+)", last.stderr).group(1)) >= saved
  config = tiny_config(**{"model.dropout": 0.1})
  step_a, a = cli.final_state(tmp_path / "straight", config)
  step_b, b = cli.final_state(w, config)
  assert step_a == step_b == steps
  cli.assert_same_state(a, b)
  # Every step's line exactly once, although each killed run logged past its checkpoint.
  logged = [json.loads(x)["step"] for x in open(os.path.join(w, "metrics.jsonl"))
            if '"loss"' in x]
  assert logged == list(range(1, steps + 1))


def test_unreadable_newest_checkpoint_is_set_aside_for_sample_train_and_eval(tmp_path, data_dir):
  """A truncated data file in the newest checkpoint: every mode uses the one before, with one
  warning naming the bad step, and keeps the bad one in checkpoints_unreadable/."""
  w = tmp_path / "w"
  flags = tiny_flags(data_dir, "--config.training.num_train_steps=4",
                     "--config.training.checkpoint_every_steps=2")

  def truncate_newest():
    step = _checkpoints(w)[-1]
    d = w / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d"
    biggest = max(d.iterdir(), key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:
      f.truncate(biggest.stat().st_size // 3)
    return step

  run_main(*flags, "--workdir", str(w), cwd=tmp_path)
  bad = truncate_newest()
  proc = run_main("--mode=sample", "--workdir", str(w), "--config.sampling.num_frames=0",
                  cwd=tmp_path)
  assert proc.stdout.strip().splitlines()[-1].endswith("samples/step2_ddim5_eta0_seed0")
  warnings = [x for x in proc.stderr.splitlines() if "is damaged" in x]
  assert len(warnings) == 1 and f"checkpoint {bad} " in warnings[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) < 20
  assert [p.split("-")[0] for p in os.listdir(w / "checkpoints_unreadable")] == [str(bad)]

  resumed = run_main(*tiny_flags(data_dir, "--config.training.num_train_steps=6",
                                 "--config.training.checkpoint_every_steps=2"),
                     "--workdir", str(w), cwd=tmp_path)
  assert "resumed from step 2" in resumed.stderr and _checkpoints(w) == [2, 4, 6]
  bad = truncate_newest()
  proc = run_main("--mode=eval", "--workdir", str(w), "--config.eval.num_samples=0",
                  cwd=tmp_path)
  assert os.path.exists(w / "eval" / "4.json") and not os.path.exists(w / "eval" / "6.json")
  assert f"checkpoint {bad} " in proc.stderr and "Traceback" not in proc.stderr
  assert len(os.listdir(w / "checkpoints_unreadable")) == 2
