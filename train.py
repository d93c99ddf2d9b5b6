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

from flaxcap import checkpoints  # noqa: E402
from flaxcap import errors  # noqa: E402
from flaxcap import train_lib  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/flickr8k.py", "Training configuration file.")
flags.DEFINE_string("workdir", None, "Checkpoints, feature cache and logs go here "
                    "(default: runs/<config file name>).")


def _exit_with_error(message: str, code: int) -> None:
  print(f"train.py: error: {message}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv):
  """absl's flag parsing, with two errors ml_collections raises as tracebacks made one line each."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # an override of a field the config lacks
    _exit_with_error("a --config.<field> override names a field the config does not have "
                     f"({str(e).strip(chr(34))})", 2)
  except SyntaxError as e:  # in the config file
    _exit_with_error(f"--config {e.filename}: cannot be loaded (SyntaxError: {e.msg}, line {e.lineno})",
                     2)


def _config():
  """The --config file's ConfigDict, or one line naming the file and why it did not load."""
  config_path = flags.FLAGS["config"].config_filename
  if not os.path.isfile(config_path):
    _exit_with_error(f"--config {config_path}: no such file", 2)
  try:
    return flags.FLAGS.config
  except OSError as e:  # ml_collections defers the load's error to the first access
    cause = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    _exit_with_error(f"--config {config_path}: cannot be loaded ({cause})", 2)


def main(argv):
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _config()
  config_path = flags.FLAGS["config"].config_filename
  workdir = flags.FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path))[0])
  try:
    train_lib.train_and_evaluate(config, workdir)
  except errors.FlaxcapError as e:
    _exit_with_error(str(e), 1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
