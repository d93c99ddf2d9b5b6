"""The shipped model's second stage: self-critical training of the configs/flickr8k.py run on CIDEr-D.

    python train.py --config configs/flickr8k.py        # cross-entropy: runs/flickr8k
    python train.py --config configs/flickr8k_scst.py   # then this, from its last checkpoint

The shipped model ran these 10 epochs on an H200 in about a minute (6 s an epoch with a beam-3 dev
evaluation); on a 2-core CPU an epoch takes 12-35 minutes.
"""

from configs import flickr8k


def get_config():
  config = flickr8k.get_config()
  config.self_critical.num_samples = 5
  config.self_critical.init_checkpoint = "runs/flickr8k/checkpoints"  # the last cross-entropy epoch
  config.batch_size = 32  # images a step, each sampled 5 times
  config.num_epochs = 10
  config.optimizer.learning_rate = 5e-5
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.eval.beam_size = 3  # select on what infer.py reports
  config.checkpoint.every_steps = 200
  return config
