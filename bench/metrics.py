"""Time to score Flickr8k's 1,000 dev images: flaxcap.metrics against pycocoevalcap, in one run.

Caption #0 of each dev image is the candidate, #1-#4 its references. Every row is end to end from
raw captions: a metric's time includes tokenizing (flaxcap: the Python PTB port; pycocoevalcap:
its PTBTokenizer, a Java process per call) and, for METEOR, starting Meteor's JVM. Cheap steps are
timed `--repeats` times and the fastest run is kept; METEOR runs once per side.

  python bench/metrics.py --flickr8k ../shared/data/flickr8k --out bench/results/metrics.json
"""

import os
import pathlib
import platform
import shutil
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top
from flaxcap import metrics  # noqa: E402  pylint: disable=g-import-not-at-top
from flaxcap import ptb_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_FLICKR8K = flags.DEFINE_string(
    "flickr8k", os.environ.get("FLAXCAP_FLICKR8K", str(_ROOT.parent / "shared/data/flickr8k")),
    "Flickr8k folder (holds Flickr8k_text/).")
_OUT = flags.DEFINE_string("out", str(_ROOT / "bench/results/metrics.json"), "JSON output path.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each step except METEOR; the fastest counts.")


def _dev_captions(root: pathlib.Path):
  text = root / "Flickr8k_text"
  dev = [line.strip() for line in (text / "Flickr_8k.devImages.txt").read_text().splitlines()
         if line.strip()]
  captions = {}
  for line in (text / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
    key, caption = line.split("\t", 1)
    image, number = key.rsplit("#", 1)
    captions.setdefault(image, {})[int(number)] = caption
  return ({image: [captions[image][k] for k in (1, 2, 3, 4)] for image in dev},
          {image: captions[image][0] for image in dev})


def _timed(function, repeats):
  """(fastest wall time in seconds, the last result)."""
  timing = common.time_calls(function, repeats=repeats, warmup=0)
  return timing.min_s, timing.result


def main(argv):
  del argv
  references, candidates = _dev_captions(pathlib.Path(_FLICKR8K.value))
  java = shutil.which("java") is not None
  repeats = _REPEATS.value
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top

  ptb_tokenizer.tokenize_captions(["Warm up: build the lexer's rules."])
  ours, theirs, ours_scores, theirs_scores = {}, {}, {}, {}
  keys = list(references)

  def our_tokenize():
    ptb_tokenizer.tokenize_captions(c for k in keys for c in references[k])
    return ptb_tokenizer.tokenize_captions(candidates[k] for k in keys)

  ours["tokenize"], _ = _timed(our_tokenize, repeats)
  if java:
    def their_tokenize():
      tokenizer = PTBTokenizer()
      return (tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in keys}),
              tokenizer.tokenize({k: [{"caption": candidates[k]}] for k in keys}))
    theirs["tokenize"], (gts, res) = _timed(their_tokenize, repeats)
  else:  # PTBTokenizer needs Java: give pycocoevalcap's scorers our tokens instead
    flat = ptb_tokenizer.tokenize_captions(c for k in keys for c in references[k])
    gts = {k: flat[4 * i:4 * i + 4] for i, k in enumerate(keys)}
    res = {k: [c] for k, c in zip(keys, our_tokenize())}
  their_scorers = {"BLEU": lambda: Bleu(4).compute_score(gts, res, verbose=0),
                   "METEOR": lambda: Meteor().compute_score(gts, res),
                   "ROUGE-L": lambda: Rouge().compute_score(gts, res),
                   "CIDEr": lambda: Cider().compute_score(gts, res)}
  for name in metrics.METRICS:
    if name == "METEOR" and not java:
      continue
    runs = 1 if name == "METEOR" else repeats
    ours[name], result = _timed(lambda: metrics.score(references, candidates, metrics=(name,)),
                                runs)
    ours_scores.update(result)
    scorer_time, (value, _) = _timed(their_scorers[name], runs)
    theirs[name] = theirs.get("tokenize", 0.0) + scorer_time
    if name == "BLEU":
      theirs_scores.update({f"BLEU-{n + 1}": value[n] for n in range(4)})
    else:
      theirs_scores[name] = float(value)
    theirs.setdefault("scorers", 0.0)
    theirs["scorers"] += scorer_time
  ours["all"], _ = _timed(lambda: metrics.score(references, candidates), 1)
  theirs["all"] = theirs.get("tokenize", 0.0) + theirs.pop("scorers")

  rows = ["tokenize"] + [m for m in metrics.METRICS if m in ours] + ["all"]
  print(f"Scoring {len(keys)} Flickr8k dev images (seconds, end to end from raw captions)")
  print(f"{'step':<10} {'flaxcap':>9} {'pycocoevalcap':>14} {'speed-up':>9}")
  for row in rows:
    their = theirs.get(row)
    their_text = f"{their:14.3f}" if their is not None else f"{'n/a':>14}"
    ratio = f"{their / ours[row]:8.1f}x" if their is not None else f"{'':>9}"
    print(f"{row:<10} {ours[row]:9.3f} {their_text} {ratio}")
  differences = {k: abs(ours_scores[k] - theirs_scores[k]) for k in theirs_scores}
  print("scores:", {k: round(v, 6) for k, v in ours_scores.items()})
  print("largest difference from pycocoevalcap:", max(differences.values()))

  java_version = (subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
                  .splitlines()[0] if java else None)
  report = {
      "images": len(keys), "references_per_image": 4,
      "seconds": {"flaxcap": ours, "pycocoevalcap": theirs},
      "scores": {"flaxcap": ours_scores, "pycocoevalcap": theirs_scores},
      "max_abs_difference": max(differences.values()),
      "repeats": repeats,
      "notes": ("rows are end to end from raw captions; pycocoevalcap rows include its Java "
                "PTBTokenizer time; METEOR rows include starting Meteor's JVM; 'all' is one "
                "metrics.score() call vs tokenize + the four scorers"
                + ("" if java else "; no java: pycocoevalcap scored our tokens, no METEOR")),
      "environment": {"python": platform.python_version(), "numpy": np.__version__,
                      "java": java_version, "cpus": os.cpu_count(),
                      "machine": platform.machine()},
  }
  report["machine"] = common.machine(torch_too=False)
  common.write_json(_OUT.value, report)


if __name__ == "__main__":
  app.run(main)
