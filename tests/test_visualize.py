"""Tests of flaxcap/visualize.py's overlays: blended in numpy, checked against matplotlib's drawing."""

import io

import matplotlib
from matplotlib import pyplot as plt
import numpy as np
from PIL import Image
import pytest

from flaxcap import visualize


def _random_photo(height=48, width=64, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _matplotlib_overlay(image: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
  """The reference: matplotlib draws the photo, then the heat map through `jet` at `alpha`."""
  height, width = image.shape[:2]
  figure = plt.figure(figsize=(width / 100, height / 100), dpi=100)
  axis = figure.add_axes((0, 0, 1, 1))
  axis.axis("off")
  axis.imshow(image, interpolation="nearest")
  axis.imshow(heat, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest")
  figure.canvas.draw()
  rendered = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
  plt.close(figure)
  return rendered


def test_blend_attention_matches_matplotlib_drawing_the_same_overlay():
  photo = _random_photo()
  word_attention = np.random.default_rng(1).random((3, 4)).astype(np.float32)
  blended = visualize.blend_attention(photo, word_attention, alpha=0.5)
  heat = visualize.upsample_attention(word_attention, photo.shape[:2])
  reference = _matplotlib_overlay(photo, heat, alpha=0.5)
  assert blended.shape == photo.shape and blended.dtype == np.uint8
  difference = np.abs(blended.astype(int) - reference.astype(int))
  assert difference.max() <= 2, difference.max()


def test_blend_attention_peak_is_hot_and_unattended_is_cold():
  photo = np.full((40, 60, 3), 128, np.uint8)
  word_attention = np.zeros((4, 6), np.float32)
  word_attention[0, 0] = 0.7  # scaled to the peak: full heat
  blended = visualize.blend_attention(photo, word_attention, alpha=0.5)
  jet = matplotlib.colormaps["jet"]
  np.testing.assert_allclose(blended[0, 0], 64 + 127.5 * np.asarray(jet(1.0)[:3]), atol=1)
  np.testing.assert_allclose(blended[-1, -1], 64 + 127.5 * np.asarray(jet(0.0)[:3]), atol=1)


def test_blend_attention_with_alpha_zero_is_the_photo():
  photo = _random_photo(seed=2)
  word_attention = np.random.default_rng(3).random((2, 2))
  np.testing.assert_array_equal(visualize.blend_attention(photo, word_attention, alpha=0.0), photo)


def test_encode_image_png_is_lossless_and_jpeg_is_close():
  photo = np.asarray(Image.fromarray(_random_photo(3, 4, seed=4)).resize((128, 96)))  # smooth
  png = visualize.encode_image(photo)
  assert png.startswith(b"\x89PNG")
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), photo)
  jpeg = visualize.encode_image(photo, image_format="JPEG", quality=95)
  assert jpeg.startswith(b"\xff\xd8")
  decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
  assert np.abs(decoded - photo).mean() < 3


def test_save_attention_overlay_checks_its_inputs_and_closes_its_figure(tmp_path):
  from flaxcap import errors  # pylint: disable=g-import-not-at-top
  photo = np.zeros((40, 60, 3), np.uint8)
  maps = np.random.default_rng(0).random((2, 7, 7)).astype(np.float32)
  visualize.save_attention_overlay(photo, ["a", "dog"], maps, tmp_path / "ok.png")
  assert Image.open(tmp_path / "ok.png").size[0] > 100
  for image, words, attention, message in (
      (photo, ["a", "dog", "runs"], maps, r"attention \[2, 7, 7\] for 3 words"),
      (photo, ["a"], maps, r"attention \[2, 7, 7\] for 1 words"),
      (photo, ["a", "dog"], maps[0], r"attention \[7, 7\] for 2 words"),
      (photo.astype(np.float32), ["a", "dog"], maps, r"uint8 \[height, width, 3\], not float32")):
    with pytest.raises(errors.ConfigError, match=message):
      visualize.save_attention_overlay(image, words, attention, tmp_path / "bad.png")
  with pytest.raises(errors.ConfigError, match="no_folder/x.png: cannot write the overlay"):
    visualize.save_attention_overlay(photo, ["a", "dog"], maps, tmp_path / "no_folder" / "x.png")
  assert not (tmp_path / "bad.png").exists() and not plt.get_fignums()


def test_upsampled_attention_peaks_at_one_for_any_grid():
  rng = np.random.default_rng(0)
  for h, w in ((2, 3), (7, 7), (14, 14)):
    attention = rng.random((h, w)).astype(np.float32)
    attention /= attention.sum()  # softmax weights: they sum to 1
    heat = visualize.upsample_attention(attention, (56, 84))
    assert heat.shape == (56, 84)
    assert 0.95 < float(heat.max()) <= 1.0, (h, w, heat.max())  # bilinear, uint8 steps
    # The map keeps its shape: the hottest upsampled pixel lies in the grid's hottest cell.
    row, column = np.unravel_index(heat.argmax(), heat.shape)
    cell = (row * h // 56, column * w // 84)
    assert attention[cell] >= np.sort(attention.reshape(-1))[-2] - 1e-6
  uniform = visualize.upsample_attention(np.full((7, 7), 1 / 49, np.float32), (20, 20))
  np.testing.assert_allclose(uniform, 1.0, atol=2 / 255)


def test_overlay_panels_upsample_each_map_to_the_photos_height_and_width(tmp_path, monkeypatch):
  sizes = []
  original = visualize.upsample_attention

  def recording(attention, size):
    sizes.append(tuple(size))
    return original(attention, size)

  monkeypatch.setattr(visualize, "upsample_attention", recording)
  photo = np.zeros((40, 90, 3), np.uint8)  # not square: height 40, width 90
  attention = np.full((2, 3, 3), 1 / 9, np.float32)
  visualize.save_attention_overlay(photo, ["a", "dog"], attention, tmp_path / "overlay.png")
  assert sizes == [(40, 90), (40, 90)]
