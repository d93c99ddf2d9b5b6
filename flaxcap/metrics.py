"""Caption metrics that give coco-caption's numbers: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D.

`score` follows `pycocoevalcap` 1.2 (the coco-caption package every captioning paper reports) step
by step: captions are PTB-tokenized as its PTBTokenizer does (in Python here, see
`flaxcap.ptb_tokenizer`), then

* BLEU-1..4: corpus level, clipped n-gram counts, the "closest" reference length for the brevity
  penalty, with bleu_scorer's 1e-9 / 1e-15 guards against division by zero;
* ROUGE-L: longest common subsequence F-measure with beta = 1.2, per image, then averaged;
* CIDEr-D: tf-idf n-grams (n = 1..4) with document frequencies over the evaluated references,
  clipped cosine similarity, a Gaussian length penalty (sigma = 6, on cider_scorer's length: the
  number of bigrams), averaged over n and references, times 10;
* METEOR 1.5: the jar shipped with `pycocoevalcap`, one JVM per call. Without `java` on the PATH
  (or without the jar) METEOR is left out of the result and one line is logged.

Only METEOR needs Java; nothing here needs TF or torch.
"""

import collections
import importlib.util
import math
import pathlib
import shutil
import subprocess
import tempfile
import threading
from typing import Hashable, Mapping, Sequence

from absl import logging
import numpy as np

from flaxcap import errors
from flaxcap.ptb_tokenizer import ptb_tokenize, tokenize_captions

__all__ = ["METRICS", "bleu_from_counts", "ptb_tokenize", "score", "tokenize_captions"]

METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
MAX_N = 4
_BLEU_SMALL = 1e-9  # bleu_scorer's guards, kept exactly for the same numbers
_BLEU_TINY = 1e-15
_ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0


def check_metric_names(metrics: str | Sequence[str]) -> tuple[str, ...]:
  """`metrics` as a tuple of names; ConfigError names the unknown ones."""
  metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
  unknown = [name for name in metrics if name not in METRICS]
  if unknown:
    raise errors.ConfigError(f"unknown caption metric(s) {unknown}; choose from {list(METRICS)}")
  return metrics


def score(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str],
          metrics: Sequence[str] = METRICS, per_image: bool = False):
  """Scores candidate captions against references, as coco-caption does.

  Args:
    references: image key -> raw reference captions (at least one per image).
    candidates: image key -> one raw candidate caption; the same keys as `references`.
    metrics: any of "BLEU", "METEOR", "ROUGE-L", "CIDEr" (or one of them as a string).
    per_image: also return every image's scores, for error analysis.

  Returns:
    `{"BLEU-1": ..., "BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ...}` (the metrics asked
    for; METEOR only when Java is there) on coco-caption's scale (0-1, CIDEr 0-10). With
    `per_image`, a pair `(scores, per_image_scores)` where `per_image_scores[key]` maps the same
    names to that image's score (BLEU per image as bleu_scorer computes it, with its own brevity
    penalty).

  Raises:
    DataError: the keys differ, or a caption is not a string, or an image has no reference.
    ConfigError: an unknown metric name.
  """
  metrics = check_metric_names(metrics)
  keys = _check_inputs(references, candidates)
  ref_counts = [len(references[key]) for key in keys]
  ref_texts = tokenize_captions(caption for key in keys for caption in references[key])
  cand_texts = tokenize_captions(candidates[key] for key in keys)
  # Regroup the flat reference list per image.
  bounds = np.cumsum([0] + ref_counts)
  refs_per_image = [ref_texts[bounds[i]:bounds[i + 1]] for i in range(len(keys))]

  corpus, images = {}, {}
  if "BLEU" in metrics or "CIDEr" in metrics:
    grams = _NGrams(cand_texts, ref_texts, np.repeat(np.arange(len(keys)), ref_counts))
    if "BLEU" in metrics:
      bleu_corpus, bleu_images = _bleu(grams)
      for n in range(MAX_N):
        corpus[f"BLEU-{n + 1}"] = bleu_corpus[n]
        images[f"BLEU-{n + 1}"] = bleu_images[:, n]
  if "METEOR" in metrics:
    meteor = _meteor(cand_texts, refs_per_image)
    if meteor is not None:
      corpus["METEOR"], images["METEOR"] = meteor
  if "ROUGE-L" in metrics:
    rouge_images = np.array([_rouge_l(cand, refs)
                             for cand, refs in zip(cand_texts, refs_per_image)])
    corpus["ROUGE-L"], images["ROUGE-L"] = float(np.mean(rouge_images)), rouge_images
  if "CIDEr" in metrics:
    cider_images = _cider_d(grams, np.asarray(ref_counts))
    corpus["CIDEr"], images["CIDEr"] = float(np.mean(cider_images)), cider_images
  if not per_image:
    return corpus
  per_image_scores = {key: {name: float(values[i]) for name, values in images.items()}
                      for i, key in enumerate(keys)}
  return corpus, per_image_scores


def _check_inputs(references, candidates) -> list:
  """The image keys in `references` order, after checking both mappings agree and hold text."""
  missing = [key for key in references if key not in candidates]
  extra = [key for key in candidates if key not in references]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"no candidate for {len(missing)} image(s): {_some(missing)}")
    if extra:
      parts.append(f"no references for {len(extra)} image(s): {_some(extra)}")
    raise errors.DataError("references and candidates must have the same image keys; "
                           + "; ".join(parts))
  keys = list(references)
  if not keys:
    raise errors.DataError("nothing to score: references and candidates are empty")
  for key in keys:
    refs = references[key]
    if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
      raise errors.DataError(
          f"references[{key!r}] must be a non-empty list of caption strings, got {refs!r}")
    if not isinstance(candidates[key], str):
      raise errors.DataError(
          f"candidates[{key!r}] must be one caption string, got {candidates[key]!r}")
  return keys


def _some(keys, limit=5) -> str:
  shown = ", ".join(repr(key) for key in keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class _NGrams:
  """Distinct n-grams (n = 1..4) of the candidates and references, with their counts.

  Words are what `str.split()` gives on the tokenized caption, as in bleu_scorer and cider_scorer.
  Caption index c < num_images is image c's candidate; reference r is caption num_images + r.
  For each order n (0-based), `caption[n]`, `gram[n]`, `count[n]` list every distinct
  (caption, n-gram) pair sorted by caption then n-gram id; `num_grams[n]` is the number of ids.
  """

  def __init__(self, cand_texts, ref_texts, ref_image):
    words = [text.split() for text in cand_texts] + [text.split() for text in ref_texts]
    self.num_images = len(cand_texts)
    self.ref_image = ref_image  # [num_refs] image index of each reference
    self.lengths = np.array([len(w) for w in words], dtype=np.int64)  # [num_captions]
    vocab = collections.defaultdict(lambda: len(vocab) + 1)  # ids from 1; 0 never occurs
    token_ids = np.array([vocab[w] for caption in words for w in caption], dtype=np.int64)
    caption_of_token = np.repeat(np.arange(len(words)), self.lengths)
    position = np.arange(len(token_ids)) - np.repeat(np.cumsum(self.lengths) - self.lengths,
                                                     self.lengths)
    base = len(vocab) + 1
    self.caption, self.gram, self.count, self.num_grams = [], [], [], []
    for order in range(1, MAX_N + 1):
      starts = np.nonzero(position <= self.lengths[caption_of_token] - order)[0]
      columns = token_ids[starts[:, None] + np.arange(order)]  # [occurrences, order]
      if base ** order < 2 ** 62:
        packed = columns @ (base ** np.arange(order - 1, -1, -1, dtype=np.int64))
        _, gram_of = np.unique(packed, return_inverse=True)
      else:
        _, gram_of = np.unique(columns, axis=0, return_inverse=True)
      gram_of = gram_of.reshape(-1)
      num_grams = int(gram_of.max()) + 1 if len(gram_of) else 1
      pairs, counts = np.unique(caption_of_token[starts] * num_grams + gram_of,
                                return_counts=True)
      self.caption.append(pairs // num_grams)
      self.gram.append(pairs % num_grams)
      self.count.append(counts)
      self.num_grams.append(num_grams)

  def split(self, n):
    """(candidate part, reference part) of order n, each as (image, gram, count) arrays."""
    is_cand = self.caption[n] < self.num_images
    cand = (self.caption[n][is_cand], self.gram[n][is_cand], self.count[n][is_cand])
    ref_caption = self.caption[n][~is_cand] - self.num_images
    ref = (self.ref_image[ref_caption], self.gram[n][~is_cand], self.count[n][~is_cand],
           ref_caption)
    return cand, ref


def _lookup(sorted_keys, values, keys):
  """values[i] where sorted_keys[i] == key, for each key; 0 where the key is absent."""
  if len(sorted_keys) == 0:
    return np.zeros(len(keys), dtype=values.dtype)
  index = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
  return np.where(sorted_keys[index] == keys, values[index], 0)


def _bleu(grams: _NGrams):
  """bleu_scorer.compute_score(option="closest"): ([4] corpus BLEU, [images, 4] per image)."""
  num_images = grams.num_images
  test_len = grams.lengths[:num_images]
  ref_len = grams.lengths[num_images:]
  correct = np.zeros((num_images, MAX_N), dtype=np.int64)
  for n in range(MAX_N):
    (image, gram, count), (ref_image, ref_gram, ref_count, _) = grams.split(n)
    # Largest count of each n-gram in any one reference of the image.
    ref_keys = ref_image * grams.num_grams[n] + ref_gram
    order = np.argsort(ref_keys, kind="stable")
    ref_keys, ref_count = ref_keys[order], ref_count[order]
    firsts = np.flatnonzero(np.r_[True, ref_keys[1:] != ref_keys[:-1]])[:len(ref_keys)]
    max_keys = ref_keys[firsts]
    max_counts = np.maximum.reduceat(ref_count, firsts) if len(ref_keys) else ref_count
    clipped = np.minimum(count, _lookup(max_keys, max_counts, image * grams.num_grams[n] + gram))
    correct[:, n] = np.bincount(image, weights=clipped, minlength=num_images).astype(np.int64)
  guess = np.maximum(0, test_len[:, None] - np.arange(MAX_N))  # [images, 4]
  # "closest" reference length; on a tie, the shorter one.
  ref_bounds = np.searchsorted(grams.ref_image, np.arange(num_images + 1))
  closest = [min((abs(length - test_len[i]), length)
                 for length in ref_len[ref_bounds[i]:ref_bounds[i + 1]])[1]
             for i in range(num_images)]

  per_image = np.array([bleu_from_counts(correct[i], guess[i], int(test_len[i]), int(closest[i]))
                        for i in range(num_images)])
  corpus = bleu_from_counts([int(c) for c in correct.sum(0)], [int(g) for g in guess.sum(0)],
                            int(test_len.sum()), int(sum(closest)))
  return corpus, per_image


def bleu_from_counts(correct, guess, test_length: int, ref_length: int) -> list[float]:
  """BLEU-1..4 from clipped matches and guesses per order, with bleu_scorer's brevity penalty."""
  bleus, bleu = [], 1.0
  for n in range(MAX_N):
    bleu *= (float(correct[n]) + _BLEU_TINY) / (float(guess[n]) + _BLEU_SMALL)
    bleus.append(bleu ** (1.0 / (n + 1)))
  ratio = (test_length + _BLEU_TINY) / (ref_length + _BLEU_SMALL)
  if ratio < 1:
    bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
  return bleus


def _cider_d(grams: _NGrams, ref_counts: np.ndarray) -> np.ndarray:
  """cider_scorer's CIDEr-D of each image: [images]."""
  num_images = grams.num_images
  log_num_images = np.log(float(num_images))
  # cider_scorer's "length" is the number of bigrams of a caption.
  bigrams = np.maximum(grams.lengths - 1, 0).astype(np.float64)
  delta = bigrams[:num_images][grams.ref_image] - bigrams[num_images:]  # [refs]
  penalty = np.e ** (-(delta ** 2) / (2 * CIDER_SIGMA ** 2))
  similarity = np.zeros((len(grams.ref_image), MAX_N))  # [refs, 4]
  for n in range(MAX_N):
    (image, gram, count), (ref_image, ref_gram, ref_count, ref) = grams.split(n)
    num_grams = grams.num_grams[n]
    # Document frequency: in how many images' references each n-gram occurs.
    present = np.unique(ref_image * num_grams + ref_gram)
    frequency = np.bincount(present % num_grams, minlength=num_grams).astype(np.float64)
    weight = log_num_images - np.log(np.maximum(1.0, frequency))  # [grams]
    cand_vec = count * weight[gram]
    ref_vec = ref_count * weight[ref_gram]
    cand_norm = np.sqrt(np.bincount(image, weights=cand_vec ** 2, minlength=num_images))
    ref_norm = np.sqrt(np.bincount(ref, weights=ref_vec ** 2, minlength=len(grams.ref_image)))
    cand_vec_at_ref = _lookup(image * num_grams + gram, cand_vec, ref_image * num_grams + ref_gram)
    dot = np.bincount(ref, weights=np.minimum(cand_vec_at_ref, ref_vec) * ref_vec,
                      minlength=len(grams.ref_image))
    norms = cand_norm[grams.ref_image] * ref_norm
    similarity[:, n] = np.where(norms != 0, dot / np.where(norms != 0, norms, 1), dot) * penalty
  per_image = np.zeros((num_images, MAX_N))
  np.add.at(per_image, grams.ref_image, similarity)
  return per_image.mean(axis=1) / ref_counts * 10.0


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro)."""
  masks = {}
  for i, word in enumerate(a):
    masks[word] = masks.get(word, 0) | (1 << i)
  full = (1 << len(a)) - 1
  row = full  # zero bits mark matched positions of `a`
  for word in b:
    match = masks.get(word)
    if match:
      u = row & match
      row = ((row + u) | (row - u)) & full
  return len(a) - row.bit_count()


def _rouge_l(candidate: str, references: Sequence[str]) -> float:
  """Rouge.calc_score: tokens are `split(" ")`, so "" is one empty token, as there."""
  cand_words = candidate.split(" ")
  precision = recall = 0.0
  for reference in references:
    ref_words = reference.split(" ")
    lcs = _lcs_length(cand_words, ref_words)
    precision = max(precision, lcs / float(len(cand_words)))
    recall = max(recall, lcs / float(len(ref_words)))
  if precision == 0 or recall == 0:
    return 0.0
  beta2 = _ROUGE_BETA ** 2
  return ((1 + beta2) * precision * recall) / float(recall + beta2 * precision)


def _meteor_jar() -> pathlib.Path | None:
  """pycocoevalcap's meteor-1.5.jar (with its paraphrase table next to it), if installed."""
  spec = importlib.util.find_spec("pycocoevalcap")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    jar = pathlib.Path(folder) / "meteor" / "meteor-1.5.jar"
    if jar.is_file():
      return jar
  return None


def _meteor(cand_texts, refs_per_image):
  """METEOR 1.5 through its jar in one JVM: (corpus score, [images] scores) or None."""
  java, jar = shutil.which("java"), _meteor_jar()
  if java is None or jar is None:
    logging.warning("METEOR left out: it runs Meteor 1.5's jar, and %s.",
                    "no `java` is on the PATH" if java is None else
                    "pycocoevalcap (which ships meteor-1.5.jar) is not installed")
    return None
  # What pycocoevalcap's Meteor sends: "SCORE ||| ref 1 ||| ... ||| ref n ||| hypothesis".
  score_lines = "".join(
      " ||| ".join(("SCORE", " ||| ".join(refs), cand.replace("|||", "").replace("  ", " ")))
      + "\n" for cand, refs in zip(cand_texts, refs_per_image)).encode()
  command = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
  with tempfile.TemporaryFile() as stderr:
    process = subprocess.Popen(command, cwd=jar.parent, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=stderr)
    try:
      # Write from a thread: the jar answers each line while we are still writing.
      writer = threading.Thread(target=_write, args=(process.stdin, score_lines))
      writer.start()
      stats = [_read_line(process, stderr) for _ in cand_texts]
      writer.join()
      _write(process.stdin, ("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
      per_image = np.array([float(_read_line(process, stderr)) for _ in cand_texts])
      corpus = float(_read_line(process, stderr))
    finally:
      process.stdin.close()
      process.kill()
      process.wait()
  return corpus, per_image


def _write(stream, data: bytes) -> None:
  try:
    stream.write(data)
    stream.flush()
  except BrokenPipeError:  # the jar died; _read_line reports why
    pass


def _read_line(process, stderr) -> str:
  line = process.stdout.readline()
  if not line:
    stderr.seek(0)
    tail = stderr.read()[-2000:].decode(errors="replace")
    raise errors.FlaxcapError(
        f"METEOR's jar stopped early (exit code {process.poll()}); its error output: {tail}")
  return line.decode().strip()
