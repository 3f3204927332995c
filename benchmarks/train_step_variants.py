"""Where CPU train time goes: the CIFAR-10 U-Net step (batch 16, plain jit, one device)
with attention or dropout removed.

  python benchmarks/train_step_variants.py
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_jax import run_utils  # noqa: E402

run_utils.set_process_defaults()  # XLA flags are read when the backend starts, after this
from configs import cifar10  # noqa: E402
from ddpm_jax import diffusion, models, train  # noqa: E402
from ddpm_jax import state as state_lib  # noqa: E402


def run(name, **model_overrides):
  c = cifar10.get_config()
  c.training.batch_size = 16
  for k, v in model_overrides.items():
    c.model[k] = v
  m = models.create_model(c)
  schedule = diffusion.make_schedule("linear", 1000)
  tx = state_lib.make_optimizer(c)
  st = state_lib.create_train_state(c, m, tx, jax.random.key(0))
  step = jax.jit(train.make_train_step(c, m, schedule, tx, axis_name=None))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 3)), jnp.float32)
  key = jax.random.key(1)
  st, met = step(st, x, key)
  jax.block_until_ready(met)
  times = []
  for _ in range(3):
    t = time.perf_counter()
    st, met = step(st, x, key)
    jax.block_until_ready(met)
    times.append(time.perf_counter() - t)
  fwd = jax.jit(lambda p, x: m.apply({"params": p}, x, jnp.full((16,), 500)))
  jax.block_until_ready(fwd(st.params, x))
  t = time.perf_counter()
  jax.block_until_ready(fwd(st.params, x))
  s = float(np.median(times))
  print(f"{name}: train {s:.2f} s/step ({16 / s:.2f} img/s), forward "
        f"{time.perf_counter() - t:.2f} s", flush=True)


if __name__ == "__main__":
  run("baseline (jit, 1 device)")
  run("no attention", attn_resolutions=())
  run("no dropout", dropout=0.0)
