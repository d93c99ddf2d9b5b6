"""Captioning images with a trained model: `Captioner.load(dir).caption(images_or_paths)`.

Images are decoded with Pillow (`flaxcap.images`), batched, encoded and searched in one compiled
function per batch shape; a folder is captioned in streamed batches, and an unreadable file is reported
without stopping the others.
"""

import dataclasses
import functools
import os
import pathlib
from typing import Iterable, Iterator

from absl import logging
import einops
import flax
import jax
import jax.numpy as jnp
import numpy as np

from flaxcap import checkpoints
from flaxcap import consensus
from flaxcap import decoding
from flaxcap import errors
from flaxcap import images as images_lib
from flaxcap import model as model_lib
from flaxcap import vocab as vocab_lib

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# XLA:CPU hands dots, convolutions and some fusions to YNNPACK by default; for the captioner at batch 1
# that doubled the EfficientNet's time (24 ms -> 12 ms without) and made the decoder's small matmuls
# slower too. An empty list keeps XLA's own emitters and Eigen.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options() -> dict[str, str]:
  """XLA options for the captioning function (`jax.jit(..., compiler_options=...)`).

  On the CPU `_CPU_COMPILER_OPTIONS`, when this jaxlib knows them (checked once on a tiny function);
  elsewhere, or when it does not, {} (XLA's defaults). They change speed, not results (up to rounding).
  """
  if jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS)(np.float32(0)).block_until_ready()
  except RuntimeError as e:  # an XLA without the option
    logging.info("XLA:CPU defaults kept (%s)", str(e).splitlines()[0])
    return {}
  return dict(_CPU_COMPILER_OPTIONS)


@dataclasses.dataclass
class Caption:
  """One image's caption and how it was found."""
  text: str
  score: float  # the beam's (length-normalized) log-probability
  tokens: np.ndarray  # int32 [len(words)]: the generated token ids
  words: list[str]  # every generated token, "<eos>" last when the caption ended before max_len
  attention: np.ndarray  # float32 [len(words), h, w]: where each token looked
  alternatives: list[tuple[str, float]]  # every beam's (text, score), in the beam's order
  beam_index: int = 0  # which alternative this is: 0, or the consensus reranking's choice
  source: str = ""  # the path, or "" for an array


@dataclasses.dataclass
class Failure:
  """An image that could not be captioned, and why (one line naming the file)."""
  source: str
  message: str


def default_checkpoint() -> pathlib.Path:
  """The model shipped in the repository."""
  return pathlib.Path(__file__).resolve().parents[1] / "models" / "flickr8k"


class Captioner:
  """A loaded model: encoder with its weights, decoder parameters, vocabulary and config."""

  def __init__(self, config, vocab, decoder_params, encoder, encoder_variables,
               consensus_index: consensus.ConsensusIndex | None = None):
    self.config = config
    self.consensus_index = consensus_index  # training images for `consensus_neighbours`
    self.vocab = vocab
    self.decoder = model_lib.create_decoder(config, len(vocab))
    # On the device once: numpy arrays would be copied in on every call (~25 ms a call on a CPU).
    self.decoder_params = jax.device_put(decoder_params)
    self.encoder = encoder
    self.encoder_variables = jax.device_put(encoder_variables)
    # Each decoding step looks its words' LSTM gate inputs up in this [V, 4H] table (computed once).
    self.word_gate_table = jax.jit(functools.partial(
        self.decoder.apply, method="word_gate_table"))({"params": self.decoder_params})

  @property
  def feature_grid_shape(self) -> tuple[int, int]:
    """(h, w) of the encoder's feature grid, the shape of each word's attention map."""
    from flaxcap import encoders  # pylint: disable=g-import-not-at-top
    return encoders.feature_shape(self.config.encoder.name, self.config.image_size,
                                  self.config.encoder.feature_stage)[:2]

  @property
  def default_consensus_neighbours(self) -> int:
    """`consensus.NEIGHBOURS` for a model with a consensus index (the shipped one), else 0."""
    return consensus.NEIGHBOURS if self.consensus_index is not None else 0

  @classmethod
  def load(cls, checkpoint_dir: str | os.PathLike | None = None) -> "Captioner":
    """Loads a training workdir, a checkpoint directory, or an exported model (default: shipped)."""
    path = pathlib.Path(checkpoint_dir) if checkpoint_dir else default_checkpoint()
    if checkpoint_dir is None and not path.exists():
      raise errors.CheckpointError(
          f"{path}: no model is shipped in this checkout yet; train one with train.py and pass "
          "--checkpoint runs/<name>")
    variables, config, vocab = checkpoints.load_for_inference(path)
    index_path = path / consensus.INDEX_FILE
    index = consensus.ConsensusIndex.load(index_path) if index_path.is_file() else None
    try:
      encoder, encoder_variables = model_lib.encoder_and_variables(config, variables)
      return cls(config, vocab, variables["params"]["decoder"], encoder, encoder_variables, index)
    except (KeyError, AttributeError) as e:  # a config or params tree without a field the model needs
      raise errors.CheckpointError(
          f"{path}: its config or parameters lack {e}; not a model flaxcap wrote") from e
    except flax.errors.FlaxError as e:  # e.g. params shaped for another vocabulary
      raise errors.CheckpointError(
          f"{path}: its parameters do not fit its config and vocabulary ({len(vocab)} words): "
          f"{str(e).splitlines()[0]}") from e

  @functools.lru_cache(maxsize=16)
  def _compiled(self, beam_size: int, max_len: int, length_penalty: float):
    def caption_batch(encoder_variables, decoder_params, word_gate_table, eos_banned_after, images):
      grid = self.encoder.apply(encoder_variables, images)
      result = decoding.search(self.decoder, decoder_params, grid, beam_size=beam_size,
                               max_len=max_len, length_penalty=length_penalty,
                               word_gate_table=word_gate_table, eos_banned_after=eos_banned_after)
      return result, consensus.pooled_features(grid)
    return jax.jit(caption_batch, compiler_options=compiler_options())

  @functools.lru_cache(maxsize=4)
  def _eos_banned_after(self, min_ending_rate: float):
    banned = self.vocab.eos_banned_after(min_ending_rate)
    return None if banned is None else jax.device_put(banned)

  def caption_arrays(self, images: np.ndarray, *, beam_size: int = 3, max_len: int | None = None,
                     length_penalty: float | None = None,
                     min_ending_rate: float | None = None,
                     consensus_neighbours: int | None = None,
                     consensus_beam_weight: float = consensus.BEAM_SCORE_WEIGHT) -> list[Caption]:
    """Captions uint8 images [batch, size, size, 3] (already resized to `config.image_size`).

    `max_len`, `length_penalty` and `min_ending_rate` (no caption ends on a word that ends fewer than
    this fraction of its training occurrences; `Vocabulary.eos_banned_after`) default to the model's
    `config.eval`. `consensus_neighbours` > 0 keeps, of the beam's captions, the one that the captions
    of that many most similar training images agree with most, plus `consensus_beam_weight` times its
    beam score (`flaxcap.consensus`; the model needs a consensus index, `export.py --consensus_data`);
    0 keeps the beam's best; None (the default) is `default_consensus_neighbours`.
    """
    if consensus_neighbours is None:
      consensus_neighbours = self.default_consensus_neighbours
    max_len = self.config.eval.max_len if max_len is None else max_len
    length_penalty = self.config.eval.length_penalty if length_penalty is None else length_penalty
    if min_ending_rate is None:
      min_ending_rate = self.config.eval.get("min_ending_rate", vocab_lib.DEFAULT_MIN_ENDING_RATE)
    check_options(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                  min_ending_rate=min_ending_rate, consensus_neighbours=consensus_neighbours,
                  consensus_beam_weight=consensus_beam_weight)
    if consensus_neighbours and self.consensus_index is None:
      raise errors.ConfigError("consensus reranking: this model has no consensus index "
                               f"({consensus.INDEX_FILE}); write one with export.py --consensus_data")
    search = self._compiled(int(beam_size), int(max_len), float(length_penalty))
    result, pooled = search(self.encoder_variables, self.decoder_params, self.word_gate_table,
                            self._eos_banned_after(float(min_ending_rate)), jnp.asarray(images))
    height, width = self.feature_grid_shape
    tokens, scores, lengths, attention, pooled = jax.device_get(
        (result.tokens, result.scores, result.lengths, result.aux, pooled))
    alternatives = [[(self.vocab.decode(tokens[row, k]), float(scores[row, k]))
                     for k in range(tokens.shape[1])] for row in range(len(images))]
    chosen = np.zeros(len(images), int)
    if consensus_neighbours:
      chosen = self.consensus_index.rerank(
          pooled, [[text for text, _ in row] for row in alternatives], int(consensus_neighbours),
          beam_scores=scores, beam_score_weight=float(consensus_beam_weight))
    captions = []
    for row, beam in enumerate(chosen):
      length = int(lengths[row, beam])
      word_attention = einops.rearrange(attention[row, beam, :length], "t (h w) -> t h w",
                                        h=int(height), w=int(width))
      captions.append(Caption(
          text=alternatives[row][beam][0], score=float(scores[row, beam]),
          tokens=tokens[row, beam, :length],
          words=[self.vocab.words[t] for t in tokens[row, beam, :length]],
          attention=word_attention.astype(np.float32), alternatives=alternatives[row],
          beam_index=int(beam)))
    return captions

  def caption(self, images_or_paths: Iterable, *, beam_size: int = 3, max_len: int | None = None,
              length_penalty: float | None = None, min_ending_rate: float | None = None,
              consensus_neighbours: int | None = None,
              consensus_beam_weight: float = consensus.BEAM_SCORE_WEIGHT,
              batch_size: int = 16) -> Iterator[Caption | Failure]:
    """Captions paths or images in streamed batches: one result per input, in the inputs' order.

    Inputs are paths (str or os.PathLike; a path alone is taken as a list of one) or in-memory images
    (`images.from_array`: Pillow images, or uint8 or [0, 1] float arrays, gray, RGB or RGBA). One that
    cannot be read or converted yields a `Failure` in its place, and the others are captioned. Batches
    are padded to `batch_size` (or to 1 for a single image) so each shape compiles once. The search
    options are `caption_arrays`'; one out of range raises `errors.ConfigError` before any captioning.
    """
    if isinstance(images_or_paths, (str, os.PathLike)):
      images_or_paths = [images_or_paths]
    options = dict(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                   min_ending_rate=min_ending_rate, consensus_neighbours=consensus_neighbours,
                   consensus_beam_weight=consensus_beam_weight)
    check_options(batch_size=batch_size,
                  **{name: value for name, value in options.items() if value is not None})
    pending: list[tuple[str, np.ndarray] | Failure] = []  # in input order, flushed a batch at a time
    num_loaded = 0
    for index, item in enumerate(images_or_paths):
      pending.append(self._load(index, item))
      num_loaded += not isinstance(pending[-1], Failure)
      if num_loaded == batch_size:
        yield from self._caption_pending(pending, batch_size, options)
        pending, num_loaded = [], 0
    if pending:
      yield from self._caption_pending(pending, batch_size, options)

  def _load(self, index: int, item) -> tuple[str, np.ndarray] | Failure:
    """(source, uint8 [image_size, image_size, 3]) of one input of `caption`, or its Failure."""
    if isinstance(item, (str, os.PathLike)):
      source = os.fspath(item)
      try:
        return source, images_lib.load_image(item, image_size=self.config.image_size)
      except errors.ImageError as e:
        return Failure(source, str(e))
    try:
      image = images_lib.from_array(item, name=f"input {index} ({type(item).__name__})")
    except errors.ImageError as e:
      return Failure("", str(e))
    return "", images_lib.resize(image, self.config.image_size)

  def _caption_pending(self, pending, batch_size, options):
    loaded = [entry for entry in pending if not isinstance(entry, Failure)]
    captions = iter(())
    if loaded:
      padded_size = 1 if len(loaded) == 1 else batch_size
      batch = np.zeros((padded_size,) + loaded[0][1].shape, np.uint8)
      batch[:len(loaded)] = [image for _, image in loaded]
      captions = iter(self.caption_arrays(batch, **options))
    for entry in pending:
      if isinstance(entry, Failure):
        yield entry
      else:
        result = next(captions)
        result.source = entry[0]
        yield result


def _check_count(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise errors.ConfigError(f"{name} must be a whole number >= {minimum}, not {value!r}")


def check_options(*, beam_size: int = 1, max_len: int = 1, length_penalty: float = 0.0,
                  min_ending_rate: float = 0.0, consensus_neighbours: int = 0,
                  consensus_beam_weight: float = 0.0, batch_size: int = 1) -> None:
  """Raises `errors.ConfigError` naming the first option of `caption` out of range."""
  _check_count("batch_size", batch_size, minimum=1)
  _check_count("beam_size", beam_size, minimum=1)
  _check_count("max_len", max_len, minimum=1)
  _check_count("consensus_neighbours", consensus_neighbours, minimum=0)
  for name, value in (("length_penalty", length_penalty), ("min_ending_rate", min_ending_rate),
                      ("consensus_beam_weight", consensus_beam_weight)):
    if not np.isfinite(value):
      raise errors.ConfigError(f"{name} must be a finite number, not {value!r}")
    if name != "length_penalty" and value < 0:
      raise errors.ConfigError(f"{name} must be >= 0 (0: off), not {value!r}")


def find_images(folder: str | os.PathLike) -> list[pathlib.Path]:
  """Every image file under `folder`, recursively, sorted: each path named with an image suffix that
  is not a folder (broken links too: captioning reports them rather than leaving them out unseen)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise errors.ImageError(f"{folder}: not a folder")
  return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
