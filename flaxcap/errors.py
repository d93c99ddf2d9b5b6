"""Exception types for errors a user can act on.

Every message names the file, line or field at fault and what to do about it, so that the command-line
tools can print it as one line on stderr and exit non-zero.
"""


class FlaxcapError(Exception):
  """Base class of every error flaxcap raises for bad input or configuration."""


class ConfigError(FlaxcapError):
  """A config field is missing or holds a value flaxcap cannot use."""


class DataError(FlaxcapError):
  """A dataset file or folder is missing, empty or malformed."""


class ImageError(FlaxcapError):
  """An image file cannot be read: missing, not an image, truncated, or too large."""


class CheckpointError(FlaxcapError):
  """A checkpoint directory is missing, incomplete, or does not match the config or vocabulary."""


class WeightsError(FlaxcapError):
  """Pretrained weights are missing or do not fit the model."""


class TrainingError(FlaxcapError):
  """Training cannot go on (for example the loss became NaN)."""
