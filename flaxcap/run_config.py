"""Checks a training config's counts before a run reads any data: one line naming the field.

Without it a batch size of 0, `config.eval.every_epochs=0` or `config.checkpoint.every_steps=0` failed
inside numpy or Python (a ZeroDivisionError), some only after a whole epoch of training.
"""

import jax

from flaxcap import epoch_plan
from flaxcap import errors

# Fields that count something and must be at least 1, and those that may be 0 (off).
POSITIVE_FIELDS = ("batch_size", "num_epochs", "log_every_steps", "checkpoint.every_steps",
                   "checkpoint.keep", "eval.batch_size", "eval.every_epochs", "eval.beam_size",
                   "eval.max_len")
NON_NEGATIVE_FIELDS = ("eval.patience", "eval.max_images", "self_critical.num_samples")


def _value(config, dotted: str):
  for name in dotted.split("."):
    config = config[name]
  return config


def check(config) -> None:
  """Raises `errors.ConfigError` for the first field out of range (see the lists above), a caption
  length below 2 tokens, or a batch that does not split evenly over the devices."""
  for fields, minimum in ((POSITIVE_FIELDS, 1), (NON_NEGATIVE_FIELDS, 0)):
    for field in fields:
      value = _value(config, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise errors.ConfigError(f"config.{field}={value!r} must be a whole number >= {minimum}")
  if config.data.max_len < 2:
    raise errors.ConfigError(f"config.data.max_len={config.data.max_len!r} must be >= 2: a caption's "
                             "tokens include <bos> and <eos>")
  epoch_plan.batch_split(config.batch_size, jax.local_device_count(), jax.process_count())
