"""Prepared records follow their source folder: a folder that changed after preparation (a copy
that was still running) is prepared again, never reused as it was."""

import os

import numpy as np

from ddpm_jax import datasets
from tests.conftest import tiny_config


def _write_images(folder, start, n, size=12):
  from PIL import Image
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(start)
  for i in range(start, start + n):
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(
        os.path.join(folder, f"img{i:04d}.png"))


def _count(config):
  return sum(len(datasets.get_source(config, split)) for split in ("train", "test"))


def test_a_folder_that_changed_is_prepared_again(tmp_path):
  folder = str(tmp_path / "imgs")
  _write_images(folder, 0, 12)
  with open(os.path.join(folder, "img0011.png"), "r+b") as f:  # still being copied
    f.truncate(20)
  config = tiny_config(**{"data.dataset": "image_folder", "data.folder": folder,
                          "data.data_dir": str(tmp_path / "tfds")})
  assert _count(config) == 11
  _write_images(folder, 11, 9)  # the copy finished: img0011 complete, 8 more
  assert _count(config) == 20
  assert _count(config) == 20  # unchanged since: reused
  variants = os.listdir(tmp_path / "tfds" / "image_folder_images")
  assert len(variants) == 2, variants
