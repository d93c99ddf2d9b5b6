"""The shipped model's second stage: self-critical training of the configs/flickr8k.py run on CIDEr-D.

    python train.py --config configs/flickr8k.py        # cross-entropy: runs/flickr8k
    python train.py --config configs/flickr8k_scst.py   # then this, from its last checkpoint

The shipped model ran these 20 epochs on an H200 in about 3 minutes (6-7 s an epoch with a beam-3 dev
evaluation, two runs side by side; the best, epoch 15, was kept); on a 2-core CPU an epoch takes
12-35 minutes. The reward scores caption endings (`config.self_critical.reward_end`, default on).
"""

from configs import flickr8k


def get_config():
  config = flickr8k.get_config()
  config.self_critical.num_samples = 5
  config.init_checkpoint = "runs/flickr8k/checkpoints"  # the last cross-entropy epoch
  config.batch_size = 32  # images a step, each sampled 5 times
  config.num_epochs = 20
  config.optimizer.learning_rate = 5e-5
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 300
  config.eval.beam_size = 3  # select on what infer.py reports
  config.eval.patience = 0  # dev CIDEr is noisy (+-0.01 an epoch); keep the best of all 20
  config.checkpoint.every_steps = 200
  return config
