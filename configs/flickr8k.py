"""Flickr8k with a frozen EfficientNet-Lite0 and cached features."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.layout = "flickr8k"
  config.data.root = "../shared/data/flickr8k"
  return config
