#!/usr/bin/env python3
# From the project's shared benchmark folder (shared/bench/diffusers_peer.py beside the
# developers' checkout), copied here so that a clone has it; only the Run line changed.
# benchmarks/bench.py runs it in the peer's venv (--peer-script), as do conv_kernels.py and
# profile_train_step.py (--peer-dir benchmarks) through benchmarks/common.py.
"""Peer baseline for benchmarks: Hugging Face diffusers (PyTorch) on the same work.

Measures the DDPM CIFAR-10 U-Net (Ho et al. 2020; 35,746,307 parameters in
diffusers' UNet2DModel port) the way a PyTorch user would run it:
  * train: Adam step on the epsilon-MSE loss, img/s (median of timed steps);
  * forward: one no-grad network evaluation, img/s;
  * ddim: a full DDIM sampling loop with N network evaluations, seconds.
Prints one JSON object on its last line (and writes it to --json if given).

Setup, in a virtual environment of its own (CPU):
  pip install torch==2.13.0 diffusers
Run:
  peer/bin/python benchmarks/diffusers_peer.py --image-size 32 --batch 16 --ddim-steps 10
On a GPU machine add --device cuda [--bf16].
"""
import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel


def ddpm_cifar10_unet(image_size: int) -> UNet2DModel:
  return UNet2DModel(
      sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=2,
      block_out_channels=(128, 256, 256, 256),
      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      dropout=0.1, norm_num_groups=32)


def sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def timed(fn, device, repeats):
  times = []
  for _ in range(repeats):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--train-steps", type=int, default=5, help="timed train steps")
  p.add_argument("--ddim-steps", type=int, default=10, help="network evaluations per DDIM sample")
  p.add_argument("--device", default="cpu")
  p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
  p.add_argument("--compile", action="store_true", help="torch.compile the model")
  p.add_argument("--json", help="also write the result here")
  args = p.parse_args()

  torch.manual_seed(0)
  device = torch.device(args.device)
  model = ddpm_cifar10_unet(args.image_size).to(device)
  net = torch.compile(model) if args.compile else model
  opt = torch.optim.Adam(model.parameters(), lr=2e-4)
  x0 = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

  def train_step():
    t = torch.randint(0, 1000, (args.batch,), device=device)
    noise = torch.randn_like(x0)
    with autocast:
      loss = ((net(x0 + noise, t).sample.float() - noise) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  for _ in range(2):
    train_step()
  train_s = timed(train_step, device, args.train_steps)

  model.eval()
  scheduler = DDIMScheduler(num_train_timesteps=1000)
  scheduler.set_timesteps(args.ddim_steps)

  @torch.no_grad()
  def forward():
    with autocast:
      net(x0, torch.full((args.batch,), 500, device=device))

  @torch.no_grad()
  def ddim_sample():
    x = torch.randn_like(x0)
    for t in scheduler.timesteps:
      with autocast:
        eps = net(x, t.to(device)).sample.float()
      x = scheduler.step(eps, t, x).prev_sample
    return x

  forward()
  forward_s = timed(forward, device, 3)
  ddim_sample()
  ddim_s = timed(ddim_sample, device, 1)

  result = {
      "peer": "diffusers", "diffusers_version": __import__("diffusers").__version__,
      "torch_version": torch.__version__, "device": str(device), "bf16": args.bf16,
      "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
      "image_size": args.image_size, "batch": args.batch,
      "train_s_per_step": train_s, "train_img_per_s": args.batch / train_s,
      "forward_img_per_s": args.batch / forward_s,
      "ddim_steps": args.ddim_steps, "ddim_s": ddim_s,
      "ddim_img_per_s": args.batch / ddim_s,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }
  line = json.dumps(result)
  if args.json:
    with open(args.json, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
