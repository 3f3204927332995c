"""Image helpers: decoding any image file to RGB, crop/resize, [-1, 1] <-> uint8, grids,
and PNG/GIF files written through ``ddpm_jax.fs`` (local or ``gs://``)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageFile

from ddpm_jax import fs

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # allow big photos; bombs beyond are refused


def list_images(folder: str) -> list[str]:
  """Image files under a local ``folder`` (recursive), as sorted relative paths."""
  out = []
  for root, _, files in os.walk(folder):
    for f in files:
      if f.lower().endswith(EXTENSIONS):
        out.append(os.path.relpath(os.path.join(root, f), folder))
  return sorted(out)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats to uint8 (rounded, clipped)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(u8: np.ndarray) -> np.ndarray:
  """uint8 to float32 in [-1, 1], as the model sees data."""
  return np.asarray(u8, np.float32) / 127.5 - 1.0


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to (size, size) with antialiasing (PIL bicubic)."""
  h, w = img.shape[:2]
  if h == w == size:
    return img
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
  out = np.asarray(pil.resize((size, size), Image.BICUBIC, reducing_gap=None))
  return out[..., None] if out.ndim == 2 else out


def load_rgb(path: str, size: int) -> np.ndarray:
  """Decodes any supported image file to uint8 RGB (size, size, 3); raises on a bad file.

  Grayscale, RGBA/LA (over white), palette, CMYK and 16-bit images are converted;
  the image is centre-cropped and resized like training data.
  """
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  with Image.open(io.BytesIO(fs.read_bytes(path)) if fs.is_remote(path) else path) as im:
    if im.format == "JPEG":
      im.draft("RGB", (size * 2, size * 2))  # decode big JPEGs at reduced scale
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
      arr = np.asarray(im, np.float64)
      arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
      im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
      im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
      bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
      im = Image.alpha_composite(bg, im.convert("RGBA"))
    im = im.convert("RGB")
    arr = np.asarray(im)
  if arr.ndim != 3 or min(arr.shape[:2]) < 1:
    raise ValueError(f"unexpected image shape {arr.shape}")
  return center_crop_resize(arr, size)


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


def png_bytes(img: np.ndarray, scale: int = 1) -> bytes:
  buf = io.BytesIO()
  _pil(img, scale).save(buf, format="PNG")
  return buf.getvalue()


def save_png(path: str, img: np.ndarray, scale: int = 1) -> None:
  fs.write_bytes(path, png_bytes(img, scale))


def save_gif(path: str, frames: list[np.ndarray], duration_ms: int = 100, scale: int = 1,
             hold_last_ms: int = 1000) -> None:
  """Writes an animated GIF, one frame per array; the last frame is held longer."""
  pil = [_pil(f, scale) for f in frames]
  durations = [duration_ms] * (len(pil) - 1) + [hold_last_ms]
  buf = io.BytesIO()
  pil[0].save(buf, format="GIF", save_all=True, append_images=pil[1:], duration=durations,
              loop=0, optimize=False, disposal=1)
  fs.write_bytes(path, buf.getvalue())


def display_scale(image_size: int, target: int = 128) -> int:
  """Nearest-neighbour upscaling that makes small images visible in grids and GIFs."""
  return max(1, target // image_size)
