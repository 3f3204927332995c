"""Input pipeline: shapes, deterministic order, disjoint per-process shards, messy folders."""

import os

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import datasets, input_pipeline
from tests.conftest import SHARED_FACES, tiny_config


@pytest.fixture(scope="module")
def source(data_dir):
  return datasets.get_source(tiny_config(**{"data.data_dir": data_dir}), "train")


def test_built_in_dataset_batches(source):
  assert len(source) == 256
  it = input_pipeline.TrainBatches(source, 8, local_devices=4, num_workers=2)
  b = next(it)
  it.close()
  assert b.shape == (4, 2, 8, 8, 3) and b.dtype == np.float32
  assert -1.0 <= b.min() < -0.5 and 0.5 < b.max() <= 1.0
  assert len({tuple(np.round(x.ravel()[:20], 3)) for x in b.reshape(8, -1)}) == 8  # distinct


def test_cartoon_faces_are_deterministic():
  from ddpm_jax.datasets import cartoon_faces
  a = cartoon_faces.render_face(np.random.default_rng([1, 2, 3]))
  b = cartoon_faces.render_face(np.random.default_rng([1, 2, 3]))
  c = cartoon_faces.render_face(np.random.default_rng([1, 2, 4]))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 5


def test_same_seed_and_step_give_the_same_batch_across_restarts(source):
  it = input_pipeline.TrainBatches(source, 8, seed=3, num_workers=2)
  batches = [next(it) for _ in range(5)]
  it.close()
  resumed = input_pipeline.TrainBatches(source, 8, seed=3, start_step=3, num_workers=2)
  np.testing.assert_array_equal(next(resumed), batches[3])
  np.testing.assert_array_equal(next(resumed), batches[4])
  resumed.close()
  other = input_pipeline.TrainBatches(source, 8, seed=4, num_workers=2)
  assert not np.array_equal(next(other), batches[0])
  other.close()


def test_reader_processes_give_the_same_batches_as_threads(source):
  threads = input_pipeline.TrainBatches(source, 16, seed=3, local_devices=4, num_workers=2)
  procs = input_pipeline.TrainBatches(source, 16, seed=3, local_devices=4, num_workers=2,
                                      num_processes=2)
  try:
    assert procs._procs is not None  # really in worker processes
    for _ in range(3):
      np.testing.assert_array_equal(next(procs), next(threads))
  finally:
    threads.close()
    procs.close()


def test_process_shards_are_disjoint_and_cover_each_epoch(source):
  n, gb = len(source), 16
  shards = [input_pipeline.TrainBatches(source, gb, seed=1, process_index=p, process_count=2,
                                        num_workers=1) for p in range(2)]
  per_epoch = n // gb
  seen = [np.concatenate([s.indices(step)[0] for step in range(per_epoch)]) for s in shards]
  for s in shards:
    s.close()
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(n))
  # The next epoch is a different order.
  assert not np.array_equal(shards[0].indices(per_epoch)[0], shards[0].indices(0)[0])


def _write_messy_folder(root):
  os.makedirs(os.path.join(root, "sub", "deeper"))
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), np.uint8)  # noqa: E731
  Image.fromarray(rgb(40, 60)).save(os.path.join(root, "a.jpg"))
  Image.fromarray(rgb(30, 30)).save(os.path.join(root, "b.PNG"))
  Image.fromarray(rgb(20, 50)[..., 0]).save(os.path.join(root, "gray.png"))
  Image.fromarray(rng.integers(0, 255, (16, 16, 4), np.uint8), "RGBA").save(
      os.path.join(root, "sub", "rgba.png"))
  Image.fromarray(rgb(16, 16)).convert("CMYK").save(os.path.join(root, "sub", "cmyk.jpg"))
  Image.fromarray(rgb(16, 16)).convert("P").save(os.path.join(root, "sub", "pal.bmp"))
  Image.fromarray(rng.integers(0, 65535, (16, 16)).astype(np.uint16)).save(
      os.path.join(root, "sub", "deeper", "sixteen.png"))
  Image.fromarray(rgb(16, 16)).save(os.path.join(root, "sub", "c.webp"))
  Image.fromarray(rgb(3000, 4000)).save(os.path.join(root, "huge.jpg"), quality=50)
  good = 9
  with open(os.path.join(root, "a.jpg"), "rb") as f:
    data = f.read()
  with open(os.path.join(root, "truncated.jpg"), "wb") as f:
    f.write(data[:len(data) // 3])
  open(os.path.join(root, "empty.png"), "wb").close()
  with open(os.path.join(root, "notes.jpg"), "w") as f:
    f.write("this is not an image")
  with open(os.path.join(root, "corrupt.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, np.uint8)))
  with open(os.path.join(root, "readme.txt"), "w") as f:
    f.write("ignored: not an image extension")
  return good


def test_messy_image_folder_skips_and_counts_bad_files(tmp_path, caplog):
  folder = tmp_path / "imgs"
  good = _write_messy_folder(str(folder))
  config = tiny_config(**{"data.dataset": "image_folder", "data.folder": str(folder),
                          "data.data_dir": str(tmp_path / "tfds")})
  with caplog.at_level("WARNING"):
    train = datasets.get_source(config, "train")
    test = datasets.get_source(config, "test")
  assert len(train) + len(test) == good and len(test) >= 1
  # 4 of the image files are unreadable, a large share: said at error level.
  assert any(f"could not be read (4 of {good + 4}," in r.getMessage() and r.levelname == "ERROR"
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  for src in (train, test):
    for i in range(len(src)):
      img = src[i]
      assert img.shape == (8, 8, 3) and img.dtype == np.uint8


def test_image_folder_sub_folders_are_classes(tmp_path, caplog):
  folder = tmp_path / "pets"
  rng = np.random.default_rng(0)
  for name, colour in (("cat", 30), ("dog", 220)):
    (folder / name / "nested").mkdir(parents=True)
    for i in range(6):
      img = np.full((12, 10, 3), colour, np.uint8) + rng.integers(0, 20, (12, 10, 3), np.uint8)
      Image.fromarray(img).save(folder / name / ("nested" if i % 2 else "") / f"{i}.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "stray.png")
  config = tiny_config(**{"data.dataset": "image_folder", "data.folder": str(folder),
                          "data.data_dir": str(tmp_path / "tfds"), "model.num_classes": 2})
  with caplog.at_level("WARNING"):
    train = datasets.get_source(config, "train", with_labels=True)
    test = datasets.get_source(config, "test", with_labels=True)
  assert train.class_names == ("cat", "dog") and len(train) + len(test) == 12
  assert any("outside the class sub-folders" in r.getMessage() for r in caplog.records)
  for src in (train, test):
    for i in range(len(src)):
      img, label = src.example(i)
      assert label == int(img.mean() > 128)  # dog images are the bright ones
  # Without labels the same folder is a plain image set (all 13 images).
  plain = tiny_config(**{"data.dataset": "image_folder", "data.folder": str(folder),
                         "data.data_dir": str(tmp_path / "tfds")})
  assert len(datasets.get_source(plain, "train")) + len(
      datasets.get_source(plain, "test")) == 13
  with pytest.raises(datasets.DatasetError, match="has no class labels"):
    datasets.get_source(tiny_config(**{"data.data_dir": str(tmp_path / "tfds")}),
                              "train", with_labels=True)
  from ddpm_jax import train as train_lib
  from ddpm_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="has 2 classes .* set --config.model.num_classes=2"):
    train_lib._check_classes(("cat", "dog"), 3, str(tmp_path), True)


@pytest.mark.parametrize("make", ["empty", "missing", "unset"])
def test_unusable_folders_are_clear_errors(tmp_path, make):
  folder = tmp_path / "imgs"
  if make == "empty":
    folder.mkdir()
    (folder / "x.txt").write_text("no images")
  overrides = {"data.dataset": "image_folder", "data.data_dir": str(tmp_path / "tfds")}
  if make != "unset":
    overrides["data.folder"] = str(folder)
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_source(tiny_config(**overrides), "train")
  msg = str(e.value)
  assert {"empty": "no image files", "missing": "does not exist",
          "unset": "needs --config.data.folder"}[make] in msg


def test_anime_faces_without_download_explains_where_to_get_it(tmp_path):
  config = tiny_config(**{"data.dataset": "anime_faces", "data.data_dir": str(tmp_path),
                          "data.manual_dir": str(tmp_path / "nowhere")})
  with pytest.raises(datasets.DatasetError, match="kaggle.com/datasets"):
    datasets.get_source(config, "train")


def test_unknown_and_unprepared_catalog_datasets_are_clear_errors(tmp_path):
  with pytest.raises(datasets.DatasetError, match="unknown dataset 'no_such_dataset'"):
    datasets.get_builder(tiny_config(**{"data.dataset": "no_such_dataset",
                                        "data.data_dir": str(tmp_path)}))
  with pytest.raises(datasets.DatasetError, match="tfds build cifar10"):
    datasets.get_builder(tiny_config(**{"data.dataset": "cifar10",
                                        "data.data_dir": str(tmp_path)}))


@pytest.mark.skipif(not os.path.isdir(SHARED_FACES), reason="../shared/data not present")
def test_real_anime_faces_laid_out_like_the_kaggle_download(tmp_path):
  manual = tmp_path / "manual" / "animefaces256cleaner"
  manual.mkdir(parents=True)
  for f in sorted(os.listdir(SHARED_FACES))[:64]:
    os.symlink(os.path.join(SHARED_FACES, f), manual / f)
  config = tiny_config(**{"data.dataset": "anime_faces", "data.data_dir": str(tmp_path / "tfds"),
                          "data.manual_dir": str(tmp_path / "manual"), "data.image_size": 16})
  train = datasets.get_source(config, "train")
  test = datasets.get_source(config, "test")
  assert len(train) + len(test) == 64
  img = train[0]
  assert img.shape == (16, 16, 3) and img.std() > 10  # a real picture, not a blank
