"""Flickr8k with a frozen EfficientNet-Lite0 and cached features: the shipped model's recipe."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.layout = "flickr8k"
  config.data.root = "../shared/data/flickr8k"
  config.data.captions_per_epoch = "all"  # every caption is an example: 30,000 per epoch
  config.num_epochs = 5  # about 45 minutes on 2 CPU cores after the 5-minute feature cache
  return config
