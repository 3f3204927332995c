"""Built-in dataset: procedurally drawn cartoon faces, no download needed.

Each image is a pure function of (split seed, index): a coloured background, a head
(an ellipse of varying size, position and skin tone), hair with a fringe, two large
eyes (iris colour, size, spacing vary) with highlights, a mouth and sometimes blush.
Drawn at 2x and box-filtered down, so edges are antialiased.

The ``hair`` configs add a class label: the hair colour family (black, blonde, blue),
a property of the picture a classifier can check, for class-conditional models.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

SIZE = 64
_SS = 2  # supersampling factor

_SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 90],
                  [255, 236, 220], [170, 110, 70]], np.float32)
_HAIR = np.array([[30, 25, 25], [90, 55, 30], [230, 200, 110], [200, 60, 50], [70, 110, 200],
                  [240, 150, 190], [240, 240, 245], [120, 80, 170], [60, 160, 100]], np.float32)
HAIR_CLASSES = ("black", "blonde", "blue")  # rows 0, 2 and 4 of _HAIR
_HAIR_CLASS_ROWS = (0, 2, 4)
_EYE = np.array([[60, 120, 220], [50, 160, 80], [170, 60, 50], [140, 70, 190], [230, 160, 40],
                 [40, 40, 50], [30, 170, 180]], np.float32)


def _jitter(rng, color, amount=18.0):
  return np.clip(color + rng.normal(0, amount, 3), 0, 255)


def render_face(rng: np.random.Generator, size: int = SIZE,
                hair_class: int | None = None) -> np.ndarray:
  """Draws one face as a (size, size, 3) uint8 array; ``hair_class`` fixes the hair colour
  family (an index into HAIR_CLASSES), taking the same random draws otherwise."""
  n = size * _SS
  yy, xx = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n  # coordinates in [0, 1]
  top = _jitter(rng, rng.uniform(60, 245, 3), 0)
  bottom = _jitter(rng, top * rng.uniform(0.6, 1.0), 10)
  img = top + (bottom - top) * yy[..., None]

  def ellipse(cx, cy, rx, ry, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    return u * u + v * v <= 1.0

  def paint(mask, color):
    img[mask] = color

  cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.5, 0.62)
  rx = rng.uniform(0.22, 0.32)
  ry = rx * rng.uniform(1.05, 1.3)
  skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))])
  hair_row = rng.integers(len(_HAIR))
  if hair_class is not None:
    hair_row = _HAIR_CLASS_ROWS[hair_class]
  hair = _jitter(rng, _HAIR[hair_row], 25)
  hair_len = rng.uniform(0.0, 0.45)  # how far hair falls below the head's centre
  # Hair behind the head: a larger ellipse, longer for long hair.
  paint(ellipse(cx, cy - 0.05 + hair_len / 2, rx * 1.25, ry * 0.95 + hair_len / 2), hair)
  head = ellipse(cx, cy, rx, ry)
  paint(head, skin)
  # Fringe: the top of a hair cap over the forehead, with a wavy lower edge.
  fringe_y = cy - ry * rng.uniform(0.25, 0.55)
  wave = 0.02 * np.sin((xx - cx) / rx * np.pi * rng.integers(2, 5))
  paint(ellipse(cx, cy - ry * 0.1, rx * 1.12, ry * 1.05) & (yy < fringe_y + wave), hair)

  eye_dx = rx * rng.uniform(0.38, 0.52)
  eye_y = cy + ry * rng.uniform(0.0, 0.2)
  erx = rx * rng.uniform(0.16, 0.24)
  ery = erx * rng.uniform(1.1, 1.6)
  iris = _jitter(rng, _EYE[rng.integers(len(_EYE))], 20)
  for side in (-1, 1):
    ex = cx + side * eye_dx
    paint(ellipse(ex, eye_y, erx * 1.15, ery * 1.1), np.array([250, 250, 250]))
    paint(ellipse(ex, eye_y + ery * 0.1, erx, ery), iris)
    paint(ellipse(ex, eye_y + ery * 0.2, erx * 0.5, ery * 0.5), iris * 0.35)
    paint(ellipse(ex - erx * 0.35, eye_y - ery * 0.35, erx * 0.3, ery * 0.25),
          np.array([255, 255, 255]))
    if rng.random() < 0.5:  # blush
      paint(ellipse(ex + side * erx * 0.4, eye_y + ery * 1.6, erx * 0.9, ery * 0.3) & head,
            0.75 * skin + 0.25 * np.array([255, 90, 110]))
  mouth_w = rx * rng.uniform(0.12, 0.3)
  mouth_y = cy + ry * rng.uniform(0.55, 0.7)
  paint(ellipse(cx, mouth_y, mouth_w, rx * rng.uniform(0.04, 0.12)) & head,
        np.array([150, 50, 60]))

  img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class CartoonFacesConfig(tfds.core.BuilderConfig):
  num_train: int = 10_000
  num_test: int = 1_000
  labels: bool = False  # a "label" feature: the hair colour class


class CartoonFaces(tfds.core.GeneratorBasedBuilder):
  """Procedural cartoon faces, 64x64 RGB; deterministic, needs no download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      CartoonFacesConfig(name="default", description="10k train / 1k test faces."),
      CartoonFacesConfig(name="tiny", description="For tests: 256 train / 64 test.",
                         num_train=256, num_test=64),
      CartoonFacesConfig(name="hair", description="10k/1k faces labelled by hair colour.",
                         labels=True),
      CartoonFacesConfig(name="hair_tiny", description="For tests: 768/96, hair labels.",
                         num_train=768, num_test=96, labels=True),
  ]

  def _info(self):
    features = {"image": tfds.features.Image(shape=(SIZE, SIZE, 3))}
    if self.builder_config.labels:
      features["label"] = tfds.features.ClassLabel(names=HAIR_CLASSES)
    return self.dataset_info_from_configs(
        description=__doc__, features=tfds.features.FeaturesDict(features),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples(0, cfg.num_train),
            "test": self._generate_examples(1, cfg.num_test)}

  def _generate_examples(self, split_seed: int, num: int):
    labelled = self.builder_config.labels
    for i in range(num):
      rng = np.random.default_rng([20240601, split_seed, i])
      if labelled:
        label = i % len(HAIR_CLASSES)
        yield i, {"image": render_face(rng, hair_class=label), "label": label}
      else:
        yield i, {"image": render_face(rng)}
