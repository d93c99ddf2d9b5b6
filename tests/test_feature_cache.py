"""Tests for flaxcap.feature_cache: a cache is reused only while the config and the image files match."""

import os

import data_fixtures
import numpy as np

from configs import tiny
from flaxcap import datasets
from flaxcap import feature_cache


def _mean_colour(images):
  """A stand-in encoder: each image's mean colour, [batch, 1, 1, 3]."""
  return np.asarray(images, np.float32).mean(axis=(1, 2), keepdims=True)


def test_cache_is_rebuilt_when_an_image_file_changes_under_its_name(tmp_path):
  config = tiny.get_config()
  paths = [data_fixtures.write_image(tmp_path / "images" / f"{k}.png", "rgb_jpeg", seed=k)
           for k in range(3)]
  broken = tmp_path / "images" / "3.png"
  broken.write_bytes(b"not an image")
  records = [datasets.CaptionRecord(str(k), str(path), ("a caption",), "train")
             for k, path in enumerate(paths + [broken])]
  calls = []

  def encode(images):
    calls.append(len(images))
    return _mean_colour(images)

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
