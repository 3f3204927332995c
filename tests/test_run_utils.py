"""Run plumbing: the workdir lock across hosts, TensorBoard files without TensorFlow, the
filesystem layer, the launcher's environment, progress lines."""

import json
import os
import socket

import numpy as np
import pytest

from ddpm_jax import fs, launch, progress, writers
from ddpm_jax import lock as lock_lib
from ddpm_jax.errors import WorkdirLocked


def test_workdir_lock_refuses_a_live_holder_and_ignores_torn_files_and_reused_pids(tmp_path):
  w = str(tmp_path)
  first = lock_lib.WorkdirLock(w)
  first.acquire()
  with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()} on {socket.gethostname()}"):
    lock_lib.WorkdirLock(w).acquire()
  first.release()
  assert not os.path.exists(tmp_path / "trainer.lock")
  # What a file says does not matter, only whether a live process holds it: a torn or empty
  # file (a full disk at start) and a file naming a live pid (reused) are taken at once.
  for text in ("", '{"host": "', json.dumps({"host": socket.gethostname(),
                                              "pid": os.getppid()})):
    (tmp_path / "trainer.lock").write_text(text)
    lock = lock_lib.WorkdirLock(w)
    lock.acquire()
    assert json.load(open(tmp_path / "trainer.lock"))["id"] == lock.me["id"]
    lock.release()


def test_workdir_lock_is_freed_when_its_holder_is_killed(tmp_path):
  import signal
  import subprocess
  import sys
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from ddpm_jax import lock as lock_lib; "
       f"lock_lib.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
       "time.sleep(600)"], stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirLocked, match=f"pid {holder.pid}"):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  lock_lib.WorkdirLock(str(tmp_path)).acquire()  # the kernel dropped the dead holder's lock


def test_exactly_one_of_many_simultaneous_trainers_gets_a_local_lock(tmp_path):
  assert_one_winner(str(tmp_path), 40)


def assert_one_winner(workdir: str, n: int) -> None:
  """n trainers start at once on ``workdir``: exactly one holds the lock (threads; each
  lock has its own id and file handle, as separate processes would)."""
  import threading
  barrier, won, refused, errors = threading.Barrier(n), [], [], []

  def start():
    lock = lock_lib.WorkdirLock(workdir)
    barrier.wait()
    try:
      lock.acquire()
      won.append(lock)
    except WorkdirLocked:
      refused.append(lock)
    except Exception as e:  # noqa: BLE001
      errors.append(e)
  threads = [threading.Thread(target=start) for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not errors, errors[:3]
  assert (len(won), len(refused)) == (1, n - 1)
  won[0].release()


def test_event_files_are_read_by_tensorboard(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  writer = writers.MetricWriter(str(tmp_path))
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
  # A rehearsed Cloud TPU VM worker: nothing names the job but the metadata server.
  gce = launch.process_env(1, 2, 1234, 2, base={"JAX_COORDINATOR_ADDRESS": "x:1"},
                           cluster="gce-tpu", metadata="127.0.0.1:999")
  assert "JAX_COORDINATOR_ADDRESS" not in gce and "JAX_PROCESS_ID" not in gce
  assert gce["GCE_METADATA_IP"] == "127.0.0.1:999" and gce["JAX_FORCE_TPU_INIT"] == "1"
  gke = launch.process_env(1, 2, 1234, 2, base={}, cluster="gke-tpu")
  assert (gke["TPU_WORKER_HOSTNAMES"], gke["TPU_WORKER_ID"]) == ("localhost,localhost", "1")


def test_rehearsed_metadata_server_answers_what_jax_reads():
  import urllib.error
  import urllib.request
  server = launch.metadata_server(1, 3)
  host, port = server.server_address[:2]
  base = f"http://{host}:{port}/computeMetadata/v1/instance/attributes/"
  try:
    get = lambda k: urllib.request.urlopen(urllib.request.Request(  # noqa: E731
        base + k, headers={"Metadata-Flavor": "Google"}), timeout=5).read().decode()
    assert get("agent-worker-number") == "1"
    assert get("worker-network-endpoints") == "localhost,localhost,localhost"
    assert get("tpu-env") == ""
    with pytest.raises(urllib.error.HTTPError):
      get("nothing-here")
  finally:
    server.shutdown()


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


@pytest.mark.parametrize("after", [r"model: [\d,]+ parameters", r"Dataset .* prepared"])
def test_a_stop_during_start_up_ends_with_its_line_and_status_0(tmp_path, after):
  """SIGTERM while TensorFlow is being imported (data preparation starts) or while the first
  step compiles: interpreter shutdown mid-way through start-up (libraries' exit hooks and
  threads) took 5-20 s and crashed (exit 139, a dump after the line). Nothing is being saved
  yet, so the process skips it: the one line is its last output, before any exit hook
  (one that reports itself is installed here) could run."""
  import signal

  from tests import cli
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(
      "import atexit, sys\n"
      "atexit.register(lambda: print('interpreter shutdown ran', file=sys.stderr, flush=True))\n")
  job = cli.main_py(*cli.tiny_flags(str(tmp_path / "tfds")), "--workdir", str(tmp_path / "w"),
                    cwd=tmp_path, extra_env={"PYTHONPATH": f"{site}{os.pathsep}{cli.REPO}",
                                             "PYTHONFAULTHANDLER": "1"})
  job.wait_for(after)
  job.proc.send_signal(signal.SIGTERM)
  assert job.finish(timeout=120) == 0, job.output[-3000:]
  last = [x for x in job.lines if x.strip()][-1]
  assert last.startswith("warning: SIGTERM received during start-up"), job.output[-3000:]
  assert not os.path.exists(tmp_path / "w" / "trainer.lock")
  assert not [s for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]


GC_STOP_SCRIPT = """
import gc, os, signal, time
from ddpm_jax import signals
from ddpm_jax.errors import StoppedEarly
fired = []
def collecting(phase, info):  # as JAX's gc callback: the signal is handled inside it
  if phase == "start" and not fired:
    fired.append(1)
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10000):
      pass
with signals.StopRequest() as stop:
  stop.watch_native_calls()
  gc.callbacks.append(collecting)
  try:
    gc.collect()
    for _ in range(200):  # start-up goes on (Python code), well past the hard stop
      time.sleep(0.05)
    print("not stopped", flush=True)
  except StoppedEarly as e:
    print("stopped:", e, flush=True)
"""


def test_a_stop_signal_handled_inside_a_gc_callback_still_stops_start_up():
  """Python drops an exception raised in a gc callback (JAX registers one; seen: a SIGTERM
  during start-up became an "Exception ignored" dump and a hard stop 5 s later). The stop
  must still reach start-up as StoppedEarly, with no dump."""
  import subprocess
  import sys

  from tests import cli
  out = subprocess.run([sys.executable, "-c", GC_STOP_SCRIPT], env=cli.env(), cwd=cli.REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  assert out.stdout.startswith("stopped: SIGTERM received during start-up"), out
  assert "Exception ignored" not in out.stderr, out.stderr
