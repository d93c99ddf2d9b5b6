"""Attention overlays: the photo with each word's attention map, one panel per word."""

import io
import math
import os

import matplotlib
matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from flaxcap import errors  # noqa: E402


def upsample_attention(attention: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear upsampling of one word's attention [h, w] to the photo's [height, width], scaled to [0, 1]."""
  peak = float(attention.max()) or 1.0
  grid = Image.fromarray((attention / peak * 255).astype(np.uint8))
  return np.asarray(grid.resize(size[::-1], Image.BILINEAR), np.float32) / 255.0


def blend_attention(image: np.ndarray, word_attention: np.ndarray, *, alpha: float = 0.5,
                    colormap: str = "jet") -> np.ndarray:
  """The photo with one word's attention coloured over it, as `save_attention_overlay` draws a panel.

  Args:
    image: uint8 [height, width, 3].
    word_attention: [h, w] attention weights over the feature grid (upsampled, scaled to its peak).
    alpha: weight of the colour map (0 = the photo alone).
    colormap: a matplotlib colour map name.

  Returns:
    uint8 [height, width, 3].
  """
  heat = upsample_attention(np.asarray(word_attention, np.float32), image.shape[:2])
  colours = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
  blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
  return np.clip(blended.round(), 0, 255).astype(np.uint8)


def encode_image(image: np.ndarray, *, image_format: str = "PNG", quality: int = 90) -> bytes:
  """uint8 [height, width, 3] as encoded file bytes ("PNG", or "JPEG" at `quality`)."""
  buffer = io.BytesIO()
  options = {"quality": quality} if image_format.upper() == "JPEG" else {}
  Image.fromarray(image).save(buffer, format=image_format, **options)
  return buffer.getvalue()


def save_attention_overlay(image: np.ndarray, words: list[str], attention: np.ndarray,
                           path: str | os.PathLike, *, columns: int = 5, title: str = "") -> None:
  """Writes a PNG: the photo, then one panel per word with its attention overlaid.

  Args:
    image: uint8 [height, width, 3].
    words: the caption's words (the panels' titles), `<eos>` last if it was generated.
    attention: [len(words), h, w] attention weights over the feature grid.

  Raises:
    errors.ConfigError: the arrays do not have those shapes, or the file cannot be written.
  """
  image, attention = np.asarray(image), np.asarray(attention)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise errors.ConfigError(f"{path}: the photo must be uint8 [height, width, 3], not "
                             f"{image.dtype} {list(image.shape)}")
  if attention.ndim != 3 or len(attention) != len(words):
    raise errors.ConfigError(f"{path}: attention {list(attention.shape)} for {len(words)} words; "
                             "expected [words, h, w]")
  panels = len(words) + 1
  rows = math.ceil(panels / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
  try:
    for axis in axes.flat:
      axis.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title(title or "photo", fontsize=9)
    for axis, word, word_attention in zip(axes.flat[1:], words, attention):
      axis.imshow(image)
      axis.imshow(upsample_attention(word_attention, image.shape[:2]), cmap="jet", alpha=0.5,
                  vmin=0.0, vmax=1.0)
      axis.set_title(word, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
  except OSError as e:
    raise errors.ConfigError(f"{path}: cannot write the overlay ({e.strerror or e})") from None
  finally:
    plt.close(figure)
