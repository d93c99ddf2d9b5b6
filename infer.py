"""Captions photos: `python infer.py --image PHOTO.jpg`.

  --image PHOTO.jpg [--image MORE.jpg]   caption these files
  --images DIR                           every image under DIR, recursively
  --checkpoint DIR                       a training workdir or exported model (default: the shipped one)
  --json                                 one JSON object per line: image, caption, score
  --attention_out DIR                    one PNG per image: each word's attention over the photo
  --dataset DIR --split dev              caption a whole split and print BLEU-1..4, METEOR, ROUGE-L, CIDEr
                                         (with --json: each image's caption, then the scores)
  --beam_size, --max_len, --length_penalty, --min_ending_rate   the search (defaults: the model's config)
  --consensus K                          keep the beam's caption that the captions of the K most similar
                                         training images agree with (default: 15 when the model has a
                                         consensus index, as the shipped one does; 0 = the beam's best)
  --consensus_beam_weight W              how much the beam's own score counts beside that agreement
  --xla_cache DIR                        keep compiled programs here for the next run (default:
                                         ~/.cache/flaxcap/xla; 'none': off)

An unreadable image gets one line on stderr and the others are still captioned (with --dataset, scored
without it); the exit code is 1 when any image failed, 2 when nothing could run (a bad flag value, no
model).
"""

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from flaxcap import errors  # noqa: E402

flags.DEFINE_multi_string("image", [], "An image file to caption (repeatable).")
flags.DEFINE_string("images", None, "A folder of images to caption (recursive).")
flags.DEFINE_string("checkpoint", None, "Model directory (default: the model shipped in models/).")
flags.DEFINE_integer("beam_size", 3, "Beam width (1 = greedy).")
flags.DEFINE_integer("max_len", None, "Longest caption in words (default: the model's config).")
flags.DEFINE_float("length_penalty", None, "GNMT length penalty alpha (default: the model's config).")
flags.DEFINE_float("min_ending_rate", None, "No caption ends on a word that ends fewer than this "
                   "fraction of its training captions; 0 = off (default: the model's config).")
flags.DEFINE_integer("consensus", None, "Rerank the beam: keep the caption with the highest mean "
                     "CIDEr-D against the captions of this many most similar training images (the "
                     "model's consensus.npz, written by export.py --consensus_data); 0 = off, the "
                     "beam's best (default: flaxcap.consensus.NEIGHBOURS when the model has an index, "
                     "else 0).")
flags.DEFINE_float("consensus_beam_weight", None, "With --consensus: add this multiple of each "
                   "caption's beam score (log-probability) to its agreement; 0 = agreement alone "
                   "(default: flaxcap.consensus.BEAM_SCORE_WEIGHT).")
flags.DEFINE_integer("batch_size", 16, "Images per compiled batch.")
flags.DEFINE_bool("json", False, "Print one JSON object per line instead of 'path: caption'.")
flags.DEFINE_string("attention_out", None, "Write one attention overlay PNG per image here.")
flags.DEFINE_string("xla_cache", None, "Where compiled programs are kept for the next run (default: "
                    "~/.cache/flaxcap/xla, or $JAX_COMPILATION_CACHE_DIR; 'none': off).")
flags.DEFINE_string("dataset", None, "Caption a dataset split and score it (a data root).")
flags.DEFINE_string("layout", None, "Layout of --dataset (default: the model's config.data.layout).")
flags.DEFINE_string("split", "dev", "Split of --dataset to caption.")
flags.DEFINE_list("metrics", None, "Metrics to score --dataset with (default: all of BLEU, METEOR, "
                  "ROUGE-L, CIDEr; METEOR starts a Java process, 10-20 s).")
FLAGS = flags.FLAGS


def _report_error(message: str) -> None:
  print(f"infer.py: error: {message}", file=sys.stderr)


def _write_overlay(result, out_dir: pathlib.Path, used_names: set) -> None:
  from flaxcap import images as images_lib  # pylint: disable=g-import-not-at-top
  from flaxcap import visualize  # pylint: disable=g-import-not-at-top
  stem = pathlib.Path(result.source).stem or "image"
  name, counter = stem, 1
  while name in used_names:
    counter += 1
    name = f"{stem}_{counter}"
  used_names.add(name)
  image = images_lib.decode_image(result.source)
  visualize.save_attention_overlay(image, result.words, result.attention, out_dir / f"{name}.png",
                                   title=result.text)


def _json_line(result) -> str:
  return json.dumps({"image": result.source, "caption": result.text, "score": round(result.score, 4)})


def _caption_options() -> dict:
  """`Captioner.caption`'s keyword arguments from the flags (None: the model's or library's default)."""
  options = dict(beam_size=FLAGS.beam_size, max_len=FLAGS.max_len,
                 length_penalty=FLAGS.length_penalty, min_ending_rate=FLAGS.min_ending_rate,
                 consensus_neighbours=FLAGS.consensus, batch_size=FLAGS.batch_size)
  if FLAGS.consensus_beam_weight is not None:
    options["consensus_beam_weight"] = FLAGS.consensus_beam_weight
  return options


def _check_flags() -> None:
  """Raises ConfigError for a flag value that cannot work, before the model is loaded."""
  from flaxcap import inference  # pylint: disable=g-import-not-at-top
  inference.check_options(**{name: value for name, value in _caption_options().items()
                             if value is not None})
  if FLAGS.dataset and not os.path.isdir(FLAGS.dataset):
    raise errors.ConfigError(f"--dataset {FLAGS.dataset}: no such folder")
  for path in FLAGS.image:  # the usual mix-up of the two flags, named before the model loads
    if os.path.isdir(path):
      raise errors.ConfigError(f"--image {path}: a folder, not an image file; --images {path} "
                               "captions every image under it")
  if FLAGS.images and not os.path.isdir(FLAGS.images):
    if os.path.isfile(FLAGS.images):
      raise errors.ConfigError(f"--images {FLAGS.images}: a file, not a folder; --image "
                               f"{FLAGS.images} captions it")
    raise errors.ConfigError(f"--images {FLAGS.images}: no such folder")
  if FLAGS.attention_out:
    try:
      pathlib.Path(FLAGS.attention_out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise errors.ConfigError(
          f"{FLAGS.attention_out}: cannot be the --attention_out folder ({e.strerror})") from None


def caption_files(captioner, paths) -> int:
  """Prints a caption per path; returns the number of failures."""
  failures = 0
  out_dir = pathlib.Path(FLAGS.attention_out) if FLAGS.attention_out else None
  used_names = set()
  from flaxcap import inference  # pylint: disable=g-import-not-at-top
  for result in captioner.caption(paths, **_caption_options()):
    if isinstance(result, inference.Failure):
      failures += 1
      _report_error(result.message)
      continue
    if FLAGS.json:
      print(_json_line(result), flush=True)
    else:
      print(f"{result.source}: {result.text}", flush=True)
    if out_dir:
      _write_overlay(result, out_dir, used_names)
  return failures


def score_dataset(captioner) -> int:
  """Captions a split and prints its scores, over the images that could be read; returns how many
  could not."""
  from flaxcap import datasets  # pylint: disable=g-import-not-at-top
  from flaxcap import metrics  # pylint: disable=g-import-not-at-top
  from flaxcap import inference  # pylint: disable=g-import-not-at-top
  data_config = datasets.rooted_at(captioner.config.data, FLAGS.dataset)
  if FLAGS.layout:
    data_config.layout = FLAGS.layout
  metric_names = metrics.check_metric_names(FLAGS.metrics or metrics.METRICS)
  records = datasets.load_records(data_config, FLAGS.split)
  if not records:
    raise errors.DataError(f"{FLAGS.dataset}: the {FLAGS.split!r} split is empty")
  candidates, failures = {}, 0
  for record, result in zip(records, captioner.caption([r.image_path for r in records],
                                                       **_caption_options())):  # one each, in order
    if isinstance(result, inference.Failure):
      failures += 1
      _report_error(result.message)
    else:
      candidates[record.image_id] = result.text
      if FLAGS.json:
        print(_json_line(result), flush=True)
  references = {r.image_id: list(r.captions) for r in records if r.image_id in candidates}
  scores = metrics.score(references, candidates, metrics=metric_names)
  neighbours = captioner.default_consensus_neighbours if FLAGS.consensus is None else FLAGS.consensus
  if FLAGS.json:
    print(json.dumps({"split": FLAGS.split, "images": len(candidates), "failed": failures,
                      "beam_size": FLAGS.beam_size, "consensus": neighbours, "scores": scores}))
    return failures
  print(f"{FLAGS.split}: {len(candidates)} images"
        + (f" ({failures} could not be read, left out)" if failures else "")
        + f", beam {FLAGS.beam_size}, "
        + (f"consensus reranking over {neighbours} neighbours" if neighbours else "no reranking"))
  for name, value in scores.items():
    print(f"  {name:8s} {value:.4f}")
  return failures


def main(argv):
  from flaxcap import compilation_cache, inference  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not (FLAGS.image or FLAGS.images or FLAGS.dataset):
    raise app.UsageError("give --image PHOTO.jpg, --images DIR or --dataset DIR")
  if not FLAGS["verbosity"].present:  # captions and errors only; -v 0 shows the INFO log
    logging.set_verbosity(logging.WARNING)
  from flaxcap import checkpoints  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax)  # reading a training workdir
  try:
    _check_flags()
    compilation_cache.enable(FLAGS.xla_cache)
    captioner = inference.Captioner.load(FLAGS.checkpoint)
    if FLAGS.dataset:
      failures = score_dataset(captioner)
    else:
      paths, failures = list(FLAGS.image), 0
      if FLAGS.images:
        found = inference.find_images(FLAGS.images)
        if not found:
          failures += 1
          _report_error(f"{FLAGS.images}: no image files in this folder or below it (looked for "
                        f"{', '.join(inference.IMAGE_SUFFIXES)})")
        paths += [str(p) for p in found]
      failures += caption_files(captioner, paths)
  except errors.FlaxcapError as e:
    _report_error(str(e))
    sys.exit(2)
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  app.run(main)
