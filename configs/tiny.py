"""A model small enough to train in seconds on a CPU, for tests and smoke runs."""

from configs import default


def get_config():
  config = default.get_config()
  config.image_size = 64
  config.encoder.weights = "imagenet"  # real features: the tiny decoder can then tell shapes apart
  config.decoder.embed_dim = 32
  config.decoder.hidden_dim = 32
  config.decoder.attention_dim = 32
  config.decoder.dropout_rate = 0.0
  config.vocab.min_count = 1
  config.data.max_len = 12
  config.batch_size = 8
  config.num_epochs = 2
  config.optimizer.warmup_steps = 0
  config.eval.batch_size = 8
  config.eval.max_len = 10
  config.checkpoint.every_steps = 10
  config.log_every_steps = 5
  return config
