"""Few-step sampling: a teacher's DDIM at several step counts against its distilled students.

  python benchmarks/few_step_quality.py --teacher runs/anime32 \
      --students runs/anime32_distill --teacher-steps 64,8,4,1 --num-samples 512

Every row draws ``--num-samples`` samples from the same starting noise (seed 0) with
deterministic DDIM on the trailing grid (a student's own grid at its own step count), and
scores them as ``--mode=eval`` does (``evaluate.sample_metrics``: FD, KID, precision and
recall on the offline random_conv features against the first eval.num_reference training
images, colour statistics), plus the RMS distance to the teacher's samples at the most steps
(same noise: how far from the teacher's many-step result). Time: wall-clock seconds for 64
samples, warm (compiled), median of 3, on this machine. Students: each
``<students>/steps<N>`` with a checkpoint, at N steps; their training cost (steps and
minutes from the first to the last logged step of each round) comes from their
metrics.jsonl. Prints a markdown table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _round_cost(workdir: str) -> dict | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = [json.loads(x) for x in open(path) if '"loss"' in x]
  if len(rows) < 2:
    return None
  return {"steps": rows[-1]["step"],
          "minutes": (rows[-1]["time"] - rows[0]["time"]) / 60 * rows[-1]["step"]
          / max(rows[-1]["step"] - rows[0]["step"], 1)}


def main():
  from ddpm_jax import run_utils
  run_utils.set_process_defaults()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--teacher", required=True)
  p.add_argument("--students", help="the --mode=distill workdir (its steps<N> rounds)")
  p.add_argument("--teacher-steps", default="64,8,4,1")
  p.add_argument("--num-samples", type=int, default=512)
  p.add_argument("--data-folder", help="override data.folder of the saved configs")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "few_step_quality.json"))
  args = p.parse_args()

  import jax
  import numpy as np

  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import config_lib, datasets, diffusion, evaluate, generate, images, models

  def load(workdir, steps):
    mngr = ckpt_lib.make_manager(workdir, read_only=True, async_save=False)
    config = config_lib.with_defaults(ckpt_lib.newest_config(mngr, workdir)[0])
    if args.data_folder:
      config.data.folder = args.data_folder
    s = config.sampling
    s.sampler, s.spacing, s.eta, s.num_steps, s.batch_size = "ddim", "trailing", 0.0, steps, 64
    params, step = ckpt_lib.load_params(config, workdir)
    return config, params, step

  rows = [("teacher", args.teacher, int(n)) for n in args.teacher_steps.split(",")]
  if args.students:
    for d in sorted(os.listdir(args.students), key=lambda n: -int(n[5:]) if n[5:].isdigit()
                    else 0):
      if d.startswith("steps") and d[5:].isdigit():
        rows.append((f"student {d}", os.path.join(args.students, d), int(d[5:])))
  ref = None
  results, reference = [], None
  for name, workdir, steps in rows:
    config, params, step = load(workdir, steps)
    if ref is None:
      data = datasets.prepare_data(config)
      ref = evaluate.Reference.build(config, data, data.source(config.data.eval_split))
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    sampler = generate.Sampler(config, models.create_model(config), schedule)
    times = []
    for _ in range(4):  # the first compiles
      start = time.perf_counter()
      jax.block_until_ready(generate.generate(config, sampler, params, 64,
                                              show_progress=False)[0])
      times.append(time.perf_counter() - start)
    times = times[1:]
    x, _ = generate.generate(config, sampler, params, args.num_samples, show_progress=False)
    if reference is None:
      reference = x  # the teacher at the most steps: the first row
    u8 = images.to_uint8(x)
    report, _ = evaluate.sample_metrics(config, u8, ref)
    colour = report["colour"]
    row = {"name": name, "workdir": workdir, "checkpoint_step": step, "steps": steps,
           "timesteps": [int(t) for t in sampler.timesteps()],
           "seconds_per_64": statistics.median(times),
           "fd": report["fd_random_conv"], "kid": report["kid_random_conv"],
           "kid_std": report["kid_random_conv_std"],
           "precision": report["precision_random_conv"], "recall": report["recall_random_conv"],
           "colour_shift": {c: v["sample_mean"] - v["data_mean"] for c, v in colour.items()},
           "colour_w1": report["colour_w1_mean"],
           "rms_to_first_row": float(np.sqrt(np.mean((x - reference) ** 2))),
           "round_cost": _round_cost(workdir) if name.startswith("student") else None}
    results.append(row)
    print(json.dumps(row), flush=True)
    images.save_png(os.path.join(os.path.dirname(args.out),
                                 f"few_step_{name.replace(' ', '_')}_{steps}.png"),
                    images.make_grid(u8[:64]), scale=2)

  print("\n| sampler | network calls | FD | KID | precision | recall | colour shift R / G / B "
        f"| colour W1 | RMS to teacher-{rows[0][2]} | s per 64 | distillation |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    cost = r["round_cost"]
    c = r["colour_shift"]
    print(f"| {r['name']} DDIM | {r['steps']} | {r['fd']:.2f} | {r['kid']:.4f} ± "
          f"{r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
          f"{c['R']:+.1f} / {c['G']:+.1f} / {c['B']:+.1f} | {r['colour_w1']:.1f} | "
          f"{r['rms_to_first_row']:.3f} | {r['seconds_per_64']:.2f} | "
          + (f"{cost['steps']} steps, {cost['minutes']:.1f} min" if cost else "") + " |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
