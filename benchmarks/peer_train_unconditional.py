#!/usr/bin/env python3
"""The peer's side of benchmarks/peer_quality.py: diffusers' train_unconditional recipe.

Runs in the peer's own environment (`pip install torch==2.13.0 diffusers`), imports
nothing of ddpm_jax. Trains diffusers' UNet2DModel at the size of configs/anime32.py
(32-64-64 channels, one residual block per level (two on the way up), attention at 8x8
with one head, GroupNorm 8, no dropout) with DDPMScheduler (linear betas 1e-4..0.02,
T = 1000, epsilon) and the recipe's defaults (examples/unconditional_image_generation/
train_unconditional.py): AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, 500
warmup steps then cosine over 100 epochs, gradient clipping at 1, EMAModel (max decay
0.9999, inv_gamma 1, power 3/4), batch 16, random horizontal flips. Training stops when
--seconds have passed since this process started (start-up included, as for ours); then
it samples --num-samples with DDIMScheduler (eta 1, clipping with the clipped x0's
epsilon, the same linspace timesteps as ours) from the EMA weights and writes them
(uint8) with the run's facts to --out (.npz) and a JSON line to stdout.

  peer-venv/bin/python peer_train_unconditional.py --images train_u8.npy --seconds 600 \
      --out peer.npz
"""

import argparse
import json
import math
import time

START = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402


def anime32_unet() -> UNet2DModel:
  return UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
      block_out_channels=(32, 64, 64),
      down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
      attention_head_dim=64, norm_num_groups=8, dropout=0.0)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", required=True, help=".npy of uint8 (N, 32, 32, 3) training images")
  p.add_argument("--seconds", type=float, required=True)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--num-samples", type=int, default=512)
  p.add_argument("--steps", type=int, default=100, help="DDIM steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True)
  args = p.parse_args()

  torch.manual_seed(args.seed)
  data = torch.from_numpy(np.load(args.images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
  model = anime32_unet()
  noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6,
                          eps=1e-8)
  steps_per_epoch = math.ceil(len(data) / args.batch)
  lr_scheduler = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500,
                               num_training_steps=100 * steps_per_epoch)
  ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                 power=3 / 4, model_cls=UNet2DModel, model_config=model.config)
  gen = torch.Generator().manual_seed(args.seed)
  step, losses, train_start = 0, [], time.time()
  model.train()
  while time.time() - START < args.seconds:
    perm = torch.randperm(len(data), generator=gen)
    for i in range(0, len(data) - args.batch + 1, args.batch):
      if time.time() - START >= args.seconds:
        break
      x0 = data[perm[i:i + args.batch]]
      flip = torch.rand(len(x0), generator=gen) < 0.5
      x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
      noise = torch.randn(x0.shape, generator=gen)
      t = torch.randint(0, 1000, (len(x0),), generator=gen)
      loss = torch.nn.functional.mse_loss(model(noise_scheduler.add_noise(x0, noise, t), t).sample,
                                          noise)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      lr_scheduler.step()
      ema.step(model.parameters())
      step += 1
      losses.append(float(loss))
  train_end = time.time()
  train_seconds = train_end - START

  ema.copy_to(model.parameters())
  model.eval()
  sampler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                          timestep_spacing="linspace", set_alpha_to_one=True)
  sampler.set_timesteps(args.steps)
  gen = torch.Generator().manual_seed(args.seed + 1)
  out, sample_start = [], time.time()
  with torch.no_grad():
    for i in range(0, args.num_samples, 64):
      x = torch.randn((min(64, args.num_samples - i), 3, 32, 32), generator=gen)
      for t in sampler.timesteps:
        eps = model(x, t).sample
        x = sampler.step(eps, t, x, eta=1.0, use_clipped_model_output=True,
                         generator=gen).prev_sample
      out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
  samples = torch.cat(out).numpy()
  facts = {"side": "diffusers", "train_steps": step, "train_seconds": train_seconds,
           "train_images": step * args.batch,
           "steps_per_s": step / max(train_end - train_start, 1e-9),
           "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None,
           "sampling_seconds": time.time() - sample_start,
           "params": sum(p.numel() for p in model.parameters()),
           "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
           "threads": torch.get_num_threads()}
  np.savez(args.out, samples=samples, facts=json.dumps(facts))
  print(json.dumps(facts), flush=True)


if __name__ == "__main__":
  main()
