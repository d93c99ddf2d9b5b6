"""Each caption's CIDEr-D and BLEU-4 against one image of a fixed corpus of references.

`metrics.score` scores an evaluated set as coco-caption does; the classes here keep a corpus (the
training captions, counted once with `ngrams.Corpus`) and score any number of candidates, each
against the references of an image of the corpus, with `metrics.py`'s formulas per caption. A call
scores its whole batch with numpy: the self-critical reward (`self_critical.CaptionReward`) calls
them once a step, consensus reranking (`consensus.py`) once for a batch of beams.
"""

import math
from typing import Sequence

import numpy as np

from flaxcap import errors
from flaxcap import metrics
from flaxcap import ngrams
from flaxcap.ptb_tokenizer import tokenize_captions


class _References:
  """A fixed corpus of references, counted once (`ngrams.Corpus`), and the pairs a call compares.

  `tokenized` (optional): the references already PTB-tokenized, flat in image order (as
  `tokenize_captions` gives them), so that they are not tokenized again.
  """

  def __init__(self, references: Sequence[Sequence[str]], owner: str, *,
               end_token: str | None = None, tokenized: Sequence[str] | None = None):
    _check_references(references, owner)
    counts = np.array([len(refs) for refs in references])
    if tokenized is None:
      tokenized = tokenize_captions(caption for refs in references for caption in refs)
    elif len(tokenized) != counts.sum():
      raise errors.DataError(f"{owner}: {len(tokenized)} tokenized references for "
                             f"{counts.sum()} captions")
    self.end_words = [end_token] if end_token else []
    suffix = "".join(" " + word for word in self.end_words)
    self.corpus = ngrams.Corpus([text + suffix for text in tokenized])
    self.num_images = len(references)
    self.ref_image = np.repeat(np.arange(len(references)), counts)  # [refs]
    self.image_refs = np.r_[0, np.cumsum(counts)]  # image i's: [image_refs[i], image_refs[i + 1])
    # Where each reference's n-grams start in the corpus's per-order arrays.
    self.ref_grams = [np.searchsorted(grams.caption, np.arange(len(self.ref_image) + 1))
                      for grams in self.corpus.grams]

  def candidates(self, texts: Sequence[str], ended: Sequence[bool] | None):
    """The candidates' n-grams and lengths (`ngrams.Corpus.count`), the end word after the ended."""
    if isinstance(texts, str):
      raise errors.DataError("candidates: a list of captions, not one string")
    if self.end_words:
      ended = [True] * len(texts) if ended is None else list(ended)
      if len(ended) != len(texts):
        raise errors.DataError(f"{len(ended)} ended flags for {len(texts)} candidates")
      texts = [f"{text} {self.end_words[0]}" if done else text for text, done in zip(texts, ended)]
    return self.corpus.count(texts)

  def pairs(self, image_indices, num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, reference) of every pair a call compares: each candidate with its image's refs."""
    images = np.asarray(image_indices, dtype=np.int64).reshape(-1)
    if len(images) != num_candidates:
      raise errors.DataError(f"{num_candidates} candidates for {len(images)} image indices")
    if len(images) and (images.min() < 0 or images.max() >= self.num_images):
      raise errors.DataError(f"image indices must be in [0, {self.num_images}), got {images.min()}-"
                             f"{images.max()}")
    return ngrams.ranges(self.image_refs[images], self.image_refs[images + 1])

  def pair_grams(self, n: int, pair_ref: np.ndarray):
    """(pair, index into the corpus's order-n arrays) of every n-gram of each pair's reference."""
    return ngrams.ranges(self.ref_grams[n][pair_ref], self.ref_grams[n][pair_ref + 1])


class CiderD:
  """CIDEr-D of candidates, each against the references of one image of a fixed corpus.

  `metrics.score` computes document frequencies over the references it is given; here they come from
  the whole corpus passed to the constructor (self-critical training rewards a sampled caption of a
  training image with the training set's frequencies), computed once. Otherwise the formula is
  `metrics.score`'s (cider_scorer's, `metrics.cider_d_similarity`): with the corpus equal to an
  evaluated set, `CiderD(refs)(range(n), cands)` is `score(..., per_image=True)`'s CIDEr of each image.

      reward = CiderD(references)                  # references[i]: raw captions of image i
      values = reward(image_indices, candidates)   # float64 [len(candidates)]

  With `end_token` (a string no tokenized caption contains, e.g. "<eos>"), the token is appended to
  every reference and to every candidate that `ended` (a sample cut off at the length limit did not),
  so the n-grams that close a caption count: "... in a <eos>" matches no reference, and a reward
  model that ignores endings no longer pays as much for a caption that stops mid-phrase (the fix of
  self-critical.pytorch, which appends its end token to both sides).

  A call scores all its candidates together with numpy (`ngrams`): a self-critical step's reward,
  160 captions tokenized and scored for CIDEr-D and BLEU-4, took 10-15 ms on the 2-core CPU
  (`bench/host_scoring.py`).
  """

  def __init__(self, references: Sequence[Sequence[str]], *, end_token: str | None = None,
               tokenized: Sequence[str] | None = None):
    """`tokenized` (optional): the references PTB-tokenized, flat (see `_References`)."""
    self._refs = refs = _References(references, "CiderD", end_token=end_token, tokenized=tokenized)
    self._log_num_images = math.log(float(refs.num_images))
    # Per order: each n-gram's document frequency and weight, each reference n-gram's tf-idf value.
    self._frequency, self._weights, self._ref_values = [], [], []
    for grams, num_grams in zip(refs.corpus.grams, refs.corpus.num_grams):
      self._frequency.append(metrics.document_frequency(refs.ref_image[grams.caption], grams.gram,
                                                        num_grams))
      weights = metrics.idf_weights(self._frequency[-1], refs.num_images)
      self._weights.append(weights)
      self._ref_values.append(grams.count * weights[grams.gram])

  def document_frequency(self, grams: Sequence[str]) -> np.ndarray:
    """int [len(grams)]: in how many images' references each n-gram ("a dog") occurs."""
    ids = self._refs.corpus.ids(grams)
    return np.array([self._frequency[len(gram.split()) - 1][i] if i >= 0 else 0
                     for gram, i in zip(grams, ids)], dtype=np.int64)

  def __call__(self, image_indices: Sequence[int], candidates: Sequence[str],
               ended: Sequence[bool] | None = None) -> np.ndarray:
    """CIDEr-D of `candidates[i]` (raw text) against the references of image `image_indices[i]`.

    `ended[i]` (default: all True) says whether candidate i reached its end token; it matters only
    with `end_token`.
    """
    if isinstance(candidates, str):
      raise errors.DataError("candidates: a list of captions, not one string")
    return self.score_tokenized(image_indices, tokenize_captions(candidates), ended)

  def score_tokenized(self, image_indices: Sequence[int], texts: Sequence[str],
                      ended: Sequence[bool] | None = None) -> np.ndarray:
    """`__call__` for candidates already PTB-tokenized (`tokenize_captions`)."""
    refs = self._refs
    grams, lengths = refs.candidates(texts, ended)
    pair_cand, pair_ref = refs.pairs(image_indices, len(texts))
    cand_vectors, pair_vectors, num_grams = [], [], []
    for n, (cand, weights, ref_values) in enumerate(zip(grams, self._weights, self._ref_values)):
      # An n-gram no reference holds weighs log(images), as cider_scorer's max(1, 0) frequency gives.
      weight = np.append(weights, self._log_num_images)[np.minimum(cand.gram, len(weights))]
      cand_vectors.append((cand.caption, cand.gram, cand.count * weight))
      pair, entry = refs.pair_grams(n, pair_ref)
      pair_vectors.append((pair, refs.corpus.grams[n].gram[entry], ref_values[entry]))
      num_grams.append(int(max(cand.gram.max(initial=0), len(weights))) + 1)
    similarity = metrics.cider_d_similarity(cand_vectors, pair_vectors, pair_cand, lengths,
                                            refs.corpus.lengths[pair_ref], num_grams)
    per_cand = np.bincount(pair_cand, weights=similarity, minlength=len(texts))
    return per_cand / metrics.MAX_N / np.bincount(pair_cand, minlength=len(texts)) * 10.0


class SentenceBleu:
  """BLEU-4 of each candidate alone against a fixed corpus of references: a self-critical reward.

  The per-image BLEU-4 of `metrics.score(..., per_image=True)` (bleu_scorer's, with its brevity penalty
  against the closest reference length), with each image's clipping counts made once:

      reward = SentenceBleu(references)            # references[i]: raw captions of image i
      values = reward(image_indices, candidates)   # float64 [len(candidates)]
  """

  def __init__(self, references: Sequence[Sequence[str]], *,
               tokenized: Sequence[str] | None = None):
    """`tokenized` (optional): the references PTB-tokenized, flat (see `_References`)."""
    self._refs = refs = _References(references, "SentenceBleu", tokenized=tokenized)
    self._max_counts = [
        metrics.max_reference_counts(refs.ref_image[grams.caption], grams.gram, grams.count,
                                     num_grams)
        for grams, num_grams in zip(refs.corpus.grams, refs.corpus.num_grams)]

  def __call__(self, image_indices: Sequence[int], candidates: Sequence[str]) -> np.ndarray:
    """BLEU-4 of `candidates[i]` (raw text) against the references of image `image_indices[i]`."""
    if isinstance(candidates, str):
      raise errors.DataError("candidates: a list of captions, not one string")
    return self.score_tokenized(image_indices, tokenize_captions(candidates))

  def score_tokenized(self, image_indices: Sequence[int], texts: Sequence[str]) -> np.ndarray:
    """`__call__` for candidates already PTB-tokenized (`tokenize_captions`)."""
    refs = self._refs
    images = np.asarray(image_indices, dtype=np.int64).reshape(-1)
    grams, lengths = refs.candidates(texts, None)
    pair_cand, pair_ref = refs.pairs(images, len(texts))
    correct = np.zeros((len(texts), metrics.MAX_N), dtype=np.int64)
    for n, (cand, max_counts) in enumerate(zip(grams, self._max_counts)):
      clipped = metrics.clipped_counts(max_counts, refs.corpus.num_grams[n], images[cand.caption],
                                       cand.gram, cand.count)
      correct[:, n] = np.bincount(cand.caption, weights=clipped, minlength=len(texts))
    guess = np.maximum(0, lengths[:, None] - np.arange(metrics.MAX_N))
    closest = metrics.closest_lengths(lengths, pair_cand, refs.corpus.lengths[pair_ref])
    return np.array([metrics.bleu_from_counts(correct[i], guess[i], int(lengths[i]),
                                              int(closest[i]))[-1] for i in range(len(texts))])


def _check_references(references: Sequence[Sequence[str]], owner: str) -> None:
  """DataError unless `references` is a non-empty list of non-empty caption lists."""
  if not references or any(isinstance(refs, str) or not refs for refs in references):
    raise errors.DataError(f"{owner} needs a non-empty list of caption lists, one per image")
