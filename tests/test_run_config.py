"""Tests for flaxcap.run_config: a training config's counts are checked before any data is read."""

import pytest

from configs import tiny
import shapes_data
from flaxcap import errors
from flaxcap import run_config
from flaxcap import train_lib


def _config(**overrides):
  """tiny.py's config with `overrides` by dotted name ("eval.patience")."""
  return shapes_data.tiny_config(**{name.replace(".", "__"): value for name, value in overrides.items()})


def test_the_shipped_configs_pass():
  from configs import default, flickr8k, flickr8k_scst  # pylint: disable=g-import-not-at-top
  for module in (tiny, default, flickr8k, flickr8k_scst):
    run_config.check(module.get_config())


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "config.batch_size=0 must be a whole number >= 1"),
    ("batch_size", -8, "config.batch_size=-8 must be"),
    ("num_epochs", 0, "config.num_epochs=0 must be"),
    ("checkpoint.every_steps", 0, "config.checkpoint.every_steps=0 must be"),
    ("eval.every_epochs", 0, "config.eval.every_epochs=0 must be"),
    ("eval.batch_size", 0, "config.eval.batch_size=0 must be"),
    ("eval.patience", -1, "config.eval.patience=-1 must be a whole number >= 0"),
    ("self_critical.num_samples", -2, "config.self_critical.num_samples=-2 must be"),
    ("data.max_len", 1, "config.data.max_len=1 must be >= 2"),
    ("batch_size", 6, "config.batch_size=6 must be a positive multiple of the 4 devices"),
])
def test_a_field_out_of_range_is_named(field, value, message):
  with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(")):
    run_config.check(_config(**{field: value}))


def test_train_and_evaluate_checks_before_reading_data(tmp_path):
  config = _config(**{"eval.every_epochs": 0})
  config.data.root = str(tmp_path / "no_data_here")  # would be a DataError if it were read
  with pytest.raises(errors.ConfigError, match="eval.every_epochs"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
