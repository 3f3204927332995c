"""Files from outside are untrusted: image bombs and foreign formats behind image extensions,
crafted FID weights files (views outside their storage, zip bombs, forged hashes), broken
and looping symlinks in image folders. Each is refused with one line, nothing crashes, and
the good files around them still work."""

import io
import os
import pickle
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import datasets, images, inception, modes
from ddpm_jax.errors import ConfigError, InputError, WeightsError
from tests.conftest import tiny_config

# ----------------------------------------------------------------------------- images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _blank_png(side: int) -> bytes:
  """A valid, complete 1-bit PNG of side x side black pixels: a few KB on disk, side^2
  pixels decoded (PIL holds "1" images at a byte a pixel, three as RGB)."""
  row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
  comp = zlib.compressobj(9)
  idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
  ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
          + _png_chunk(b"IEND", b""))


def _jpeg_declaring(side: int) -> bytes:
  """A small real JPEG whose frame header (SOF0) is patched to declare side x side."""
  buf = io.BytesIO()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
  data = bytearray(buf.getvalue())
  at = data.index(b"\xff\xc0")
  data[at + 5:at + 9] = struct.pack(">HH", side, side)  # height, width
  return bytes(data)


def _renamed(fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buf, fmt)
  return buf.getvalue()


# 9000^2 = 81 MP: over MAX_PIXELS (64 MiP) and under PIL's own warning (about 89 MP), so only
# our cap refuses it; yet it is a complete, valid PNG that decodes to ~250 MB as RGB.
BOMB_SIDE = 9000


def test_the_bomb_fixture_is_a_real_image_beyond_the_cap():
  """The crafted PNG is tiny on disk and a valid image of BOMB_SIDE^2 pixels (header read
  only, nothing decoded), so refusing it is the cap at work, not a parse error."""
  data = _blank_png(BOMB_SIDE)
  assert len(data) < 100_000
  with Image.open(io.BytesIO(data)) as im:
    assert im.size == (BOMB_SIDE, BOMB_SIDE) and im.format == "PNG"
  assert images.MAX_PIXELS < BOMB_SIDE ** 2 < Image.MAX_IMAGE_PIXELS


def test_a_png_bomb_is_refused_before_decoding(tmp_path):
  path = tmp_path / "bomb.png"
  path.write_bytes(_blank_png(BOMB_SIDE))
  with pytest.raises(images.ImageRefused, match=f"{BOMB_SIDE}x{BOMB_SIDE} pixels"):
    images.load_rgb(str(path), 8)


def test_a_jpeg_declaring_more_than_pil_allows_is_refused_and_nothing_global_changes(tmp_path):
  """A JPEG declaring 100 MP: JPEG decodes at reduced scale, so our cap alone would let it
  through; PIL's bomb warning (89 MP) is an error instead. Neither PIL's limit nor the
  warning filters are changed for the rest of the process (other threads, other code)."""
  path = tmp_path / "big.jpg"
  path.write_bytes(_jpeg_declaring(10_000))
  filters = list(warnings.filters)
  with pytest.raises(images.ImageRefused, match="declares too many pixels"):
    images.load_rgb(str(path), 8)
  assert warnings.filters == filters
  assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # PIL's default
  with warnings.catch_warnings(record=True) as seen:  # ours is an error in our reader only
    warnings.simplefilter("always")
    Image.open(str(path)).close()
  assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in seen)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_other_formats_behind_an_image_extension_are_refused(tmp_path, fmt):
  """PIL would parse any of its ~40 formats behind a .png name; we read the four we list."""
  path = tmp_path / "renamed.png"
  path.write_bytes(_renamed(fmt))
  with Image.open(path) as im:
    assert im.format == fmt  # PIL reads it
  with pytest.raises(images.ImageRefused, match="not a JPEG, PNG, WEBP, BMP image"):
    images.load_rgb(str(path), 8)


def test_each_listed_format_still_loads_and_big_jpegs_decode_at_reduced_scale(tmp_path):
  rng = np.random.default_rng(0)
  for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")):
    p = tmp_path / f"ok.{ext}"
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8)).save(p, fmt)
    assert images.load_rgb(str(p), 8).shape == (8, 8, 3)
  p = tmp_path / "photo.jpg"
  Image.fromarray(np.full((1600, 1600, 3), 77, np.uint8)).save(p, quality=90)
  assert images.open_image(str(p), 100).size == (200, 200)  # 1/8 scale: >= 2 * 100


def test_a_bomb_as_a_sampling_input_or_mask_is_one_line(tmp_path):
  bomb = tmp_path / "in" / "x.png"
  bomb.parent.mkdir()
  bomb.write_bytes(_blank_png(BOMB_SIDE))
  with pytest.raises(InputError) as e:
    modes.load_inputs([str(bomb)], 8)
  assert "ImageRefused" in str(e.value) and "pixels" in str(e.value)
  assert "\n" not in str(e.value)
  masks = tmp_path / "masks"
  masks.mkdir()
  (masks / "x.png").write_bytes(_renamed("GIF"))
  config = tiny_config(**{"sampling.mask_dir": str(masks)})
  with pytest.raises(InputError) as e:
    modes.load_masks(config, [str(bomb)])
  assert "not a JPEG, PNG, WEBP, BMP image" in str(e.value) and "\n" not in str(e.value)
  (masks / "x.png").write_bytes(_blank_png(BOMB_SIDE))
  with pytest.raises(InputError, match="pixels"):
    modes.load_masks(config, [str(bomb)])
  Image.fromarray(np.full((30, 30), 255, np.uint8)).save(masks / "x.png")
  assert modes.load_masks(config, [str(bomb)]).shape[1:] == (8, 8, 1)  # a real mask loads


def _prepare(folder, tmp_path, caplog):
  config = tiny_config(**{"data.dataset": "image_folder", "data.folder": str(folder),
                          "data.data_dir": str(tmp_path / "tfds")})
  with caplog.at_level("WARNING"):
    n = len(datasets.get_source(config, "train")) + len(datasets.get_source(config, "test"))
  return n, " ".join(r.getMessage() for r in caplog.records)


def test_bombs_and_foreign_formats_in_a_training_folder_are_skipped_and_reported(
    tmp_path, caplog):
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
  (folder / "bomb.png").write_bytes(_blank_png(BOMB_SIDE))
  (folder / "anim.png").write_bytes(_renamed("GIF"))
  n, log = _prepare(folder, tmp_path, caplog)
  assert n == 3
  assert "could not be read (2 of 5," in log, log
  assert "bomb.png (ImageRefused" in log and "anim.png (ImageRefused: not a JPEG" in log, log


# ----------------------------------------------------------------------------- symlinks


def test_broken_and_looping_links_are_skipped_and_linked_folders_followed(tmp_path, caplog):
  """A symlinked sub-folder is part of the data (followed once); a link back to the folder
  adds nothing; dangling and self-looping links are reported like unreadable files."""
  folder, outside = tmp_path / "imgs", tmp_path / "elsewhere"
  folder.mkdir()
  (outside / "deep").mkdir(parents=True)
  Image.fromarray(np.full((12, 12, 3), 10, np.uint8)).save(folder / "own.png")
  Image.fromarray(np.full((12, 12, 3), 90, np.uint8)).save(outside / "a.png")
  Image.fromarray(np.full((12, 12, 3), 170, np.uint8)).save(outside / "deep" / "b.jpg")
  os.symlink(outside, folder / "linked")
  os.symlink(folder, folder / "again")  # a cycle
  os.symlink(outside / "deep", outside / "up")  # the same folder twice in the linked tree
  os.symlink(tmp_path / "missing.png", folder / "gone.png")
  os.symlink("loop.png", folder / "loop.png")
  assert images.list_images(str(folder)) == [
      "gone.png", "linked/a.png", "linked/deep/b.jpg", "loop.png", "own.png"]
  n, log = _prepare(folder, tmp_path, caplog)
  assert n == 3
  assert "could not be read (2 of 5," in log and "gone.png (broken symbolic link" in log, log
  assert "loop.png (broken symbolic link" in log, log


# ----------------------------------------------------------------------------- weights


def _ops(value) -> bytes:
  """The pickle opcodes of a plain value (str, int, tuple of ints), without PROTO/STOP."""
  return pickle.dumps(value, protocol=2)[2:-1]


def _state_dict_pickle(tensors: dict, legacy: bool = False) -> bytes:
  """A protocol-2 pickle, by hand, of a dict of name -> torch tensor, the way torch.save
  writes it: ``_rebuild_tensor_v2(persistent storage id, offset, size, stride, False, {})``.
  ``tensors``: name -> (storage key, numel, offset, size, stride, storage type)."""
  out = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
  for name, (key, numel, offset, size, stride, kind) in tensors.items():
    pid = (b"(" + _ops("storage") + f"ctorch\n{kind}\n".encode() + _ops(key) + _ops("cpu")
           + _ops(numel) + (b"N" if legacy else b"") + b"tQ")  # TUPLE, BINPERSID
    out.append(_ops(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _ops(offset)
               + _ops(tuple(size)) + _ops(tuple(stride)) + b"\x89}tR")
  return b"".join(out) + b"u."  # SETITEMS, STOP


def _write_zip(path, tensors, storages, bomb: str | None = None):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("archive/data.pkl", _state_dict_pickle(tensors))
    z.writestr("archive/version", "3\n")
    for key, arr in storages.items():
      if key == bomb:  # zeros that inflate to 64 MB from ~64 KB
        with z.open(f"archive/data/{key}", "w") as f:
          for _ in range(64):
            f.write(bytes(1 << 20))
      else:
        z.writestr(f"archive/data/{key}", np.ascontiguousarray(arr).tobytes())
  return str(path)


def _write_legacy(path, tensors, storages, sizes=None):
  buf = io.BytesIO()
  for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True, "protocol_version": 1001}):
    pickle.dump(x, buf, protocol=2)
  buf.write(_state_dict_pickle(tensors, legacy=True))
  pickle.dump(sorted(storages), buf, protocol=2)
  for k in sorted(storages):
    buf.write(np.int64((sizes or {}).get(k, storages[k].size)).tobytes())
    buf.write(np.ascontiguousarray(storages[k]).tobytes())
  path.write_bytes(buf.getvalue())
  return str(path)


BASE = np.arange(12, dtype=np.float32)


def _tensor(offset=0, size=(3, 4), stride=(4, 1), key="0", numel=12, kind="FloatStorage"):
  return (key, numel, offset, size, stride, kind)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_a_valid_hand_written_weights_file_loads_every_kind_of_view(tmp_path, fmt):
  """Offsets, transposed strides, broadcast (stride 0) and empty views inside the storage
  are all legitimate torch views, and read back exactly."""
  tensors = {"plain": _tensor(), "t": _tensor(size=(4, 3), stride=(1, 4)),
             "tail": _tensor(offset=8, size=(4,), stride=(1,)),
             "bcast": _tensor(offset=5, size=(2, 3), stride=(0, 1)),
             "empty": _tensor(offset=12, size=(0, 5), stride=(5, 1)),
             "ints": _tensor(key="1", numel=3, size=(3,), stride=(1,), kind="LongStorage")}
  storages = {"0": BASE, "1": np.array([7, -1, 2], np.int64)}
  write = _write_zip if fmt == "zip" else _write_legacy
  got = inception.read_torch_file(write(tmp_path / "ok.pth", tensors, storages))
  np.testing.assert_array_equal(got["plain"], BASE.reshape(3, 4))
  np.testing.assert_array_equal(got["t"], BASE.reshape(3, 4).T)
  np.testing.assert_array_equal(got["tail"], BASE[8:])
  np.testing.assert_array_equal(got["bcast"], np.broadcast_to(BASE[5:8], (2, 3)))
  assert got["empty"].shape == (0, 5)
  np.testing.assert_array_equal(got["ints"], [7, -1, 2])


BAD_VIEWS = {
    "offset_past_the_end": (_tensor(offset=1000, size=(4,), stride=(1,)), "reaches element"),
    "offset_negative": (_tensor(offset=-2, size=(4,), stride=(1,)), "negative view"),
    "stride_too_big": (_tensor(size=(4,), stride=(1000,)), "reaches element"),
    "stride_negative": (_tensor(size=(4,), stride=(-1,)), "negative view"),
    "size_too_big": (_tensor(size=(4, 4)), "reaches element"),
    "shape_stride_mismatch": (_tensor(size=(4, 3), stride=(1,)), "malformed view"),
    # 600 MB from one float: within the storage, but past the cap on what is copied out.
    "broadcast_past_the_cap": (_tensor(size=(150_000_000,), stride=(0,)), "bytes in all"),
}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("case", sorted(BAD_VIEWS))
def test_a_view_outside_its_storage_is_one_line_not_a_crash(tmp_path, case, fmt):
  """as_strided reads whatever memory the offsets and strides name (a crafted file copied
  heap memory out, or segfaulted): every view is checked against its storage first."""
  tensor, message = BAD_VIEWS[case]
  write = _write_zip if fmt == "zip" else _write_legacy
  path = write(tmp_path / "bad.pth", {"w": tensor}, {"0": BASE})
  with pytest.raises(WeightsError, match=message) as e:
    inception.read_torch_file(path)
  assert "\n" not in str(e.value) and str(e.value).startswith(path), str(e.value)
  with pytest.raises(WeightsError, match=message):  # the same through load_params
    inception.load_params(path, "")


def test_a_zip_bomb_storage_is_refused_from_the_zip_directory(tmp_path):
  """A storage of 12 floats whose member inflates to 64 MB: refused by its declared size,
  before inflating (the bytes it would read are 48, so nothing past them is wanted)."""
  path = _write_zip(tmp_path / "bomb.pth", {"w": _tensor()}, {"0": BASE}, bomb="0")
  assert os.path.getsize(path) < 1 << 20
  with pytest.raises(WeightsError, match="holds 67108864 bytes, expected 48") as e:
    inception.read_torch_file(path)
  assert "\n" not in str(e.value)


def test_oversized_storages_and_pickles_are_refused(tmp_path):
  huge = _tensor(numel=inception.MAX_FILE_BYTES // 4 + 1, size=(4,), stride=(1,))
  with pytest.raises(WeightsError, match="declares"):
    inception.read_torch_file(_write_zip(tmp_path / "a.pth", {"w": huge}, {"0": BASE}))
  path = tmp_path / "b.pth"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("archive/data.pkl", bytes(inception.MAX_PICKLE_BYTES + 1))
  with pytest.raises(WeightsError, match="zip member archive/data.pkl holds"):
    inception.read_torch_file(str(path))


def test_a_legacy_storage_whose_size_disagrees_with_its_header_is_refused(tmp_path):
  path = _write_legacy(tmp_path / "l.pth", {"w": _tensor()}, {"0": BASE}, sizes={"0": 11})
  with pytest.raises(WeightsError, match="holds 11 elements, its header says 12"):
    inception.read_torch_file(path)


def test_the_weights_hash_is_the_full_sha256(tmp_path):
  """An 8-hex prefix takes minutes to forge: only a full digest is accepted; the official
  file name's prefix stands for the official file's full hash, and a wrong file is one
  line naming both digests."""
  path = _write_zip(tmp_path / "w.pth", {"w": _tensor()}, {"0": BASE})
  digest = inception.sha256(path)
  assert inception.expected_digest(inception.EXPECTED_SHA256_PREFIX) == inception.EXPECTED_SHA256
  assert len(inception.EXPECTED_SHA256) == 64
  with pytest.raises(ConfigError, match="full sha256"):
    inception.load_params(path, digest[:8])  # a prefix of the right file: still refused
  for wrong in (inception.EXPECTED_SHA256_PREFIX, inception.EXPECTED_SHA256, "0" * 64):
    with pytest.raises(WeightsError, match=f"sha256 {digest} is not the expected") as e:
      inception.load_params(path, wrong)
    assert "\n" not in str(e.value)
  with pytest.raises(WeightsError, match="unexpected tensor 'w'"):  # the hash check passes
    inception.load_params(path, digest.upper())
