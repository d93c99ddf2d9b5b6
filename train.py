"""Trains a captioner: `python train.py --config configs/flickr8k.py --workdir runs/flickr8k`.

Config fields can be overridden the ml_collections way, e.g. `--config.batch_size=128`. A run restarted
with the same --workdir resumes from its latest checkpoint.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flaxcap import errors  # noqa: E402
from flaxcap import train_lib  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/flickr8k.py", "Training configuration file.")
flags.DEFINE_string("workdir", None, "Checkpoints, feature cache and logs go here "
                    "(default: runs/<config file name>).")


def _quiet_orbax(record) -> bool:
  """Drops orbax's INFO chatter (a dozen lines per save) from the log."""
  return record.levelno > logging.converter.ABSL_INFO or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config_path = flags.FLAGS["config"].config_filename
  workdir = flags.FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path))[0])
  try:
    train_lib.train_and_evaluate(flags.FLAGS.config, workdir)
  except errors.FlaxcapError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
