"""Writes a compact inference copy of a trained model.

  python export.py --checkpoint runs/flickr8k --out models/flickr8k

The copy holds float16 decoder params, the config and the vocabulary; `infer.py --checkpoint` and
`Captioner.load()` read it like a training workdir. Several --checkpoint flags write the average of
their parameters (a "model soup" of runs fine-tuned from one model; `checkpoints.average_variables`):

  python export.py --checkpoint runs/scst_a --checkpoint runs/scst_b --out models/flickr8k

--data_root DIR rebuilds the vocabulary's ending rates (`config.eval.min_ending_rate`) from the
training captions under DIR, for models trained before vocabularies kept them.
--consensus_data DIR encodes the training images under DIR and writes the index that
`infer.py --consensus K` reranks the beam with (consensus.npz, `flaxcap.consensus`).
"""

import os
import pathlib
import shutil
import sys

from absl import app
from absl import flags
from absl import logging

from flaxcap import checkpoints
from flaxcap import consensus
from flaxcap import errors

flags.DEFINE_multi_string("checkpoint", None, "Training workdir, checkpoint or exported model; "
                          "repeat to average several.", required=True)
flags.DEFINE_string("out", None, "Directory to write the exported model to.", required=True)
flags.DEFINE_string("data_root", None, "Rebuild the vocabulary's ending rates from the training "
                    "captions under this data root (models trained before vocabularies kept them).")
flags.DEFINE_string("consensus_data", None, "Also index the training images under this data root "
                    "for consensus reranking (infer.py --consensus).")


def _exit_with_error(message: str) -> None:
  print(f"export.py: error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax)
  for flag in ("data_root", "consensus_data"):
    folder = flags.FLAGS[flag].value
    if folder is not None and not os.path.isdir(folder):
      _exit_with_error(f"--{flag} {folder}: no such folder")
  out = pathlib.Path(flags.FLAGS.out)
  if out.exists() and not out.is_dir():
    _exit_with_error(f"--out {out}: a file is there; name a folder")
  new_folder = not out.exists()
  try:
    checkpoints.export(flags.FLAGS.checkpoint, out, data_root=flags.FLAGS.data_root)
    if flags.FLAGS.consensus_data:
      consensus.write_index(out, flags.FLAGS.consensus_data)
  except errors.FlaxcapError as e:
    if new_folder:  # no half-written model left behind
      shutil.rmtree(out, ignore_errors=True)
    _exit_with_error(str(e))
  print(out)


if __name__ == "__main__":
  app.run(main)
