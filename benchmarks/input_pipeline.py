"""The host input pipeline alone: training img/s from prepared records against the cores it
is given, next to what a train step consumes.

  python benchmarks/input_pipeline.py [--folder anime_faces_64]  (64x64 faces: docs/results.md)

Prepares the folder once as ArrayRecords (image_folder at 32x32 and 64x64, in --data-dir),
then for each image size, number of cores (the child process, and the reader processes it
starts, are pinned to them with sched_setaffinity) and reader (decoding threads,
data.num_workers, or reader processes, data.num_processes), runs ``TrainBatches`` (batch
--batch, random flips) in a fresh process and reports img/s after a warm-up. Writes JSON
(--out). Without --folder it uses the built-in cartoon faces.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(REPO, "..", "shared", "data", "anime_faces_64", "images")


def config_for(folder, size, data_dir, workers):
  from configs import default
  c = default.get_config()
  if folder:
    c.data.dataset, c.data.folder = "image_folder", folder
  c.data.image_size, c.data.data_dir, c.data.num_workers = size, data_dir, workers
  return c


def child(args):
  """Runs in the pinned subprocess: img/s of TrainBatches."""
  os.sched_setaffinity(0, set(range(args.cores)))
  from ddpm_jax import datasets, input_pipeline, run_utils
  run_utils.set_process_defaults()
  c = config_for(args.folder, args.size, args.data_dir, args.workers)
  source = datasets.get_source(c, "train")
  batches = input_pipeline.TrainBatches(source, args.batch, seed=0, random_flip=True,
                                        num_workers=args.workers, prefetch=2,
                                        num_processes=args.processes)
  for _ in range(3):  # warm-up: threads and processes started, first records read
    next(batches)
  t = time.perf_counter()
  for _ in range(args.batches):
    next(batches)
  dt = time.perf_counter() - t
  batches.close()
  print(json.dumps({"img_per_s": args.batches * args.batch / dt, "images": len(source)}))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--folder", default=SHARED if os.path.isdir(SHARED) else None)
  p.add_argument("--data-dir", default="/tmp/ddpm_jax_input_bench")
  p.add_argument("--sizes", default="32,64")
  p.add_argument("--cores", default="", help="comma list (default: 1, 2, 4, ... up to all)")
  p.add_argument("--workers", default="1,2,4,8", help="thread counts to try")
  p.add_argument("--processes", default="1,2,4,8,16",
                 help="reader process counts to try (at most 2 per core)")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                               "input_pipeline.json"))
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--size", type=int, help=argparse.SUPPRESS)
  args, _ = p.parse_known_args()
  if args.child:
    args.cores, args.workers = int(args.cores), int(args.workers)
    args.processes = int(args.processes)
    return child(args)

  ncpu = len(os.sched_getaffinity(0))
  cores = [int(c) for c in args.cores.split(",")] if args.cores else sorted(
      {min(2**i, ncpu) for i in range(8) if 2**i <= ncpu} | {ncpu})
  rows = []
  from ddpm_jax import datasets, run_utils
  run_utils.set_process_defaults()
  for size in (int(s) for s in args.sizes.split(",")):
    datasets.get_source(config_for(args.folder, size, args.data_dir, 8), "train")  # prepare
    for k in cores:
      readers = [(w, 0) for w in (int(x) for x in args.workers.split(","))] + [
          (2, n) for n in (int(x) for x in args.processes.split(",")) if n <= 2 * k]
      for w, n in readers:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(size),
               "--cores", str(k), "--workers", str(w), "--processes", str(n),
               "--batch", str(args.batch), "--batches", str(args.batches),
               "--data-dir", args.data_dir]
        if args.folder:
          cmd += ["--folder", args.folder]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = (out.stdout.strip().splitlines() or ["{}"])[-1]
        r = json.loads(line) if line.startswith("{") else {"error": out.stderr[-500:]}
        rows.append({"size": size, "cores": k, "threads": 0 if n else w, "processes": n, **r})
        reader = f"{n:2d} processes" if n else f"{w:2d} threads  "
        print(f"{size}x{size}  cores {k:2d}  {reader}  "
              f"{r.get('img_per_s', float('nan')):8.0f} img/s", flush=True)
  result = {"machine": {"cpus": ncpu, "cpu": _cpu_model()}, "batch": args.batch,
            "folder": args.folder or "cartoon_faces", "rows": rows, "time": time.time()}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown"


if __name__ == "__main__":
  main()
