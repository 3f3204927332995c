"""Image helpers: decoding image files to RGB, crop/resize, [-1, 1] <-> uint8, grids,
and PNG/GIF files written through ``ddpm_jax.fs`` (local or ``gs://``).

Every image file we read (training folders, ``sampling.inputs``, masks) goes through
``open_image``: files come from anywhere, so only the formats we list are parsed and no
image is decoded beyond ``MAX_PIXELS`` (a few hundred bytes of PNG can declare gigabytes).
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin

from ddpm_jax import fs

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # the formats of EXTENSIONS; nothing else is parsed
# The most pixels decoded from one file: 64 MP (8192 x 8192) covers camera photos and
# scans, and is ~200 MB as RGB (~1 GB peak with the conversions) per decode, with up to 8 in
# flight during preparation. JPEGs are decoded at reduced scale first (``Image.draft``), so
# this counts their reduced size; PIL's own bomb warning (about 89 MP declared) is an error.
MAX_PIXELS = 64 * 1024 * 1024
# Decodes above this many pixels run at most two at a time (bounds preparation's peak memory).
_BIG_PIXELS = 16 * 1024 * 1024
_BIG_DECODES = threading.BoundedSemaphore(2)
# ``warnings.catch_warnings`` swaps the process-wide filter list: one at a time, or two
# overlapping threads could leave the "error" filter installed for good.
_OPEN_LOCK = threading.Lock()


class ImageRefused(ValueError):
  """An image file that is not decoded: a format we do not read, or too many pixels."""


def list_images(folder: str) -> list[str]:
  """Image files under a local ``folder`` (recursive), as sorted relative paths.

  Symlinked sub-folders are followed; a folder reached twice (a link loop, or two links
  to one folder) is listed once, under the first path found (walked in sorted order).
  Broken links with an image extension are listed: reading them fails, and preparation
  skips and reports them like any unreadable file.
  """
  out, seen = [], {os.path.realpath(folder)}
  for root, dirs, files in os.walk(folder, followlinks=True):
    keep = []
    for d in sorted(dirs):
      real = os.path.realpath(os.path.join(root, d))
      if real not in seen:
        seen.add(real)
        keep.append(d)
    dirs[:] = keep
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


def open_image(path: str, size: int | None = None, mode: str = "RGB") -> Image.Image:
  """The decoded image in file ``path`` (local or gs://), refused (``ImageRefused``) when it
  is not one of FORMATS or has more than MAX_PIXELS; other bad files raise PIL's errors.

  A JPEG is decoded at the smallest power-of-two reduction that keeps both sides at least
  ``2 * size`` (``size`` None: full size).
  """
  data = fs.read_bytes(path) if fs.is_remote(path) else None
  with open(path, "rb") if data is None else io.BytesIO(data) as fp:
    im = _open_checked(fp, path)
    if size and isinstance(im, JpegImagePlugin.JpegImageFile):
      im.draft(mode, (size * 2, size * 2))
    pixels = im.width * im.height
    if pixels > MAX_PIXELS:
      raise ImageRefused(f"{im.width}x{im.height} pixels: more than the {MAX_PIXELS} that "
                         "are decoded; downscale the file first")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if pixels > _BIG_PIXELS:
      with _BIG_DECODES:
        im.load()
    else:
      im.load()
  return im


def _open_checked(fp, path: str) -> Image.Image:
  """``Image.open`` for FORMATS only, with PIL's bomb warning raised as ``ImageRefused``."""
  try:
    with _OPEN_LOCK, warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      return Image.open(fp, formats=FORMATS)
  except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
    raise ImageRefused(f"declares too many pixels ({e})") from None
  except Image.UnidentifiedImageError:
    raise ImageRefused(f"not a {', '.join(FORMATS)} image (the formats read: "
                       f"{', '.join(EXTENSIONS)})") from None


def load_rgb(path: str, size: int) -> np.ndarray:
  """Decodes a supported image file to uint8 RGB (size, size, 3); raises on a bad file.

  Grayscale, RGBA/LA (over white), palette, CMYK and 16-bit images are converted;
  the image is centre-cropped and resized like training data.
  """
  im = open_image(path, size)
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(im, np.float64)
    arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
  if im.mode == "P":
    im = im.convert("RGBA")
  if im.mode in ("RGBA", "LA", "PA"):
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(bg, im.convert("RGBA"))
  arr = np.asarray(im.convert("RGB"))
  if arr.ndim != 3 or min(arr.shape[:2]) < 1:
    raise ValueError(f"unexpected image shape {arr.shape}")
  return center_crop_resize(arr, size)


def load_grey(path: str, size: int) -> np.ndarray:
  """A mask file as uint8 (size, size) grey, resized with nearest neighbours (no crop)."""
  im = open_image(path, size, mode="L")
  return np.asarray(im.convert("L").resize((size, size), Image.NEAREST))


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
