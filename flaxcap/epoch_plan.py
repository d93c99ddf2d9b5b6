"""Which image and caption each training example uses, epoch by epoch (numpy only, no TensorFlow).

The tf.data pipeline (`input_pipeline.train_dataset`) and the cached-feature training path share this,
so both see the same caption choice, order and per-host shard for a given seed and epoch:

    table = encode_captions(records, vocab, max_len)          # every caption tokenized once
    plan = plan_epoch(table, captions_per_epoch="one", global_batch_size=64, seed=0, epoch=3,
                      process_index=jax.process_index(), process_count=jax.process_count())
    tokens = table.tokens[plan.caption_index[step]]           # int32 [per_host_batch, max_len]
    images_or_features = ...[plan.record_index[step]]
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from flaxcap import errors

CAPTIONS_PER_EPOCH = ("one", "all")


@dataclasses.dataclass(frozen=True)
class CaptionTable:
  """All captions of a list of records, tokenized.

  Attributes:
    tokens: int32 [num_captions, max_len], `<bos> ... <eos> <pad>...` (see `Vocabulary.encode`).
    record_index: int32 [num_captions], the record each caption belongs to (non-decreasing).
    num_records: how many records the table was built from.
  """
  tokens: np.ndarray
  record_index: np.ndarray
  num_records: int


def encode_captions(records: Sequence, vocab, max_len: int) -> CaptionTable:
  """Tokenizes every caption of `records` (CaptionRecords) with `vocab` into a CaptionTable."""
  texts, owners = [], []
  for index, record in enumerate(records):
    if not record.captions:
      raise errors.DataError(f"{record.image_path}: record {record.image_id!r} has no captions")
    texts.extend(record.captions)
    owners.extend([index] * len(record.captions))
  return CaptionTable(tokens=vocab.encode_batch(texts, max_len),
                      record_index=np.asarray(owners, dtype=np.int32), num_records=len(records))


def batch_split(global_batch_size: int, num_devices: int, process_count: int = 1) -> tuple[int, int]:
  """(per-host batch, per-device batch) of a global batch spread over every device of every host."""
  total_devices = num_devices * process_count
  if global_batch_size <= 0 or global_batch_size % total_devices:
    raise errors.ConfigError(
        f"config.batch_size={global_batch_size} must be a positive multiple of the {total_devices} "
        f"devices ({process_count} host(s) x {num_devices})")
  return global_batch_size // process_count, global_batch_size // total_devices


def examples_per_epoch(table: CaptionTable, captions_per_epoch: str) -> int:
  """Training examples in one epoch: one per image ("one") or one per caption ("all")."""
  if captions_per_epoch not in CAPTIONS_PER_EPOCH:
    raise errors.ConfigError(f"config.data.captions_per_epoch={captions_per_epoch!r} is not one of "
                             f"{', '.join(CAPTIONS_PER_EPOCH)}")
  return table.num_records if captions_per_epoch == "one" else len(table.record_index)


def steps_per_epoch(table: CaptionTable, captions_per_epoch: str, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped; it differs every epoch); at least one,
  else `errors.ConfigError`."""
  num_examples = examples_per_epoch(table, captions_per_epoch)
  if num_examples < global_batch_size:
    raise errors.ConfigError(f"config.batch_size={global_batch_size} is larger than the {num_examples} "
                             "training examples of one epoch; lower it")
  return num_examples // global_batch_size


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """This host's share of one epoch.

  Attributes:
    record_index: int32 [steps, per_host_batch], the record (image) of each example.
    caption_index: int32 [steps, per_host_batch], rows of `CaptionTable.tokens`.
    example_seed: int32 [steps, per_host_batch], a seed per example for random augmentation.
  """
  record_index: np.ndarray
  caption_index: np.ndarray
  example_seed: np.ndarray

  @property
  def steps(self) -> int:
    return self.record_index.shape[0]


def plan_epoch(table: CaptionTable, *, captions_per_epoch: str, global_batch_size: int, seed: int,
               epoch: int, process_index: int = 0, process_count: int = 1) -> EpochPlan:
  """Picks captions, shuffles and shards one epoch; the same on every host for the same arguments.

  Args:
    table: the captions of the training records.
    captions_per_epoch: "one": one caption per image, drawn anew each epoch; "all": every caption is
      an example.
    global_batch_size: examples per step over all hosts (config.batch_size).
    seed, epoch: the plan is a pure function of these (and the table).
    process_index, process_count: this host's shard: each step's global batch is cut into
      `process_count` consecutive slices.

  Returns:
    `steps_per_epoch` steps of `global_batch_size // process_count` examples for this host.
  """
  num_examples = examples_per_epoch(table, captions_per_epoch)
  if global_batch_size % process_count:
    raise errors.ConfigError(f"config.batch_size={global_batch_size} is not divisible by the "
                             f"{process_count} hosts")
  steps = steps_per_epoch(table, captions_per_epoch, global_batch_size)
  rng = np.random.default_rng([seed, epoch])
  if captions_per_epoch == "one":
    counts = np.bincount(table.record_index, minlength=table.num_records)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    captions = first + np.floor(rng.random(table.num_records) * counts).astype(np.int64)
  else:
    captions = np.arange(num_examples)
  chosen = captions[rng.permutation(num_examples)[:steps * global_batch_size]]
  seeds = rng.integers(0, 2**31 - 1, size=chosen.shape[0])
  per_host = global_batch_size // process_count

  def host_share(values):
    return values.reshape(steps, process_count, per_host)[:, process_index].astype(np.int32)

  return EpochPlan(record_index=host_share(table.record_index[chosen]), caption_index=host_share(chosen),
                   example_seed=host_share(seeds))
