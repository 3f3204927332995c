"""The DDPM U-Net (Ho et al. 2020) as a Flax Linen module, NHWC.

Residual blocks with GroupNorm and a sinusoidal timestep embedding, self-attention
over spatial positions at chosen resolutions, dropout, and a channel multiplier and
a number of residual blocks per level. With ch=128, ch_mult=(1, 2, 2, 2),
num_res_blocks=2, attention at 16x16 it is the DDPM CIFAR-10 model (35,746,307
parameters). The network knows nothing of diffusion: it maps (x_t, t) and, for a
class-conditional model, a label y to an output with x_t's shape.

Options beyond DDPM's architecture (used by ``configs/anime_notebook.py``, the Keras
notebook's network): the timestep embedding as a scale and shift of the second
GroupNorm (``time_conditioning="scale_shift"``), linear attention (``attention="linear"``,
Katharopoulos et al. 2020; the middle block keeps softmax attention), and average-pool
down / bilinear up without convolutions (``resample="pool"``).

``downsample_padding="same"``: the stride-2 convolutions pad one zero row and column after
the image and none before, as TensorFlow's 'SAME' padding in Ho et al.'s code (and diffusers'
``downsample_padding=0``: google/ddpm-* checkpoints need it); the default "symmetric" pads one
on each side. Only the output differs, not the parameters.

Rematerialisation (``remat="block"``, training only): each ResBlock and AttnBlock is wrapped
in ``nn.remat`` with JAX's default policy (save nothing inside the block): the backward pass
keeps only each block's inputs and recomputes the block's GroupNorm/SiLU/conv/attention
activations, which are most of a U-Net's memory at 128-256 px, at the cost of about one more
forward pass. Saving the conv/matmul outputs instead (``dots_saveable``) keeps the largest
of those tensors and saves little. Submodules carry the names the plain model gives them
(``ResBlock_0``, ``AttnBlock_0``, ...), so the parameters, checkpoints and the diffusers
export are the same with and without remat. ``train`` is a static argument of the block.

Class conditioning (``num_classes > 0``): a learned embedding of the label is added to
the timestep embedding. Row ``num_classes`` is the null label: what classifier-free
guidance trains with dropped labels and samples as "unconditional".
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax import config_lib
from ddpm_jax.errors import ConfigError

# DDPM's initialisation: variance scaling over fan-average, uniform; zero for the
# last layer of each residual branch and the output, so each block starts as identity.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros
DOWNSAMPLE_PADDINGS = ("symmetric", "same")
REMATS = config_lib.REMATS  # model.remat values (checked in config_lib.validate)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in DDPM's code."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice, with a skip; the timestep embedding is added after the first
  conv ("add", DDPM) or scales and shifts the second GroupNorm ("scale_shift")."""
  out_ch: int
  dropout: float = 0.0
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  time_conditioning: str = "add"

  @nn.compact
  def __call__(self, x, temb, train: bool):
    conv = lambda feat, k, init=default_init, name=None: nn.Conv(  # noqa: E731
        feat, (k, k), padding=k // 2, dtype=self.dtype, kernel_init=init, name=name)
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
    h = conv(self.out_ch, 3, name="conv1")(h)
    if self.time_conditioning == "scale_shift":
      ss = nn.Dense(2 * self.out_ch, dtype=self.dtype, kernel_init=default_init,
                    name="temb_proj")(nn.silu(temb))[:, None, None, :]
      scale, shift = jnp.split(ss, 2, axis=-1)
      h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h) * (1 + scale) + shift
    else:
      h = h + nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init,
                       name="temb_proj")(nn.silu(temb))[:, None, None, :]
      h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_ch, 3, zero_init, name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, 1, name="shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Self-attention over the H*W spatial positions (each position a token of C channels)."""
  num_heads: int = 1
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    if C % self.num_heads:
      raise ValueError(f"channels {C} not divisible by num_heads {self.num_heads}")
    h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    h = h.reshape(B, H * W, C)  # tokens are positions; channels stay together
    dense = lambda name, init=default_init: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, C // self.num_heads), dtype=self.dtype, kernel_init=init, name=name)
    q, k, v = dense("q")(h), dense("k")(h), dense("v")(h)  # (B, HW, heads, C/heads)
    a = jax.nn.dot_product_attention(q, k, v)
    out = nn.DenseGeneral(C, axis=(-2, -1), dtype=self.dtype, kernel_init=zero_init,
                          name="proj_out")(a)
    return x + out.reshape(B, H, W, C)


class LinearAttnBlock(nn.Module):
  """Linear attention over the H*W positions (Katharopoulos et al. 2020, in the form of
  lucidrains' LinearAttention): softmax of q over features, of k over positions, so the
  cost is linear in H*W. Heads of ``head_dim`` channels; output GroupNorm(1)."""
  num_heads: int = 4
  head_dim: int = 32
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x).reshape(B, H * W, C)
    qkv = nn.DenseGeneral((3, self.num_heads, self.head_dim), dtype=self.dtype,
                          kernel_init=default_init, use_bias=False, name="qkv")(h)
    q, k, v = (qkv[:, :, i].astype(jnp.float32) for i in range(3))  # (B, N, heads, d)
    q = jax.nn.softmax(q, axis=-1) * self.head_dim ** -0.5
    k = jax.nn.softmax(k, axis=1)
    context = jnp.einsum("bnhd,bnhe->bhde", k, v)
    out = jnp.einsum("bhde,bnhd->bnhe", context, q).astype(self.dtype)
    out = nn.DenseGeneral(C, axis=(-2, -1), dtype=self.dtype, kernel_init=default_init,
                          name="proj_out")(out)
    out = nn.GroupNorm(1, dtype=self.dtype, name="norm_out")(out)
    return x + out.reshape(B, H, W, C)


class UNet(nn.Module):
  """The DDPM U-Net. ``attn_resolutions`` are feature-map sizes (e.g. 16 for 16x16)."""
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_heads: int = 1
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  num_classes: int = 0  # > 0: class-conditional, with a null label at index num_classes
  time_conditioning: str = "add"  # "add" (DDPM) or "scale_shift"
  attention: str = "softmax"  # at attn_resolutions: "softmax" (DDPM) or "linear"
  resample: str = "conv"  # "conv" (strided conv down, nearest+conv up) or "pool"
  downsample_padding: str = "symmetric"  # of the strided convs: "symmetric" or "same" (TF)
  remat: str = "none"  # "none" or "block": recompute each block's activations in backward

  def _block(self, cls, counts, train: bool, **kw):
    """``cls(**kw)`` named as the plain model names it (``ResBlock_3``), wrapped in
    ``nn.remat`` when training with ``remat="block"`` (``train`` is ResBlock's 4th argument
    counting ``self``, static: it picks Python branches)."""
    name = f"{cls.__name__}_{counts.get(cls.__name__, 0)}"
    counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
    if self.remat == "block" and train:
      cls = nn.remat(cls, static_argnums=(3,) if cls is ResBlock else ())
    return cls(name=name, **kw)

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    """Args: x (B, H, W, C) noisy images; t (B,) int timesteps; y (B,) int labels in
    [0, num_classes] (num_classes = no label) or None. Returns (B, H, W, out_ch)."""
    if self.remat not in REMATS:
      raise ValueError(f"remat={self.remat!r}: use one of {REMATS}")
    counts = {}
    res_kw = dict(dropout=self.dropout, num_groups=self.num_groups, dtype=self.dtype,
                  time_conditioning=self.time_conditioning)
    resblock = lambda out_ch, h: self._block(  # noqa: E731
        ResBlock, counts, train, out_ch=out_ch, **res_kw)(h, temb, train)
    mid_attn = lambda h: self._block(  # noqa: E731
        AttnBlock, counts, train, num_heads=self.num_heads, num_groups=self.num_groups,
        dtype=self.dtype)(h)
    if self.attention == "linear":
      attn = lambda h: self._block(  # noqa: E731
          LinearAttnBlock, counts, train, num_groups=self.num_groups, dtype=self.dtype)(h)
    else:
      attn = mid_attn
    conv3 = lambda feat, **kw: nn.Conv(feat, (3, 3), padding=kw.pop("padding", 1),  # noqa: E731
                                       dtype=self.dtype,
                                       kernel_init=kw.pop("init", default_init), **kw)
    if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
      raise ValueError(f"downsample_padding={self.downsample_padding!r}: use one of "
                       f"{DOWNSAMPLE_PADDINGS}")
    pad = 1 if self.downsample_padding == "symmetric" else ((0, 1), (0, 1))
    x = x.astype(self.dtype)
    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(self.ch * 4, dtype=self.dtype, kernel_init=default_init, name="temb0")(temb)
    temb = nn.Dense(self.ch * 4, dtype=self.dtype, kernel_init=default_init,
                    name="temb1")(nn.silu(temb))
    if self.num_classes:
      if y is None:
        y = null_labels(self.num_classes, t.shape[0])
      temb = temb + nn.Embed(self.num_classes + 1, self.ch * 4, dtype=self.dtype,
                             name="class_emb")(y)

    hs = [conv3(self.ch, name="conv_in")(x)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = resblock(self.ch * mult, hs[-1])
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        if self.resample == "pool":
          hs.append(nn.avg_pool(hs[-1], (2, 2), (2, 2)))
        else:
          hs.append(conv3(hs[-1].shape[-1], strides=2, padding=pad)(hs[-1]))

    h = resblock(hs[-1].shape[-1], hs[-1])
    h = mid_attn(h)
    h = resblock(h.shape[-1], h)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = resblock(self.ch * mult, jnp.concatenate([h, hs.pop()], -1))
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
      if level != 0:
        B, H, W, C = h.shape
        if self.resample == "pool":
          h = jax.image.resize(h, (B, 2 * H, 2 * W, C), "bilinear")
        else:
          h = conv3(C)(jax.image.resize(h, (B, 2 * H, 2 * W, C), "nearest"))
    assert not hs
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(h))
    return conv3(self.out_ch, init=zero_init, name="conv_out")(h).astype(jnp.float32)


def null_labels(num_classes: int, n: int) -> jax.Array:
  """``n`` copies of the null label ("no class": classifier-free guidance's unconditional
  branch), the index ``num_classes``, the class embedding's extra last row. The one place
  this rule is written."""
  return jnp.full((n,), num_classes, jnp.int32)


def create_model(config) -> UNet:
  """Builds the U-Net from a complete config (``config_lib.complete``: every field there;
  uses ``config.model`` and ``config.data``)."""
  m = config.model
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype]
  return UNet(ch=m.ch, out_ch=config.data.num_channels, ch_mult=tuple(m.ch_mult),
              num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
              dropout=m.dropout, num_heads=m.num_heads, num_groups=m.num_groups, dtype=dtype,
              num_classes=m.num_classes, time_conditioning=m.time_conditioning,
              attention=m.attention, resample=m.resample,
              downsample_padding=_downsample_padding(m.downsample_padding), remat=m.remat)


def _downsample_padding(value: str) -> str:
  if value not in DOWNSAMPLE_PADDINGS:
    raise ConfigError(f"model.downsample_padding={value!r}: use one of {DOWNSAMPLE_PADDINGS}")
  return value


def init_params(model: UNet, key: jax.Array, image_size: int, channels: int = 3):
  """Initialises parameters with a batch of one (shapes only depend on the image size)."""
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return model.init({"params": key}, x, t, t if model.num_classes else None,
                    train=False)["params"]


def apply(model: UNet, params, x, t, y=None, *, train: bool = False, dropout_key=None):
  """The network's output for noisy images ``x`` at timesteps ``t`` (labels ``y``).

  ``dropout_key``: one key for the batch, or one per example (shape (B,)): then each
  example's dropout masks are a function of its own key only (the network is vmapped over
  the examples), so a batch split into microbatches or over devices drops the same units.
  Without dropout (rate 0 or ``train=False``) the keys are not read and nothing is vmapped.
  """
  if dropout_key is not None and _is_key_batch(dropout_key):
    if not (train and getattr(model, "dropout", 0.0) > 0):
      dropout_key = None
    else:
      one = lambda xi, ti, yi, ki: model.apply(  # noqa: E731
          {"params": params}, xi[None], ti[None], None if yi is None else yi[None],
          train=True, rngs={"dropout": ki})[0]
      return jax.vmap(one)(x, t, y, dropout_key)
  rngs = {"dropout": dropout_key} if dropout_key is not None else None
  return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)


def _is_key_batch(key) -> bool:
  """A 1-D array of typed keys, or a 2-D array of raw uint32 keys."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim == (1 if typed else 2)


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
