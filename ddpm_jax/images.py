"""Image helpers: [-1, 1] floats to uint8, grids, PNG and GIF files."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats to uint8 (rounded, clipped)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles (N, H, W, C) uint8 images into one (rows*H', cols*W', C) image."""
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid


def _pil(img: np.ndarray, scale: int = 1) -> Image.Image:
  im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
  return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def save_png(path: str, img: np.ndarray, scale: int = 1) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  _pil(img, scale).save(path)


def save_gif(path: str, frames: list[np.ndarray], duration_ms: int = 100, scale: int = 1,
             hold_last_ms: int = 1000) -> None:
  """Writes an animated GIF, one frame per array; the last frame is held longer."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  pil = [_pil(f, scale) for f in frames]
  durations = [duration_ms] * (len(pil) - 1) + [hold_last_ms]
  pil[0].save(path, save_all=True, append_images=pil[1:], duration=durations, loop=0,
              optimize=False, disposal=1)
