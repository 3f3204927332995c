"""A 2-process job (2 CPU devices each) through ``ddpm_jax.launch``, as a pod slice runs it:
shared data prepared once, agreed stops, a dead coordinator, exact resume, sampling and eval,
and the failure paths of several processes. The processes find their job as on Cloud TPU
VMs: through a (simulated) GCE metadata server per host (``gce-tpu``, a slice made with
``gcloud compute tpus tpu-vm create``), through GKE's variables (``gke-tpu``), or through
explicit coordinator variables; each time ``jax.distributed.initialize()`` decides."""

import json
import os
import re
import signal
import time

import numpy as np
import pytest

from tests import cli
from tests.conftest import tiny_config

STEPS = 16
OVERRIDES = {"training.num_train_steps": STEPS, "training.checkpoint_every_steps": 8,
             "training.sample_every_steps": 8, "training.eval_every_steps": 8,
             "model.dropout": 0.1}


def flags(data_dir, workdir):
  return cli.tiny_flags(data_dir, *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
                        "--workdir", str(workdir))


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
  """An uninterrupted 2-process run on a fresh data_dir both processes share."""
  root = tmp_path_factory.mktemp("pod")
  job = cli.run(cli.launch(2, 2, *flags(root / "tfds", root / "ref"), cwd=root))
  return root, job


def test_fresh_shared_data_dir_is_prepared_once_and_the_run_completes(pod):
  root, job = pod
  assert job.output.count("Downloading and preparing dataset") == 1, job.output[-3000:]
  w = root / "ref"
  assert sorted(int(s) for s in os.listdir(w / "checkpoints")) == [8, 16]
  assert sorted(os.listdir(w / "samples" / "during_training")) == [
      "step16.png", "step8.png"]
  lines = [json.loads(x) for x in open(w / "metrics.jsonl")]
  assert [x["step"] for x in lines if "loss" in x] == list(range(1, STEPS + 1))  # process 0 only
  assert [x["step"] for x in lines if "val/loss_all" in x] == [8, 16]
  assert not os.path.exists(w / "trainer.lock")
  # The same global batches on 1 process x 4 devices take the same steps: the gradient mean
  # spans both processes (float reduction order aside).
  from ddpm_jax import train
  config = tiny_config(**{"data.data_dir": str(root / "tfds"), **OVERRIDES,
                          "training.sample_every_steps": 0, "training.eval_every_steps": 0})
  train.train_and_evaluate(config, str(root / "one_process"))
  ours = [x["loss"] for x in lines if "loss" in x]
  one = [json.loads(x)["loss"] for x in open(root / "one_process" / "metrics.jsonl")]
  np.testing.assert_allclose(ours, one, rtol=1e-4)


def test_sample_and_eval_run_on_both_processes_and_match_one_process(pod):
  root, _ = pod
  w = root / "ref"
  job = cli.run(cli.launch(2, 2, "--mode=sample", "--workdir", str(w), cwd=root))
  out = re.findall(r"^\[p0\] (/\S+/samples/\S+)$", job.output, re.M)[-1]
  # The log line and the printed folder, process 0 only.
  assert job.output.count(f"/samples/step{STEPS}_") == 2
  two = np.load(os.path.join(out, "samples.npz"))["images"]
  # The same samples from this process (4 devices): sample i depends only on (seed, i).
  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import diffusion, generate, models
  config = tiny_config(**{"data.data_dir": str(root / "tfds"), **OVERRIDES})
  params, step = ckpt_lib.load_params(config, str(w))
  model = models.create_model(config)
  schedule = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
  one, _ = generate.generate(config, generate.Sampler(config, model, schedule), params, 8)
  from ddpm_jax import images
  assert step == STEPS and two.shape == (8, 8, 8, 3)
  assert np.abs(images.to_uint8(one).astype(int) - two).max() <= 1

  job = cli.run(cli.launch(2, 2, "--mode=eval", "--workdir", str(w), cwd=root))
  two = json.load(open(w / "eval" / f"{STEPS}.json"))
  assert two["num_samples"] == 8
  assert job.output.count("bits/dim on 16 test images") == 1  # the table: process 0 only
  # The same report from one process (4 devices): the bound and the held-out loss are
  # computed alike on every process; the samples are the same up to one uint8 level.
  from ddpm_jax import evaluate
  config.eval.name = "one_process"
  one = evaluate.evaluate(config, str(w))[0]
  np.testing.assert_allclose(one["bits_per_dim"], two["bits_per_dim"], rtol=1e-5)
  for bucket, v in two["val_loss_per_t_bucket"].items():
    np.testing.assert_allclose(one["val_loss_per_t_bucket"][bucket], v, rtol=1e-5)
  np.testing.assert_allclose(one["colour_w1_mean"], two["colour_w1_mean"], atol=0.05)


def test_slice_loses_its_coordinator_and_resumes_exactly(pod):
  """A TPU VM slice whose workers know each other from the metadata server only loses the host
  of process 0 (the coordination service); the same job on GKE resumes and ends bitwise equal
  to the uninterrupted run. (A preemption notice to one host: tests/test_gcs.py.)"""
  root, _ = pod
  w = root / "interrupted"
  args = flags(root / "tfds", w)

  heartbeat = 20  # seconds (60 by default): a dead coordinator is noticed sooner
  job = cli.launch(2, 2, *args, cwd=root, cluster="gce-tpu",
                   extra_env={"DDPM_JAX_HEARTBEAT_TIMEOUT_S": str(heartbeat)})
  pids = job.pids(2)
  job.wait_for(r"\[p1\] .*JAX .*: 2 processes, 4 devices")
  job.wait_for(r"train: step 10/")  # after the checkpoint at step 8
  os.kill(pids[0], signal.SIGKILL)  # process 0 runs the coordination service
  killed_at = time.time()
  job.finish(timeout=300)
  took = time.time() - killed_at
  status = cli.statuses(job)
  # Process 1 stopped by itself (not killed by the launcher), within the heartbeat bound:
  # with our line if it was in a collective, or ended by JAX's own client (SIGABRT) with
  # JAX's line when the coordination service went away.
  assert status[0] == "signal SIGKILL", job.output[-3000:]
  assert status[1] in ("status 1", "signal SIGABRT"), job.output[-3000:]
  assert took < heartbeat + 30 and "killing it" not in job.output, job.output[-3000:]
  assert re.search(r"\[p1\] error: process 1 of 2 lost contact with another process",
                   job.output) or re.search(r"\[p1\] .*Terminating process because the JAX "
                                            r"distributed service", job.output), job.output[-6000:]
  saved = max(int(s) for s in os.listdir(w / "checkpoints"))

  job = cli.run(cli.launch(2, 2, *args, cwd=root, cluster="gke-tpu"))
  assert f"resumed from step {saved}" in job.output
  config = tiny_config(**OVERRIDES)
  step_a, a = cli.final_state(root / "ref", config)
  step_b, b = cli.final_state(w, config)
  assert step_a == step_b == STEPS
  cli.assert_same_state(a, b)
  lines = [json.loads(x) for x in open(w / "metrics.jsonl")]
  assert [x["step"] for x in lines if "loss" in x] == list(range(1, STEPS + 1))


def test_failures_of_several_processes_end_every_process_with_one_line(tmp_path, data_dir):
  """A failure every process shares: the same line on each, each exits 1 at once, though one
  process is late to leave (a busy host): process 0 runs the coordination service and leaves
  last, or JAX's client aborts the others (SIGABRT, a crash dump instead of the line)."""
  root = tmp_path
  # Process 0 fails inside process_0_then_all (the workdir lock is held by another trainer):
  # every process prints the same line and exits 1 at once, not after a long wait. Process 0
  # is late to leave: process 1 leaves first, and neither is ended by the service.
  from ddpm_jax import lock as lock_lib
  held = lock_lib.WorkdirLock(str(tmp_path / "busy"))
  held.acquire()
  try:
    start = time.time()
    job = cli.launch(2, 1, *flags(data_dir, tmp_path / "busy"), cwd=root,
                     extra_env={"DDPM_JAX_TEST_SLOW_LEAVE": "0:5"})
    job.finish(timeout=120)
  finally:
    held.release()
  assert time.time() - start < 60, job.output[-3000:]
  assert cli.statuses(job) == {0: "status 75", 1: "status 75"}, job.output[-3000:]
  errors = re.findall(r"\[p(\d)\] (error: .*)", job.output)
  assert sorted(p for p, _ in errors) == ["0", "1"], job.output[-3000:]
  assert errors[0][1] == errors[1][1] and "in use by a running trainer" in errors[0][1]
  # A config error: one line on every process, every process exits 1 at once. Process 1 is
  # 20 s late to leave (more than the 15 s process 0 used to wait for it).
  start = time.time()
  job = cli.launch(2, 1, *flags(data_dir, tmp_path / "w"),
                   "--config.training.batch_size=3", cwd=root,
                   extra_env={"DDPM_JAX_TEST_SLOW_LEAVE": "1:20"})
  job.finish(timeout=120)
  assert time.time() - start < 90, job.output[-3000:]
  assert cli.statuses(job) == {0: "status 1", 1: "status 1"}, job.output[-3000:]
  errors = re.findall(r"\[p(\d)\] (error: .*)", job.output)
  assert len(errors) == 2 and errors[0][1] == errors[1][1] and "batch_size=3" in errors[0][1]
  assert "Traceback" not in job.output and "Terminating process" not in job.output


RESTORE_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from ddpm_jax import run_utils
run_utils.set_process_defaults()
from ddpm_jax import parallel
parallel.initialize_distributed()
import jax
from ddpm_jax import checkpoint as ckpt_lib, errors, state as state_lib
from configs import tiny
mngr = ckpt_lib.make_manager({workdir!r}, read_only=True, async_save=False)
if jax.process_index() == 1:  # a read error on this process alone (a 403, say)
  private_reader = ckpt_lib._reader
  def reader_that_is_denied(workdir):
    reader = private_reader(workdir)
    def denied(*a, **k):
      raise PermissionError("403 Forbidden (injected)")
    reader.restore = denied
    return reader
  ckpt_lib._reader = reader_that_is_denied
try:
  ckpt_lib.restore_newest(mngr, {workdir!r}, state_lib.abstract_train_state(tiny.get_config()),
                          retries=0, set_aside=True)  # as a trainer: even it moves nothing
except errors.UserError as e:
  print("error:", e, flush=True)
  parallel.leave_together(1)  # as main.py does: process 0 must not cut the other off
os._exit(0)
"""


def test_a_read_error_on_one_process_ends_every_process_and_moves_nothing(tmp_path, capfd):
  from ddpm_jax import launch
  from tests.test_checkpoint import _steps, _workdir_with_two_checkpoints
  _workdir_with_two_checkpoints(tmp_path / "w", tiny_config())
  script = tmp_path / "restore.py"
  script.write_text(RESTORE_SCRIPT.format(repo=cli.REPO, workdir=str(tmp_path / "w")))
  start = time.time()
  rc = launch.launch([], 2, 1, script=str(script), grace_s=60)
  out = "".join(capfd.readouterr())
  assert rc == 1 and time.time() - start < 60, out[-3000:]
  assert "launch: process 0 exited with status 1" in out
  assert "launch: process 1 exited with status 1" in out
  errors = re.findall(r"\[p(\d)\] (error: .*)", out)
  assert sorted(p for p, _ in errors) == ["0", "1"] and errors[0][1] == errors[1][1], out
  assert "could not be read (process 1): PermissionError: 403" in errors[0][1]
  assert _steps(tmp_path / "w") == [2, 4]
  assert not (tmp_path / "w" / "checkpoints_unreadable").exists()


SLOW_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
from ddpm_jax import run_utils
run_utils.set_process_defaults()
from ddpm_jax import parallel
parallel.initialize_distributed()
import jax, numpy as np
f = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
if jax.process_index() == 1:
  time.sleep({delay})  # a first compile that took longer on this host, say
print("psum", float(np.asarray(f(np.ones((jax.local_device_count(), 1))))[0, 0]), flush=True)
"""


def test_a_host_slow_to_reach_its_first_collective_does_not_kill_the_job(tmp_path, capfd):
  """Gloo gives up on a peer that is over 30 s late to the first collective (seen: a job
  aborted under load inside its first train step); processes start together instead."""
  from ddpm_jax import launch
  script = tmp_path / "slow.py"
  script.write_text(SLOW_SCRIPT.format(repo=cli.REPO, delay=32))
  rc = launch.launch([], 2, 1, script=str(script), grace_s=60)
  out = "".join(capfd.readouterr())
  assert rc == 0, out[-3000:]
  assert out.count("psum 2.0") == 2, out[-3000:]
