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
and its sha256 is checked (``EXPECTED_SHA256_PREFIX`` is the hash prefix torch.hub
puts in the file name).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import fs
from ddpm_jax.errors import WeightsError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
EXPECTED_SHA256_PREFIX = "6726825d"
FEATURE_DIM = 2048
__all__ = ["WeightsError", "load_params", "make_feature_fn", "read_torch_file"]

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
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
  def __init__(self, dtype, key, numel):
    self.dtype, self.key, self.numel, self.data = dtype, key, numel, None


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    d = self.storage.data
    item = d.itemsize
    view = np.lib.stride_tricks.as_strided(
        d[self.offset:], self.size, tuple(s * item for s in self.stride))
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
    key = str(pid[2])
    if key not in self.storages:
      self.storages[key] = _Storage(np.dtype(pid[1]), key, int(pid[4]))
    return self.storages[key]


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
  ``os.system``, say) is a ``WeightsError`` and nothing in it runs.
  """
  raw = fs.read_bytes(path)
  try:
    return _read_torch_bytes(raw, path)
  except WeightsError:
    raise
  except Exception as e:  # noqa: BLE001  (truncated or malformed: pickle, zip, numpy errors)
    raise WeightsError(f"{path}: not a readable torch weights file ({type(e).__name__}: "
                       f"{str(e)[:100]})") from None


def _read_torch_bytes(raw: bytes, path: str) -> dict[str, np.ndarray]:
  if zipfile.is_zipfile(io.BytesIO(raw)):
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
      names = z.namelist()
      pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
      if not pkl:
        raise WeightsError(f"{path}: a zip file without data.pkl, not a torch file")
      prefix = pkl[0][:-len("data.pkl")]
      obj, storages = _unpickle(io.BytesIO(z.read(pkl[0])))
      for key, s in storages.items():
        s.data = np.frombuffer(z.read(f"{prefix}data/{key}"), s.dtype, s.numel)
  else:
    f = io.BytesIO(raw)
    try:
      magic = _plain(f)
    except WeightsError:
      raise
    except Exception as e:
      raise WeightsError(f"{path}: not a torch weights file ({e})") from None
    if magic != _LEGACY_MAGIC:
      raise WeightsError(f"{path}: not a torch weights file (bad magic number)")
    _plain(f)  # protocol version
    sys_info = _plain(f)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
      raise WeightsError(f"{path}: big-endian or unknown torch files are not supported")
    obj, storages = _unpickle(f)
    keys = _plain(f)
    for key in keys:
      s = storages[str(key)]
      n = int(np.frombuffer(f.read(8), "<i8")[0])
      s.data = np.frombuffer(f.read(n * s.dtype.itemsize), s.dtype, n)
  if not isinstance(obj, dict):
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  return {k: v.numpy() for k, v in obj.items() if isinstance(v, _Tensor)}


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


def load_params(path: str, expected_sha256: str = EXPECTED_SHA256_PREFIX):
  """Parameters from the FID weights file at ``path``, after checking its sha256 (a full
  hash, or a prefix as in the official file name)."""
  if not path or not fs.exists(path):
    raise WeightsError(f"Inception weights file {path!r} not found; get {WEIGHTS_NAME} from "
                       "https://github.com/mseitzer/pytorch-fid/releases and set "
                       "--config.eval.inception_weights=PATH")
  digest = sha256(path)
  if expected_sha256 and not digest.startswith(expected_sha256.lower()):
    raise WeightsError(f"{path}: sha256 {digest} does not match the expected "
                       f"{expected_sha256}...; FID needs the exact {WEIGHTS_NAME}")
  template = param_shapes()
  return params_from_state_dict(read_torch_file(path), template), digest
