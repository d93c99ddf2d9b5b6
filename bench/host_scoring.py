"""Host-side caption scoring: the self-critical reward of a train step, consensus reranking of a photo.

Both run in Python and numpy on the host between device calls, so whatever the device they add to
every self-critical step and to every photo `infer.py` captions. The corpus is the shipped model's
consensus index (`models/flickr8k/consensus.npz`: Flickr8k's 6,000 training images, 30,000 captions),
so no dataset is needed. Rows:

  reward_build  `self_critical.CaptionReward` of the shipped recipe's last stage (CIDEr-D with the end
                token, plus 6 x BLEU-4: configs/flickr8k_scst_bleu6.py) built from the 30,000 captions,
                once per training run
  reward_step   that reward over one step's batch: 32 images x 5 samples (other training captions as
                the samples, 1 in 10 cut off at the length limit), a new batch each call
  rerank_first  `ConsensusIndex.load` and its first reranking (what each `infer.py` run pays once)
  rerank_photo  `ConsensusIndex.consensus` of a beam of 3 captions over 15 neighbours for a new photo
                each call (random pooled features: new neighbours each time, as in a folder of photos)

    python bench/host_scoring.py [--repeats 30] [--baseline_tree /tmp/before]

--baseline_tree: a checkout of another commit (`git worktree add /tmp/before <commit>`). The same
rows, on the same inputs, run with that checkout's flaxcap (and its model's index) in a child process
of the same call; the table shows each row's time there, the speed-up, and the largest difference
between the two checkouts' rewards and consensus scores. Prints a table and writes JSON (default
bench/results/host_scoring.json).
"""

import json
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from bench import common  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed calls of the per-step and per-photo rows.")
_BASELINE_TREE = flags.DEFINE_string("baseline_tree", None, "Another checkout to time beside this one.")
_CHILD_TREE = flags.DEFINE_string("child_tree", None, "Internal: time the checkout at this path and "
                                  "print the rows as JSON.")
_OUTPUT = flags.DEFINE_string("output", "host_scoring", "JSON path, or a name under bench/results/.")

BATCH_IMAGES, SAMPLES, NEIGHBOURS, BEAM = 32, 5, 15, 3
COLUMNS = [common.Column("row", "row"), common.Column("median_ms", "median ms", ".2f"),
           common.Column("min_ms", "min ms", ".2f"), common.Column("baseline_median_ms",
                                                                  "baseline median ms", ".2f"),
           common.Column("speedup", "speed-up", ".2f"), common.Column("max_difference",
                                                                     "max |difference|", ".1e")]


def _inputs(captions: list[list[str]], repeats: int, channels: int):
  """The same batches and photos for every checkout: (reward batches, rerank queries)."""
  rng = np.random.default_rng(0)
  flat = [caption for texts in captions for caption in texts]
  batches = []
  for _ in range(repeats + 1):
    images = np.repeat(rng.choice(len(captions), BATCH_IMAGES, replace=False), SAMPLES)
    samples = [flat[i] for i in rng.integers(0, len(flat), size=len(images))]
    batches.append((images, samples, rng.random(len(images)) > 0.1))
  queries = [(rng.normal(size=(1, channels)).astype(np.float32) + 1.0,
              [[flat[i] for i in rng.integers(0, len(flat), size=BEAM)]]) for _ in range(repeats + 2)]
  return batches, queries


def _time_tree(tree: pathlib.Path, repeats: int) -> dict:
  """Times every row with the flaxcap of `tree` (already first on sys.path)."""
  from flaxcap import consensus, self_critical  # pylint: disable=g-import-not-at-top
  index_path = tree / "models" / "flickr8k" / consensus.INDEX_FILE
  start = time.perf_counter()
  index = consensus.ConsensusIndex.load(index_path)
  batches, queries = _inputs(index.captions, repeats, index.embeddings.shape[1])
  first_scores = index.consensus(*queries[0], neighbours=NEIGHBOURS)
  rerank_first = time.perf_counter() - start
  start = time.perf_counter()
  reward = self_critical.CaptionReward(index.captions, reward_end=True, bleu_weight=6.0)
  reward_build = time.perf_counter() - start
  rewards, scores = [], [first_scores]
  batch_iter, query_iter = iter(batches), iter(queries[1:])
  steps = common.time_calls(lambda: rewards.append(reward(*next(batch_iter))), repeats=repeats)
  photos = common.time_calls(
      lambda: scores.append(index.consensus(*next(query_iter), neighbours=NEIGHBOURS)), repeats=repeats)
  return {
      "rows": {"reward_build": [reward_build], "reward_step": steps.times_s,
               "rerank_first": [rerank_first], "rerank_photo": photos.times_s},
      "rewards": np.concatenate(rewards).tolist(),
      "scores": np.concatenate([s.ravel() for s in scores]).tolist(),
  }


def _child(tree: str, repeats: int) -> dict:
  command = [sys.executable, __file__, f"--child_tree={tree}", f"--repeats={repeats}"]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"{tree}: the baseline run failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  repeats = _REPEATS.value
  if _CHILD_TREE.value:
    tree = pathlib.Path(_CHILD_TREE.value).resolve()
    sys.path.insert(0, str(tree))
    print(json.dumps(_time_tree(tree, repeats)))
    return
  info = common.machine(torch_too=False)
  print(common.machine_line(info))
  baseline = _child(_BASELINE_TREE.value, repeats) if _BASELINE_TREE.value else None
  current = _child(str(REPO_ROOT), repeats)
  rows = []
  for name, times in current["rows"].items():
    row = {"row": name, "median_ms": float(np.median(times)) * 1e3, "min_ms": min(times) * 1e3,
           "times_s": times}
    if baseline:
      base = baseline["rows"][name]
      row.update(baseline_median_ms=float(np.median(base)) * 1e3, baseline_times_s=base,
                 speedup=float(np.median(base) / np.median(times)))
      key = "rewards" if name.startswith("reward") else "scores"
      row["max_difference"] = float(np.max(np.abs(np.subtract(baseline[key], current[key]))))
    rows.append(row)
  title = (f"host-side scoring, {BATCH_IMAGES} images x {SAMPLES} samples a step, a beam of {BEAM} "
           f"over {NEIGHBOURS} neighbours a photo; median of {repeats}"
           + (f"; baseline: {_BASELINE_TREE.value}" if baseline else ""))
  common.print_table(rows, COLUMNS, title=title)
  common.write_json(_OUTPUT.value, {"machine": info, "repeats": repeats, "rows": rows,
                                    "baseline_tree": _BASELINE_TREE.value})


if __name__ == "__main__":
  app.run(main)
