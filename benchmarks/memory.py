"""Peak memory of one compiled train step, with and without remat, and what remat and
gradient accumulation cost in step time (CPU).

  python benchmarks/memory.py             # the table of docs/benchmarks.md, a few minutes
  python benchmarks/memory.py --grid=64:1,8 --no-time
  python benchmarks/memory.py --time-only  # remat step time and RSS, 64 px batch 8

Memory is XLA's own buffer assignment of the compiled step (``compiled.memory_analysis()``,
nothing runs): ``temp_size_in_bytes`` (activations and other scratch: what remat and
microbatches shrink) + ``argument_size_in_bytes`` (state and batch) +
``output_size_in_bytes`` (the new state, metrics) - ``alias_size_in_bytes`` (outputs written
into the donated state's buffers, counted once). The state is abstract (jax.eval_shape), so
a 256 px step at batch 64 is compiled without allocating anything. Peak RSS (Linux VmHWM,
reset after compilation) is measured on CPU in a fresh process for the sizes that run.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_jax import run_utils  # noqa: E402

run_utils.set_process_defaults()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax import diffusion, models, objectives, train  # noqa: E402
from ddpm_jax import state as state_lib  # noqa: E402

CONFIGS = {64: "anime", 128: "anime128", 256: "anime256"}
GRID = {64: (1, 8, 64), 128: (1, 8, 32), 256: (1, 4, 16)}


def make_step(size, batch, remat, microbatches=1, dropout=None):
  """(jitted step with donated state, abstract state, batch spec, key spec)."""
  c = importlib.import_module(f"configs.{CONFIGS[size]}").get_config()
  c.training.batch_size, c.training.microbatches, c.model.remat = batch, microbatches, remat
  if dropout is not None:
    c.model.dropout = dropout
  m = models.create_model(c)
  sched = diffusion.make_schedule(c.diffusion.schedule, c.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(c)
  state = jax.eval_shape(lambda: state_lib.create_train_state(c, m, tx, jax.random.key(0)))
  step = jax.jit(train.make_train_step(c, m, sched, tx, axis_name=None), donate_argnums=0)
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return step, state, x, jax.eval_shape(lambda: jax.random.key(1)), (c, m, sched, tx)


def memory(size, batch, remat, microbatches=1) -> dict:
  step, state, x, key, _ = make_step(size, batch, remat, microbatches)
  t = time.perf_counter()
  ma = step.lower(state, x, key).compile().memory_analysis()
  gib = lambda b: b / 2**30  # noqa: E731
  peak = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
          - ma.alias_size_in_bytes)
  return dict(size=size, batch=batch, remat=remat, microbatches=microbatches,
              temp_gib=gib(ma.temp_size_in_bytes), args_gib=gib(ma.argument_size_in_bytes),
              peak_gib=gib(peak), compile_s=time.perf_counter() - t)


def _concrete(state_spec, x_spec, consts):
  c, m, _, tx = consts
  state = state_lib.create_train_state(c, m, tx, jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, x_spec.shape), jnp.float32)
  return state, x


def step_time(size, batch, remat, microbatches=1, dropout=None, steps=3) -> float:
  """Median seconds of a train step (after one warm-up step)."""
  step, state_spec, x_spec, _, consts = make_step(size, batch, remat, microbatches, dropout)
  state, x = _concrete(state_spec, x_spec, consts)
  key, times = jax.random.key(1), []
  for i in range(steps + 1):
    t = time.perf_counter()
    state, met = step(state, x, key)
    jax.block_until_ready(met)
    if i:
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def rss_child(size, batch, remat) -> None:
  """In a fresh process: compile and run a step, print the RSS high-water mark of the run
  (VmHWM reset after compilation and the first step) and the RSS before it, in GiB."""
  step, state_spec, x_spec, _, consts = make_step(size, batch, remat)
  state, x = _concrete(state_spec, x_spec, consts)
  key = jax.random.key(1)
  state, met = step(state, x, key)
  jax.block_until_ready(met)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  before = _status_kib("VmRSS")
  state, met = step(state, x, key)
  jax.block_until_ready(met)
  print(json.dumps(dict(rss_before_gib=before / 2**20, rss_peak_gib=_status_kib("VmHWM") / 2**20)))


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss(size, batch, remat) -> dict:
  out = subprocess.run([sys.executable, __file__, f"--rss={size},{batch},{remat}"],
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def _per_example_vs_one_dropout_key(size, batch) -> float:
  """Step time with per-example dropout (vmapped network) / one key for the batch (as
  before microbatching), dropout 0.1."""
  t_per = step_time(size, batch, "none", dropout=0.1)
  orig = train.accumulated_grads

  def one_key(objective, params, examples, extra, k):  # the batch's first key for all
    x0, labels, ek, dk = examples
    shared = objectives.Objective(lambda p, x, y, e, d, ex: objective.loss(p, x, y, e, d[0], ex))
    return orig(shared, params, (x0, labels, ek, dk), extra, k)
  train.accumulated_grads = one_key
  try:
    t_one = step_time(size, batch, "none", dropout=0.1)
  finally:
    train.accumulated_grads = orig
  return t_per / t_one


def _remat_time() -> None:
  """Peak RSS and step time of 64 px batch 8 with and without remat: each setting timed
  twice, alternating (median of 5 steps after a warm-up each time), so the machine's drift
  falls on both; the ratio is of the two best medians."""
  for remat in ("none", "block"):
    print(f"RSS 64 px batch 8 remat={remat}: {rss(64, 8, remat)}", flush=True)
  ts = {"none": [], "block": []}
  for _ in range(2):
    for remat in ("none", "block"):
      ts[remat].append(step_time(64, 8, remat, steps=5))
  print(f"step time 64 px batch 8 (s, two medians each): {json.dumps(ts)}; ratio block/none "
        f"(best medians): {min(ts['block']) / min(ts['none']):.3f}", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--grid", default="", help="size:b1,b2;size:... (default: GRID)")
  ap.add_argument("--no-time", action="store_true", help="memory only")
  ap.add_argument("--time-only", action="store_true", help="step time and RSS only")
  ap.add_argument("--rss", default="", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.rss:
    size, batch, remat = a.rss.split(",")
    return rss_child(int(size), int(batch), remat)
  if a.time_only:
    return _remat_time()
  grid = ({int(s): tuple(int(b) for b in bs.split(","))
           for s, bs in (g.split(":") for g in a.grid.split(";"))} if a.grid else GRID)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  print("| px | batch | peak no remat (temp) | peak remat=block (temp) | remat/none |")
  print("|---|---|---|---|---|")
  for size, batches in grid.items():
    for b in batches:
      n, r = memory(size, b, "none"), memory(size, b, "block")
      print(f"| {size} | {b} | {n['peak_gib']:.2f} GiB ({n['temp_gib']:.2f}) | "
            f"{r['peak_gib']:.2f} GiB ({r['temp_gib']:.2f}) | "
            f"{r['peak_gib'] / n['peak_gib']:.0%} (temp {r['temp_gib'] / n['temp_gib']:.0%}) |",
            flush=True)
  for size, b, k in ((64, 64, 8), (256, 64, 16)):
    one, acc = memory(size, b // k, "none"), memory(size, b, "none", k)
    print(f"accumulation {size} px: batch {b} as {k} microbatches {acc['peak_gib']:.2f} GiB, "
          f"temp {acc['temp_gib']:.2f}; one microbatch of {b // k}: {one['peak_gib']:.2f} GiB, "
          f"temp {one['temp_gib']:.2f}", flush=True)
  if a.no_time:
    return
  _remat_time()
  print(f"dropout per example / one key, 64 px batch 8: "
        f"{_per_example_vs_one_dropout_key(64, 8):.2f}", flush=True)


if __name__ == "__main__":
  main()
