"""TFDS builders for folders of images: any folder (``image_folder``) and the Kaggle
"another anime face dataset" (``anime_faces``, manual download).

Images are read once, at preparation: converted to RGB (grayscale, RGBA and LA over
white, palette, CMYK, 16-bit), centre-cropped, resized with antialiasing to the
configured size and stored as PNG records (ArrayRecord), so training reads small
records, not the originals. Files that cannot be decoded (corrupt, truncated,
empty, not images) are skipped, counted and reported once with example paths.
The train/test split is a pure function of each file's path relative to the folder
(md5 hash), so it never changes as long as the files don't.

Prepared records are keyed on the folder's path and contents (every image file's name,
size and modification time), so a folder that changed (a copy that was still running,
images added or replaced) is prepared again rather than reused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import zipfile

from absl import logging

from ddpm_jax import fs, images
from ddpm_jax.datasets.tf import tfds_module
from ddpm_jax.errors import DatasetError
from ddpm_jax.images import EXTENSIONS, list_images

ANIME_INSTRUCTIONS = """\
Download the Kaggle "another anime face dataset" (scribbless/another-anime-face-dataset,
about 92k 256x256 JPEGs in animefaces256cleaner/) from
  https://www.kaggle.com/datasets/scribbless/another-anime-face-dataset
(`kaggle datasets download -d scribbless/another-anime-face-dataset`), and put either the
zip (archive.zip) or the extracted animefaces256cleaner/ folder into the manual folder:
  --config.data.manual_dir=DIR   (default: <data_dir>/downloads/manual)
With a gs:// data_dir the default is in the bucket: `gcloud storage cp archive.zip
gs://BUCKET/tfds/downloads/manual/` for --config.data.data_dir=gs://BUCKET/tfds."""

# A share of unreadable files above this is reported as an error-level warning: the folder
# is probably still being copied, or is not what was meant.
LOUD_SKIP_FRACTION = 0.05


def content_tag(folder: str, files: list[str]) -> str:
  """A short hash of the folder's path and its files' names, sizes and modification times."""
  h = hashlib.md5(folder.encode())
  for rel in files:
    try:
      st = os.stat(os.path.join(folder, rel))
    except OSError:  # a broken or looping link: skipped at preparation, tagged as such
      h.update(f"\0{rel}\0unreadable".encode())
      continue
    h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return h.hexdigest()[:10]


def class_of(relpath: str) -> str:
  """The top-level sub-folder of an image's relative path ("" for files at the top)."""
  parts = relpath.replace(os.sep, "/").split("/")
  return parts[0] if len(parts) > 1 else ""


def class_folders(folder: str) -> tuple:
  """Sorted names of the sub-folders of ``folder`` that hold images (at any depth)."""
  return tuple(sorted({class_of(f) for f in list_images(folder)} - {""}))


def is_test(relpath: str, test_percent: float) -> bool:
  h = int(hashlib.md5(relpath.replace(os.sep, "/").encode()).hexdigest()[:8], 16)
  return (h % 10000) < test_percent * 100


def _try_load(folder, rel, size):
  path = os.path.join(folder, rel)
  try:
    return rel, images.load_rgb(path, size), None
  except Exception as e:  # corrupt, truncated, empty, not an image, too many pixels
    if os.path.islink(path) and not os.path.exists(path):
      return rel, None, "broken symbolic link (its target is missing, or a loop)"
    return rel, None, f"{type(e).__name__}: {e}"


def _builder_classes():
  tfds = tfds_module()

  @dataclasses.dataclass
  class FolderConfig(tfds.core.BuilderConfig):
    folder: str = ""
    image_size: int = 64
    test_percent: float = 2.0
    class_names: tuple = ()  # labels: one class per top-level sub-folder

  class ImageFolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images of one folder, resized; splits 'train' and 'test' by path hash."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      s = self.builder_config.image_size
      features = {"image": tfds.features.Image(shape=(s, s, 3)), "path": tfds.features.Text()}
      if self.builder_config.class_names:
        features["label"] = tfds.features.ClassLabel(names=list(self.builder_config.class_names))
      return self.dataset_info_from_configs(
          description=f"Images from {self.builder_config.folder}",
          features=tfds.features.FeaturesDict(features))

    def _folder(self, dl_manager):
      return self.builder_config.folder

    def _split_generators(self, dl_manager):
      folder = self._folder(dl_manager)
      files = list_images(folder)
      names = self.builder_config.class_names
      if names:
        outside = [f for f in files if class_of(f) not in names]
        if outside:
          logging.warning("%d images outside the class sub-folders %s are not used, e.g. %s",
                          len(outside), list(names), outside[0])
        files = [f for f in files if class_of(f) in names]
      if not files:
        raise DatasetError(f"no image files ({', '.join(EXTENSIONS)}) under {folder!r}")
      size = self.builder_config.image_size
      # A first pass finds the readable files, so that neither split ends up empty.
      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda f: _try_load(folder, f, size)[::2], files))
      skipped = [(rel, err) for rel, err in results if err is not None]
      good = [rel for rel, err in results if err is None]
      if skipped:
        examples = "; ".join(f"{p} ({e[:60]})" for p, e in skipped[:3])
        share = len(skipped) / len(files)
        if share > LOUD_SKIP_FRACTION:
          logging.error("%.0f%% of the image files in %s could not be read (%d of %d, e.g. "
                        "%s): is the folder still being copied? Training uses the other %d; "
                        "once the folder is complete, the next start prepares it again",
                        100 * share, folder, len(skipped), len(files), examples, len(good))
        else:
          logging.warning("skipped %d of %d files in %s that could not be read as images, "
                          "e.g. %s", len(skipped), len(files), folder, examples)
      if not good:
        raise DatasetError(f"no usable image under {folder!r}: all {len(files)} image files "
                           f"were unreadable, e.g. {skipped[0][0]} ({skipped[0][1][:60]})")
      pct = self.builder_config.test_percent
      train = [f for f in good if not is_test(f, pct)]
      test = [f for f in good if is_test(f, pct)]
      if not test or not train:  # tiny folders: keep an image on each side
        train, test = good[:-1] or good, good[-1:]
      return {"train": self._generate_examples(folder, train),
              "test": self._generate_examples(folder, test)}

    def _generate_examples(self, folder, files):
      size = self.builder_config.image_size
      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for rel, img, _ in pool.map(lambda f: _try_load(folder, f, size), files):
          if img is not None:  # a file that changed since the first pass is dropped
            ex = {"image": img, "path": rel}
            if self.builder_config.class_names:
              ex["label"] = self.builder_config.class_names.index(class_of(rel))
            yield rel, ex

  class AnimeFaces(ImageFolderImages, skip_registration=True):
    """The Kaggle "another anime face dataset" (about 92k 256x256 JPEGs), manual download."""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ANIME_INSTRUCTIONS

    def _folder(self, dl_manager):
      return find_anime_folder(str(dl_manager.manual_dir))

  return FolderConfig, ImageFolderImages, AnimeFaces


def find_anime_folder(manual_dir: str) -> str:
  """The folder of anime-face JPEGs in ``manual_dir``: extracted, or unzipped from a zip."""
  if not os.path.isdir(manual_dir):
    raise DatasetError(f"the anime_faces manual folder {manual_dir!r} does not exist.\n"
                       + ANIME_INSTRUCTIONS)
  for cand in ("animefaces256cleaner", os.path.join("archive", "animefaces256cleaner"), "."):
    path = os.path.join(manual_dir, cand)
    if os.path.isdir(path) and any(f.lower().endswith(EXTENSIONS) for f in os.listdir(path)):
      return path
  zips = sorted(f for f in os.listdir(manual_dir) if f.lower().endswith(".zip"))
  for z in zips:
    target = os.path.join(manual_dir, "extracted")
    logging.info("extracting %s to %s", z, target)
    with zipfile.ZipFile(os.path.join(manual_dir, z)) as zf:
      zf.extractall(target)
    for root, _, files in os.walk(target):
      if any(f.lower().endswith(EXTENSIONS) for f in files):
        return root
  raise DatasetError(f"no anime-face images or zip in {manual_dir!r}.\n" + ANIME_INSTRUCTIONS)


def _has_anime_source(manual_dir: str) -> bool:
  if not os.path.isdir(manual_dir):
    return False
  try:
    find_anime_folder(manual_dir)
    return True
  except DatasetError:
    return False


def _local_folder(path: str, what: str) -> str:
  if fs.is_remote(path):
    raise DatasetError(f"{what}={path!r}: source images are read from a local folder; copy "
                       f"them to this machine first (e.g. gcloud storage cp -r {path} DIR) and "
                       f"pass DIR. Prepared records may live in a gs:// data.data_dir.")
  return os.path.abspath(os.path.expanduser(path))


def make_builder(config, root: str, configured_root: str | None = None):
  """(builder on data_dir ``root``, prepare()) for an ``image_folder``/``anime_faces`` config.

  ``configured_root`` is the configured data_dir when ``root`` is a local copy of a remote
  one: the default ``manual_dir`` of anime_faces is then in the bucket."""
  tfds = tfds_module()
  FolderConfig, ImageFolderImages, AnimeFaces = _builder_classes()
  d = config.data
  size = d.image_size
  if d.dataset.startswith("anime_faces"):
    remote = None  # where the download is in a bucket: the default with a gs:// data_dir
    if d.manual_dir and fs.is_remote(d.manual_dir):
      remote = fs.normalize(d.manual_dir)
    elif not d.manual_dir and configured_root and fs.is_remote(configured_root):
      remote = fs.join(configured_root, "downloads", "manual")
    manual = (_local_folder(d.manual_dir, "data.manual_dir") if d.manual_dir and not remote
              else os.path.join(root, "downloads", "manual"))
    cfg = FolderConfig(name=f"{size}px", folder="", image_size=size)
    builder = AnimeFaces(config=cfg, data_dir=root, file_format="array_record")

    def prepare():
      if remote and not _has_anime_source(manual):
        if not fs.listdir(remote):
          raise DatasetError(f"no anime-face download in {remote!r}.\n" + ANIME_INSTRUCTIONS)
        logging.warning("copying the anime-face download from %s to %s", remote, manual)
        fs.copytree(remote, manual)
      find_anime_folder(manual)  # a clear error before TFDS starts
      builder.download_and_prepare(file_format="array_record", download_config=
                                   tfds.download.DownloadConfig(manual_dir=manual))
    return builder, prepare
  if not d.folder:
    raise DatasetError("data.dataset=image_folder needs --config.data.folder=PATH")
  folder = _local_folder(d.folder, "data.folder")
  if not os.path.isdir(folder):
    raise DatasetError(f"image folder {folder!r} does not exist")
  tag = content_tag(folder, list_images(folder))
  names = ()
  if config.model.get("num_classes", 0):
    names = class_folders(folder)
    if len(names) < 2:
      raise DatasetError(f"model.num_classes={config.model.num_classes} needs labels: put each "
                         f"class's images in its own sub-folder of {folder!r} (found "
                         f"{len(names)} sub-folder(s) with images)")
    tag += "_labels" + hashlib.md5("/".join(names).encode()).hexdigest()[:6]
  cfg = FolderConfig(name=f"{size}px_{tag}", folder=folder, image_size=size, class_names=names,
                     description=f"images of {folder}")
  builder = ImageFolderImages(config=cfg, data_dir=root, file_format="array_record")
  return builder, lambda: builder.download_and_prepare(file_format="array_record")
