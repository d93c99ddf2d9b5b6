"""Stage 4 of the shipped model: self-critical training continued from the weight soup.

    python export.py --checkpoint runs/flickr8k_scst --checkpoint runs/flickr8k_scst_2e-4 \
        --checkpoint runs/flickr8k_scst_10 --out runs/soup   # the soup of three self-critical runs
    python train.py --config configs/flickr8k_scst_soup.py  # then this, from the soup

Same reward and sampling as configs/flickr8k_scst.py, at 5e-5 after a 50-step warm-up. On a 2-core
CPU an epoch takes about 9.5 minutes with its beam-3 dev evaluation; stage 4 is its best
epoch (the 5th). The README's Quality section has every stage and its dev scores.
"""

from configs import flickr8k_scst


def get_config():
  config = flickr8k_scst.get_config()
  config.init_checkpoint = "runs/soup"  # an exported model directory (params, config, vocabulary)
  config.optimizer.warmup_steps = 50
  config.num_epochs = 12
  return config
