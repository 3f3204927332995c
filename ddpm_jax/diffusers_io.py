"""Weights in and out of Hugging Face diffusers: ``UNet2DModel`` folders <-> our workdirs.

Export writes a workdir's EMA (or raw) parameters as a ``DDPMPipeline`` folder that
``diffusers.DDPMPipeline.from_pretrained(DIR)`` and ``UNet2DModel.from_pretrained(DIR,
subfolder="unet")`` load: ``model_index.json``, ``unet/config.json``,
``unet/diffusion_pytorch_model.safetensors`` (written here with numpy: no torch needed) and
``scheduler/scheduler_config.json`` (a ``DDPMScheduler``). Import reads a ``UNet2DModel``
folder (safetensors, or the older ``.bin`` torch pickle, read without torch and without
running pickled code) and its scheduler config into a workdir whose step-0 checkpoint
(params = EMA params = the weights, a fresh optimizer) every mode uses as if trained here.

What maps (ours -> diffusers): ``ch * ch_mult`` -> ``block_out_channels``; attention at a
level -> ``AttnDownBlock2D``/``AttnUpBlock2D``; ``num_res_blocks`` -> ``layers_per_block``;
``num_groups`` -> ``norm_num_groups`` (Flax GroupNorm's eps 1e-6 -> ``norm_eps``); our
sinusoidal embedding is ``flip_sin_to_cos=False, freq_shift=1``; ``num_heads`` ->
``attention_head_dim`` (None for one head); ``downsample_padding`` "symmetric"/"same" -> 1/0;
``time_conditioning`` add/scale_shift -> ``resnet_time_scale_shift`` default/scale_shift;
``num_classes`` K -> ``num_class_embeds`` K + 1 (row K, our null label, is the last row; a
private ``_ddpm_jax_null_label`` key in config.json says so, which diffusers ignores). The
schedule: linear (beta 1e-4..0.02 scaled by 1000/T) or cosine (``squaredcos_cap_v2``),
``prediction_type`` epsilon/v/x0 -> epsilon/v_prediction/sample, ``sampling.ddpm_variance``
-> ``variance_type``, ``sampling.clip_x0`` -> ``clip_sample``.

Refused, one line naming the setting: linear attention, pooling resample, a per-level head
count diffusers cannot express, and on import anything of ``UNet2DModel`` that our U-Net does
not compute (other embeddings, block types, eps, activations, scheduler betas).
A diffusers class-conditional model has no null label: its import gets one more, all-zero
embedding row as the null label, and ``sampling.guidance_scale=1`` (purely conditional).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import config_lib, fs, inception, models
from ddpm_jax.errors import ConfigError, UserError, WeightsError

DIFFUSERS_VERSION = "0.42.1"  # the release these files are written for and tested with
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
NULL_LABEL_KEY = "_ddpm_jax_null_label"  # "_" keys are ignored by diffusers' config loader
NORM_EPS = 1e-6  # Flax GroupNorm's epsilon, everywhere in our U-Net
MAX_WEIGHTS_BYTES = 2 << 30  # an untrusted weights file (the 256 px DDPMs: 455 MB)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
MAX_JSON_BYTES = 1 << 20

__all__ = ["DiffusersError", "export_pipeline", "import_unet", "unet_config",
           "config_from_diffusers", "to_diffusers", "from_diffusers", "read_safetensors",
           "write_safetensors"]


class DiffusersError(UserError, ValueError):
  """A diffusers folder or weights file that cannot be read (corrupt, foreign or mismatched)."""


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
              "BF16": np.dtype("<u2")}  # bf16 read as raw bits, widened to float32 below


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """The safetensors format: an 8-byte little-endian header length, a JSON header of
  {name: {dtype, shape, data_offsets}} (names sorted, padded with spaces to 8 bytes), then
  the tensors' raw little-endian bytes back to back. float32 only (what our params are)."""
  header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name], dtype="<f4")
    header[name] = {"dtype": "F32", "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    chunks.append(a.tobytes())
    offset += a.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  fs.write_bytes(path, len(text).to_bytes(8, "little") + text + b"".join(chunks))


def read_safetensors(raw: bytes, path: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file's bytes as float32 arrays; DiffusersError for a bad
  header, a tensor outside the data or overlapping another, or a dtype that is not a float."""
  def bad(why):
    return DiffusersError(f"{path}: not a readable safetensors file ({why})")
  if len(raw) < 8:
    raise bad("shorter than its 8-byte header length")
  n = int.from_bytes(raw[:8], "little")
  if n > MAX_HEADER_BYTES or 8 + n > len(raw):
    raise bad(f"a header of {n} bytes in a file of {len(raw)}")
  try:
    header = json.loads(raw[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise bad(f"its header is not JSON: {str(e)[:80]}") from None
  if not isinstance(header, dict):
    raise bad("its header is not a JSON object")
  header.pop("__metadata__", None)
  data, spans, out = memoryview(raw)[8 + n:], [], {}
  for name, info in header.items():
    if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in info["shape"] + info["data_offsets"])):
      raise bad(f"tensor {name!r:.80} has a malformed entry")
    if info.get("dtype") not in _ST_DTYPES:
      raise bad(f"tensor {name!r:.80} has dtype {str(info.get('dtype'))[:20]!r}, not one of "
                f"{sorted(_ST_DTYPES)}")
    dtype, (begin, end) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
    if not begin <= end <= len(data) or end - begin != math.prod(info["shape"]) * dtype.itemsize:
      raise bad(f"tensor {name!r:.80}: offsets {begin}..{end} for shape {info['shape']} "
                f"{info['dtype']} in {len(data)} bytes of data")
    spans.append((begin, end, name))
    a = np.frombuffer(data[begin:end], dtype).reshape(info["shape"])
    if info["dtype"] == "BF16":
      a = (a.astype(np.uint32) << 16).view(np.float32)
    out[name] = a.astype(np.float32)
  spans.sort()
  for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
    if b1 < e0:
      raise bad(f"tensors {a!r:.60} and {b!r:.60} overlap")
  return out


# ----------------------------------------------------------------------------- configs

# UNet2DModel's constructor arguments and their defaults in diffusers 0.42.1: a config.json
# without a field means this value (older files lack the newer fields).
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
_PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
_VARIANCES = {"small": "fixed_small", "large": "fixed_large"}
_PADDINGS = {"symmetric": 1, "same": 0}


def _attn_levels(config) -> list[bool]:
  m = config.model
  sizes = config_lib.feature_map_sizes(config.data.image_size, len(m.ch_mult))
  return [s in tuple(m.attn_resolutions) for s in sizes]


def unet_config(config) -> dict:
  """``unet/config.json`` for ``config``'s U-Net; ConfigError naming the setting that
  UNet2DModel cannot reproduce."""
  m = config.model
  for field, ours in (("attention", "softmax"), ("resample", "conv")):
    value = config.model[field]
    if value != ours:
      raise ConfigError(f"model.{field}={value!r} has no diffusers UNet2DModel equivalent "
                        f"(it has {field} {ours!r} only): this model cannot be exported")
  ch, mult, levels = int(m.ch), [int(v) for v in m.ch_mult], _attn_levels(config)
  attn_channels = sorted({ch * k for k, a in zip(mult, levels) if a} | {ch * mult[-1]})
  heads = int(m.num_heads)
  if heads == 1:
    head_dim = None
  elif len(attn_channels) == 1 and attn_channels[0] % heads == 0:
    head_dim = attn_channels[0] // heads
  else:
    raise ConfigError(f"model.num_heads={heads} with attention at {attn_channels} channels: "
                      f"UNet2DModel has one attention_head_dim for every level, so its head "
                      f"counts would differ; only num_heads=1 exports with these channels")
  shift = {"add": "default", "scale_shift": "scale_shift"}[
      m.time_conditioning]
  num_classes = int(m.num_classes)
  out = dict(UNET_DEFAULTS)
  out.update({
      "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": int(config.data.image_size), "in_channels": int(config.data.num_channels),
      "out_channels": int(config.data.num_channels), "freq_shift": 1, "flip_sin_to_cos": False,
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in levels],
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
      "block_out_channels": [ch * k for k in mult], "layers_per_block": int(m.num_res_blocks),
      "downsample_padding": _PADDINGS[m.downsample_padding],
      "dropout": float(m.dropout), "attention_head_dim": head_dim,
      "norm_num_groups": int(m.num_groups), "norm_eps": NORM_EPS,
      # diffusers drops the mid attention's norm under scale_shift unless this is set; ours has it
      "attn_norm_num_groups": int(m.num_groups) if shift == "scale_shift" else None,
      "resnet_time_scale_shift": shift,
      "num_class_embeds": num_classes + 1 if num_classes else None,
  })
  if num_classes:
    out[NULL_LABEL_KEY] = num_classes
  return dict(sorted(out.items()))


def scheduler_config(config) -> dict:
  """``scheduler/scheduler_config.json``: a DDPMScheduler with our schedule."""
  T = int(config.diffusion.num_timesteps)
  schedule = config.diffusion.schedule
  scale = 1000.0 / T  # as diffusion.linear_betas (cosine ignores the beta range)
  beta_start, beta_end = (scale * 1e-4, scale * 0.02) if schedule == "linear" else (1e-4, 0.02)
  return {
      "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
      "beta_end": beta_end, "beta_schedule": _SCHEDULES[schedule], "beta_start": beta_start,
      "clip_sample": bool(config.sampling.clip_x0), "clip_sample_range": 1.0,
      "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": T,
      "prediction_type": _PREDICTIONS[config.model.prediction_type],
      "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "steps_offset": 0,
      "thresholding": False, "timestep_spacing": "trailing", "trained_betas": None,
      "variance_type": _VARIANCES[config.sampling.ddpm_variance],
  }


def _refuse(key, value, why: str):
  return ConfigError(f"UNet2DModel {key}={value!r}: {why}; this model cannot be imported")


def _require(cfg: dict, key: str, allowed) -> None:
  if cfg[key] not in allowed:
    raise _refuse(key, cfg[key], f"our U-Net computes only {key} in {list(allowed)}")


def _model_fields(cfg: dict) -> dict:
  """Our model/data fields from a UNet2DModel config (defaults filled in); ConfigError for
  a setting our U-Net does not compute."""
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in UNET_DEFAULTS)
  if unknown:
    raise _refuse(unknown[0], cfg[unknown[0]], "a setting this importer does not know")
  cfg = {**UNET_DEFAULTS, **cfg}
  for key, allowed in (("center_input_sample", (False,)), ("time_embedding_type", ("positional",)),
                       ("flip_sin_to_cos", (False,)), ("freq_shift", (1,)),
                       ("mid_block_type", ("UNetMidBlock2D",)), ("mid_block_scale_factor", (1,)),
                       ("downsample_padding", (0, 1)), ("downsample_type", ("conv",)),
                       ("upsample_type", ("conv",)), ("act_fn", ("silu", "swish")),
                       ("resnet_time_scale_shift", ("default", "scale_shift")),
                       ("add_attention", (True,)), ("class_embed_type", (None,))):
    _require(cfg, key, allowed)
  chans, size = cfg["block_out_channels"], cfg["sample_size"]
  if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
    size = size[0]
  if not isinstance(size, int) or size <= 0:
    raise _refuse("sample_size", size, "our U-Net needs one positive, square size")
  if not (isinstance(chans, list) and chans and all(isinstance(c, int) and c > 0 for c in chans)
          and all(c % chans[0] == 0 for c in chans)):
    raise _refuse("block_out_channels", chans, "each must be a multiple of the first")
  if cfg["time_embedding_dim"] not in (None, 4 * chans[0]):
    raise _refuse("time_embedding_dim", cfg["time_embedding_dim"],
                  f"ours is 4 * block_out_channels[0] = {4 * chans[0]}")
  if abs(float(cfg["norm_eps"]) - NORM_EPS) > 1e-12:
    raise _refuse("norm_eps", cfg["norm_eps"], f"our GroupNorms use {NORM_EPS}")
  if cfg["in_channels"] != cfg["out_channels"]:
    raise _refuse("out_channels", cfg["out_channels"], "ours equals in_channels")
  down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
  if len(down) != len(chans) or len(up) != len(chans):
    raise _refuse("down_block_types", down, "one per block_out_channels, and as many up")
  for types, plain, attn in ((down, "DownBlock2D", "AttnDownBlock2D"),
                             (up, "UpBlock2D", "AttnUpBlock2D")):
    for t in types:
      if t not in (plain, attn):
        raise _refuse("block type", t, f"our U-Net has only {plain} and {attn}")
  levels = [t == "AttnDownBlock2D" for t in down]
  if [t == "AttnUpBlock2D" for t in reversed(up)] != levels:
    raise _refuse("up_block_types", up, "our U-Net has attention at the same levels down and up")
  groups = cfg["norm_num_groups"]
  mid_norm = cfg["attn_norm_num_groups"]
  if mid_norm is None and cfg["resnet_time_scale_shift"] != "default":
    raise _refuse("attn_norm_num_groups", None, "with scale_shift, diffusers' middle attention "
                  "has no GroupNorm and ours has")
  if mid_norm not in (None, groups):
    raise _refuse("attn_norm_num_groups", mid_norm, f"ours is norm_num_groups={groups}")
  size_at = [size // 2**i for i in range(len(chans))]
  heads = _num_heads(cfg["attention_head_dim"], [c for c, a in zip(chans, levels) if a]
                     + [chans[-1]])
  return {
      "data.image_size": size, "data.num_channels": int(cfg["in_channels"]),
      "model.ch": chans[0], "model.ch_mult": tuple(c // chans[0] for c in chans),
      "model.num_res_blocks": int(cfg["layers_per_block"]),
      "model.attn_resolutions": tuple(s for s, a in zip(size_at, levels) if a),
      "model.num_heads": heads, "model.dropout": float(cfg["dropout"]),
      "model.num_groups": int(groups),
      "model.time_conditioning": "add" if cfg["resnet_time_scale_shift"] == "default"
                                 else "scale_shift",
      "model.attention": "softmax", "model.resample": "conv",
      "model.downsample_padding": "symmetric" if cfg["downsample_padding"] == 1 else "same",
  }


def _num_heads(head_dim, channels: list[int]) -> int:
  """Our one head count for diffusers' one head size (None: one head of all channels)."""
  if head_dim is None:
    return 1
  if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 \
      or any(c % head_dim for c in channels) or len({c // head_dim for c in channels}) != 1:
    raise _refuse("attention_head_dim", head_dim, f"attention at {sorted(set(channels))} "
                  f"channels would need different head counts; ours has one")
  return channels[0] // head_dim


def _schedule_fields(sched: dict | None) -> dict:
  """Our diffusion/model/sampling fields from a scheduler config (None: DDPM's linear
  schedule, T=1000, epsilon, the DDPMScheduler defaults)."""
  s = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
       "beta_end": 0.02, "trained_betas": None, "prediction_type": "epsilon",
       "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
       "rescale_betas_zero_snr": False, **(sched or {})}
  T = s["num_train_timesteps"]
  if not isinstance(T, int) or T < 2:
    raise _refuse_s("num_train_timesteps", T, "must be an integer >= 2")
  if s["trained_betas"] is not None:
    raise _refuse_s("trained_betas", "[...]", "only the linear and cosine schedules map")
  if s["rescale_betas_zero_snr"]:
    raise _refuse_s("rescale_betas_zero_snr", True, "our schedules are not rescaled")
  inverse = {v: k for k, v in _SCHEDULES.items()}
  if s["beta_schedule"] not in inverse:
    raise _refuse_s("beta_schedule", s["beta_schedule"], f"use one of {list(inverse)}")
  schedule = inverse[s["beta_schedule"]]
  if schedule == "linear":
    want = (1e-4 * 1000.0 / T, 0.02 * 1000.0 / T)
    got = (float(s["beta_start"]), float(s["beta_end"]))
    if any(abs(g - w) > 1e-6 * w for g, w in zip(got, want)):
      raise _refuse_s("beta_start, beta_end", got, f"our linear schedule at T={T} is "
                      f"{want[0]:g}..{want[1]:g} (DDPM's 1e-4..0.02 scaled by 1000/T)")
  pred = {v: k for k, v in _PREDICTIONS.items()}
  if s["prediction_type"] not in pred:
    raise _refuse_s("prediction_type", s["prediction_type"], f"use one of {list(pred)}")
  var = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
         "fixed_large_log": "large"}
  if s["variance_type"] not in var:
    raise _refuse_s("variance_type", s["variance_type"], "our network predicts no variance")
  if float(s["clip_sample_range"]) != 1.0:
    raise _refuse_s("clip_sample_range", s["clip_sample_range"], "we clip x0 to [-1, 1]")
  return {"diffusion.schedule": schedule, "diffusion.num_timesteps": T,
          "model.prediction_type": pred[s["prediction_type"]],
          "sampling.ddpm_variance": var[s["variance_type"]],
          "sampling.clip_x0": bool(s["clip_sample"])}


def _refuse_s(key, value, why: str):
  return ConfigError(f"scheduler {key}={value!r}: {why}; this model cannot be imported")


def config_from_diffusers(unet_cfg: dict, sched_cfg: dict | None = None):
  """The full config (``configs/default.py`` with the model, data, schedule and sampling
  fields these diffusers configs decide) and whether the model lacks our null label."""
  fields = {**_model_fields(unet_cfg), **_schedule_fields(sched_cfg)}
  n = unet_cfg.get("num_class_embeds")
  add_null = False
  if n is not None:
    if not isinstance(n, int) or n < 1:
      raise _refuse("num_class_embeds", n, "must be a positive integer")
    null = unet_cfg.get(NULL_LABEL_KEY)
    add_null = null != n - 1  # ours: row n - 1 is the null label; theirs: it has none
    fields["model.num_classes"] = n if add_null else n - 1
    if add_null:
      fields["sampling.guidance_scale"] = 1.0
  config = config_lib.defaults()
  for path, value in fields.items():
    section, key = path.split(".")
    config[section][key] = value
  config_lib.validate(config, num_devices=1)
  return config, add_null


# ----------------------------------------------------------------------------- parameters

def _module_names(config) -> dict[str, tuple[str, str]]:
  """Our module path ("ResBlock_3", "AttnBlock_0", "Conv_1", "conv_in") -> (diffusers
  prefix, kind), in the order ``models.UNet`` creates its unnamed modules."""
  m = config.model
  levels, nrb, L = _attn_levels(config), int(m.num_res_blocks), len(m.ch_mult)
  out = {"conv_in": ("conv_in", "conv"), "temb0": ("time_embedding.linear_1", "dense"),
         "temb1": ("time_embedding.linear_2", "dense"), "class_emb": ("class_embedding", "embed"),
         "norm_out": ("conv_norm_out", "norm"), "conv_out": ("conv_out", "conv")}
  count = {"ResBlock": 0, "AttnBlock": 0, "Conv": 0}

  def add(kind, prefix):
    out[f"{kind}_{count[kind]}"] = (prefix, {"ResBlock": "res", "AttnBlock": "attn",
                                             "Conv": "conv"}[kind])
    count[kind] += 1
  for level in range(L):
    for i in range(nrb):
      add("ResBlock", f"down_blocks.{level}.resnets.{i}")
      if levels[level]:
        add("AttnBlock", f"down_blocks.{level}.attentions.{i}")
    if level != L - 1:
      add("Conv", f"down_blocks.{level}.downsamplers.0.conv")
  add("ResBlock", "mid_block.resnets.0")
  add("AttnBlock", "mid_block.attentions.0")
  add("ResBlock", "mid_block.resnets.1")
  for j, level in enumerate(reversed(range(L))):
    for i in range(nrb + 1):
      add("ResBlock", f"up_blocks.{j}.resnets.{i}")
      if levels[level]:
        add("AttnBlock", f"up_blocks.{j}.attentions.{i}")
    if level != 0:
      add("Conv", f"up_blocks.{j}.upsamplers.0.conv")
  return out


_RES = {"norm1": ("norm1", "norm"), "conv1": ("conv1", "conv"),
        "temb_proj": ("time_emb_proj", "dense"), "norm2": ("norm2", "norm"),
        "conv2": ("conv2", "conv"), "shortcut": ("conv_shortcut", "conv")}
_ATTN = {"norm": ("group_norm", "norm"), "q": ("to_q", "qkv"), "k": ("to_k", "qkv"),
         "v": ("to_v", "qkv"), "proj_out": ("to_out.0", "out")}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
# The older diffusers attention names (AttentionBlock before 0.14) -> the current ones.
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _name_map(config, template) -> dict[tuple, tuple[str, str]]:
  """Each of our parameter paths -> (diffusers tensor name, layer kind)."""
  modules, out = _module_names(config), {}
  for path in traverse_util.flatten_dict(template):
    prefix, kind = modules[path[0]]
    if kind in ("res", "attn"):
      sub, kind = (_RES if kind == "res" else _ATTN)[path[1]]
      prefix = f"{prefix}.{sub}"
    out[path] = (f"{prefix}.{_LEAF[path[-1]]}", kind)
  return out


def _to_torch(kind: str, leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if kind == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
      return a.transpose(3, 2, 0, 1)
    if kind == "qkv":  # (C, heads, head_dim) -> (heads * head_dim, C)
      return a.reshape(a.shape[0], -1).T
    if kind == "out":  # (heads, head_dim, C) -> (C, heads * head_dim)
      return a.reshape(-1, a.shape[-1]).T
    return a.T  # dense (in, out) -> (out, in)
  return a.reshape(-1) if kind == "qkv" else a  # (heads, head_dim) biases flatten


def _from_torch(kind: str, leaf: str, a: np.ndarray, shape: tuple) -> np.ndarray:
  if leaf == "kernel":
    if kind == "conv":
      return a.transpose(2, 3, 1, 0)
    return a.T.reshape(shape)
  return a.reshape(shape)


def _template(config):
  model = models.create_model(config)
  return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0),
                                                   config.data.image_size,
                                                   config.data.num_channels))


def to_diffusers(params, config) -> dict[str, np.ndarray]:
  """Our parameter tree -> UNet2DModel's state dict (float32 numpy arrays)."""
  names = _name_map(config, params)
  return {names[path][0]: np.ascontiguousarray(_to_torch(names[path][1], path[-1],
                                                         np.asarray(v, np.float32)))
          for path, v in traverse_util.flatten_dict(params).items()}


def from_diffusers(tensors: dict[str, np.ndarray], config, *, add_null_label: bool = False,
                   where: str = "the weights"):
  """UNet2DModel's state dict -> our parameter tree for ``config``; DiffusersError for a
  missing, unexpected or misshaped tensor. The older attention names are accepted."""
  tensors = dict(tensors)
  for name in list(tensors):
    head, _, tail = name.rpartition(".")
    stem, _, layer = head.rpartition(".")
    if layer in OLD_ATTENTION_NAMES and ".attentions." in name:
      new = f"{stem}.{OLD_ATTENTION_NAMES[layer]}.{tail}"
      if new in tensors:
        raise DiffusersError(f"{where}: both {name!r} and {new!r}")
      tensors[new] = tensors.pop(name)
  template = traverse_util.flatten_dict(_template(config))
  names = _name_map(config, traverse_util.unflatten_dict(template))
  wanted = {names[p][0] for p in template}
  missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
  if missing:
    raise DiffusersError(f"{where}: {len(missing)} tensors missing for this config, e.g. "
                         f"{missing[0]!r}: not the model its config.json describes")
  if unexpected:
    raise DiffusersError(f"{where}: {len(unexpected)} unexpected tensors, e.g. "
                         f"{unexpected[0][:100]!r}: not the model its config.json describes")
  out = {}
  for path, leaf in template.items():
    name, kind = names[path]
    a = np.asarray(tensors[name], np.float32)
    shape = tuple(leaf.shape)
    if add_null_label and path == ("class_emb", "embedding"):
      a = np.concatenate([a, np.zeros((1,) + a.shape[1:], np.float32)])  # the null label
    want = _to_torch(kind, path[-1], np.zeros(shape, np.float32)).shape
    if a.shape != want:
      raise DiffusersError(f"{where}: tensor {name!r} has shape {list(a.shape)}, this config "
                           f"needs {list(want)}")
    out[path] = _from_torch(kind, path[-1], a, shape)
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- files

def _read_json(path: str) -> dict:
  try:
    with fs.path(path).open("rb") as f:
      raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
      raise DiffusersError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MB, not a config")
    obj = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise DiffusersError(f"{path}: not a JSON config ({str(e)[:80]})") from None
  except OSError as e:
    raise DiffusersError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:80]})") from None
  if not isinstance(obj, dict):
    raise DiffusersError(f"{path}: not a JSON object")
  return obj


def _write_json(path: str, obj: dict) -> None:
  fs.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_weights(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """The state dict in ``folder``: safetensors if there, else the ``.bin`` torch pickle
  (read by the restricted unpickler of ``ddpm_jax.inception``: no pickled code runs)."""
  for name in (SAFETENSORS_NAME, BIN_NAME):
    path = fs.join(folder, name)
    if fs.exists(path):
      break
  else:
    raise DiffusersError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {folder} (sharded and "
                         f"variant weights are not read)")
  cap = MAX_WEIGHTS_BYTES if name == SAFETENSORS_NAME else inception.MAX_FILE_BYTES
  with fs.path(path).open("rb") as f:
    raw = f.read(cap + 1)
  if len(raw) > cap:
    raise DiffusersError(f"{path}: more than {cap >> 20} MB, larger than any model read here")
  if name == SAFETENSORS_NAME:
    return read_safetensors(raw, path), path
  try:
    sd = inception.parse_torch_bytes(raw, path)
  except WeightsError as e:
    raise DiffusersError(str(e)) from None
  bad = [k for k, v in sd.items() if v.dtype.kind != "f"]
  if bad:
    raise DiffusersError(f"{path}: tensor {bad[0]!r:.80} is {sd[bad[0]].dtype}, not float")
  return {k: v.astype(np.float32) for k, v in sd.items()}, path


def _find_scheduler(model_dir: str, folder: str) -> str | None:
  """scheduler_config.json beside the weights, or in the pipeline's scheduler/ folder."""
  for path in (fs.join(folder, "scheduler_config.json"),
               fs.join(model_dir, "scheduler", "scheduler_config.json"),
               fs.join(model_dir, "scheduler_config.json")):
    if fs.exists(path):
      return path
  return None


def _unet_folder(model_dir: str, subfolder: str | None) -> str:
  if subfolder:
    return fs.join(model_dir, subfolder)
  if not fs.exists(fs.join(model_dir, "config.json")) and \
      fs.exists(fs.join(model_dir, "unet", "config.json")):
    return fs.join(model_dir, "unet")  # a pipeline folder
  return model_dir


def import_unet(model_dir: str, workdir: str, subfolder: str | None = None):
  """A diffusers UNet2DModel folder -> ``workdir`` with a step-0 checkpoint (params = EMA
  params = the weights, a fresh optimizer) and config.json; returns the config.

  ``subfolder`` (e.g. "unet") is where config.json and the weights are; a pipeline folder is
  found by itself. The schedule comes from scheduler_config.json beside them or in the
  pipeline's scheduler/ folder (none: DDPM's linear schedule, T=1000, epsilon)."""
  from ddpm_jax import checkpoint
  from ddpm_jax import state as state_lib
  folder = _unet_folder(model_dir, subfolder)
  cfg_path = fs.join(folder, "config.json")
  if not fs.exists(cfg_path):
    raise DiffusersError(f"no config.json in {folder}: not a diffusers UNet2DModel folder "
                         f"(a pipeline's model is in its unet/ folder: --subfolder unet)")
  unet_cfg = _read_json(cfg_path)
  if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise DiffusersError(f"{cfg_path}: a {str(unet_cfg['_class_name'])[:40]}, not a "
                         f"UNet2DModel")
  sched_path = _find_scheduler(model_dir, folder)
  config, add_null = config_from_diffusers(unet_cfg,
                                           _read_json(sched_path) if sched_path else None)
  tensors, weights_path = _read_weights(folder)
  params = from_diffusers(tensors, config, add_null_label=add_null, where=weights_path)
  mngr = checkpoint.make_manager(workdir, async_save=False)
  if mngr.all_steps():
    raise UserError(f"{checkpoint.checkpoint_dir(workdir)} already holds checkpoints: import "
                    f"into a new --workdir")
  tx = state_lib.make_optimizer(config)
  params = jax.tree.map(jnp.asarray, params)
  train_state = jax.device_get(state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)))
  checkpoint.save(mngr, 0, train_state, config, force=True)
  mngr.wait_until_finished()
  mngr.close()
  checkpoint.write_config_json(workdir, config)
  print(f"imported {weights_path} ({models.count_params(params):,} parameters; schedule from "
        f"{sched_path or 'the DDPM defaults: linear, T=1000, epsilon'}) into {workdir}"
        + (f"; the model has no null label: label {config.model.num_classes} is a zero "
           f"embedding it never saw, so sample with guidance_scale=1" if add_null else ""))
  return config


def export_pipeline(config, workdir: str, out_dir: str, use_ema: bool = True) -> str:
  """``workdir``'s newest checkpoint (EMA parameters unless ``use_ema=False``) -> a
  DDPMPipeline folder ``out_dir``; returns ``out_dir``. ``config`` None: the checkpoint's."""
  from ddpm_jax import checkpoint
  config = checkpoint.saved_config(workdir) if config is None else \
      config_lib.with_defaults(config)
  config.sampling.use_ema = bool(use_ema)
  unet_cfg, sched_cfg = unet_config(config), scheduler_config(config)  # refusals first
  if fs.exists(out_dir) and fs.listdir(out_dir) and \
      not fs.exists(fs.join(out_dir, "model_index.json")):
    raise UserError(f"{out_dir} exists and is not a diffusers pipeline folder: export into a "
                    f"new or empty folder")
  params, step = checkpoint.load_params(config, workdir)
  write_safetensors(fs.join(out_dir, "unet", SAFETENSORS_NAME), to_diffusers(params, config))
  _write_json(fs.join(out_dir, "unet", "config.json"), unet_cfg)
  _write_json(fs.join(out_dir, "scheduler", "scheduler_config.json"), sched_cfg)
  _write_json(fs.join(out_dir, "model_index.json"), {
      "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
      "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]})
  print(f"exported step {step} ({'EMA' if use_ema else 'raw'} parameters) of {workdir} to "
        f"{out_dir}")
  return out_dir


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m ddpm_jax.diffusers_io", description=__doc__
                              .split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  e = sub.add_parser("export", help="a workdir -> a diffusers DDPMPipeline folder")
  e.add_argument("--workdir", required=True)
  e.add_argument("--out", required=True, help="the pipeline folder to write")
  e.add_argument("--raw", action="store_true", help="the raw parameters instead of the EMA")
  i = sub.add_parser("import", help="a diffusers UNet2DModel folder -> a new workdir")
  i.add_argument("--model", required=True, help="the folder (a pipeline, or its unet/)")
  i.add_argument("--workdir", required=True)
  i.add_argument("--subfolder", default=None, help="where config.json is, e.g. unet")
  args = p.parse_args(argv)
  try:
    if args.command == "export":
      export_pipeline(None, args.workdir, args.out, use_ema=not args.raw)
    else:
      import_unet(args.model, args.workdir, args.subfolder)
  except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
