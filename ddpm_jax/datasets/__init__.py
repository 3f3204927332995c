"""Datasets: the TFDS builders that ship with ddpm_jax and the lookup by config name.

``config.data.dataset`` is one of:
  * ``cartoon_faces`` (built in, generated offline; ``cartoon_faces/tiny`` for tests),
  * ``anime_faces`` (the Kaggle "another anime face dataset", manual download),
  * ``image_folder`` (any folder of images, ``config.data.folder``),
  * any TFDS catalog name (``cifar10``, ``celeb_a``, ...), prepared in ``data.data_dir``.
"""

from __future__ import annotations

import os

import numpy as np

BUILT_IN = ("cartoon_faces", "anime_faces", "image_folder")


class DatasetError(ValueError):
  """A dataset that cannot be used as configured; the message says what to do."""


def _tfds():
  from ddpm_jax.input_pipeline import hide_accelerators_from_tf
  hide_accelerators_from_tf()
  import tensorflow_datasets as tfds
  return tfds


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir or os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets"))


def get_builder(config):
  """Returns the prepared TFDS builder for ``config.data``, preparing built-in data once."""
  tfds = _tfds()
  name = config.data.dataset
  base = name.split("/")[0].split(":")[0]
  if base == "cartoon_faces":
    from ddpm_jax.datasets import cartoon_faces  # noqa: F401  (registers the builder)
    builder = tfds.builder(name, data_dir=data_dir(config), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return builder
  if base in ("image_folder", "anime_faces"):
    from ddpm_jax.datasets import image_folder
    return image_folder.prepared_builder(config)
  try:
    builder = tfds.builder(name, data_dir=data_dir(config))
  except Exception as e:  # DatasetNotFoundError and friends
    raise DatasetError(f"unknown dataset {name!r}: not one of {BUILT_IN} nor in the TFDS "
                       f"catalog ({type(e).__name__}: {e})") from None
  if not builder.is_prepared():
    raise DatasetError(
        f"TFDS dataset {name!r} is not prepared in {data_dir(config)!r}, and this machine "
        f"may be offline. On a machine with network run `tfds build {name} "
        f"--data_dir=DIR`, copy DIR here and pass --config.data.data_dir=DIR.")
  return builder


def load_split_in_memory(builder, split: str, image_key: str, image_size: int) -> np.ndarray:
  """Reads a whole split (TFRecord-prepared catalog data) into uint8 (N, S, S, C)."""
  from ddpm_jax.input_pipeline import center_crop_resize
  tfds = _tfds()
  if image_key not in builder.info.features:
    raise DatasetError(f"dataset {builder.name!r} has no feature {image_key!r}; its features "
                       f"are {list(builder.info.features)}: set --config.data.image_key")
  ds = builder.as_dataset(split=split, shuffle_files=False)
  imgs = [center_crop_resize(ex[image_key], image_size) for ex in tfds.as_numpy(ds)]
  return np.stack(imgs)
