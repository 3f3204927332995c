"""The CIFAR-10 U-Net's convolutions, one by one, in XLA:CPU and in PyTorch (oneDNN).

  python benchmarks/conv_kernels.py --peer-python /path/to/peer-venv/bin/python

Every convolution of the model's forward pass is read from its jaxpr (shapes and how
often each occurs). Each distinct shape is timed alone, forward and forward+backward
(gradients for input and kernel), as a jitted JAX function and as torch
``F.conv2d`` with autograd in the peer's venv, in the same run. Weighted by their
counts, the per-shape times give each side's convolution time per train step; the
whole train step of each side is timed in the same run, so the difference is what
the rest of the step (norms, activations, attention, optimizer, EMA) costs.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import DEFAULT_PEER_DIR, PEER_TRAIN_STEP, our_train_step  # noqa: E402

PEER = r'''
import json, sys, time, torch
import torch.nn.functional as F
shapes = json.loads(sys.argv[1]); reps = int(sys.argv[2])
out = {}
for key, (x_shape, w_shape, stride, pad) in shapes.items():
  B, H, W, C = x_shape; kh, kw, ci, co = w_shape
  x = torch.randn(B, C, H, W)  # NCHW, contiguous: what diffusers' UNet2DModel runs on
  w = torch.randn(co, ci, kh, kw) * 0.05
  xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
  def fwd():
    with torch.no_grad():
      return F.conv2d(x, w, stride=stride, padding=pad)
  def fb():
    y = F.conv2d(xg, wg, stride=stride, padding=pad)
    gx, gw = torch.autograd.grad(y, (xg, wg), torch.ones_like(y))
  res = []
  for fn in (fwd, fb):
    fn(); fn()
    ts = []
    for _ in range(reps):
      t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    res.append(sorted(ts)[len(ts) // 2])
  out[key] = res
sys.path.insert(0, sys.argv[3])
B = shapes["0"][0][0]
''' + PEER_TRAIN_STEP + r'''
step(); step()
ts = []
for _ in range(reps):
  t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "times": out,
                  "train_step_s": sorted(ts)[len(ts) // 2]}))
'''


def model_convs(batch):
  """Distinct (input shape, kernel shape, stride, padding) of the forward pass, with counts."""
  import jax
  import jax.numpy as jnp

  from configs import cifar10
  from ddpm_jax import models
  c = cifar10.get_config()
  m = models.create_model(c)
  x = jnp.zeros((batch, 32, 32, 3))
  t = jnp.zeros((batch,), jnp.int32)
  params = jax.eval_shape(lambda: m.init(jax.random.key(0), x, t))
  jaxpr = jax.make_jaxpr(lambda p: m.apply(p, x, t, train=False))(params)
  counts = collections.Counter()

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        stride = eqn.params["window_strides"][0]
        pad = eqn.params["padding"][0][0]
        counts[(tuple(lhs), tuple(rhs), stride, pad)] += 1
      for v in eqn.params.values():  # nested jaxprs (pjit, remat, custom_vjp, ...)
        sub = getattr(v, "jaxpr", v)
        if hasattr(sub, "eqns"):
          walk(sub)
  walk(jaxpr.jaxpr)
  return counts


def time_ours(shape, reps):
  import jax
  import jax.numpy as jnp
  import numpy as np
  x_shape, w_shape, stride, pad = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape) * 0.05, jnp.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fwd = jax.jit(conv)
  fb = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=(0, 1)))
  res = []
  for fn in (fwd, fb):
    jax.block_until_ready(fn(x, w))
    jax.block_until_ready(fn(x, w))
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(x, w))
      ts.append(time.perf_counter() - t)
    res.append(sorted(ts)[len(ts) // 2])
  return res


def time_our_train_step(batch, reps):
  import jax
  step, st, x, key = our_train_step(batch)
  ts = []
  for i in range(reps + 1):
    t0 = time.perf_counter()
    st, met = step(st, x, jax.random.fold_in(key, i))
    jax.block_until_ready(met)
    ts.append(time.perf_counter() - t0)
  return sorted(ts[1:])[reps // 2]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--peer-python", required=True)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--peer-dir", default=DEFAULT_PEER_DIR)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  from ddpm_jax import run_utils
  run_utils.set_process_defaults()  # the project's XLA:CPU flags, before JAX starts
  counts = model_convs(args.batch)
  keys = {f"{i}": [list(s[0]), list(s[1]), s[2], s[3]] for i, s in enumerate(counts)}
  peer = json.loads(subprocess.run(
      [args.peer_python, "-c", PEER, json.dumps(keys), str(args.reps),
       os.path.abspath(args.peer_dir)],
      check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
  rows, tot = [], collections.Counter()
  print(f"batch {args.batch}; torch {peer['torch']} ({peer['threads']} threads); "
        "times are medians, GFLOP/s = 2 x MACs / time (forward+backward = 3x forward FLOPs)")
  print(f"{'input':>16s} {'kernel':>14s} {'n':>3s} | {'XLA fwd':>8s} {'torch fwd':>9s} | "
        f"{'XLA f+b':>8s} {'torch f+b':>9s} | GFLOP/s XLA/torch (f+b)")
  for i, (shape, n) in enumerate(counts.items()):
    x_shape, w_shape, stride, _ = shape
    ho = x_shape[1] // stride
    flops = 2 * x_shape[0] * ho * ho * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]
    ours = time_ours(shape, args.reps)
    theirs = peer["times"][str(i)]
    for side, tt in (("ours", ours), ("peer", theirs)):
      tot[side + "_fwd"] += n * tt[0]
      tot[side + "_fb"] += n * tt[1]
    tot["flops"] += n * flops
    rows.append({"input": x_shape, "kernel": w_shape, "stride": stride, "count": n,
                 "ours_s": ours, "peer_s": theirs, "fwd_gflop": flops / 1e9})
    print(f"{str(x_shape):>16s} {str(w_shape):>14s} {n:3d} | {ours[0] * 1e3:7.2f}ms "
          f"{theirs[0] * 1e3:8.2f}ms | {ours[1] * 1e3:7.2f}ms {theirs[1] * 1e3:8.2f}ms | "
          f"{3 * flops / ours[1] / 1e9:6.1f} / {3 * flops / theirs[1] / 1e9:6.1f}", flush=True)
  f = tot["flops"]
  print(f"all convolutions of one train step ({3 * f / 1e9:.0f} GFLOP): XLA {tot['ours_fb']:.2f} s "
        f"({3 * f / tot['ours_fb'] / 1e9:.0f} GFLOP/s), torch {tot['peer_fb']:.2f} s "
        f"({3 * f / tot['peer_fb'] / 1e9:.0f} GFLOP/s); forward only: XLA {tot['ours_fwd']:.2f} s, "
        f"torch {tot['peer_fwd']:.2f} s")
  ours_step = time_our_train_step(args.batch, max(3, args.reps // 2))
  peer_step = peer["train_step_s"]
  print(f"whole train step (Adam, dropout, batch {args.batch}): ddpm_jax {ours_step:.2f} s, "
        f"diffusers {peer_step:.2f} s")
  print(f"  convolutions (sum of the kernels alone): ddpm_jax {tot['ours_fb']:.2f} s, "
        f"diffusers {tot['peer_fb']:.2f} s")
  print(f"  everything else (step - convolutions): ddpm_jax {ours_step - tot['ours_fb']:.2f} s, "
        f"diffusers {peer_step - tot['peer_fb']:.2f} s")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"batch": args.batch, "rows": rows, "totals": dict(tot), "torch": peer["torch"],
                 "ours_train_step_s": ours_step, "peer_train_step_s": peer_step}, fh, indent=1)


if __name__ == "__main__":
  main()
