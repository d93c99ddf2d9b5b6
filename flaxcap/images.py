"""Robust image decoding with Pillow: any image file -> uint8 [height, width, 3], or one clear error.

Used by inference (no TensorFlow here) and as the fallback decoder of the tf.data pipeline. Every mode
becomes RGB: grayscale, palette, CMYK, 16-bit (scaled to 8 bits), and alpha (composited over white).
Animated images give their first frame. Problems raise `errors.ImageError` with a one-line message that
names the file: missing, empty, not an image, truncated or corrupt, or over the pixel limit.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from flaxcap import errors

# Larger images are refused before their pixels are decoded (a "decompression bomb" guard). 100
# megapixels is a 10000x10000 photo; Pillow itself refuses twice its own limit of ~89 megapixels.
MAX_PIXELS = 100_000_000

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _problem(name: str, problem: str) -> errors.ImageError:
  return errors.ImageError(f"{name}: {problem}")


def _sixteen_bit_to_uint8(image: Image.Image) -> np.ndarray:
  """Gray "I;16*", "I" or "F" images as uint8 [height, width]: 16-bit ranges scale to 0..255."""
  values = np.asarray(image)
  if image.mode == "F":
    values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
    return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
  values = values.astype(np.int64)
  if image.mode.startswith("I;16") or values.max(initial=0) > 255:
    values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
  return np.clip(values, 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
  """A decoded Pillow image in any mode as uint8 [height, width, 3]; alpha is composited over white."""
  if image.mode == "RGB":
    return np.asarray(image, dtype=np.uint8)
  if image.mode.startswith("I") or image.mode == "F":
    gray = _sixteen_bit_to_uint8(image)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in _ALPHA_MODES:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open(source, name: str, max_pixels: int) -> Image.Image:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(source)
  except Image.DecompressionBombError as e:
    raise _problem(name, f"too many pixels, refused as a possible decompression bomb ({e})") from None
  except Image.UnidentifiedImageError:
    raise _problem(name, "not an image Pillow can read (unknown or unsupported format)") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise _problem(name, f"truncated or corrupt image header ({e})") from None
  width, height = image.size
  if width * height > max_pixels:
    raise _problem(name, f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}, "
                   "refused as a possible decompression bomb")
  if width == 0 or height == 0:
    raise _problem(name, f"image has no pixels ({width}x{height})")
  return image


def _load(image: Image.Image, name: str, draft_size: int | None, exif_transpose: bool) -> np.ndarray:
  try:
    if getattr(image, "n_frames", 1) > 1:
      image.seek(0)
    if draft_size and image.format == "JPEG":
      image.draft(None, (draft_size, draft_size))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      image.load()
      if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)
  except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
    raise _problem(name, f"truncated or corrupt image data ({e})") from None


def decode_image_bytes(data: bytes, *, name: str = "<bytes>", max_pixels: int = MAX_PIXELS,
                       exif_transpose: bool = True, draft_size: int | None = None) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, BMP, GIF, WebP, TIFF, ...) to RGB.

  Args:
    data: the encoded file contents.
    name: what to call the image in error messages (its path).
    max_pixels: width*height above which the image is refused unread.
    exif_transpose: rotate as the EXIF orientation tag says (what a photo viewer shows).
    draft_size: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as both sides stay
      >= draft_size (much faster for large photos that will be resized anyway).

  Returns:
    uint8 [height, width, 3].

  Raises:
    errors.ImageError: empty, not an image, truncated or corrupt, or too large.
  """
  if not data:
    raise _problem(name, "empty file (0 bytes)")
  image = _open(io.BytesIO(data), name, max_pixels)
  return _load(image, name, draft_size, exif_transpose)


def decode_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, exif_transpose: bool = True,
                 draft_size: int | None = None) -> np.ndarray:
  """Reads and decodes one image file to uint8 [height, width, 3]; see `decode_image_bytes`.

  Raises:
    errors.ImageError: missing, unreadable, empty, not an image, truncated or corrupt, or too large;
      the one-line message starts with the path.
  """
  name = os.fspath(path)
  try:
    with open(name, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    if os.path.islink(name):
      raise _problem(name, f"a symbolic link to a missing file ({os.readlink(name)})") from None
    raise _problem(name, "file not found") from None
  except IsADirectoryError:
    raise _problem(name, "is a folder, not an image file") from None
  except OSError as e:
    raise _problem(name, f"cannot read file ({e.strerror})") from None
  return decode_image_bytes(data, name=name, max_pixels=max_pixels, exif_transpose=exif_transpose,
                            draft_size=draft_size)


def from_array(image, name: str) -> np.ndarray:
  """An in-memory image as uint8 [height, width, 3], converted as a file's pixels would be.

  Accepts a Pillow image, or an array [height, width] (gray), [height, width, 1], [height, width, 3]
  or [height, width, 4] (alpha, composited over white): uint8 or other integers in 0..255, uint16 in
  0..65535 (scaled), bool, or floats in [0, 1] (as the encoders take them).

  Raises:
    errors.ImageError: another shape, or values outside the dtype's range; the message starts with
      `name`.
  """
  if isinstance(image, Image.Image):
    return to_rgb(image)
  try:
    values = np.asarray(image)
  except (TypeError, ValueError) as e:
    raise _problem(name, f"not an image array ({e})") from None
  if values.ndim == 3 and values.shape[2] == 1:
    values = values[:, :, 0]
  if not (values.ndim == 2 or (values.ndim == 3 and values.shape[2] in (3, 4))):
    raise _problem(name, f"an array of shape {values.shape} is not an image: expected [height, "
                   "width], [height, width, 1], [height, width, 3] or [height, width, 4]")
  if values.shape[0] == 0 or values.shape[1] == 0:
    raise _problem(name, f"image has no pixels ({values.shape[1]}x{values.shape[0]})")
  values = _array_to_uint8(values, name)
  if values.ndim == 2:
    return np.repeat(values[:, :, None], 3, axis=2)
  if values.shape[2] == 4:
    return to_rgb(Image.fromarray(values, "RGBA"))
  return values


def _array_to_uint8(values: np.ndarray, name: str) -> np.ndarray:
  if values.dtype == np.uint8:
    return values
  if values.dtype == np.bool_:
    return values.astype(np.uint8) * 255
  if np.issubdtype(values.dtype, np.floating):
    if not np.isfinite(values).all():
      found = "NaN or infinity"
    elif values.min() < 0 or values.max() > 1:
      found = f"{values.min():g}..{values.max():g}"
    else:
      return np.round(values * 255).astype(np.uint8)
    raise _problem(name, f"{values.dtype} values must be finite and in [0, 1] (found {found}); "
                   "pass uint8 for 0..255")
  if np.issubdtype(values.dtype, np.integer):
    top = 65535 if values.dtype == np.uint16 else 255
    if values.min() < 0 or values.max() > top:
      raise _problem(name, f"{values.dtype} values must be in 0..{top} (found "
                     f"{values.min()}..{values.max()})")
    if top == 65535:
      return ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    return values.astype(np.uint8)
  raise _problem(name, f"an array of {values.dtype} is not an image (expected integers or floats)")


def resize(image: np.ndarray, image_size: int) -> np.ndarray:
  """Resizes uint8 [height, width, 3] to [image_size, image_size, 3] (aspect ratio not kept).

  Bilinear with antialiasing when shrinking, like `tf.image.resize(..., antialias=True)` in the
  training pipeline.
  """
  if image.shape[:2] == (image_size, image_size):
    return image
  resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
  return np.asarray(resized, dtype=np.uint8)


def load_image(path: str | os.PathLike, image_size: int, *, max_pixels: int = MAX_PIXELS,
               exif_transpose: bool = True) -> np.ndarray:
  """What inference feeds the encoder: decode `path` and resize to uint8 [image_size, image_size, 3]."""
  return resize(decode_image(path, max_pixels=max_pixels, exif_transpose=exif_transpose,
                             draft_size=image_size), image_size)
