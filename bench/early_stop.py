"""How many steps the early stop saves on real photos: the shipped model's searches on dev images.

bench/beam_search.py measures the early stop on random weights edited so that every caption ends at
12 tokens, so every batch stops after exactly 12 of the 20 steps. A trained model's captions differ in
length, and a batch stops only once none of its images can still change its result, so larger
batches stop later. This script runs the shipped model's `decoding.search` (its config's length
penalty and `<eos>` ban, max_len 20) on the encoder features of --images dev photos, without the
early stop and with each of its loops ("cond", the CPU's default, and "while"; `flaxcap.beam_search`),
for each beam and batch size: the steps each batch took (`BeamSearchResult.steps`),
the time of a batch (the mean over the first --timed_batches batches, median of --rounds rounds in
which the settings take turns, after compilation), and whether they return the same captions as
without the stop (they must).

    python bench/early_stop.py                         # ../shared/data/flickr8k, 512 dev images
    python bench/early_stop.py --data DIR --batch_sizes=1,32

Needs the real data (a Flickr8k root, as `infer.py --dataset` reads it); prints a table and writes
JSON (default bench/results/early_stop.json). Not part of run_all.py (the suite needs no data).
"""

import pathlib
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402
from flaxcap import datasets  # noqa: E402
from flaxcap import decoding  # noqa: E402
from flaxcap import errors  # noqa: E402
from flaxcap import images as images_lib  # noqa: E402
from flaxcap import inference  # noqa: E402
from flaxcap import vocab as vocab_lib  # noqa: E402

_DATA = flags.DEFINE_string("data", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
                                        / "flickr8k"), "A Flickr8k root (the model's data layout).")
_SPLIT = flags.DEFINE_string("split", "dev", "Split whose images are captioned.")
_IMAGES = flags.DEFINE_integer("images", 512, "Images of the split (the first ones) in the batches.")
_BATCH1_IMAGES = flags.DEFINE_integer("batch1_images", 64, "Images searched one at a time.")
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "1,32,256", "Comma-separated batch sizes.")
_BEAM_SIZES = flags.DEFINE_string("beam_sizes", "3,5", "Comma-separated beam sizes.")
_MAX_LEN = flags.DEFINE_integer("max_len", 20, "Decoding steps without the early stop.")
_TIMED_BATCHES = flags.DEFINE_integer("timed_batches", 8, "Batches timed (the first ones).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timing rounds; each times both settings in turn.")
_OUTPUT = flags.DEFINE_string("output", "early_stop", "JSON path, or a name under bench/results/.")

STOPS = ("off", "cond", "while")  # decoding.search(early_stop=...): False, "cond", "while"

COLUMNS = [common.Column("beam", "beam"), common.Column("batch", "batch"),
           common.Column("early_stop", "stop"), common.Column("batches", "batches"),
           common.Column("steps_mean", "steps (mean)", ".1f"),
           common.Column("steps_min", "min"), common.Column("steps_max", "max"),
           common.Column("ms_per_batch", "ms/batch", ".1f"),
           common.Column("captions_per_s", "captions/s", ",.1f"),
           common.Column("vs_off", "vs off", ".2f"), common.Column("same", "same captions", ".0%"),
           common.Column("mean_length", "mean len", ".1f")]


def encoder_features(captioner: inference.Captioner, paths: list[str], chunk: int = 64) -> np.ndarray:
  """The encoder's grids of these photos, as inference computes them: [images, h, w, channels]."""
  encode = jax.jit(captioner.encoder.apply)
  size = captioner.config.image_size
  grids = []
  for start in range(0, len(paths), chunk):
    photos = np.stack([images_lib.load_image(path, size) for path in paths[start:start + chunk]])
    grids.append(np.asarray(encode(captioner.encoder_variables, jnp.asarray(photos))))
  return np.concatenate(grids)


def main(argv):
  del argv
  try:
    captioner = inference.Captioner.load()
    data_config = datasets.rooted_at(captioner.config.data, _DATA.value)
    records = datasets.load_records(data_config, _SPLIT.value)[:_IMAGES.value]
  except errors.FlaxcapError as e:  # no data here: one line, not a traceback
    sys.exit(f"bench/early_stop.py: {e}")
  info = common.machine(torch_too=False)
  print(common.machine_line(info), flush=True)
  start = time.perf_counter()
  features = encoder_features(captioner, [record.image_path for record in records])
  print(f"{len(records)} {_SPLIT.value} images encoded in {time.perf_counter() - start:.0f} s",
        flush=True)
  eval_config = captioner.config.eval
  length_penalty = float(eval_config.length_penalty)
  banned = captioner.vocab.eos_banned_after(
      float(eval_config.get("min_ending_rate", vocab_lib.DEFAULT_MIN_ENDING_RATE)))
  rows = []
  for beam in common.int_list(_BEAM_SIZES.value):
    for batch in common.int_list(_BATCH_SIZES.value):
      images = min(len(features), _BATCH1_IMAGES.value if batch == 1 else len(features))
      batches = [jnp.asarray(features[i:i + batch]) for i in range(0, images - batch + 1, batch)]
      if not batches:
        raise app.UsageError(f"--images {len(features)}: fewer than one batch of {batch}")
      searches, results = {}, {}
      for stop in STOPS:
        searches[stop] = jax.jit(lambda grid, stop=stop: decoding.search(
            captioner.decoder, captioner.decoder_params, grid, beam_size=beam,
            max_len=_MAX_LEN.value, length_penalty=length_penalty,
            word_gate_table=captioner.word_gate_table, eos_banned_after=banned,
            early_stop=False if stop == "off" else stop),
                                 compiler_options=inference.compiler_options())
        results[stop] = [jax.device_get(searches[stop](grid)) for grid in batches]
      timed = batches[:_TIMED_BATCHES.value]
      seconds = {stop: [] for stop in searches}
      for _ in range(_ROUNDS.value):  # the settings take turns, so all see the same load
        for stop, search in searches.items():
          start = time.perf_counter()
          for grid in timed:
            search(grid).tokens.block_until_ready()
          seconds[stop].append((time.perf_counter() - start) / len(timed))
      off_seconds = float(np.median(seconds["off"]))
      for stop, batch_results in results.items():
        steps = [int(result.steps) for result in batch_results]
        same = np.mean(np.concatenate([np.all(result.tokens == off.tokens, axis=(1, 2))
                                       for result, off in zip(batch_results, results["off"])]))
        median_s = float(np.median(seconds[stop]))
        rows.append({"beam": beam, "batch": batch, "early_stop": stop, "batches": len(batches),
                     "steps": steps, "steps_mean": float(np.mean(steps)),
                     "steps_min": min(steps), "steps_max": max(steps), "seconds": median_s,
                     "round_seconds": seconds[stop], "timed_batches": len(timed),
                     "ms_per_batch": median_s * 1e3, "captions_per_s": batch / median_s,
                     "vs_off": off_seconds / median_s, "same": float(same),
                     "mean_length": float(np.mean([r.lengths[:, 0] for r in batch_results]))})
        print(f"beam {beam}, batch {batch}, {stop}: {rows[-1]['steps_mean']:.1f} of "
              f"{_MAX_LEN.value} steps, {rows[-1]['vs_off']:.2f}x", flush=True)
  print()
  common.print_table(rows, COLUMNS, title=(
      f"early stop on the shipped model, {len(features)} {_SPLIT.value} images (batch 1: "
      f"{min(len(features), _BATCH1_IMAGES.value)}), max_len {_MAX_LEN.value}; ms/batch: the first "
      f"{_TIMED_BATCHES.value} batches' mean, median of {_ROUNDS.value} rounds; "
      f"{common.machine_line(info)}"))
  common.write_json(_OUTPUT.value, {
      "benchmark": "early_stop", "machine": info, "split": _SPLIT.value, "images": len(features),
      "max_len": _MAX_LEN.value, "length_penalty": length_penalty, "rows": rows,
      "notes": "steps: BeamSearchResult.steps of every batch; same: share of images whose beam "
               "(all hypotheses' tokens) is the same as without the stop"})


if __name__ == "__main__":
  app.run(main)
