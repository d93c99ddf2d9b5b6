"""Tests for flaxcap.images: every mode to RGB, and one clear error for every broken file."""

import io
import pathlib
import subprocess
import sys

import data_fixtures
import numpy as np
from PIL import Image
import pytest

from flaxcap import errors
from flaxcap import images

SIZE = (40, 30)  # width, height


def _decode(tmp_path, kind, **kwargs):
  path = data_fixtures.write_image(tmp_path / f"{kind}.img", kind, seed=3, size=SIZE)
  return images.decode_image(path, **kwargs)


@pytest.mark.parametrize("kind", data_fixtures.GOOD_KINDS)
def test_every_good_kind_decodes_to_uint8_rgb(tmp_path, kind):
  decoded = _decode(tmp_path, kind)
  assert decoded.dtype == np.uint8 and decoded.shape == (30, 40, 3)


@pytest.mark.parametrize("kind, max_mean_error", [
    ("rgb_jpeg", 3.0), ("cmyk_jpeg", 3.0), ("bmp", 0.0), ("png16_rgb", 0.0)])
def test_colour_kinds_keep_the_picture(tmp_path, kind, max_mean_error):
  expected = data_fixtures.pixels(3, SIZE).astype(float)
  assert np.abs(_decode(tmp_path, kind) - expected).mean() <= max_mean_error


def test_gray_kinds_give_three_equal_channels(tmp_path):
  expected = data_fixtures.pixels(3, SIZE)[:, :, 0]
  png16 = _decode(tmp_path, "png16_gray")
  np.testing.assert_array_equal(png16, np.repeat(expected[:, :, None], 3, axis=2))
  gray_jpeg = _decode(tmp_path, "gray_jpeg")
  np.testing.assert_array_equal(gray_jpeg[:, :, 0], gray_jpeg[:, :, 2])
  luminance = np.asarray(Image.fromarray(data_fixtures.pixels(3, SIZE)).convert("L"), float)
  assert np.abs(gray_jpeg[:, :, 0] - luminance).mean() < 3


def test_sixteen_bit_gray_scales_down_not_clips(tmp_path):
  ramp = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64746
  path = tmp_path / "ramp.png"
  path.write_bytes(data_fixtures.png_bytes(ramp))
  decoded = images.decode_image(path)[:, :, 0].astype(int)
  np.testing.assert_array_equal(decoded, np.round(ramp / 257.0).astype(int))


def test_alpha_is_composited_over_white(tmp_path):
  decoded = _decode(tmp_path, "rgba_png")
  assert (decoded[:, :20] == 255).all()
  np.testing.assert_array_equal(decoded[:, 20:], data_fixtures.pixels(3, SIZE)[:, 20:])
  palette = _decode(tmp_path, "palette_png_transparent")
  source = Image.open(io.BytesIO(data_fixtures.image_bytes("palette_png_transparent", 3, SIZE)))
  transparent = np.asarray(source) == 0
  assert transparent.any() and (palette[transparent] == 255).all()


def test_animated_gif_gives_its_first_frame(tmp_path):
  decoded = _decode(tmp_path, "gif_animated").astype(float)
  first = data_fixtures.pixels(3, SIZE).astype(float)
  assert np.abs(decoded - first).mean() < np.abs(decoded - (255 - first)).mean() / 4


@pytest.mark.parametrize("kind, message", [
    ("truncated_jpeg", "truncated or corrupt"),
    ("garbled_jpeg", "truncated or corrupt|not an image"),
    ("empty", "empty file"),
    ("text", "not an image"),
    ("bomb_png", "decompression bomb"),
])
def test_broken_files_raise_one_line_image_error_naming_the_file(tmp_path, kind, message):
  path = data_fixtures.write_image(tmp_path / "broken.jpg", kind)
  with pytest.raises(errors.ImageError, match=message) as info:
    images.decode_image(path)
  text = str(info.value)
  assert text.startswith(str(path) + ": ") and "\n" not in text


def test_missing_file_and_folder(tmp_path):
  with pytest.raises(errors.ImageError, match="file not found"):
    images.decode_image(tmp_path / "nope.jpg")
  with pytest.raises(errors.ImageError, match="folder"):
    images.decode_image(tmp_path)


def test_max_pixels_limit(tmp_path):
  with pytest.raises(errors.ImageError, match="over the limit of 1000"):
    _decode(tmp_path, "rgb_jpeg", max_pixels=1000)
  assert _decode(tmp_path, "rgb_jpeg", max_pixels=1200).shape == (30, 40, 3)


def test_decode_image_bytes_names_the_source():
  with pytest.raises(errors.ImageError, match="^upload-7: empty file"):
    images.decode_image_bytes(b"", name="upload-7")
  decoded = images.decode_image_bytes(data_fixtures.image_bytes("bmp", 3, SIZE))
  np.testing.assert_array_equal(decoded, data_fixtures.pixels(3, SIZE))


def test_exif_orientation(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  path = tmp_path / "rotated.jpg"
  Image.fromarray(data_fixtures.pixels(3, SIZE)).save(path, "JPEG", exif=exif.tobytes())
  assert images.decode_image(path).shape == (40, 30, 3)
  assert images.decode_image(path, exif_transpose=False).shape == (30, 40, 3)


def test_draft_size_decodes_large_jpeg_smaller_but_not_below_the_size(tmp_path):
  path = data_fixtures.write_image(tmp_path / "large.jpg", "rgb_jpeg", size=(400, 300))
  assert images.decode_image(path).shape == (300, 400, 3)
  assert images.decode_image(path, draft_size=100).shape == (150, 200, 3)
  assert images.decode_image(path, draft_size=64).shape == (75, 100, 3)


def _triangle_resize_1d(values, out_size):
  """Reference antialiased bilinear resize along axis 0: a triangle filter widened by the shrink factor."""
  in_size = values.shape[0]
  scale = in_size / out_size
  support = max(scale, 1.0)
  out = []
  for i in range(out_size):
    center = (i + 0.5) * scale - 0.5
    j = np.arange(in_size)
    weights = np.maximum(0.0, 1.0 - np.abs(j - center) / support)
    out.append(np.tensordot(weights / weights.sum(), values, axes=1))
  return np.stack(out)


def _triangle_resize(image, size):
  rows = _triangle_resize_1d(image.astype(float), size)
  return np.swapaxes(_triangle_resize_1d(np.swapaxes(rows, 0, 1), size), 0, 1)


def test_resize_and_load_image(tmp_path):
  constant = np.full((30, 40, 3), 77, np.uint8)
  resized = images.resize(constant, 16)
  assert resized.shape == (16, 16, 3) and resized.dtype == np.uint8 and (resized == 77).all()
  picture = data_fixtures.pixels(1, (64, 64))
  np.testing.assert_array_equal(images.resize(picture, 64), picture)
  for size in (32, 20, 96):  # Pillow rounds to uint8 between its two passes: off by up to ~1
    error = np.abs(images.resize(picture, size) - _triangle_resize(picture, size))
    assert error.max() <= 1.5 and error.mean() < 0.5
  path = data_fixtures.write_image(tmp_path / "a.png", "rgba_png", size=(50, 20))
  loaded = images.load_image(path, 24)
  assert loaded.shape == (24, 24, 3) and loaded.dtype == np.uint8


def test_from_array_converts_as_a_file_of_those_pixels_would_be(tmp_path):
  picture = data_fixtures.pixels(2, SIZE)  # uint8 [30, 40, 3]
  gray = picture[:, :, 0]
  for array in (picture, picture / 255.0, (picture / 255).astype(np.float16), picture.astype(np.int32),
                picture.astype(np.uint16) * 257, Image.fromarray(picture)):
    converted = images.from_array(array, "photo")
    assert converted.dtype == np.uint8 and converted.shape == picture.shape
    np.testing.assert_array_equal(converted, picture)
  for array in (gray, gray[:, :, None]):
    np.testing.assert_array_equal(images.from_array(array, "photo"), np.stack([gray] * 3, axis=-1))
  half = np.concatenate([picture, np.full(picture.shape[:2] + (1,), 128, np.uint8)], axis=-1)
  path = tmp_path / "half.png"
  Image.fromarray(half, "RGBA").save(path)
  np.testing.assert_array_equal(images.from_array(half, "photo"), images.decode_image(path))
  mask = np.eye(30, 40, dtype=bool)
  assert set(np.unique(images.from_array(mask, "mask"))) == {0, 255}


@pytest.mark.parametrize("array, message", [
    (np.full((4, 4, 3), 2.0), r"photo: float64 values must be finite and in \[0, 1\] \(found 2..2\)"),
    (np.full((4, 4, 3), np.nan, np.float32), "photo: float32 values must be finite"),
    (np.full((4, 4, 3), -1, np.int16), r"photo: int16 values must be in 0..255"),
    (np.zeros((1, 4, 4, 3), np.uint8), r"photo: an array of shape \(1, 4, 4, 3\) is not an image"),
    (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
    (np.zeros((0, 4, 3), np.uint8), "photo: image has no pixels"),
    (np.array([["a"]]), "photo: an array of <U1 is not an image"),
])
def test_from_array_refuses_what_is_not_an_image_in_one_line(array, message):
  with pytest.raises(errors.ImageError, match=message) as raised:
    images.from_array(array, "photo")
  assert "\n" not in str(raised.value)


def test_images_module_does_not_import_tensorflow():
  code = "import sys, flaxcap.images; assert 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])


def test_from_array_rounds_floats_and_uint16_to_the_nearest_level():
  floats = np.array([[0.0, 0.999, 0.5 / 255 + 1e-6, 1.0]], np.float32)
  np.testing.assert_array_equal(images.from_array(floats, "f")[..., 0],
                                np.round(floats * 255).astype(np.uint8))
  wide = np.array([[0, 383, 65280, 65535, 32768]], np.uint16)
  np.testing.assert_array_equal(images.from_array(wide, "u")[..., 0],
                                np.round(wide.astype(np.float64) * 255 / 65535).astype(np.uint8))
