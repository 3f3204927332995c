"""One process of the 2-process x 2-device test (run by tests/test_multiprocess.py).

Usage: python tests/multiprocess_worker.py PORT PROCESS_ID OUT_DIR DATA_DIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(port, pid, out_dir, data_dir):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

  from ddpm_jax import diffusion, input_pipeline, models, parallel, train
  from tests.conftest import tiny_config

  config = tiny_config(**{"data.data_dir": data_dir})
  # 1. Each process reads its own shard of every global batch.
  source = input_pipeline.get_source(config, "train")
  batches = input_pipeline.TrainBatches(
      source, 16, seed=5, process_index=jax.process_index(), process_count=2,
      local_devices=2, num_workers=1)
  idx = np.concatenate([batches.indices(s)[0] for s in range(16)])
  batches.close()

  # 2. One pmapped step on a fixed global batch: this process feeds its half.
  model = models.create_model(config)
  schedule = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
  tx = train.make_optimizer(config)
  state = train.create_train_state(config, model, tx, jax.random.key(0))
  global_batch = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
  local = global_batch[pid * 4:(pid + 1) * 4].reshape(2, 1, 2, 8, 8, 3)
  p_step = train.make_p_train_step(config, model, schedule, tx)
  sr, metrics = p_step(parallel.replicate(state), parallel.shard(local), jax.random.key(7))
  params = parallel.unreplicate(sr.params)
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
  np.savez(os.path.join(out_dir, f"proc{pid}.npz"), indices=idx, params=flat,
           loss=np.asarray(metrics["loss"])[0, 0])
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
