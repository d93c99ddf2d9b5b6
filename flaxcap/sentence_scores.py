"""Scores of one caption at a time against a fixed corpus of references: CIDEr-D and BLEU-4.

`metrics.score` scores an evaluated set as coco-caption does; the classes here keep a corpus (the
training captions) and score any number of candidates against one of its images each, the same
formulas per caption: the self-critical reward (`self_critical.CaptionReward`) and consensus
reranking (`consensus.py`) call them once per step or beam.
"""

import collections
import functools
import math
import operator
from typing import Sequence

import numpy as np

from flaxcap import errors
from flaxcap import metrics
from flaxcap.ptb_tokenizer import tokenize_captions


class CiderD:
  """CIDEr-D of candidates against a fixed corpus of references, one image at a time.

  `metrics.score` computes document frequencies over the references it is given; here they come from
  the whole corpus passed to the constructor (self-critical training rewards a sampled caption of a
  training image with the training set's frequencies), computed once. Otherwise the formula is
  `metrics.score`'s (cider_scorer's): with the corpus equal to an evaluated set, `CiderD(refs)(range(n), cands)`
  is `score(..., per_image=True)`'s CIDEr of each image.

      reward = CiderD(references)                  # references[i]: raw captions of image i
      values = reward(image_indices, candidates)   # float64 [len(candidates)]

  With `end_token` (a string no tokenized caption contains, e.g. "<eos>"), the token is appended to
  every reference and to every candidate that `ended` (a sample cut off at the length limit did not),
  so the n-grams that close a caption count: "... in a <eos>" matches no reference, and a reward
  model that ignores endings no longer pays as much for a caption that stops mid-phrase (the fix of
  self-critical.pytorch, which appends its end token to both sides).
  """

  def __init__(self, references: Sequence[Sequence[str]], *, end_token: str | None = None,
               document_frequency: Sequence[dict[str, int]] | None = None):
    """`document_frequency` (optional): another `CiderD`'s of the same references and end token.

    Without it the constructor tokenizes every reference to count in how many images each n-gram
    occurs (seconds for 30,000 captions); with it, an image's references are tokenized when the image
    is first scored, so loading a large corpus of which few images are used is fast.
    """
    _check_references(references, "CiderD")
    self._end_words = [end_token] if end_token else []
    self._references_text = references
    self._log_num_images = math.log(float(len(references)))
    # Per image, per reference: (n-gram counts, length); their tf-idf vectors are made when the image
    # is first scored (`_references`).
    self._reference_grams: list = [None] * len(references)
    self._reference_vectors = {}
    if document_frequency is not None:
      if len(document_frequency) != metrics.MAX_N:
        raise errors.DataError(f"CiderD: document frequencies of {len(document_frequency)} n-gram "
                               f"orders, not {metrics.MAX_N}")
      self._frequency = list(document_frequency)
      return
    self._frequency = [collections.Counter() for _ in range(metrics.MAX_N)]
    for image, image_words in enumerate(_reference_words(references, "CiderD")):
      self._reference_grams[image] = self._grams_and_lengths(image_words)
      for n in range(metrics.MAX_N):
        self._frequency[n].update({_gram_key(gram) for grams, _ in self._reference_grams[image]
                                   for gram in grams[n]})

  @property
  def document_frequency(self) -> list[dict[str, int]]:
    """Per n-gram order 1..4: in how many images' references each n-gram ("a dog") occurs."""
    return self._frequency

  def _grams_and_lengths(self, image_words: list[list[str]]) -> list:
    return [(_gram_counts(words + self._end_words), len(words) + len(self._end_words))
            for words in image_words]

  def _references(self, image: int) -> list:
    """Image `image`'s references: (tf-idf vector per order, their norms, bigram count) each."""
    vectors = self._reference_vectors.get(image)
    if vectors is None:
      if self._reference_grams[image] is None:
        texts = tokenize_captions(self._references_text[image])
        self._reference_grams[image] = self._grams_and_lengths([text.split() for text in texts])
      vectors = [self._vector(grams, length) for grams, length in self._reference_grams[image]]
      self._reference_vectors[image] = vectors
    return vectors

  def _vector(self, grams, length):
    vectors, norms = [], []
    for n in range(metrics.MAX_N):
      frequency = self._frequency[n]
      vector = {gram: count * (self._log_num_images -
                               math.log(max(1.0, frequency.get(_gram_key(gram), 0))))
                for gram, count in grams[n].items()}
      vectors.append(vector)
      norms.append(math.sqrt(sum(value * value for value in vector.values())))
    return vectors, norms, max(length - 1, 0)

  def __call__(self, image_indices: Sequence[int], candidates: Sequence[str],
               ended: Sequence[bool] | None = None) -> np.ndarray:
    """CIDEr-D of `candidates[i]` (raw text) against the references of image `image_indices[i]`.

    `ended[i]` (default: all True) says whether candidate i reached its end token; it matters only
    with `end_token`.
    """
    texts = tokenize_captions(candidates)
    ended = [True] * len(texts) if ended is None else list(ended)
    if len(ended) != len(texts):
      raise ValueError(f"{len(ended)} ended flags for {len(texts)} candidates")
    values = np.zeros(len(texts))
    candidate_vectors = {}  # a caption scored against several images is vectorised once
    for i, (image, text) in enumerate(zip(image_indices, texts)):
      words = tuple(text.split() + (self._end_words if ended[i] else []))
      if words not in candidate_vectors:
        candidate_vectors[words] = self._vector(_gram_counts(words), len(words))
      cand_vectors, cand_norms, cand_length = candidate_vectors[words]
      references = self._references(int(image))
      total = 0.0
      for ref_vectors, ref_norms, ref_length in references:
        penalty = math.exp(-((cand_length - ref_length) ** 2) / (2 * metrics.CIDER_SIGMA ** 2))
        for n in range(metrics.MAX_N):
          ref_vector = ref_vectors[n]
          dot = sum(min(value, ref_vector[gram]) * ref_vector[gram]
                    for gram, value in cand_vectors[n].items() if gram in ref_vector)
          norm = cand_norms[n] * ref_norms[n]
          total += (dot / norm if norm != 0 else dot) * penalty
      values[i] = total / metrics.MAX_N / len(references) * 10.0
    return values


class SentenceBleu:
  """BLEU-4 of each candidate alone against a fixed corpus of references: a self-critical reward.

  The per-image BLEU-4 of `metrics.score(..., per_image=True)` (bleu_scorer's, with its brevity penalty
  against the closest reference length), with each image's clipping counts made once:

      reward = SentenceBleu(references)            # references[i]: raw captions of image i
      values = reward(image_indices, candidates)   # float64 [len(candidates)]
  """

  def __init__(self, references: Sequence[Sequence[str]]):
    self._max_counts, self._lengths = [], []
    for image_words in _reference_words(references, "SentenceBleu"):
      grams = [_gram_counts(words) for words in image_words]
      # The largest count of each n-gram in any one reference (Counter's | keeps the maximum).
      self._max_counts.append([functools.reduce(operator.or_, (g[n] for g in grams))
                               for n in range(metrics.MAX_N)])
      self._lengths.append([len(words) for words in image_words])

  def __call__(self, image_indices: Sequence[int], candidates: Sequence[str]) -> np.ndarray:
    """BLEU-4 of `candidates[i]` (raw text) against the references of image `image_indices[i]`."""
    values = np.zeros(len(candidates))
    for i, (image, text) in enumerate(zip(image_indices, tokenize_captions(candidates))):
      words = text.split()
      max_counts = self._max_counts[int(image)]
      correct = [sum(min(count, max_counts[n][gram]) for gram, count in grams.items())
                 for n, grams in enumerate(_gram_counts(words))]
      guess = [max(0, len(words) - n) for n in range(metrics.MAX_N)]
      closest = min((abs(length - len(words)), length) for length in self._lengths[int(image)])[1]
      values[i] = metrics.bleu_from_counts(correct, guess, len(words), closest)[-1]
    return values


def _check_references(references: Sequence[Sequence[str]], owner: str) -> None:
  """DataError unless `references` is a non-empty list of non-empty caption lists."""
  if not references or any(isinstance(refs, str) or not refs for refs in references):
    raise errors.DataError(f"{owner} needs a non-empty list of caption lists, one per image")


def _reference_words(references: Sequence[Sequence[str]], owner: str) -> list[list[list[str]]]:
  """The words of each tokenized reference, per image; DataError unless every image has some."""
  _check_references(references, owner)
  texts = tokenize_captions(caption for refs in references for caption in refs)
  bounds = np.cumsum([0] + [len(refs) for refs in references])
  return [[text.split() for text in texts[start:stop]]
          for start, stop in zip(bounds[:-1], bounds[1:])]


def _gram_key(gram: tuple[str, ...]) -> str:
  """An n-gram as a document-frequency key: its words joined by spaces (no token contains one)."""
  return " ".join(gram)


def _gram_counts(words: Sequence[str]) -> list[collections.Counter]:
  """n-gram counts of one caption, n = 1..4."""
  return [collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
          for n in range(1, metrics.MAX_N + 1)]
