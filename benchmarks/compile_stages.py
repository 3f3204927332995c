"""Where the train step's start-up time goes: trace, lower, compile (or cache load), first run.

  python benchmarks/compile_stages.py            # runs itself twice in fresh processes

The first process starts with an empty persistent compilation cache, the second
with the cache the first wrote; each times JAX's stages of the CIFAR-10 U-Net train
step (batch 16, jit, one device) separately.
"""

import json
import os
import subprocess
import sys
import tempfile
import time


def stages():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from ddpm_jax import run_utils
  run_utils.set_process_defaults()
  t0 = time.perf_counter()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import cifar10
  from ddpm_jax import diffusion, models, train
  from ddpm_jax import state as state_lib
  jax.config.update("jax_compilation_cache_dir", os.environ["CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  t_import = time.perf_counter() - t0
  c = cifar10.get_config()
  c.training.batch_size = 16
  m = models.create_model(c)
  s = diffusion.make_schedule("linear", 1000)
  tx = state_lib.make_optimizer(c)
  t = time.perf_counter()
  st = state_lib.create_train_state(c, m, tx, jax.random.key(0))
  jax.block_until_ready(st)
  t_init = time.perf_counter() - t
  step = jax.jit(train.make_train_step(c, m, s, tx, axis_name=None), donate_argnums=0)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 3)), jnp.float32)
  key = jax.random.key(1)
  t = time.perf_counter()
  traced = step.trace(st, x, key)
  t_trace = time.perf_counter() - t
  t = time.perf_counter()
  lowered = traced.lower()
  t_lower = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t
  t = time.perf_counter()
  st, met = compiled(st, x, key)
  jax.block_until_ready(met)
  t_run = time.perf_counter() - t
  print(json.dumps({"import_s": t_import, "init_state_s": t_init, "trace_s": t_trace,
                    "lower_s": t_lower, "compile_or_cache_load_s": t_compile,
                    "first_step_s": t_run}))


def main():
  with tempfile.TemporaryDirectory() as cache:
    env = dict(os.environ, CACHE_DIR=cache)
    for label in ("empty cache", "warm cache"):
      out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
      r = json.loads(out)
      total = r["trace_s"] + r["lower_s"] + r["compile_or_cache_load_s"]
      print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items())
            + f" | trace+lower+compile {total:.2f} s")


if __name__ == "__main__":
  stages() if "--child" in sys.argv else main()
