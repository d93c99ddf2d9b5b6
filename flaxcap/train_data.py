"""What a training run reads: records, vocabulary, caption tokens, cached features, batches.

`prepare(config, workdir)` gathers it once. Three paths:
- frozen encoder (default): train and eval images are encoded once into `<workdir>/features/`, and
  batches are rows of that table plus tokens (numpy only; no TensorFlow is imported);
- fine-tuning the last stages (`config.encoder.trainable_stages` from stage s > 0 on, with
  `config.data.cache_features`, the default): the same, but the table holds the output of the frozen
  stages 0..s-1, and each step runs the encoder's tail (stages s..) on its rows (`start_stage`); still
  no TensorFlow, and a step costs only the tail and the decoder;
- fine-tuning from images (stage 0 trainable, `config.data.cache_features=False`, or augmentation):
  batches of decoded images come from the tf.data pipeline.
When the encoder is fine-tuned, eval images are encoded with the current encoder parameters.

A run started from `config.init_checkpoint` whose model fine-tuned its encoder takes that encoder
(frozen or trained further) instead of the pretrained one, and carries it in its own checkpoints.
"""

import dataclasses
import functools
import hashlib
import itertools
from typing import Any, Iterator

from absl import logging
import jax
import numpy as np

from flaxcap import checkpoints
from flaxcap import datasets
from flaxcap import epoch_plan
from flaxcap import decoding
from flaxcap import encoders
from flaxcap import errors
from flaxcap import feature_cache
from flaxcap import model as model_lib
from flaxcap import vocab as vocab_lib


@dataclasses.dataclass(eq=False)
class TrainData:
  """Everything the training loop reads; built by `prepare`."""
  config: Any
  vocab: vocab_lib.Vocabulary
  train_records: list
  eval_records: list
  captions: epoch_plan.CaptionTable | None  # the train captions, tokenized (frozen encoder)
  encoder: Any  # the encoder module (when the frozen stages are cached: the tail it trains)
  encoder_variables: dict  # its pretrained variables (of the whole encoder)
  feature_table: np.ndarray | None = None  # float16 [num_train, P, C] (frozen encoder) or
  #   [num_train, h, w, c] (the frozen stages' output, fine-tuning the tail)
  eval_features: np.ndarray | None = None  # float16, the same for the eval images
  init_params: dict | None = None  # `config.init_checkpoint`'s params ({"decoder", ("encoder")})
  encoder_from_checkpoint: bool = False  # `encoder_variables` are init_checkpoint's fine-tuned ones

  def steps_per_epoch(self) -> int:
    return epoch_plan.steps_per_epoch(self.captions, self.config.data.captions_per_epoch,
                                      self.config.batch_size)

  def train_batches(self, *, epoch: int, num_devices: int,
                    skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of batches shaped [num_devices, per_device, ...], from batch `skip_batches` on.

    With a feature table: {"image_index": int32, rows of `feature_table`; "tokens": int32
    [..., max_len]}. Fine-tuning from images: {"images": uint8 [..., H, W, 3]; "tokens"} from the
    tf.data pipeline.
    Both follow `epoch_plan.plan_epoch`, a pure function of (seed, epoch).
    """
    config = self.config
    if self.feature_table is None:
      from flaxcap import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: fine-tuning only)
      batches = input_pipeline.train_dataset(self.train_records, self.vocab, config, seed=config.seed,
                                             num_devices=num_devices, epoch=epoch, num_epochs=1)
      return itertools.islice(batches, skip_batches, None)
    plan = epoch_plan.plan_epoch(
        self.captions, captions_per_epoch=config.data.captions_per_epoch,
        global_batch_size=config.batch_size, seed=config.seed, epoch=epoch,
        process_index=jax.process_index(), process_count=jax.process_count())
    _, per_device = epoch_plan.batch_split(config.batch_size, num_devices, jax.process_count())
    by_device = lambda rows: rows.reshape((num_devices, per_device) + rows.shape[1:])
    return ({"image_index": by_device(plan.record_index[step]),
             "tokens": by_device(self.captions.tokens[plan.caption_index[step]])}
            for step in range(skip_batches, plan.steps))

  @functools.cached_property
  def _decoder(self):
    return model_lib.create_decoder(self.config, len(self.vocab))

  def _search_fn(self, beam_size: int, max_len: int, length_penalty: float):
    return _jitted_search(self._decoder, beam_size, max_len, length_penalty)

  def eval_feature_grid(self, params, batch_stats=None, *, batch_size: int = 64) -> np.ndarray:
    """The decoder's input for every eval image, [num_eval, P, C] (float16 when cached).

    A frozen encoder's features come from the cache; a fine-tuned encoder runs with `params`
    ({"encoder": ..., "decoder": ...}) and `batch_stats` (its running statistics; None = the
    pretrained ones), from images or from the cached output of its frozen stages.
    """
    if not self.config.encoder.trainable_stages:
      return self.eval_features
    stats = batch_stats["encoder"] if batch_stats else self.encoder_variables.get("batch_stats")
    variables = {"params": params["encoder"], **({"batch_stats": stats} if stats else {})}
    encode = _jitted_apply(self.encoder)
    if self.eval_features is None:
      features, valid = feature_cache.encode_records(
          self.eval_records, lambda images: encode(variables, images),
          image_size=self.config.image_size)
      return features[valid]
    grids = []
    for start in range(0, len(self.eval_features), batch_size):
      rows = np.asarray(self.eval_features[start:start + batch_size], np.float32)
      grids.append(np.asarray(encode(variables, _pad_rows(rows, batch_size)))[:len(rows)])
    return np.concatenate(grids).reshape(len(self.eval_features), -1, grids[0].shape[-1])

  def caption_eval_split(self, params, *, beam_size: int, max_len: int,
                         length_penalty: float, batch_size: int,
                         batch_stats=None) -> dict[str, str]:
    """Captions every eval image: {image_id: caption text} (batches padded to one shape)."""
    features = self.eval_feature_grid(params, batch_stats)
    records = self.eval_records
    if self.config.eval.max_images:
      records, features = records[:self.config.eval.max_images], features[:self.config.eval.max_images]
    search_fn = self._search_fn(beam_size, max_len, length_penalty)
    captions = {}
    for start in range(0, len(records), batch_size):
      chunk = np.asarray(features[start:start + batch_size], np.float32)
      count = len(chunk)
      result = search_fn(params["decoder"], _pad_rows(chunk, batch_size))
      best_tokens = np.asarray(result.tokens[:count, 0])
      for record, tokens in zip(records[start:start + count], best_tokens):
        captions[record.image_id] = self.vocab.decode(tokens)
    return captions


def _pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """`rows` with zero rows appended up to `size` (one shape, one compilation)."""
  if len(rows) == size:
    return rows
  return np.concatenate([rows, np.zeros((size - len(rows),) + rows.shape[1:], rows.dtype)])


@functools.lru_cache(maxsize=8)
def _jitted_apply(encoder):
  """`encoder.apply` jitted (inference mode), kept across evaluations."""
  return jax.jit(encoder.apply)


@functools.lru_cache(maxsize=8)
def _jitted_search(decoder, beam_size: int, max_len: int, length_penalty: float):
  """`decoding.search` jitted, kept across runs of the same decoder in one process."""
  return jax.jit(functools.partial(decoding.search, decoder, beam_size=beam_size, max_len=max_len,
                                   length_penalty=length_penalty))


def tail_start_stage(config) -> int:
  """The first trainable encoder stage when fine-tuning runs from cached features, else 0.

  Fine-tuning caches the frozen stages' output when `config.data.cache_features` is on, no image
  augmentation is asked for, and stage 0 is frozen; otherwise (0) images flow through tf.data.
  """
  stages = tuple(config.encoder.trainable_stages)
  if not stages or not config.data.cache_features or config.data.augment or config.data.hflip:
    return 0
  count = encoders.num_stages(config.encoder.name)
  return min(encoders.stage_index(s, count, "config.encoder.trainable_stages") for s in stages)


def _load_init_checkpoint(config, vocab) -> dict | None:
  """`config.init_checkpoint`'s variables, checked against this run's vocabulary and encoder."""
  path = config.init_checkpoint
  if not path:
    return None
  variables, source_config, source_vocab = checkpoints.load_for_inference(path)
  mismatch = checkpoints.model_mismatch(source_config, source_vocab, config, vocab, "this run")
  if mismatch:
    raise errors.ConfigError(f"{path}: {mismatch}; config.init_checkpoint needs the same vocabulary "
                             "and encoder")
  return variables


def _fingerprint(variables) -> str:
  """A short hash of every leaf's bytes: names encoder weights in a feature cache's description."""
  digest = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(variables):
    digest.update(np.ascontiguousarray(leaf, np.float32).tobytes())
  return digest.hexdigest()[:16]


def prepare(config, workdir) -> TrainData:
  """Reads the splits, builds the vocabulary from train captions, encodes or sets up the images."""
  train_records = datasets.load_records(config.data, config.data.train_split)
  eval_records = datasets.load_records(config.data, config.data.eval_split)
  for split, records in ((config.data.train_split, train_records),
                         (config.data.eval_split, eval_records)):
    if not records:
      raise errors.DataError(f"{config.data.root}: the {split!r} split is empty "
                             f"(layout {config.data.layout!r}); check config.data")
  shared = {r.image_id for r in train_records} & {r.image_id for r in eval_records}
  if shared:
    logging.warning("%d of the %d %s images are also in %s (e.g. %s): its scores are not those of "
                    "unseen images", len(shared), len(eval_records), config.data.eval_split,
                    config.data.train_split, sorted(shared)[0])
  vocab = vocab_lib.Vocabulary.build((c for r in train_records for c in r.captions),
                                     min_count=config.vocab.min_count, max_size=config.vocab.max_size)
  if len(vocab) == len(vocab_lib.SPECIAL_TOKENS):
    raise errors.ConfigError(f"config.vocab.min_count={config.vocab.min_count}: no word of the "
                             f"{config.data.train_split!r} captions occurs that often; lower it")
  logging.info("%d train and %d %s images; vocabulary of %d words", len(train_records),
               len(eval_records), config.data.eval_split, len(vocab))
  init_variables = _load_init_checkpoint(config, vocab)
  # A fine-tuned init checkpoint's encoder, else the pretrained one.
  encoder, encoder_variables = model_lib.encoder_and_variables(config, init_variables)
  data = TrainData(config=config, vocab=vocab, train_records=train_records,
                   eval_records=eval_records, captions=None,
                   encoder=encoder, encoder_variables=encoder_variables,
                   init_params=init_variables and init_variables["params"])
  weights_id = ""
  if init_variables is not None and "encoder" in init_variables["params"]:
    data.encoder_from_checkpoint = True
    weights_id = _fingerprint(encoder_variables)
  tail_start = tail_start_stage(config)
  if not config.encoder.trainable_stages or tail_start:
    # Cache what does not change: the whole frozen encoder's output, or its frozen head's.
    head_stage = tail_start - 1 if tail_start else None
    head = model_lib.create_encoder(config, feature_stage=head_stage) if tail_start else encoder
    encode = jax.jit(lambda images: head.apply(encoder_variables, images))
    data.feature_table, data.train_records = feature_cache.cached_features(
        workdir, config, "train", train_records, encode, feature_stage=head_stage,
        weights_id=weights_id)
    data.eval_features, data.eval_records = feature_cache.cached_features(
        workdir, config, "eval", eval_records, encode, feature_stage=head_stage,
        weights_id=weights_id)
    for split, kept in ((config.data.train_split, data.train_records),
                        (config.data.eval_split, data.eval_records)):
      if not kept:
        raise errors.DataError(f"{config.data.root}: not one image of the {split!r} split could be "
                               "read (see the warnings above)")
  if tail_start:
    data.encoder = model_lib.create_encoder(config, start_stage=tail_start)
    grid = encoders.feature_shape(config.encoder.name, config.image_size, tail_start - 1)
    data.feature_table = data.feature_table.reshape((-1,) + grid)
    data.eval_features = data.eval_features.reshape((-1,) + grid)
  data.captions = epoch_plan.encode_captions(data.train_records, vocab, config.data.max_len)
  return data
