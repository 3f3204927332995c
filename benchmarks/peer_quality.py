"""Sample quality per CPU-hour: ddpm_jax against diffusers, the same U-Net, images, cores, time.

  python benchmarks/peer_quality.py --peer-python /path/to/peer-venv/bin/python \
      --folder anime_faces_64 --minutes 10

One run, one side after the other on the same cores:
  ours: `main.py` with configs/anime32.py (1,113,955 parameters) on the folder, stopped with
    SIGTERM --minutes after it started (start-up, data preparation and compilation count;
    the trainer saves the step it reached), then 512 samples from its EMA weights;
  peer: benchmarks/peer_train_unconditional.py in the peer's environment: diffusers'
    UNet2DModel of the same size (the same 1,113,955 parameters) trained with the
    train_unconditional recipe's defaults on the same training images (our 32x32 train
    split, written out as uint8) for the same minutes, then 512 samples from its EMA.
Both sample with DDIM, eta 1, 100 steps on linspace(0, 999, 100), x0 clipped and the
clipped x0's epsilon used (each side's own implementation; diffusers' DDIM steps to
t - 10 where ours steps to the next listed timestep), and both are scored here with the
same features against the same 1,024 training images (``evaluate.sample_metrics``: FD,
KID, precision/recall on random_conv features, colour); ours also gets held-out
bits/dim (``--mode=eval``). Prints a table, writes JSON and the two grids next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
  from ddpm_jax import run_utils
  run_utils.set_process_defaults()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--peer-python", required=True)
  p.add_argument("--folder", required=True, help="the image folder (data.folder)")
  p.add_argument("--minutes", type=float, default=10.0)
  p.add_argument("--num-samples", type=int, default=512)
  p.add_argument("--workdir", default="/tmp/peer_quality")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                               "peer_quality.json"))
  args = p.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  seconds = args.minutes * 60

  import numpy as np

  from configs import anime32
  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import datasets, diffusion, evaluate, generate, images, models

  config = anime32.get_config()
  config.data.folder = os.path.abspath(args.folder)
  ours_dir = os.path.join(args.workdir, "ours")
  flags = ["--config", os.path.join(REPO, "configs", "anime32.py"),
           f"--config.data.folder={config.data.folder}",
           "--config.training.num_train_steps=1000000",
           "--config.training.checkpoint_every_steps=1000000",
           "--config.training.sample_every_steps=0", "--config.training.keep_period=0"]

  # Ours, for --minutes from the start of the process.
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *flags,
                           "--workdir", ours_dir], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  time.sleep(seconds)
  proc.send_signal(signal.SIGTERM)
  proc.wait()
  saved = ckpt_lib.saved_config(ours_dir)
  s = saved.sampling
  s.sampler, s.eta, s.num_steps, s.spacing, s.clip_x0, s.batch_size = "ddim", 1.0, 100, \
      "uniform", True, 64
  params, step = ckpt_lib.load_params(saved, ours_dir)
  schedule = diffusion.make_schedule(saved.diffusion.schedule, saved.diffusion.num_timesteps)
  sampler = generate.Sampler(saved, models.create_model(saved), schedule)
  start = time.time()
  ours_x, _ = generate.generate(saved, sampler, params, args.num_samples, show_progress=False)
  ours_facts = {"side": "ddpm_jax", "train_steps": int(step), "train_images": int(step) * 32,
                "sampling_seconds": time.time() - start}
  rows = [line for line in open(os.path.join(ours_dir, "metrics.jsonl")) if '"loss"' in line]
  if rows:
    ours_facts["final_loss_last_logged"] = json.loads(rows[-1])["loss"]
  subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--mode=eval", "--workdir",
                  ours_dir, "--config.eval.num_samples=0", "--config.eval.name=peer_quality"],
                 cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  report = json.load(open(os.path.join(ours_dir, "eval", f"{step}_peer_quality.json")))
  ours_facts["bits_per_dim"] = report.get("bits_per_dim")

  # The same training images for the peer, as uint8.
  train_u8 = evaluate._load_uint8(datasets.get_source(config, config.data.train_split), 10**9)
  images_path = os.path.join(args.workdir, "train_u8.npy")
  np.save(images_path, train_u8)
  peer_out = os.path.join(args.workdir, "peer.npz")
  peer = subprocess.run([args.peer_python, os.path.join(REPO, "benchmarks",
                                                        "peer_train_unconditional.py"),
                         "--images", images_path, "--seconds", str(seconds),
                         "--num-samples", str(args.num_samples), "--out", peer_out],
                        capture_output=True, text=True, check=True)
  peer_facts = json.loads(peer.stdout.strip().splitlines()[-1])
  peer_u8 = np.load(peer_out)["samples"]

  ref = evaluate.Reference.build(config, datasets.get_source(config, config.data.eval_split))
  results = []
  out_dir = os.path.dirname(args.out)
  os.makedirs(out_dir, exist_ok=True)
  for facts, u8 in ((ours_facts, images.to_uint8(ours_x)), (peer_facts, peer_u8)):
    m, _ = evaluate.sample_metrics(config, u8, ref)
    facts.update(minutes=args.minutes, fd=m["fd_random_conv"], kid=m["kid_random_conv"],
                 kid_std=m["kid_random_conv_std"], precision=m["precision_random_conv"],
                 recall=m["recall_random_conv"], colour_w1=m["colour_w1_mean"],
                 colour_shift={c: v["sample_mean"] - v["data_mean"]
                               for c, v in m["colour"].items()})
    results.append(facts)
    images.save_png(os.path.join(out_dir, f"peer_quality_{facts['side']}.png"),
                    images.make_grid(u8[:64]), scale=2)
    print(json.dumps(facts), flush=True)
  print(f"\n| side ({args.minutes:g} min of training on the same cores) | train steps (images) "
        "| FD | KID | precision | recall | colour shift R / G / B | colour W1 | held-out "
        "bits/dim |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    c = r["colour_shift"]
    bpd = r.get("bits_per_dim")
    print(f"| {r['side']} | {r['train_steps']} ({r['train_images']}) | {r['fd']:.2f} | "
          f"{r['kid']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
          f"{c['R']:+.1f} / {c['G']:+.1f} / {c['B']:+.1f} | {r['colour_w1']:.1f} | "
          f"{bpd if bpd is None else format(bpd, '.3f')} |")
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
