"""A 2-process job (2 CPU devices each) through ``ddpm_jax.launch``, as a pod slice runs it:
shared data prepared once, agreed stops, a dead peer, exact resume, sampling and eval."""

import json
import os
import signal
import time

import numpy as np
import pytest

from tests import cli
from tests.conftest import tiny_config

STEPS = 24
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
  assert sorted(int(s) for s in os.listdir(w / "checkpoints")) == [8, 16, 24]
  assert sorted(os.listdir(w / "samples" / "during_training")) == [
      "step16.png", "step24.png", "step8.png"]
  lines = [json.loads(x) for x in open(w / "metrics.jsonl")]
  assert [x["step"] for x in lines if "loss" in x] == list(range(1, STEPS + 1))  # process 0 only
  assert [x["step"] for x in lines if "val/loss_all" in x] == [8, 16, 24]
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
  out = job.output.strip().splitlines()[-1].split("] ", 1)[-1]
  assert job.output.count("/samples/step24_") == 2  # the log line and the printed folder, p0 only
  two = np.load(os.path.join(out, "samples.npz"))["images"]
  # The same samples from this process (4 devices): sample i depends only on (seed, i).
  from ddpm_jax import diffusion, generate, models
  config = tiny_config(**{"data.data_dir": str(root / "tfds"), **OVERRIDES})
  params, step = generate.load_params(config, str(w))
  model = models.create_model(config)
  schedule = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
  one, _ = generate.generate(config, generate.Sampler(config, model, schedule), params, 8)
  from ddpm_jax import images
  assert step == STEPS and two.shape == (8, 8, 8, 3)
  assert np.abs(images.to_uint8(one).astype(int) - two).max() <= 1

  job = cli.run(cli.launch(2, 2, "--mode=eval", "--workdir", str(w), cwd=root))
  report = json.load(open(w / "eval" / f"{STEPS}.json"))
  assert np.isfinite(report["bits_per_dim"]) and report["num_samples"] == 8
  assert job.output.count("bits/dim on 16 test images") == 1  # the table: process 0 only


def test_sigterm_to_one_process_sigkill_of_another_and_exact_resume(pod):
  root, _ = pod
  w = root / "interrupted"
  args = flags(root / "tfds", w)

  job = cli.launch(2, 2, *args, cwd=root)
  pids = job.pids(2)
  job.wait_for(r"train: step \d+/")
  os.kill(pids[1], signal.SIGTERM)  # a preemption notice that reaches one host only
  assert job.finish(timeout=300) == 0, job.output[-4000:]
  stopped = [int(m) for m in __import__("re").findall(r"stopped by .* at step (\d+)", job.output)]
  assert len(stopped) == 2 and stopped[0] == stopped[1] < STEPS, job.output[-3000:]
  assert "stopped by SIGTERM" in job.output and "another process of this job" in job.output
  assert max(int(s) for s in os.listdir(w / "checkpoints")) == stopped[0]

  job = cli.launch(2, 2, *args, cwd=root)
  pids = job.pids(2)
  job.wait_for(rf"resumed from step {stopped[0]}")
  job.wait_for(r"train: step \d+/")
  os.kill(pids[1], signal.SIGKILL)  # a lost host
  killed_at = time.time()
  rc = job.finish(timeout=300)
  assert rc != 0 and time.time() - killed_at < 120, job.output[-3000:]
  assert "killing it" not in job.output  # process 0 stopped by itself, not by the launcher
  assert ("lost contact with another process" in job.output
          or "Terminating process because the JAX distributed service" in job.output)

  job = cli.run(cli.launch(2, 2, *args, cwd=root))
  assert "resumed from step" in job.output
  config = tiny_config(**OVERRIDES)
  step_a, a = cli.final_state(root / "ref", config)
  step_b, b = cli.final_state(w, config)
  assert step_a == step_b == STEPS
  cli.assert_same_state(a, b)
