"""Checks the Flax FID Inception against pytorch-fid's network, layer for layer.

  python benchmarks/inception_parity.py --peer-python /path/to/venv-with-pytorch-fid/bin/python

(Used here: the diffusers peer venv's torch 2.13.0+cpu, with torchvision 0.28.0 and
pytorch-fid 0.3.0 installed apart, ``pip install --no-deps --target DIR ...``, and
``PYTHONPATH=DIR`` set for the command.)

The peer side (torch, torchvision, pytorch-fid) builds pytorch-fid's ``InceptionV3``
exactly as ``fid_inception_v3()`` does, but with *random* weights (nothing is
downloaded; BatchNorm statistics are randomised too, so every parameter matters),
saves them with ``torch.save`` in both file formats, and writes its 2048-d features
of random uint8 images (pytorch-fid's own resize and scaling). This side loads each
file with ``ddpm_jax.inception`` (no torch) and compares the features.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

PEER = r'''
import sys, numpy as np, torch
try:
  import torchvision  # noqa: F401
except RuntimeError:
  # A torchvision wheel whose compiled ops do not load in this torch (seen with
  # torchvision 0.28.0 + torch 2.13.0+cpu): only its fake-tensor registrations fail,
  # which the Inception layers never use. Skip them and import again.
  for m in [m for m in sys.modules if m.startswith("torchvision")]:
    del sys.modules[m]
  torch.library.register_fake = lambda *a, **k: (lambda f: f)
from pytorch_fid import inception as pf
out = sys.argv[1]
torch.manual_seed(0)
inc = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
inc.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
inc.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
inc.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
inc.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
inc.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
inc.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
inc.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
inc.Mixed_7b = pf.FIDInceptionE_1(1280)
inc.Mixed_7c = pf.FIDInceptionE_2(2048)
g = torch.Generator().manual_seed(1)
sd = inc.state_dict()
for k, v in sd.items():
  if k.endswith("running_var"): sd[k] = torch.rand(v.shape, generator=g) + 0.5
  elif k.endswith(("running_mean", "bn.bias")):
    sd[k] = 0.1 * torch.randn(v.shape, generator=g)
  elif k.endswith("bn.weight"): sd[k] = torch.rand(v.shape, generator=g) + 0.5
  elif v.is_floating_point():
    sd[k] = v.normal_(generator=g) * (2.0 / max(1, v[0].numel())) ** 0.5
inc.load_state_dict(sd)
torch.save(inc.state_dict(), out + "/zip.pth")
torch.save(inc.state_dict(), out + "/legacy.pth", _use_new_zipfile_serialization=False)
orig = pf.fid_inception_v3
pf.fid_inception_v3 = lambda: inc
model = pf.InceptionV3([3]).eval()
pf.fid_inception_v3 = orig
rng = np.random.default_rng(0)
imgs = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
smooth = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
imgs[2:] = np.repeat(np.repeat(smooth, 8, 1), 8, 2)
x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
with torch.no_grad():
  f = model(x)[0][:, :, 0, 0].numpy()
np.save(out + "/imgs.npy", imgs); np.save(out + "/feats.npy", f)
print("torch", torch.__version__)
'''


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--peer-python", required=True)
  args = ap.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax.numpy as jnp

  from ddpm_jax import inception
  with tempfile.TemporaryDirectory() as d:
    subprocess.run([args.peer_python, "-c", PEER, d], check=True)
    imgs, ref = np.load(f"{d}/imgs.npy"), np.load(f"{d}/feats.npy")
    fn = inception.make_feature_fn()
    result = {}
    for fmt in ("zip", "legacy"):
      params, digest = inception.load_params(f"{d}/{fmt}.pth", expected_sha256="")
      ours = np.asarray(fn(params, jnp.asarray(imgs)))
      err = float(np.abs(ours - ref).max() / np.abs(ref).max())
      result[fmt] = {"max_abs_err_rel_to_max": err, "max_abs_ref": float(np.abs(ref).max())}
      print(f"{fmt} file: max |ours - pytorch-fid| / max |pytorch-fid| = {err:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
  main()
