"""Datasets: the TFDS builders that ship with ddpm_jax, lookup by config name, and preparation
that is safe with several processes and with a ``gs://`` data_dir.

``config.data.dataset`` is one of:
  * ``cartoon_faces`` (built in, generated offline; ``cartoon_faces/tiny`` for tests),
  * ``anime_faces`` (the Kaggle "another anime face dataset", manual download),
  * ``image_folder`` (any folder of images, ``config.data.folder``),
  * any TFDS catalog name (``cifar10``, ``celeb_a``, ...), prepared in ``data.data_dir``.

Preparation, decided here once for every process of a job:
  * local data_dir: each process prepares under a file lock in the data_dir, so
    processes sharing a disk prepare once and the others reuse it; hosts with their
    own disks each prepare their own copy (the records are a pure function of the
    source files, so every copy is the same).
  * remote data_dir (``gs://``): ArrayRecord files are read by index, which needs a
    local file, so records live in a local copy (``data.local_cache_dir``). Process 0
    prepares (or downloads) them and uploads what the bucket lacks; then every process
    copies the prepared records from the bucket into its host's local copy once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np
from absl import logging

from ddpm_jax import fs, images, parallel
from ddpm_jax.datasets.sources import ArraySource, Source, TfdsArraySource, class_names_of
from ddpm_jax.datasets.tf import hide_accelerators_from_tf, tfds_module
from ddpm_jax.errors import DatasetError

BUILT_IN = ("cartoon_faces", "anime_faces", "image_folder")
__all__ = ["DatasetError", "get_builder", "data_dir", "load_split_in_memory",
           "hide_accelerators_from_tf", "get_source", "ArraySource", "TfdsArraySource",
           "Source", "prepare", "Prepared", "prepare_data"]


def data_dir(config) -> str:
  """The TFDS data_dir: ``data.data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return fs.normalize(config.data.data_dir or os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets"))


def local_records_dir(config) -> str:
  """Where records of a remote data_dir are kept on this host."""
  root = data_dir(config)
  if not fs.is_remote(root):
    return root
  base = config.data.get("local_cache_dir") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ddpm_jax", "data")
  return os.path.join(fs.normalize(base), hashlib.sha1(root.encode()).hexdigest()[:12])


@contextlib.contextmanager
def _file_lock(folder: str):
  """An exclusive lock between processes of this host (fcntl), held while preparing."""
  import fcntl
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, ".ddpm_jax_prepare.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _make_builder(config, root: str):
  """(builder with data_dir ``root``, a function that prepares it, or None for catalog data)."""
  tfds = tfds_module()
  name = config.data.dataset
  base = name.split("/")[0].split(":")[0]
  if base == "cartoon_faces":
    from ddpm_jax.datasets import cartoon_faces  # noqa: F401  (registers the builder)
    builder = tfds.builder(name, data_dir=root, file_format="array_record")
    return builder, lambda: builder.download_and_prepare(file_format="array_record")
  if base in ("image_folder", "anime_faces"):
    from ddpm_jax.datasets import image_folder
    return image_folder.make_builder(config, root, data_dir(config))
  try:
    builder = tfds.builder(name, data_dir=root)
  except Exception as e:  # DatasetNotFoundError and friends
    raise DatasetError(f"unknown dataset {name!r}: not one of {BUILT_IN} nor in the TFDS "
                       f"catalog ({type(e).__name__}: {e})") from None
  return builder, None


def _not_prepared(config) -> DatasetError:
  name, root = config.data.dataset, data_dir(config)
  return DatasetError(
      f"TFDS dataset {name!r} is not prepared in {root!r}, and this machine may be offline. "
      f"On a machine with network run `tfds build {name} --data_dir=DIR`, copy DIR here "
      f"(or to the bucket) and pass --config.data.data_dir=DIR.")


def _variant(builder, root: str) -> str:
  """The builder's dataset/config/version folder, relative to its data_dir."""
  return os.path.relpath(os.fspath(builder.data_dir), os.fspath(root))


def _copy_variant(src: str, dst: str) -> None:
  """Copies a prepared dataset folder; dataset_info.json, which marks it prepared, last."""
  names = [n for n in fs.listdir(src) if not n.startswith(".")]
  for n in sorted(names, key=lambda n: n == "dataset_info.json"):
    fs.write_bytes(fs.join(dst, n), fs.read_bytes(fs.join(src, n)))


def _prepare_local(config, root: str):
  with _file_lock(root):
    builder, prepare = _make_builder(config, root)
    if not builder.is_prepared():
      if prepare is None:
        raise _not_prepared(config)
      prepare()
  return builder


def _prepare_remote(config) -> None:
  """Process 0: records in this host's local copy, and in the bucket."""
  remote, local = data_dir(config), local_records_dir(config)
  with _file_lock(local):
    builder, prepare = _make_builder(config, local)
    remote_dir = fs.join(remote, _variant(builder, local))
    remote_ready = fs.exists(fs.join(remote_dir, "dataset_info.json"))
    if not builder.is_prepared():
      if remote_ready:
        _download(remote_dir, os.fspath(builder.data_dir))
        return
      if prepare is None:
        raise _not_prepared(config)
      prepare()
    if not remote_ready:
      logging.warning("uploading the prepared records to %s", remote_dir)
      _copy_variant(os.fspath(builder.data_dir), remote_dir)


def _download(remote_dir: str, local_dir: str) -> None:
  logging.warning("copying prepared records from %s to %s", remote_dir, local_dir)
  tmp = local_dir + ".incomplete"
  _copy_variant(remote_dir, tmp)
  os.rename(tmp, local_dir)


def prepare(config) -> str:
  """Prepares ``config.data``'s records (``--mode=prepare``), e.g. on a small VM before a pod
  starts, and returns where they are: the bucket's folder for a gs:// data_dir."""
  root = data_dir(config)
  if fs.is_remote(root):
    fs.check_writable(root, "data.data_dir")
  builder = get_builder(config)
  if fs.is_remote(root):
    return fs.join(root, _variant(builder, local_records_dir(config)))
  return os.fspath(builder.data_dir)


def get_builder(config):
  """The prepared TFDS builder for ``config.data`` (see the module docstring)."""
  root = data_dir(config)
  if not fs.is_remote(root):
    return _prepare_local(config, root)
  local = local_records_dir(config)
  if not getattr(get_builder, "_said", None) == (root, local):
    logging.warning("data_dir %s is remote: records are read from a local copy in %s (set "
                    "data.local_cache_dir to move it)", root, local)
    get_builder._said = (root, local)
  parallel.process_0_then_all(f"prepare {config.data.dataset}", lambda: _prepare_remote(config))
  with _file_lock(local):
    builder, _ = _make_builder(config, local)
    if not builder.is_prepared():
      _download(fs.join(root, _variant(builder, local)), os.fspath(builder.data_dir))
      builder, _ = _make_builder(config, local)
  return builder


def load_split_in_memory(builder, split: str, image_key: str, image_size: int,
                         label_key: str | None = None):
  """Reads a whole split (TFRecord-prepared catalog data) into uint8 (N, S, S, C), and the
  int labels (N,) of ``label_key`` (None without)."""
  tfds = tfds_module()
  if image_key not in builder.info.features:
    raise DatasetError(f"dataset {builder.name!r} has no feature {image_key!r}; its features "
                       f"are {list(builder.info.features)}: set --config.data.image_key")
  ds = builder.as_dataset(split=split, shuffle_files=False)
  imgs, labels = [], []
  for ex in tfds.as_numpy(ds):
    imgs.append(images.center_crop_resize(ex[image_key], image_size))
    if label_key:
      labels.append(int(ex[label_key]))
  return np.stack(imgs), (np.array(labels, np.int32) if label_key else None)


class Prepared:
  """A run's data, prepared once (``prepare_data``; with a gs:// data_dir that is a step every
  process takes together): open any of its splits as often as needed, with no new step."""

  def __init__(self, data, builder):
    self.data, self.builder = data, builder

  def source(self, split: str, with_labels: bool = False) -> Source:
    """The data source of ``split`` ("train"/"test" or a TFDS split). ``with_labels``: also
    read ``data.label_key`` (raises if the dataset has no labels)."""
    data, builder = self.data, self.builder
    label_key = data.label_key if with_labels else None
    names = class_names_of(builder, label_key) if with_labels else ()
    if with_labels and not names:
      raise DatasetError(
          f"dataset {data.dataset!r} has no class labels (feature {label_key!r}); for an image "
          f"folder put each class in its own sub-folder, or set --config.model.num_classes=0")
    fmt = builder.info.file_format
    if getattr(fmt, "value", fmt) == "array_record":
      return TfdsArraySource(builder, split, data.image_key, data.image_size, label_key, names)
    imgs, labels = load_split_in_memory(builder, split, data.image_key, data.image_size,
                                        label_key)
    return ArraySource(imgs, labels, names)


def prepare_data(config) -> Prepared:
  """``config.data`` prepared (``get_builder``), ready to open splits from."""
  return Prepared(config.data, get_builder(config))


def get_source(config, split: str, with_labels: bool = False) -> Source:
  """One split of ``config.data``: ``prepare_data(config).source(split, with_labels)``. Code
  that opens several splits prepares once with ``prepare_data`` and opens each from it."""
  return prepare_data(config).source(split, with_labels)
