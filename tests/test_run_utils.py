"""Run plumbing: the workdir lock across hosts, TensorBoard files without TensorFlow, the
filesystem layer, the launcher's environment, progress lines."""

import json
import os
import socket
import time

import numpy as np
import pytest

from ddpm_jax import fs, launch, progress, run_utils
from ddpm_jax.errors import WorkdirLocked


def write_lock(workdir, **holder):
  with open(os.path.join(workdir, "trainer.lock"), "w") as f:
    json.dump(holder, f)


def test_workdir_lock_refuses_live_holders_and_takes_over_dead_ones(tmp_path):
  w = str(tmp_path)
  here = socket.gethostname()
  # A live process on this host.
  write_lock(w, host=here, pid=os.getppid(), time=time.time(), id="x")
  with pytest.raises(WorkdirLocked, match=f"pid {os.getppid()} on {here}"):
    run_utils.WorkdirLock(w).acquire()
  # Another host that refreshed the lock recently: refused; long ago: taken over.
  write_lock(w, host="tpu-worker-7", pid=123, time=time.time() - 30, id="y")
  with pytest.raises(WorkdirLocked, match="tpu-worker-7"):
    run_utils.WorkdirLock(w).acquire()
  write_lock(w, host="tpu-worker-7", pid=123, time=time.time() - 3600, id="y")
  lock = run_utils.WorkdirLock(w)
  lock.acquire()
  assert json.load(open(tmp_path / "trainer.lock"))["id"] == lock.me["id"]
  lock.refresh()  # not due yet: nothing changes
  lock.release()
  assert not os.path.exists(tmp_path / "trainer.lock")
  # A dead process on this host (and the old format, a bare pid) is taken over.
  with open(tmp_path / "trainer.lock", "w") as f:
    f.write("999999999")
  run_utils.WorkdirLock(w).acquire()


def test_event_files_are_read_by_tensorboard(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  writer = run_utils.MetricWriter(str(tmp_path))
  writer.scalars(1, {"loss": 0.5, "skipped": 0})
  writer.scalars(2, {"loss": 0.25, "skipped": 1})
  writer.image(2, "samples/ema", np.full((6, 4, 3), 200, np.uint8))
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
  img = acc.Images("samples/ema")[0]
  assert (img.step, img.width, img.height) == (2, 4, 6)
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [x["loss"] for x in lines] == [0.5, 0.25] and lines[1]["skipped"] == 1


def test_growing_file_keeps_earlier_content_and_appends(tmp_path):
  p = str(tmp_path / "a" / "log.jsonl")
  f = fs.GrowingFile(p)
  f.write(b"one\n")
  f.flush()
  g = fs.GrowingFile(p)  # a resumed run
  g.write(b"two\n")
  assert g.size() == 8
  g.flush()
  assert open(p).read() == "one\ntwo\n"


def test_fs_writes_whole_files_and_moves_folders(tmp_path):
  fs.write_json(tmp_path / "x" / "r.json", {"a": 1})
  assert json.loads(fs.read_text(tmp_path / "x" / "r.json")) == {"a": 1}
  assert not [n for n in os.listdir(tmp_path / "x") if ".tmp" in n]  # no leftovers
  fs.save_npz(tmp_path / "x" / "a.npz", v=np.arange(3))
  np.testing.assert_array_equal(fs.load_npz(tmp_path / "x" / "a.npz")["v"], [0, 1, 2])
  fs.move(tmp_path / "x", tmp_path / "y" / "z")
  assert fs.listdir(tmp_path / "y" / "z") == ["a.npz", "r.json"] and not fs.exists(tmp_path / "x")
  assert fs.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert fs.normalize("gs://b/run/") == "gs://b/run" and fs.is_remote("gs://b")
  assert not fs.is_remote(str(tmp_path))


def test_launcher_environment_of_each_process():
  env = launch.process_env(1, 4, 1234, 2, base={"XLA_FLAGS": "--foo --xla_force_host_platform_"
                                                             "device_count=8"})
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("4", "1")
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
  assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
  from ddpm_jax import parallel
  assert parallel.is_multi_host_launch(env)


def test_launcher_reports_the_failing_process(tmp_path, capsys):
  script = tmp_path / "job.py"
  script.write_text("import os, sys\nprint('hello from', os.environ['JAX_PROCESS_ID'])\n"
                    "sys.exit(3 if os.environ['JAX_PROCESS_ID'] == '1' else 0)\n")
  rc = launch.launch([], 2, script=str(script))
  out, err = capsys.readouterr()
  assert rc == 3
  assert "[p0] hello from 0" in out and "[p1] hello from 1" in out
  assert "launch: process 1 exited with status 3" in err


def test_progress_lines_without_a_terminal(capsys):
  with progress.Progress(10, "train", "step", log_every=5, per_unit=(32, "img"),
                         enabled=True) as bar:
    for _ in range(10):
      bar.update(1, {"loss": "0.1"})
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("train: step 5/10 | ")
  assert "img/s" in lines[1] and lines[1].endswith("loss=0.1")
