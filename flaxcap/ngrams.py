"""The n-grams (n = 1..4) of tokenized captions as integer arrays: the counting behind BLEU and CIDEr-D.

Words are what `str.split()` gives on a tokenized caption, as in bleu_scorer and cider_scorer. A
`Corpus` numbers the distinct n-grams of a fixed set of captions (the references) and counts them
per caption; `Corpus.count` counts the n-grams of other captions (candidates) with the corpus's ids,
so that a candidate's n-gram can be matched with the references' by comparing integers:

    corpus = Corpus(["a dog runs", "a dog"])
    grams, lengths = corpus.count(["a cat runs"])
    grams[0]   # order 1: captions [0 0 0], grams [0 2 3]: "a" and "runs" as in the corpus, "cat" new

Ids are built order by order: an n-gram's key is (id of its first n - 1 words, id of its last word),
so no key overflows however large the vocabulary. Everything is numpy; no Python loop runs per n-gram.
"""

import dataclasses
import itertools
from typing import Sequence

import numpy as np

MAX_N = 4


@dataclasses.dataclass(frozen=True)
class Grams:
  """The distinct (caption, n-gram) pairs of one order, sorted by caption, then n-gram id.

  Attributes:
    caption: int64 [pairs], which caption.
    gram: int64 [pairs], the n-gram's id: below the corpus's `num_grams` for the corpus's n-grams;
      from `num_grams` up, n-grams the corpus does not hold (each distinct one its own id).
    count: int64 [pairs], how often the n-gram occurs in the caption.
  """
  caption: np.ndarray
  gram: np.ndarray
  count: np.ndarray


def _starts(lengths: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
  """(flat token index, caption) of every n-gram of this order: [occurrences] each."""
  caption_of_token = np.repeat(np.arange(len(lengths)), lengths)
  position = np.arange(len(caption_of_token)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  starts = np.flatnonzero(position <= lengths[caption_of_token] - order)
  return starts, caption_of_token[starts]


def _distinct_pairs(caption: np.ndarray, gram: np.ndarray, num_grams: int) -> Grams:
  pairs, counts = np.unique(caption * max(num_grams, 1) + gram, return_counts=True)
  return Grams(pairs // max(num_grams, 1), pairs % max(num_grams, 1), counts)


class Corpus:
  """The n-grams of a fixed set of tokenized captions, numbered.

  Attributes:
    grams: per order (index n - 1), every caption's n-grams (`Grams`, ids below `num_grams[n - 1]`).
    lengths: int64 [captions], words per caption.
    num_grams: per order, how many distinct n-grams the corpus holds.
  """

  def __init__(self, texts: Sequence[str]):
    self._word_ids: dict[str, int] = {}  # ids from 1; 0 is no word
    token_ids, self.lengths = self._token_ids(texts, grow=True)
    self._keys: list[np.ndarray] = []  # per order: the sorted keys of the corpus's n-grams
    self.grams, self.num_grams = [], []
    prefix_ids = None
    for order in range(1, MAX_N + 1):
      starts, caption = _starts(self.lengths, order)
      keys = self._keys_of(token_ids, starts, order, prefix_ids)
      order_keys, gram = np.unique(keys, return_inverse=True)
      self._keys.append(order_keys)
      self.num_grams.append(len(order_keys))
      self.grams.append(_distinct_pairs(caption, gram.reshape(-1), len(order_keys)))
      prefix_ids = np.full(len(token_ids), -1, np.int64)
      prefix_ids[starts] = gram.reshape(-1)

  def _token_ids(self, texts: Sequence[str], grow: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flat word ids of `texts` and their lengths; words the corpus lacks get ids above its own."""
    words = [text.split() for text in texts]
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    ids = self._word_ids
    distinct = [word for word in dict.fromkeys(itertools.chain.from_iterable(words)) if word not in ids]
    if grow:
      ids.update(zip(distinct, range(len(ids) + 1, len(ids) + 1 + len(distinct))))
    elif distinct:
      ids = {**ids, **dict(zip(distinct, range(len(ids) + 1, len(ids) + 1 + len(distinct))))}
    token_ids = np.fromiter(map(ids.__getitem__, itertools.chain.from_iterable(words)), np.int64,
                            int(lengths.sum()))
    return token_ids, lengths

  def _keys_of(self, token_ids, starts, order, prefix_ids) -> np.ndarray:
    """Each occurrence's key: its word's id (order 1), or (prefix id, last word id) packed."""
    last_word = token_ids[starts + order - 1]
    if order == 1:
      return last_word
    return prefix_ids[starts] * (len(self._word_ids) + 1) + last_word

  def count(self, texts: Sequence[str]) -> tuple[list[Grams], np.ndarray]:
    """The n-grams of other tokenized captions with the corpus's ids: (per-order `Grams`, lengths)."""
    token_ids, lengths = self._token_ids(texts, grow=False)
    known_word = token_ids <= len(self._word_ids)
    grams, prefix_ids = [], None
    for order, order_keys in enumerate(self._keys, start=1):
      starts, caption = _starts(lengths, order)
      known = known_word[starts + order - 1]
      if order > 1:
        known &= prefix_ids[starts] >= 0
      keys = self._keys_of(token_ids, starts, order, prefix_ids)
      gram = np.minimum(np.searchsorted(order_keys, keys), max(len(order_keys) - 1, 0))
      known &= order_keys[gram] == keys if len(order_keys) else False
      gram = np.where(known, gram, -1)
      # N-grams the corpus lacks: numbered after its own, one id per distinct word sequence.
      unknown = np.flatnonzero(~known)
      if len(unknown):
        columns = token_ids[starts[unknown, None] + np.arange(order)]
        _, new_ids = np.unique(columns, axis=0, return_inverse=True)
        gram[unknown] = len(order_keys) + new_ids.reshape(-1)
      grams.append(_distinct_pairs(caption, gram, len(order_keys) + len(unknown)))
      prefix_ids = np.full(len(token_ids), -1, np.int64)
      prefix_ids[starts] = np.where(known, gram, -1)
    return grams, lengths

  def ids(self, texts: Sequence[str]) -> np.ndarray:
    """int64 [texts]: the id of each tokenized text as one n-gram of the corpus (its order is its
    number of words, 1..4), or -1 where the corpus does not hold it."""
    grams, lengths = self.count(texts)
    result = np.full(len(texts), -1, np.int64)
    for order, order_grams in enumerate(grams, start=1):
      whole = (lengths[order_grams.caption] == order) & (order_grams.gram < self.num_grams[order - 1])
      result[order_grams.caption[whole]] = order_grams.gram[whole]
    return result


def ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(owner, index) of every index in the ranges [starts[i], stops[i]): [sum of their lengths] each."""
  sizes = stops - starts
  owner = np.repeat(np.arange(len(starts)), sizes)
  return owner, np.arange(len(owner)) - np.repeat(np.cumsum(sizes) - sizes, sizes) + starts[owner]
