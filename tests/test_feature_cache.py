"""Tests for flaxcap.feature_cache: a cache is reused only while the config and the image files match."""

import os

import data_fixtures
import numpy as np

from configs import tiny
from flaxcap import datasets
from flaxcap import feature_cache
import pytest
from flaxcap import images as images_lib


def _mean_colour(images):
  """A stand-in encoder: each image's mean colour, [batch, 1, 1, 3]."""
  return np.asarray(images, np.float32).mean(axis=(1, 2), keepdims=True)


def _counting_encoder():
  """([], encode): `_mean_colour`, appending each call's batch size to the list."""
  calls = []

  def encode(images):
    calls.append(len(images))
    return _mean_colour(images)

  return calls, encode


def test_cache_is_rebuilt_when_an_image_file_changes_under_its_name(tmp_path):
  config = tiny.get_config()
  paths = [data_fixtures.write_image(tmp_path / "images" / f"{k}.png", "rgb_jpeg", seed=k)
           for k in range(3)]
  broken = tmp_path / "images" / "3.png"
  broken.write_bytes(b"not an image")
  records = [datasets.CaptionRecord(str(k), str(path), ("a caption",), "train")
             for k, path in enumerate(paths + [broken])]
  calls, encode = _counting_encoder()
  first, kept = feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  assert [r.image_id for r in kept] == ["0", "1", "2"] and len(calls) == 1
  again, kept = feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  assert len(calls) == 1 and len(kept) == 3  # the same files: read from the cache
  np.testing.assert_array_equal(again, first)
  # The broken image repaired, and another replaced, under the same names: encoded again.
  data_fixtures.write_image(broken, "rgb_jpeg", seed=7)
  data_fixtures.write_image(paths[0], "rgb_jpeg", seed=8)
  os.utime(paths[0], ns=(1, 1))  # a new size or modification time, either one, is a change
  repaired, kept = feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  assert len(calls) == 2 and [r.image_id for r in kept] == ["0", "1", "2", "3"]
  assert not np.array_equal(repaired[0], first[0])
  np.testing.assert_array_equal(repaired[1:3], first[1:3])


def _records(folder, count, broken=()):
  records = []
  for k in range(count):
    path = folder / f"{k}.png"
    if k in broken:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(b"not an image")
    else:
      data_fixtures.write_image(path, "rgb_jpeg", seed=k)
    records.append(datasets.CaptionRecord(str(k), str(path), ("a caption",), "train"))
  return records


def _expected_rows(records, image_size):
  """Each record's mean colour from Pillow directly: [n, 1, 3] float16."""
  return np.stack([_mean_colour(images_lib.load_image(r.image_path, image_size=image_size)[None])[0]
                   .reshape(1, 3) for r in records]).astype(np.float16)


@pytest.mark.parametrize("field, value", [("image_size", 48), ("encoder.weights", "none"),
                                          ("encoder.feature_stage", -2),
                                          ("encoder.name", "vgg16")])
def test_a_cache_is_rebuilt_when_any_described_setting_changes(tmp_path, field, value):
  records = _records(tmp_path / "images", 2)
  calls, encode = _counting_encoder()
  config = tiny.get_config()
  feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  assert len(calls) == 1
  owner = config
  *parents, name = field.split(".")
  for parent in parents:
    owner = getattr(owner, parent)
  assert getattr(owner, name) != value
  setattr(owner, name, value)
  feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  assert len(calls) == 2, f"{field} changed but the cache was reused"


def test_a_file_touched_under_the_same_size_makes_the_cache_stale(tmp_path):
  records = _records(tmp_path / "images", 2)
  calls, encode = _counting_encoder()
  config = tiny.get_config()
  feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  stat = os.stat(records[1].image_path)
  os.utime(records[1].image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert os.stat(records[1].image_path).st_size == stat.st_size
  feature_cache.cached_features(tmp_path / "run", config, "train", records, encode)
  assert len(calls) == 2


def test_rows_of_unreadable_images_are_left_out_between_readable_ones(tmp_path):
  config = tiny.get_config()
  records = _records(tmp_path / "images", 5, broken=(1, 3))
  for attempt in ("fresh", "cached"):
    table, kept = feature_cache.cached_features(tmp_path / "run", config, "train", records,
                                                _mean_colour)
    assert [r.image_id for r in kept] == ["0", "2", "4"], attempt
    assert table.shape == (3, 1, 3), attempt
    np.testing.assert_allclose(np.asarray(table, np.float32),
                               _expected_rows(kept, config.image_size), rtol=2e-3, err_msg=attempt)


def test_encode_records_over_several_batches_keeps_each_row_its_own_image(tmp_path):
  records = _records(tmp_path / "images", 7, broken=(4,))
  features, valid = feature_cache.encode_records(records, _mean_colour, image_size=32, batch_size=2,
                                                 num_threads=2)
  assert features.shape == (7, 1, 3)
  np.testing.assert_array_equal(valid, [k != 4 for k in range(7)])
  good = [r for k, r in enumerate(records) if k != 4]
  np.testing.assert_allclose(np.asarray(features[valid], np.float32), _expected_rows(good, 32),
                             rtol=2e-3)
  assert not features[4].any()
