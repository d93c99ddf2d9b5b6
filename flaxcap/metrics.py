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
from flaxcap import ngrams
from flaxcap.ptb_tokenizer import ptb_tokenize, tokenize_captions

__all__ = ["METRICS", "bleu_from_counts", "ptb_tokenize", "score", "tokenize_captions"]

METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
MAX_N = ngrams.MAX_N
_BLEU_SMALL = 1e-9  # bleu_scorer's guards, kept exactly for the same numbers
_BLEU_TINY = 1e-15
_ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0


def check_metric_names(metrics: str | Sequence[str]) -> tuple[str, ...]:
  """`metrics` as a tuple of names; ConfigError names the unknown ones, or says there are none."""
  if metrics is None:
    return METRICS
  metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
  unknown = [name for name in metrics if name not in METRICS]
  if unknown or not metrics:
    raise errors.ConfigError(f"unknown caption metric(s) {unknown}; choose from {list(METRICS)}"
                             if unknown else f"no caption metric asked for; choose from {list(METRICS)}")
  return metrics


def score(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str],
          metrics: Sequence[str] = METRICS, per_image: bool = False):
  """Scores candidate captions against references, as coco-caption does.

  Args:
    references: image key -> raw reference captions (at least one per image).
    candidates: image key -> one raw candidate caption; the same keys as `references`.
    metrics: any of "BLEU", "METEOR", "ROUGE-L", "CIDEr" (or one of them as a string; None:
      all).
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
  """The n-grams (n = 1..4) of the candidates and references (`ngrams.Corpus` over both).

  Caption index c < num_images is image c's candidate; reference r is caption num_images + r.
  """

  def __init__(self, cand_texts, ref_texts, ref_image):
    corpus = ngrams.Corpus(list(cand_texts) + list(ref_texts))
    self.num_images = len(cand_texts)
    self.ref_image = ref_image  # [num_refs] image index of each reference
    self.lengths = corpus.lengths  # [num_captions]
    self.grams, self.num_grams = corpus.grams, corpus.num_grams

  def split(self, n):
    """(candidate part, reference part) of order n, each as (image, gram, count) arrays."""
    grams = self.grams[n]
    is_cand = grams.caption < self.num_images
    cand = (grams.caption[is_cand], grams.gram[is_cand], grams.count[is_cand])
    ref_caption = grams.caption[~is_cand] - self.num_images
    ref = (self.ref_image[ref_caption], grams.gram[~is_cand], grams.count[~is_cand], ref_caption)
    return cand, ref


def _lookup(sorted_keys, values, keys):
  """values[i] where sorted_keys[i] == key, for each key; 0 where the key is absent."""
  if len(sorted_keys) == 0:
    return np.zeros(len(keys), dtype=values.dtype)
  index = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
  return np.where(sorted_keys[index] == keys, values[index], 0)


def max_reference_counts(ref_image, ref_gram, ref_count, num_grams: int):
  """BLEU's clipping counts: the largest count of each n-gram in any one reference of an image.

  Args: the references' (image, n-gram id, count) triples of one order, n-gram ids below
  `num_grams`. Returns (sorted keys image * num_grams + n-gram, largest counts), for `clipped_counts`.
  """
  ref_keys = ref_image * num_grams + ref_gram
  order = np.argsort(ref_keys, kind="stable")
  ref_keys, ref_count = ref_keys[order], ref_count[order]
  firsts = np.flatnonzero(np.r_[True, ref_keys[1:] != ref_keys[:-1]])[:len(ref_keys)]
  max_counts = np.maximum.reduceat(ref_count, firsts) if len(ref_keys) else ref_count
  return ref_keys[firsts], max_counts


def clipped_counts(max_counts, num_grams: int, image, gram, count) -> np.ndarray:
  """Each candidate n-gram's count clipped by its image's references (0 for ids >= `num_grams`)."""
  held = gram < num_grams
  keys = image * num_grams + np.where(held, gram, 0)
  return np.where(held, np.minimum(count, _lookup(*max_counts, keys)), 0)


def closest_lengths(test_length, pair_test, pair_ref_length) -> np.ndarray:
  """bleu_scorer's "closest" reference length of each test caption; on a tie, the shorter one.

  `pair_test` (sorted) says which test caption each reference length in `pair_ref_length` goes with.
  """
  gap = np.abs(pair_ref_length - test_length[pair_test])
  best = np.lexsort((pair_ref_length, gap, pair_test))  # by test, then gap, then length
  firsts = np.flatnonzero(np.r_[True, pair_test[best][1:] != pair_test[best][:-1]])
  closest = np.zeros(len(test_length), dtype=np.int64)
  closest[pair_test[best][firsts]] = pair_ref_length[best][firsts]
  return closest


def _bleu(grams: _NGrams):
  """bleu_scorer.compute_score(option="closest"): ([4] corpus BLEU, [images, 4] per image)."""
  num_images = grams.num_images
  test_len = grams.lengths[:num_images]
  ref_len = grams.lengths[num_images:]
  correct = np.zeros((num_images, MAX_N), dtype=np.int64)
  for n in range(MAX_N):
    (image, gram, count), (ref_image, ref_gram, ref_count, _) = grams.split(n)
    max_counts = max_reference_counts(ref_image, ref_gram, ref_count, grams.num_grams[n])
    clipped = clipped_counts(max_counts, grams.num_grams[n], image, gram, count)
    correct[:, n] = np.bincount(image, weights=clipped, minlength=num_images).astype(np.int64)
  guess = np.maximum(0, test_len[:, None] - np.arange(MAX_N))  # [images, 4]
  closest = closest_lengths(test_len, grams.ref_image, ref_len)
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


def document_frequency(ref_image, ref_gram, num_grams: int) -> np.ndarray:
  """int64 [num_grams]: in how many images' references each n-gram occurs (CIDEr-D's frequencies)."""
  keys = np.sort(ref_image * num_grams + ref_gram)  # sorting beats np.unique's hashing here (4x)
  present = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
  return np.bincount(present % max(num_grams, 1), minlength=num_grams)


def idf_weights(frequency: np.ndarray, num_images: int) -> np.ndarray:
  """CIDEr-D's n-gram weights: log(images) - log(max(1, document frequency))."""
  return np.log(float(num_images)) - np.log(np.maximum(1.0, frequency.astype(np.float64)))


def cider_d_similarity(cand_vectors, pair_vectors, pair_cand, cand_length, pair_length,
                       num_grams) -> np.ndarray:
  """cider_scorer's similarity of (candidate, reference) pairs, summed over n = 1..4: [pairs].

  Args:
    cand_vectors: per order, the candidates' tf-idf vectors as (candidate, n-gram id, value) arrays,
      sorted by candidate, then n-gram.
    pair_vectors: per order, each pair's reference vector as (pair, n-gram id, value) arrays.
    pair_cand: int [pairs], the candidate of each pair.
    cand_length, pair_length: words of each candidate and of each pair's reference.
    num_grams: per order, an upper bound of the n-gram ids.
  """
  # cider_scorer's "length" is the number of bigrams of a caption.
  delta = np.maximum(cand_length - 1, 0)[pair_cand] - np.maximum(pair_length - 1, 0)
  penalty = np.e ** (-(delta.astype(np.float64) ** 2) / (2 * CIDER_SIGMA ** 2))
  similarity = np.zeros(len(pair_cand))
  for n in range(MAX_N):
    (cand, gram, cand_vec), (pair, ref_gram, ref_vec) = cand_vectors[n], pair_vectors[n]
    cand_norm = np.sqrt(np.bincount(cand, weights=cand_vec ** 2, minlength=len(cand_length)))
    ref_norm = np.sqrt(np.bincount(pair, weights=ref_vec ** 2, minlength=len(pair_cand)))
    cand_vec_at_ref = _lookup(cand * num_grams[n] + gram, cand_vec,
                              pair_cand[pair] * num_grams[n] + ref_gram)
    dot = np.bincount(pair, weights=np.minimum(cand_vec_at_ref, ref_vec) * ref_vec,
                      minlength=len(pair_cand))
    norms = cand_norm[pair_cand] * ref_norm
    similarity += np.where(norms != 0, dot / np.where(norms != 0, norms, 1), dot) * penalty
  return similarity


def _cider_d(grams: _NGrams, ref_counts: np.ndarray) -> np.ndarray:
  """cider_scorer's CIDEr-D of each image: [images]."""
  num_images = grams.num_images
  cand_vectors, ref_vectors = [], []
  for n in range(MAX_N):
    (image, gram, count), (ref_image, ref_gram, ref_count, ref) = grams.split(n)
    # Document frequency: in how many images' references each n-gram occurs.
    weight = idf_weights(document_frequency(ref_image, ref_gram, grams.num_grams[n]), num_images)
    cand_vectors.append((image, gram, count * weight[gram]))
    ref_vectors.append((ref, ref_gram, ref_count * weight[ref_gram]))
  similarity = cider_d_similarity(cand_vectors, ref_vectors, grams.ref_image,
                                  grams.lengths[:num_images], grams.lengths[num_images:],
                                  grams.num_grams)
  per_image = np.bincount(grams.ref_image, weights=similarity, minlength=num_images)
  return per_image / MAX_N / ref_counts * 10.0


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
