"""Consensus reranking: the beam's caption that the captions of similar training images agree with.

Beam search ranks captions by the decoder's own probability. Consensus reranking (Devlin et al., 2015,
"Exploring Nearest Neighbor Approaches for Image Captioning"; Mao et al., 2015) picks instead, among
the beam's captions, the one with the highest mean CIDEr-D against the reference captions of the
image's k nearest training images, plus a small multiple of its beam score (`BEAM_SCORE_WEIGHT`: the
beam's log-probability breaks near-ties between captions the neighbours agree with about equally). The index (`ConsensusIndex`) holds one embedding per training
image, the mean of its encoder grid (centred on the training mean, unit length: cosine neighbours),
and the images' captions, also stored PTB-tokenized (so that the first reranking need not tokenize
30,000 captions); `write_index` builds it for an exported model, and
`Captioner.load` reads it from the model's directory (`INDEX_FILE`): a model with an index reranks
its beam over `NEIGHBOURS` neighbours unless told otherwise.

    index = ConsensusIndex.load("models/flickr8k/consensus.npz")
    chosen = index.rerank(pooled_features, beam_captions, neighbours=15,   # [batch] beam indices
                          beam_scores=beam_scores, beam_score_weight=BEAM_SCORE_WEIGHT)
"""

import dataclasses
import functools
import json
import os
import pathlib
from typing import Sequence
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from flaxcap import errors
from flaxcap import metrics
from flaxcap import sentence_scores

INDEX_FILE = "consensus.npz"
# How many neighbours a model with an index consults by default (`Captioner.caption`, `infer.py`), chosen
# on Flickr8k's dev split: 15 against 10, 20, 25 and 30 (README).
NEIGHBOURS = 15
# Weight of the beam's own score (its log-probability) beside the mean CIDEr-D, chosen on Flickr8k's dev
# split: 0.02-0.05 kept CIDEr and lifted BLEU-4 by 0.2-0.5 over 0 for three models (README).
BEAM_SCORE_WEIGHT = 0.03


def pooled_features(grid: jax.Array) -> jax.Array:
  """The mean feature of each image: grid [batch, height, width, channels] -> [batch, channels]."""
  return jnp.mean(grid.astype(jnp.float32), axis=(1, 2))


@dataclasses.dataclass
class ConsensusIndex:
  """Training images as (embedding, reference captions) pairs.

  Attributes:
    embeddings: float16 [images, channels], the images' pooled features minus `center`, unit length.
    center: float32 [channels], the mean pooled feature of the training images.
    captions: each image's raw reference captions.
    tokenized: every caption PTB-tokenized, flat in image order (`metrics.tokenize_captions`); None:
      tokenized on first use.
  """
  embeddings: np.ndarray
  center: np.ndarray
  captions: list[list[str]]
  tokenized: list[str] | None = None

  @classmethod
  def build(cls, pooled: np.ndarray, captions: Sequence[Sequence[str]]) -> "ConsensusIndex":
    """The index of images with pooled features [images, channels] and their captions."""
    pooled = np.asarray(pooled, np.float32)
    if pooled.ndim != 2 or len(pooled) != len(captions) or not len(captions):
      raise errors.DataError(f"consensus index: {pooled.shape} features for {len(captions)} images")
    center = pooled.mean(0)
    return cls(_unit(pooled - center).astype(np.float16), center, [list(c) for c in captions])

  def save(self, path: str | os.PathLike) -> None:
    """Writes the index with its captions tokenized, so that scoring need not tokenize them."""
    captions = np.frombuffer(json.dumps(self.captions).encode("utf-8"), np.uint8)
    tokenized = np.frombuffer("\n".join(self._tokenized).encode("utf-8"), np.uint8)
    with open(path, "wb") as f:  # np.savez_compressed would append ".npz" to another suffix
      np.savez_compressed(f, embeddings=self.embeddings, center=self.center, captions=captions,
                          tokenized=tokenized)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "ConsensusIndex":
    """Reads an index `save` wrote; anything else (truncated, corrupt, of other shapes or types) is
    an `errors.CheckpointError` naming the file."""
    try:
      with np.load(path) as stored:
        index = cls(stored["embeddings"], stored["center"],
                    json.loads(stored["captions"].tobytes().decode("utf-8")))
        if "tokenized" in stored:  # indexes written before session 17: tokenized on first use
          index.tokenized = stored["tokenized"].tobytes().decode("utf-8").split("\n")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise errors.CheckpointError(f"{path}: not a consensus index ({type(e).__name__}: {e})")
    problem = index._problem()
    if problem:
      raise errors.CheckpointError(f"{path}: not a usable consensus index: {problem}")
    return index

  def _problem(self) -> str | None:
    """What makes this index unusable, or None."""
    embeddings, center = self.embeddings, self.center
    if embeddings.ndim != 2 or center.ndim != 1 or not (
        np.issubdtype(embeddings.dtype, np.floating) and np.issubdtype(center.dtype, np.floating)):
      return (f"embeddings {embeddings.dtype}{list(embeddings.shape)} and center "
              f"{center.dtype}{list(center.shape)}, not float [images, channels] and [channels]")
    if not isinstance(self.captions, list) or not all(
        isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)
        for texts in self.captions):
      return "its captions are not a list of non-empty lists of strings, one per image"
    if embeddings.shape != (len(self.captions), len(center)):
      return (f"{embeddings.shape} embeddings for {len(self.captions)} images of {len(center)} "
              "channels")
    if not (np.isfinite(embeddings).all() and np.isfinite(center).all()):
      return "its embeddings or center hold NaN or infinity"
    if self.tokenized is not None and len(self.tokenized) != sum(map(len, self.captions)):
      return f"{len(self.tokenized)} tokenized captions for {sum(map(len, self.captions))} captions"
    return None

  @property
  def _tokenized(self) -> list[str]:
    if self.tokenized is None:
      self.tokenized = metrics.tokenize_captions(c for captions in self.captions for c in captions)
    return self.tokenized

  @functools.cached_property
  def _device_embeddings(self) -> jax.Array:
    return jax.device_put(self.embeddings.astype(np.float32))

  @functools.cached_property
  def _cider(self) -> sentence_scores.CiderD:
    return sentence_scores.CiderD(self.captions, tokenized=self._tokenized)

  def neighbours(self, pooled: np.ndarray, count: int) -> np.ndarray:
    """int [batch, count]: the most similar training images (cosine), most similar first."""
    pooled = np.asarray(pooled, np.float32)
    if count < 1:
      raise errors.ConfigError(f"consensus reranking needs at least one neighbour, not {count}")
    if pooled.shape[-1] != self.embeddings.shape[1]:
      raise errors.ConfigError(f"consensus index: {self.embeddings.shape[1]}-channel embeddings, "
                               f"the encoder gives {pooled.shape[-1]}")
    query = _unit(pooled - self.center)
    # In XLA rather than numpy: numpy's threaded BLAS, run right after the captioner's XLA call,
    # fought XLA's threads on the 2-core CPU (+30 ms a photo; the XLA product takes ~1 ms).
    count = min(int(count), len(self.embeddings))
    return np.asarray(_nearest(jnp.asarray(query), self._device_embeddings, count))

  def consensus(self, pooled: np.ndarray, candidates: Sequence[Sequence[str]],
                neighbours: int) -> np.ndarray:
    """float [batch, candidates]: each candidate's mean CIDEr-D against its image's neighbours."""
    nearest = self.neighbours(pooled, neighbours)  # [batch, neighbours]
    scores = np.full((len(candidates), max(map(len, candidates), default=0)), -np.inf)
    row = np.repeat(np.arange(len(candidates)), [len(texts) for texts in candidates])
    column = np.concatenate([np.arange(len(texts)) for texts in candidates] + [[]]).astype(int)
    if not len(row):
      return scores
    texts = metrics.tokenize_captions(text for texts in candidates for text in texts)
    count = nearest.shape[1]
    # Every (candidate, neighbour) pair in one call: [candidates x neighbours] CIDEr-D values.
    values = self._cider.score_tokenized(nearest[row].reshape(-1), np.repeat(texts, count))
    scores[row, column] = values.reshape(-1, count).mean(1)
    return scores

  def rerank(self, pooled: np.ndarray, candidates: Sequence[Sequence[str]], neighbours: int,
             beam_scores: np.ndarray | None = None, beam_score_weight: float = 0.0) -> np.ndarray:
    """int [batch]: the candidate each image keeps (the first on a tie, i.e. the beam's best).

    Each candidate's score is its `consensus` plus `beam_score_weight` times its entry of `beam_scores`
    (float [batch, candidates], the beam's log-probabilities; needed when the weight is not 0).
    """
    scores = self.consensus(pooled, candidates, neighbours)
    if beam_score_weight < 0:
      raise errors.ConfigError(f"consensus reranking: the beam score weight must be >= 0, "
                               f"not {beam_score_weight}")
    if beam_score_weight:
      if beam_scores is None or np.shape(beam_scores)[0] != len(scores) or np.shape(
          beam_scores)[1] < scores.shape[1]:
        raise errors.ConfigError(f"consensus reranking: beam scores of shape "
                                 f"{None if beam_scores is None else np.shape(beam_scores)} for "
                                 f"{scores.shape} candidates")
      scores = scores + beam_score_weight * np.asarray(beam_scores, np.float64)[:, :scores.shape[1]]
    return np.argmax(scores, axis=1)


@functools.partial(jax.jit, static_argnames="count")
def _nearest(query: jax.Array, embeddings: jax.Array, count: int) -> jax.Array:
  """int [batch, count]: rows of `embeddings` [images, C] with the largest dot products with `query`."""
  return jax.lax.top_k(query @ embeddings.T, count)[1]


def _unit(vectors: np.ndarray) -> np.ndarray:
  return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def write_index(model_dir: str | os.PathLike, data_root: str | os.PathLike,
                batch_size: int = 64) -> pathlib.Path:
  """Encodes the training images under `data_root` with the model's encoder; writes `INDEX_FILE`.

  The model's `config.data` layout is read under `data_root` (its training split). Images that
  cannot be read are left out with a warning; the rest are indexed.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from flaxcap import checkpoints, datasets, feature_cache  # pylint: disable=g-import-not-at-top
  from flaxcap import model as model_lib  # pylint: disable=g-import-not-at-top
  variables, config, _ = checkpoints.load_for_inference(model_dir)
  data_config = datasets.rooted_at(config.data, data_root)
  records = datasets.load_records(data_config, data_config.train_split)
  if not records:
    raise errors.DataError(f"{data_root}: no {data_config.train_split!r} images to index")
  encoder, encoder_variables = model_lib.encoder_and_variables(config, variables)
  encode = jax.jit(lambda images: pooled_features(encoder.apply(encoder_variables, images))[:, None,
                                                                                             None])
  pooled, valid = feature_cache.encode_records(records, encode, image_size=config.image_size,
                                               batch_size=batch_size)
  if not valid.all():
    logging.warning("%s: %d unreadable training images left out of the consensus index", data_root,
                    int((~valid).sum()))
  index = ConsensusIndex.build(pooled[valid, 0], [r.captions for r, ok in zip(records, valid) if ok])
  path = pathlib.Path(model_dir) / INDEX_FILE
  index.save(path)
  return path
