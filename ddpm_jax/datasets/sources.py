"""Data sources: random access to a prepared split, read by index from ArrayRecord files or
held in memory (``ddpm_jax.datasets.get_source`` opens one)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ddpm_jax import images


class Source(Protocol):
  """Random access to a split: ``len(source)``, ``source[i] -> uint8 (H, W, C)`` and
  ``source.example(i) -> (image, label or None)``; ``class_names`` is () without labels."""
  class_names: tuple
  def __len__(self) -> int: ...
  def __getitem__(self, i: int) -> np.ndarray: ...
  def example(self, i: int) -> tuple: ...


class TfdsArraySource:
  """A split of a TFDS dataset prepared in ArrayRecord format, read by index."""

  def __init__(self, builder, split: str, image_key: str, image_size: int,
               label_key: str | None = None, class_names: tuple = ()):
    self._ds = builder.as_data_source(split=split)
    self._key, self._size, self._label_key = image_key, image_size, label_key
    self.class_names = class_names
    self.spec = {"builder_dir": str(builder.data_dir), "split": split, "image_key": image_key,
                 "image_size": image_size, "label_key": label_key}

  @classmethod
  def from_spec(cls, spec: dict):
    """The same source reopened from its prepared files (in a worker process)."""
    from ddpm_jax.datasets.tf import tfds_module
    builder = tfds_module().builder_from_directory(spec["builder_dir"])
    return cls(builder, spec["split"], spec["image_key"], spec["image_size"],
               spec["label_key"])

  def __len__(self):
    return len(self._ds)

  def example(self, i):
    ex = self._ds[int(i)]
    img = images.center_crop_resize(np.asarray(ex[self._key]), self._size)
    return img, (int(ex[self._label_key]) if self._label_key else None)

  def __getitem__(self, i):
    return self.example(i)[0]


class ArraySource:
  """A split held in memory as uint8 (N, H, W, C), with optional int labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
               class_names: tuple = ()):
    self.images, self.labels, self.class_names = images, labels, class_names

  def __len__(self):
    return len(self.images)

  def example(self, i):
    return self.images[int(i)], (int(self.labels[int(i)]) if self.labels is not None else None)

  def __getitem__(self, i):
    return self.images[int(i)]


def class_names_of(builder, label_key: str) -> tuple:
  """The class names of a dataset's ClassLabel feature ``label_key`` (() if it has none)."""
  features = builder.info.features
  feature = features[label_key] if label_key and label_key in features else None
  return tuple(getattr(feature, "names", None) or ())
