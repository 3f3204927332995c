"""FID of held-out real images against the training reference: the floor of FID at this N.

  python benchmarks/fid_floor.py WORKDIR N

Uses the workdir's saved config (data, eval settings) and eval's own Reference and
sample_metrics, with N held-out images in place of samples (docs/results.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import checkpoint as ckpt_lib  # noqa: E402
from ddpm_jax import datasets, evaluate  # noqa: E402

w, n = sys.argv[1], int(sys.argv[2])
config = ckpt_lib.saved_config(w)
config.eval.num_samples = config.eval.num_reference = config.eval.num_examples = n
data = datasets.prepare_data(config)
src = data.source(config.data.eval_split)
ref = evaluate.Reference.build(config, data, src)
held = evaluate._load_uint8(src, n)
rep, _ = evaluate.sample_metrics(config, held, ref)
keys = ("fid", "kid", "fd_random_conv", "precision_random_conv", "recall_random_conv")
print({k: rep[k] for k in keys if k in rep}, "on", len(held), "held-out images")
