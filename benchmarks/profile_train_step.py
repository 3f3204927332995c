"""Where the CPU train step's time goes, op by op, for ddpm_jax and the diffusers peer.

  python benchmarks/profile_train_step.py --peer-python /path/to/peer-venv/bin/python

Ours: the DDPM CIFAR-10 U-Net train step (plain ``jit``, one device, batch 16) is
traced with ``jax.profiler``; every XLA:CPU thunk's time is attributed to its HLO
instruction, and convolutions are split into forward, backward-data and
backward-filter (from the instruction's ``op_name`` metadata and output shape) with
their FLOPs from the shapes. Caveat, measured: the convolution thunks' events cover
only a small part of their work (the implied rates are over 10x the CPU's peak), so
take convolution time from ``benchmarks/conv_kernels.py``; the other categories
(fusions, copies) are timed whole.
Peer: the same step of the peer's model under ``torch.profiler`` (self CPU time per
aten op). Both are printed in one table; JSON goes to --out.
"""

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import run_utils  # noqa: E402

run_utils.set_process_defaults()  # an entry point: the project's XLA flags, before JAX starts
from benchmarks.common import DEFAULT_PEER_DIR, PEER_TRAIN_STEP, our_train_step  # noqa: E402

PEER = r'''
import sys, json, torch
sys.path.insert(0, sys.argv[1])
B = int(sys.argv[2])
''' + PEER_TRAIN_STEP + r'''
for _ in range(2): step()
from torch.profiler import profile, ProfilerActivity
import time
with profile(activities=[ProfilerActivity.CPU]) as prof:
  t0 = time.perf_counter()
  for _ in range(2): step()
  wall = (time.perf_counter() - t0) / 2
out = {"wall_s": wall, "ops": {}}
for e in prof.key_averages():
  out["ops"][e.key] = out["ops"].get(e.key, 0) + e.self_cpu_time_total / 1e6 / 2
print(json.dumps(out))
'''


def classify_torch(name):
  n = name.lower()
  if "convolution_backward" in n:
    return "conv backward (data + filter)"
  if "conv" in n:
    return "conv forward"
  if any(k in n for k in ("mm", "bmm", "addmm", "linear", "matmul", "baddbmm", "softmax")):
    return "matmul / attention"
  if "group_norm" in n or "native_group_norm" in n:
    return "group norm"
  if "adam" in n or "_foreach" in n:
    return "optimizer"
  return "other (elementwise, copies, ...)"


def _parse_hlo(text):
  """instruction name -> (opcode, output shape, op_name, flops for convolutions)."""
  pat = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
  rows = {}
  for line in text.splitlines():
    m = pat.match(line)
    if m:
      name, shape, opcode, rest = m.groups()
      rows[name] = ([int(v) for v in shape.split(",") if v], opcode, rest)
  info = {}
  for name, (out, opcode, rest) in rows.items():
    op_name = re.search(r'op_name="([^"]*)"', rest)
    flops = 0
    if opcode == "convolution":
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
      if len(operands) >= 2 and labels and operands[1] in rows:
        rhs, rl = rows[operands[1]][0], labels.group(2)
        window = 1
        for ch, size in zip(rl, rhs):
          if ch.isdigit():
            window *= size
        n_out = 1
        for v in out:
          n_out *= v
        flops = 2 * n_out * window * rhs[rl.index("i")]
    info[name] = (opcode, out, op_name.group(1) if op_name else "", flops)
  return info


def classify_ours(name, info):
  opcode, out, op_name, _ = info.get(name, ("?", [], "", 0))
  if opcode == "convolution" or name.startswith("convolution"):
    if op_name and "transpose(" not in op_name:
      return "conv forward"
    # Filter gradients come out kernel-shaped, (Ci, kh, kw, Co) with kh = kw in {1, 3};
    # XLA leaves them without op_name metadata.
    if len(out) == 4 and out[1] == out[2] and out[1] in (1, 3):
      return "conv backward-filter"
    return "conv backward-data"
  if opcode in ("dot",) or name.startswith("dot"):
    return "matmul / attention"
  if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
    return "copies / transposes"
  if "rng" in name or "threefry" in op_name or "random_bits" in op_name:
    return "random bits"
  return "fusions (elementwise, norms, reductions, optimizer)"


def profile_ours(batch, config_name="cifar10"):
  import jax
  from jax.profiler import ProfileData
  step, st, x, key = our_train_step(batch, config_name)
  info = _parse_hlo(step.lower(st, x, key).compile().as_text())
  for _ in range(2):
    st, met = step(st, x, key)
  jax.block_until_ready(met)
  d = tempfile.mkdtemp()
  with jax.profiler.trace(d):
    t0 = time.perf_counter()
    for _ in range(2):
      st, met = step(st, x, key)
    jax.block_until_ready(met)
    wall = (time.perf_counter() - t0) / 2
  pd = ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
  per = collections.Counter()
  for plane in pd.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      for e in line.events:
        if e.name.startswith(("ThreadpoolListener", "end:", "ThunkExecutor")):
          continue
        per[e.name] += e.duration_ns / 1e9 / 2
  cats = collections.defaultdict(lambda: {"s": 0.0, "flops": 0})
  for name, sec in per.items():
    cat = classify_ours(name, info)
    cats[cat]["s"] += sec
    cats[cat]["flops"] += info.get(name, (0, 0, 0, 0))[3]
  return {"wall_s": wall, "categories": dict(cats),
          "top": per.most_common(12)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--peer-python", required=True)
  ap.add_argument("--peer-dir", default=DEFAULT_PEER_DIR)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--config", default="cifar10", help="ours only: a configs/ module")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  peer = json.loads(subprocess.run(
      [args.peer_python, "-c", PEER, os.path.abspath(args.peer_dir), str(args.batch)],
      check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
  ours = profile_ours(args.batch, args.config)
  pcats = collections.Counter()
  for k, v in peer["ops"].items():
    pcats[classify_torch(k)] += v
  print(f"train step, batch {args.batch}: ddpm_jax {ours['wall_s']:.2f} s wall, "
        f"diffusers {peer['wall_s']:.2f} s wall")
  print(f"{'ddpm_jax (XLA:CPU thunks)':<55s} {'s/step':>7s} {'GFLOP':>7s} {'GFLOP/s':>8s}")
  for cat, v in sorted(ours["categories"].items(), key=lambda kv: -kv[1]["s"]):
    gf = v["flops"] / 1e9
    rate = f"{gf / v['s']:.1f}" if gf else ""
    print(f"  {cat:<53s} {v['s']:7.3f} {gf:7.1f} {rate:>8s}")
  print(f"{'diffusers (torch.profiler self CPU time)':<55s} {'s/step':>7s}")
  for cat, v in pcats.most_common():
    print(f"  {cat:<53s} {v:7.3f}")
  print("top ddpm_jax thunks:", ", ".join(f"{n} {s:.3f}s" for n, s in ours["top"]))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"batch": args.batch, "ours": {k: v for k, v in ours.items()},
                 "peer": {"wall_s": peer["wall_s"], "categories": dict(pcats),
                          "ops": peer["ops"]}}, f, indent=1)


if __name__ == "__main__":
  main()
