"""The command line, end to end, in subprocesses: train, bare --mode=sample, signals, errors."""

import json
import os
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


def test_train_then_bare_sample_as_on_the_design_card(tmp_path, data_dir):
  """`main.py --config ... --workdir runs/` then a bare `main.py --mode=sample`."""
  run_main(*tiny_flags(data_dir), "--workdir", "runs/", cwd=tmp_path)
  ckpts = sorted(os.listdir(tmp_path / "runs" / "checkpoints"))
  assert "4" in ckpts
  lines = [json.loads(x) for x in open(tmp_path / "runs" / "metrics.jsonl")]
  assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(np.isfinite(x["loss"]) for x in lines)
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "runs" / "tensorboard"))

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
  other = run_main("--mode=sample", "--config.sampling.sampler=dpm_solver++",
                   "--config.sampling.num_frames=0", cwd=tmp_path).stdout.strip().splitlines()[-1]
  assert "dpm_solver++5" in other and not os.path.exists(os.path.join(other, "denoise.gif"))


def test_sample_without_a_checkpoint_is_one_clear_line(tmp_path):
  proc = run_main("--mode=sample", "--workdir", str(tmp_path / "empty"), cwd=tmp_path,
                  check=False)
  assert proc.returncode != 0
  assert "error: no checkpoint in" in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_config_is_one_clear_line(tmp_path, data_dir):
  proc = run_main(*tiny_flags(data_dir, "--config.data.image_size=12",
                              "--config.model.ch_mult=(1,2,2,2)"),
                  "--workdir", str(tmp_path / "w"), cwd=tmp_path, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "error: data.image_size=12 must be divisible by" in proc.stderr


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
