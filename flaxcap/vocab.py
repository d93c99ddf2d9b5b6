"""Caption tokenization and the word vocabulary.

Tokenization follows Karpathy's neuraltalk2 preprocessing (and what coco-caption scores against): lower-case,
delete punctuation characters, split on white space. "A dog's ball." -> ["a", "dogs", "ball"].

The vocabulary maps words to ids with four special tokens first: `<pad>`=0, `<bos>`=1, `<eos>`=2,
`<unk>`=3. It is saved as JSON next to checkpoints so a trained model can be loaded on its own.
This module imports neither TensorFlow nor JAX.
"""

from __future__ import annotations

import collections
import json
import os
import string
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from flaxcap import errors

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

_FILE_FORMAT = "flaxcap.vocabulary"
_FILE_VERSION = 1
_ASCII_PUNCTUATION = frozenset(string.punctuation)
# Captions may not end on a word that ends fewer than this fraction of its training occurrences
# (`Vocabulary.eos_banned_after`; config.eval.min_ending_rate): "... playing in a red" goes on.
DEFAULT_MIN_ENDING_RATE = 0.01


def _is_punctuation(char: str) -> bool:
  """ASCII punctuation and symbols (string.punctuation) and any Unicode punctuation (category P*)."""
  return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def tokenize(text: str) -> list[str]:
  """Splits a caption into lower-case words with punctuation characters deleted.

  Args:
    text: a raw caption, e.g. "A child in a pink dress is climbing up a set of stairs ."

  Returns:
    The words, e.g. ["a", "child", "in", ...]. "statefarm.com" becomes "statefarmcom" and "t-shirt"
    becomes "tshirt", as in Karpathy's preprocessing.
  """
  lowered = unicodedata.normalize("NFKC", text).lower()
  stripped = "".join(" " if char.isspace() else char for char in lowered if not _is_punctuation(char))
  return stripped.split()


class Vocabulary:
  """Words indexed by id; ids 0..3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`.

  Attributes:
    words: every token, index = id.
    ending_rates: float32 [len(words)] or None: for each word, the fraction of its occurrences in the
      training captions that end a caption (0 for `<pad>`, `<bos>`, `<eos>`; `<unk>`'s is the rare
      words'); None for vocabularies saved before flaxcap kept them. Not part of equality.
  """

  def __init__(self, words: Sequence[str], ending_rates: Sequence[float] | None = None):
    words = list(words)
    if tuple(words[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}, got {words[:4]}")
    word_to_id = {}
    for index, word in enumerate(words):
      if not isinstance(word, str) or not word:
        raise ValueError(f"vocabulary entry {index} is not a non-empty string: {word!r}")
      if word in word_to_id:
        raise ValueError(f"vocabulary entry {index} repeats {word!r} (first at {word_to_id[word]})")
      word_to_id[word] = index
    if ending_rates is not None:
      ending_rates = np.asarray(ending_rates, np.float32)
      if ending_rates.shape != (len(words),) or not np.all((ending_rates >= 0) & (ending_rates <= 1)):
        raise ValueError(f"ending_rates must be {len(words)} fractions in [0, 1], one per word")
    self.words = words
    self.ending_rates = ending_rates
    self._word_to_id = word_to_id

  @classmethod
  def build(cls, captions: Iterable[str], min_count: int = 5, max_size: int = 0) -> Vocabulary:
    """Builds the vocabulary of the words seen at least `min_count` times.

    Args:
      captions: raw caption strings (the training split's), tokenized with `tokenize`.
      min_count: words seen fewer times map to `<unk>`.
      max_size: if > 0, the largest vocabulary size including the four special tokens; the most frequent
        words are kept.

    Returns:
      Special tokens first, then words by decreasing count (ties alphabetical), so the result does not
      depend on caption order.
    """
    if min_count < 1:
      raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_size and max_size <= len(SPECIAL_TOKENS):
      raise ValueError(f"max_size must be 0 (no limit) or > {len(SPECIAL_TOKENS)}, got {max_size}")
    counts, endings = collections.Counter(), collections.Counter()
    for caption in captions:
      words = tokenize(caption)
      counts.update(words)
      if words:
        endings[words[-1]] += 1
    kept = [(word, count) for word, count in counts.items()
            if count >= min_count and word not in SPECIAL_TOKENS]
    kept.sort(key=lambda item: (-item[1], item[0]))
    if max_size:
      kept = kept[:max_size - len(SPECIAL_TOKENS)]
    kept_words = {word for word, _ in kept}
    rare_count = sum(count for word, count in counts.items() if word not in kept_words)
    rare_endings = sum(count for word, count in endings.items() if word not in kept_words)
    unk_rate = rare_endings / rare_count if rare_count else 0.0
    return cls(list(SPECIAL_TOKENS) + [word for word, _ in kept],
               ending_rates=[0.0, 0.0, 0.0, unk_rate] + [endings[word] / count for word, count in kept])

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: str) -> bool:
    return word in self._word_to_id

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and self.words == other.words

  def __repr__(self) -> str:
    return f"Vocabulary({len(self)} words)"

  def eos_banned_after(self, min_ending_rate: float) -> np.ndarray | None:
    """bool [len(words)]: the tokens a caption may not end on, or None when none is banned.

    Those that end fewer than `min_ending_rate` of their training occurrences (`ending_rates`), and
    `<bos>` (no empty caption); None when the rates are unknown or `min_ending_rate` is 0.
    """
    if self.ending_rates is None or min_ending_rate <= 0:
      return None
    return self.ending_rates < min_ending_rate

  def word_id(self, word: str) -> int:
    """The id of `word`, or UNK."""
    return self._word_to_id.get(word, UNK)

  def encode(self, text: str, max_len: int) -> np.ndarray:
    """Tokenizes and encodes a caption as `<bos> w1 .. wn <eos> <pad> ...`.

    Args:
      text: a raw caption.
      max_len: the length of the result, counting `<bos>` and `<eos>` (>= 2).

    Returns:
      int32 [max_len]. A caption too long is cut so that `<eos>` stays last.
    """
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 to hold <bos> and <eos>, got {max_len}")
    word_ids = [self.word_id(word) for word in tokenize(text)][:max_len - 2]
    ids = np.full([max_len], PAD, dtype=np.int32)
    ids[0] = BOS
    ids[1:1 + len(word_ids)] = word_ids
    ids[1 + len(word_ids)] = EOS
    return ids

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """`encode` for many captions: int32 [len(texts), max_len]."""
    ids = np.full([len(texts), max_len], PAD, dtype=np.int32)
    for row, text in enumerate(texts):
      ids[row] = self.encode(text, max_len)
    return ids

  def decode_words(self, ids: Iterable[int]) -> list[str]:
    """The words of `ids` up to the first `<eos>`; `<bos>` and `<pad>` are dropped, `<unk>` kept."""
    words = []
    for token_id in np.asarray(ids).reshape(-1).tolist():
      if token_id == EOS:
        break
      if token_id in (BOS, PAD):
        continue
      if not 0 <= token_id < len(self.words):
        raise ValueError(f"token id {token_id} is outside the vocabulary of {len(self.words)} words")
      words.append(self.words[token_id])
    return words

  def decode(self, ids: Iterable[int]) -> str:
    """Caption text of `ids` ([time] ints): words joined by single spaces, stopping at `<eos>`."""
    return " ".join(self.decode_words(ids))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as JSON (`{"format", "version", "words"[, "ending_rates"]}`)."""
    payload = {"format": _FILE_FORMAT, "version": _FILE_VERSION, **self.to_json()}
    tmp_path = f"{os.fspath(path)}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
      json.dump(payload, f, ensure_ascii=False, indent=0)
      f.write("\n")
    os.replace(tmp_path, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Vocabulary:
    """Reads a vocabulary written by `save`.

    Raises:
      errors.DataError: the file is missing, not JSON, or not a flaxcap vocabulary; the message names
        the file (and the line for bad JSON).
    """
    path = os.fspath(path)
    try:
      with open(path, "r", encoding="utf-8-sig") as f:
        payload = json.load(f)
    except FileNotFoundError:
      raise errors.DataError(
          f"{path}: vocabulary file not found; pass the vocab.json saved with the checkpoint") from None
    except json.JSONDecodeError as e:
      raise errors.DataError(
          f"{path}:{e.lineno}:{e.colno}: vocabulary file is not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
      raise errors.DataError(f"{path}: cannot read vocabulary file ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
      raise errors.DataError(
          f"{path}: not a flaxcap vocabulary (expected a JSON object with \"format\": \"{_FILE_FORMAT}\")")
    if payload.get("version") != _FILE_VERSION:
      raise errors.DataError(
          f"{path}: vocabulary version {payload.get('version')!r} is not supported "
          f"(expected {_FILE_VERSION})")
    if not isinstance(payload.get("words"), list):
      raise errors.DataError(f"{path}: vocabulary has no \"words\" list")
    try:
      return cls.from_json(payload)
    except (ValueError, TypeError) as e:
      raise errors.DataError(f"{path}: bad vocabulary: {e}") from None

  def to_json(self) -> dict:
    """`{"words": [...], "ending_rates": [...]}` (rates only when known), as checkpoints store it."""
    payload = {"words": list(self.words)}
    if self.ending_rates is not None:
      payload["ending_rates"] = [round(float(rate), 6) for rate in self.ending_rates]
    return payload

  @classmethod
  def from_json(cls, payload: dict) -> Vocabulary:
    """The inverse of `to_json`; raises ValueError on a bad entry."""
    return cls(list(payload["words"]), payload.get("ending_rates"))
