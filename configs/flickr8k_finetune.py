"""The cross-entropy run of configs/flickr8k.py continued with Lite0's last stages fine-tuned.

    python train.py --config configs/flickr8k.py --workdir runs/flickr8k            # first
    python train.py --config configs/flickr8k_finetune.py --workdir runs/flickr8k_finetune

Stages 7 (MBConv k3, 320 channels) and 8 (the 1x1 head conv, 1280 channels) train with the decoder;
stages 0-6 stay frozen and their output (7x7x192 at 224 px) is cached once, so a step runs only the
tail and the decoder, without TensorFlow (`flaxcap/train_data.py`).
"""

from configs import flickr8k


def get_config():
  config = flickr8k.get_config()
  config.init_checkpoint = "runs/flickr8k/checkpoints"  # the last cross-entropy epoch
  config.encoder.trainable_stages = (7, 8)
  config.encoder.learning_rate = 1e-4
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 200
  config.num_epochs = 3
  return config
