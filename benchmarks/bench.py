"""ddpm_jax vs the diffusers peer on the DDPM CIFAR-10 U-Net (35,746,307 parameters), one run.

  python benchmarks/bench.py --peer-python /path/to/peer-venv/bin/python

measures, for both sides on the same machine in the same run: train img/s (batch 16
and --big-batch), forward img/s, end-to-end DDIM sampling time for 10 and 50 steps
(16 images, warm), and for ddpm_jax the train-step compile time cold and from the
persistent cache (fresh subprocesses), and peak memory. Prints a table of absolute
numbers and ratios, and writes JSON (--out). Without --peer-python the peer rows are
empty. The peer runs benchmarks/diffusers_peer.py in its own environment
(`pip install torch==2.13.0 diffusers`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PEER = os.path.join(REPO, "benchmarks", "diffusers_peer.py")


# What the two sides do differently in the timed work (printed with the table).
DIFFERENCES = [
    "train step: ours also updates the EMA parameters, clips the global gradient norm and "
    "checks the step is finite (skipping it if not); the peer's is a plain Adam step",
    "bf16: ours computes GroupNorm (statistics in float32) and SiLU in bfloat16; torch "
    "autocast runs them in float32",
    "DDIM: ours is one compiled lax.scan over the steps; the peer calls its (compiled) "
    "network from diffusers' Python scheduler loop",
    "both sides: parameters on the device before timing; the same number of timed train "
    "steps (--train-steps), the median reported",
]


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def build(batch, bf16=False, image_size=32):
  import jax

  from configs import cifar10
  from ddpm_jax import diffusion, models
  from ddpm_jax import state as state_lib
  config = cifar10.get_config()
  config.data.image_size = image_size
  config.training.batch_size = batch
  config.model.dtype = "bfloat16" if bf16 else "float32"
  model = models.create_model(config)
  schedule = diffusion.make_schedule("linear", 1000)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create_train_state(config, model, tx, jax.random.key(0))
  return config, model, schedule, tx, state


def measure_train(batch, steps, bf16=False):
  """Train img/s through the product's pmapped step (all local devices)."""
  import jax
  import numpy as np

  from ddpm_jax import parallel, train
  config, model, schedule, tx, state = build(batch, bf16)
  p_step = train.make_p_train_step(config, model, schedule, tx)
  n = jax.local_device_count()
  x = parallel.shard(np.random.default_rng(0).uniform(-1, 1, (n, 1, batch // n, 32, 32, 3))
                     .astype(np.float32))
  sr = parallel.replicate(state)
  key, req = jax.random.key(0), parallel.requests_array()
  t0 = time.perf_counter()
  sr, m, _ = p_step(sr, x, key, req)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  if steps == 0:  # compile-time probe only
    return {"train_first_call_s": first}
  box = [sr]

  def one():
    box[0], mm, _ = p_step(box[0], x, key, req)
    jax.block_until_ready(mm)
  one()
  s = _timed(one, steps)
  return {"train_img_per_s": batch / s, "train_s_per_step": s, "train_first_call_s": first}


def measure_forward_and_ddim(batch, ddim_steps_list, bf16=False):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ddpm_jax import generate
  config, model, schedule, tx, state = build(batch, bf16)
  # On the device before timing, as the peer's are: a host (numpy) tree would be copied to
  # the device on every timed call (143 MB for this model).
  params = jax.device_put(state.params)
  f = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.full((x.shape[0],), 500)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 32, 32, 3)), jnp.float32)
  jax.block_until_ready(f(params, x))
  fwd = _timed(lambda: jax.block_until_ready(f(params, x)), 3)
  out = {"forward_img_per_s": batch / fwd}
  n = jax.local_device_count()
  for steps in ddim_steps_list:
    config.sampling.sampler, config.sampling.num_steps = "ddim", steps
    config.sampling.clip_x0 = False
    sampler = generate.Sampler(config, model, schedule)
    idx = np.arange(batch - batch % n)
    sampler(params, idx, 0, 0)  # compile
    out[f"ddim{steps}_s"] = _timed(lambda: sampler(params, idx, 0, 1), 1)  # noqa: B023
  return out


def compile_time_subprocess(cache_dir, batch):
  """Seconds to the first train step's result in a fresh process using ``cache_dir``."""
  code = (f"import sys,time; sys.path.insert(0,{REPO!r}); import jax;"
          f"jax.config.update('jax_compilation_cache_dir',{cache_dir!r});"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs',0.0);"
          "jax.config.update('jax_persistent_cache_min_entry_size_bytes',0);"
          "from benchmarks import bench;"
          f"print('RESULT', bench.measure_train({batch}, 0)['train_first_call_s'])")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT"):
      return float(line.split()[1])
  raise RuntimeError(proc.stderr[-2000:])


def run_peer(peer_python, batch, ddim_steps, device, bf16=False, compile_=False, script=PEER,
             train_steps=5):
  cmd = [peer_python, script, "--batch", str(batch), "--ddim-steps", str(ddim_steps),
         "--device", device, "--train-steps", str(train_steps)] + (
             ["--bf16"] if bf16 else []) + (["--compile"] if compile_ else [])
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    return {"error": proc.stderr[-1000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info():
  import jax
  import jaxlib
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--peer-python", help="python of the peer's venv (torch + diffusers)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--big-batch", type=int, default=64)
  p.add_argument("--train-steps", type=int, default=5)
  p.add_argument("--bf16", action="store_true", help="bfloat16 compute on both sides")
  p.add_argument("--peer-compile", action="store_true", help="add a torch.compile peer row")
  p.add_argument("--peer-script", default=PEER, help="path of diffusers_peer.py")
  p.add_argument("--peer-compile-light", action="store_true",
                 help="compiled peer: only the batch/DDIM-10 run (each run recompiles)")
  p.add_argument("--skip-compile-time", action="store_true")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "latest.json"))
  args = p.parse_args()

  import jax

  from ddpm_jax import run_utils
  run_utils.set_process_defaults()  # the project's XLA:CPU flags, before JAX starts
  device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  result = {"machine": machine_info(), "batch": args.batch, "big_batch": args.big_batch,
            "bf16": args.bf16, "ours": {"side": "ddpm_jax"}, "peers": [], "time": time.time(),
            "timed_train_steps": args.train_steps, "differences": DIFFERENCES}

  def save():  # after each phase, so a run cut short still leaves its numbers
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)

  # Peers first: a child process's peak RSS (ru_maxrss) starts from its parent's, so the
  # peer must be started before this process has grown.
  if args.peer_python:
    rows = [("diffusers", False)] + ([("diffusers+compile", True)] if args.peer_compile else [])
    for name, comp in rows:
      r10 = run_peer(args.peer_python, args.batch, 10, device, args.bf16, comp,
                     args.peer_script, args.train_steps)
      full = not comp or not args.peer_compile_light
      r50 = run_peer(args.peer_python, args.batch, 50, device, args.bf16, comp,
                     args.peer_script, args.train_steps) if full else {}
      big = run_peer(args.peer_python, args.big_batch, 1, device, args.bf16, comp,
                     args.peer_script, max(2, args.train_steps // 2)) if full else {}
      result["peers"].append({
          "side": name, "train_img_per_s": r10.get("train_img_per_s"),
          "train_img_per_s_big_batch": big.get("train_img_per_s"),
          "forward_img_per_s": r10.get("forward_img_per_s"),
          "ddim10_s": r10.get("ddim_s"), "ddim50_s": r50.get("ddim_s"),
          "peak_rss_mib": max(r10.get("peak_rss_mib") or 0, big.get("peak_rss_mib") or 0),
          "raw": [r10, r50, big]})
      save()
  ours = result["ours"]
  ours.update(measure_train(args.batch, args.train_steps, args.bf16))
  save()
  big = measure_train(args.big_batch, max(2, args.train_steps // 2), args.bf16)
  ours["train_img_per_s_big_batch"] = big["train_img_per_s"]
  ours.update(measure_forward_and_ddim(args.batch, (10, 50), args.bf16))
  ours["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if device == "cuda":
    stats = jax.devices()[0].memory_stats() or {}
    ours["peak_device_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
  save()
  if not args.skip_compile_time:
    with tempfile.TemporaryDirectory() as cache:
      ours["compile_cold_s"] = compile_time_subprocess(cache, args.batch)
      ours["compile_cached_s"] = compile_time_subprocess(cache, args.batch)
    save()

  print_table(result)


def print_table(result):
  ours, peers = result["ours"], result["peers"]
  keys = [("train_img_per_s", f"train img/s (batch {result['batch']})", True),
          ("train_img_per_s_big_batch", f"train img/s (batch {result['big_batch']})", True),
          ("forward_img_per_s", "forward img/s", True),
          ("ddim10_s", f"DDIM-10, {result['batch']} images (s)", False),
          ("ddim50_s", f"DDIM-50, {result['batch']} images (s)", False),
          ("compile_cold_s", "train compile, cold (s)", False),
          ("compile_cached_s", "train compile, cached (s)", False),
          ("peak_rss_mib", "peak host RSS (MiB)", False)]
  head = f"{'metric':32s} {'ddpm_jax':>10s}" + "".join(
      f" {p['side']:>18s} {'ratio':>7s}" for p in peers)
  print(head)
  for k, label, higher in keys:
    v = ours.get(k)
    row = f"{label:32s} {v if v is None else round(v, 3)!s:>10s}"
    for p in peers:
      pv = p.get(k)
      ratio = (v / pv if higher else pv / v) if (v and pv) else None
      shown = "" if ratio is None else f"{ratio:.2f}x"
      row += f" {pv if pv is None else round(pv, 3)!s:>18s} {shown:>7s}"
    print(row)
  print("(ratio: how many times better ddpm_jax is; >1 = faster)")
  for d in result.get("differences", []):
    print(f"  - {d}")


if __name__ == "__main__":
  main()
