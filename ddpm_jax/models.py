"""The DDPM U-Net (Ho et al. 2020) as a Flax Linen module, NHWC.

Residual blocks with GroupNorm and a sinusoidal timestep embedding, self-attention
over spatial positions at chosen resolutions, dropout, and a channel multiplier and
a number of residual blocks per level. With ch=128, ch_mult=(1, 2, 2, 2),
num_res_blocks=2, attention at 16x16 it is the DDPM CIFAR-10 model (35,746,307
parameters). The network knows nothing of diffusion: it maps (x_t, t) to an
output with x_t's shape.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# DDPM's initialisation: variance scaling over fan-average, uniform; zero for the
# last layer of each residual branch and the output, so each block starts as identity.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


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
  """GroupNorm-SiLU-Conv, plus the projected timestep embedding, twice, with a skip."""
  out_ch: int
  dropout: float = 0.0
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    conv = lambda feat, k, init=default_init, name=None: nn.Conv(  # noqa: E731
        feat, (k, k), padding=k // 2, dtype=self.dtype, kernel_init=init, name=name)
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
    h = conv(self.out_ch, 3, name="conv1")(h)
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init,
                     name="temb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h))
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

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    """Args: x (B, H, W, C) noisy images; t (B,) int timesteps. Returns (B, H, W, out_ch)."""
    res_kw = dict(dropout=self.dropout, num_groups=self.num_groups, dtype=self.dtype)
    attn = lambda h: AttnBlock(self.num_heads, self.num_groups, self.dtype)(h)  # noqa: E731
    conv3 = lambda feat, **kw: nn.Conv(feat, (3, 3), padding=1, dtype=self.dtype,  # noqa: E731
                                       kernel_init=kw.pop("init", default_init), **kw)
    x = x.astype(self.dtype)
    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(self.ch * 4, dtype=self.dtype, kernel_init=default_init, name="temb0")(temb)
    temb = nn.Dense(self.ch * 4, dtype=self.dtype, kernel_init=default_init,
                    name="temb1")(nn.silu(temb))

    hs = [conv3(self.ch, name="conv_in")(x)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, **res_kw)(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        hs.append(conv3(hs[-1].shape[-1], strides=2)(hs[-1]))

    h = ResBlock(hs[-1].shape[-1], **res_kw)(hs[-1], temb, train)
    h = attn(h)
    h = ResBlock(h.shape[-1], **res_kw)(h, temb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * mult, **res_kw)(jnp.concatenate([h, hs.pop()], -1), temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
      if level != 0:
        B, H, W, C = h.shape
        h = jax.image.resize(h, (B, 2 * H, 2 * W, C), "nearest")
        h = conv3(C)(h)
    assert not hs
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(h))
    return conv3(self.out_ch, init=zero_init, name="conv_out")(h).astype(jnp.float32)


def create_model(config) -> UNet:
  """Builds the U-Net from a full config (uses ``config.model`` and ``config.data``)."""
  m = config.model
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.get("dtype", "float32")]
  return UNet(ch=m.ch, out_ch=config.data.get("num_channels", 3), ch_mult=tuple(m.ch_mult),
              num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
              dropout=m.dropout, num_heads=m.get("num_heads", 1),
              num_groups=m.get("num_groups", 32), dtype=dtype)


def init_params(model: UNet, key: jax.Array, image_size: int, channels: int = 3):
  """Initialises parameters with a batch of one (shapes only depend on the image size)."""
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return model.init({"params": key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
