"""2 processes x 2 CPU devices (jax.distributed on localhost, gloo collectives) against
1 process x 4 devices: disjoint data shards, and the same averaged gradient step."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from ddpm_jax import diffusion, input_pipeline, models, parallel, train
from tests.conftest import REPO, tiny_config


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_and_average_over_all_devices(tmp_path, data_dir):
  config = tiny_config(**{"data.data_dir": data_dir})
  source = input_pipeline.get_source(config, "train")  # prepares the data once, here
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "multiprocess_worker.py"),
                             str(port), str(i), str(tmp_path), data_dir], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  out = [np.load(tmp_path / f"proc{i}.npz") for i in range(2)]

  # Disjoint shards that together cover every example of each epoch (16 steps x 16 = 256).
  a, b = out[0]["indices"], out[1]["indices"]
  assert not set(a) & set(b)
  assert sorted(np.concatenate([a, b])) == list(range(len(source)))

  # Same step on one process with 4 devices and the same global batch.
  model = models.create_model(config)
  schedule = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
  tx = train.make_optimizer(config)
  state = train.create_train_state(config, model, tx, jax.random.key(0))
  global_batch = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
  p_step = train.make_p_train_step(config, model, schedule, tx)
  sr, metrics = p_step(parallel.replicate(state),
                       parallel.shard(global_batch.reshape(4, 1, 2, 8, 8, 3)), jax.random.key(7))
  want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(parallel.unreplicate(sr.params))])
  for o in out:
    np.testing.assert_allclose(float(o["loss"]), float(np.asarray(metrics["loss"])[0, 0]),
                               rtol=1e-5)
    np.testing.assert_allclose(o["params"], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out[0]["params"], out[1]["params"])
