"""Tests for flaxcap.epoch_plan: caption choice, shuffling and per-host sharding of an epoch."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flaxcap import datasets
from flaxcap import epoch_plan
from flaxcap import errors
from flaxcap import vocab as vocab_lib

NUM_RECORDS = 20


def _table(captions_per_record=5):
  records = []
  for i in range(NUM_RECORDS):
    captions = tuple(f"image w{i} caption c{k}" for k in range(captions_per_record + i % 2))
    records.append(datasets.CaptionRecord(f"id{i}", f"/x/{i}.jpg", captions, "train"))
  vocab = vocab_lib.Vocabulary.build([c for r in records for c in r.captions], min_count=1)
  return epoch_plan.encode_captions(records, vocab, max_len=8), records, vocab


def test_encode_captions():
  table, records, vocab = _table()
  assert table.tokens.dtype == np.int32 and table.tokens.shape == (sum(len(r.captions) for r in records), 8)
  assert table.num_records == NUM_RECORDS
  np.testing.assert_array_equal(np.bincount(table.record_index), [len(r.captions) for r in records])
  assert vocab.decode(table.tokens[7]) == records[1].captions[2]


def test_batch_split():
  assert epoch_plan.batch_split(64, 4, 2) == (32, 8)
  assert epoch_plan.batch_split(8, 8) == (8, 1)
  with pytest.raises(errors.ConfigError, match="config.batch_size=10"):
    epoch_plan.batch_split(10, 4)


def _plan(table, **overrides):
  arguments = dict(captions_per_epoch="one", global_batch_size=8, seed=0, epoch=0)
  arguments.update(overrides)
  return epoch_plan.plan_epoch(table, **arguments)


def test_one_caption_per_image_each_epoch():
  table, _, _ = _table()
  plan = _plan(table)
  assert plan.steps == epoch_plan.steps_per_epoch(table, "one", 8) == NUM_RECORDS // 8
  assert plan.record_index.shape == plan.caption_index.shape == plan.example_seed.shape == (2, 8)
  records = plan.record_index.reshape(-1)
  assert len(set(records.tolist())) == len(records)  # each image at most once per epoch
  np.testing.assert_array_equal(table.record_index[plan.caption_index], plan.record_index)


def test_caption_choice_covers_every_caption_over_epochs():
  table, _, _ = _table()
  chosen = np.concatenate([_plan(table, epoch=e).caption_index.reshape(-1) for e in range(60)])
  assert set(chosen.tolist()) == set(range(len(table.record_index)))


def test_all_captions_mode():
  table, _, _ = _table()
  plan = _plan(table, captions_per_epoch="all")
  num_captions = len(table.record_index)
  assert plan.steps == num_captions // 8
  captions = plan.caption_index.reshape(-1)
  assert len(set(captions.tolist())) == len(captions)


def test_plans_are_deterministic_and_change_with_seed_and_epoch():
  table, _, _ = _table()
  first, again = _plan(table, seed=3, epoch=2), _plan(table, seed=3, epoch=2)
  for field in ("record_index", "caption_index", "example_seed"):
    np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
  assert not np.array_equal(first.caption_index, _plan(table, seed=4, epoch=2).caption_index)
  assert not np.array_equal(first.caption_index, _plan(table, seed=3, epoch=3).caption_index)


def test_hosts_get_disjoint_slices_of_the_same_global_batches():
  table, _, _ = _table()
  whole = _plan(table, global_batch_size=8)
  shares = [_plan(table, global_batch_size=8, process_index=i, process_count=2) for i in range(2)]
  assert shares[0].caption_index.shape == (2, 4)
  np.testing.assert_array_equal(np.concatenate([s.caption_index for s in shares], axis=1),
                                whole.caption_index)


def test_bad_settings():
  table, _, _ = _table()
  with pytest.raises(errors.ConfigError, match="captions_per_epoch='some'"):
    _plan(table, captions_per_epoch="some")
  with pytest.raises(errors.ConfigError, match="larger than the 20"):
    _plan(table, global_batch_size=32)
  with pytest.raises(errors.ConfigError, match="config.batch_size=32 is larger than the 20"):
    epoch_plan.steps_per_epoch(table, "one", 32)  # what a run asks first: not 0 steps


def test_epoch_plan_module_does_not_import_tensorflow():
  code = "import sys, flaxcap.epoch_plan; assert 'tensorflow' not in sys.modules and 'jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])


def test_hosts_get_disjoint_slices_of_every_field():
  table, _, _ = _table()
  whole = _plan(table, global_batch_size=8)
  shares = [_plan(table, global_batch_size=8, process_index=i, process_count=2) for i in range(2)]
  for field in ("record_index", "caption_index", "example_seed"):
    np.testing.assert_array_equal(
        np.concatenate([getattr(s, field) for s in shares], axis=1), getattr(whole, field), field)
