"""How often guided samples show the asked class, for a model of the built-in faces by hair.

  python benchmarks/guidance_accuracy.py --workdir runs/hair [--samples 192]

Fits a nearest-class-mean classifier on the pixels of labelled training faces, reports
its accuracy on the held-out split, then samples the workdir's newest checkpoint with
labels cycling over the classes at each guidance scale and reports the share classified
as the asked class (chance: 1 / number of classes). Prints JSON.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--samples", type=int, default=192)
  p.add_argument("--train-images", type=int, default=3000)
  p.add_argument("--scales", default="0,1,3")
  args = p.parse_args()
  from ddpm_jax import run_utils
  run_utils.set_process_defaults()
  import numpy as np

  from ddpm_jax import checkpoint, datasets, diffusion, generate, images, models
  config = checkpoint.saved_config(args.workdir)
  config.sampling.num_frames = 0

  def load(split, n):
    src = datasets.get_source(config, split, with_labels=True)
    ex = [src.example(i) for i in range(min(n, len(src)))]
    return np.stack([e[0] for e in ex]), np.array([e[1] for e in ex]), src.class_names

  x, y, names = load(config.data.train_split, args.train_images)
  flat = lambda u8: u8.reshape(len(u8), -1).astype(np.float64)  # noqa: E731
  means = np.stack([flat(x[y == k]).mean(0) for k in range(len(names))])
  classify = lambda u8: np.argmin(((flat(u8)[:, None] - means[None]) ** 2).sum(-1), 1)  # noqa
  xt, yt, _ = load(config.data.eval_split, 10**9)
  out = {"classes": list(names), "classifier_heldout_accuracy": float((classify(xt) == yt).mean()),
         "heldout_images": int(len(yt)), "samples": args.samples}
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  params, out["step"] = checkpoint.load_params(config, args.workdir)
  labels = np.arange(args.samples) % len(names)
  for w in (float(s) for s in args.scales.split(",")):
    config.sampling.guidance_scale = w
    samples, _ = generate.generate(config, generate.Sampler(config, model, schedule), params,
                                   args.samples, labels=labels, show_progress=False)
    out[f"asked_class_share_w{w:g}"] = float((classify(images.to_uint8(samples)) == labels).mean())
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
