"""Attention overlays: the photo with each word's attention map, one panel per word."""

import math
import os

import matplotlib
matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def upsample_attention(attention: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear upsampling of one word's attention [h, w] to the photo's [height, width], scaled to [0, 1]."""
  peak = float(attention.max()) or 1.0
  grid = Image.fromarray((attention / peak * 255).astype(np.uint8))
  return np.asarray(grid.resize(size[::-1], Image.BILINEAR), np.float32) / 255.0


def save_attention_overlay(image: np.ndarray, words: list[str], attention: np.ndarray,
                           path: str | os.PathLike, *, columns: int = 5, title: str = "") -> None:
  """Writes a PNG: the photo, then one panel per word with its attention overlaid.

  Args:
    image: uint8 [height, width, 3].
    words: the caption's words (the panels' titles), `<eos>` last if it was generated.
    attention: [len(words), h, w] attention weights over the feature grid.
  """
  panels = len(words) + 1
  rows = math.ceil(panels / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
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
  plt.close(figure)
