"""Tests for flaxcap.input_pipeline: batches, shapes, determinism, sharding, broken images, parity."""

import logging

import data_fixtures
import numpy as np
import pytest

from configs import tiny
from flaxcap import datasets
from flaxcap import epoch_plan
from flaxcap import images
from flaxcap import input_pipeline
from flaxcap import vocab as vocab_lib
import gc

IMAGE_SIZE = 32
GOOD = data_fixtures.GOOD_KINDS + ("rgb_jpeg", "rgb_jpeg", "rgb_jpeg")  # 12 good images
BROKEN = ("truncated_jpeg", "empty", "text", "garbled_jpeg")


def _config(batch_size=4, **data_fields):
  config = tiny.get_config()
  config.image_size = IMAGE_SIZE
  config.batch_size = batch_size
  config.data.max_len = 10
  for name, value in data_fields.items():
    setattr(config.data, name, value)
  return config


def _records(folder, kinds, sizes=None):
  records = []
  for index, kind in enumerate(kinds):
    size = (sizes or {}).get(index, (40 + 4 * index, 30 + 3 * index))
    path = data_fixtures.write_image(folder / f"{index:02d}_{kind}.img", kind, seed=index, size=size)
    captions = tuple(f"picture {word} number {index}" for word in ("one", "two", "three", "four", "five"))
    records.append(datasets.CaptionRecord(f"id{index:02d}", str(path), captions, "train"))
  return records


@pytest.fixture(scope="module")
def good_records(tmp_path_factory):
  return _records(tmp_path_factory.mktemp("good"), GOOD, sizes={0: (400, 300)})


@pytest.fixture(scope="module")
def vocab(good_records):
  return vocab_lib.Vocabulary.build((c for r in good_records for c in r.captions), min_count=1)


def _reference_images(records):
  """Pillow's decode + resize of each record (an independent path from the TF fast path)."""
  return np.stack([images.load_image(r.image_path, IMAGE_SIZE, exif_transpose=False).astype(float)
                   for r in records])


def _identify(image, references):
  errors_by_record = np.abs(references - image.astype(float)).mean(axis=(1, 2, 3))
  return int(errors_by_record.argmin()), float(errors_by_record.min())


def _collect(iterator):
  return [{k: v.copy() for k, v in batch.items()} for batch in iterator]


def test_tensorflow_sees_no_gpu():
  import tensorflow as tf
  assert tf.config.get_visible_devices("GPU") == []


def test_train_batches_have_pmap_shapes_and_match_their_captions(good_records, vocab):
  config = _config(batch_size=4)
  batches = _collect(input_pipeline.train_dataset(good_records, vocab, config, seed=0, num_devices=2,
                                                  process_index=0, process_count=1))
  table = epoch_plan.encode_captions(good_records, vocab, config.data.max_len)
  assert len(batches) == epoch_plan.steps_per_epoch(table, "one", 4) == 3
  references = _reference_images(good_records)
  seen = []
  for batch in batches:
    assert batch["images"].shape == (2, 2, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["images"].dtype == np.uint8
    assert batch["tokens"].shape == (2, 2, 10) and batch["tokens"].dtype == np.int32
    for image, tokens in zip(batch["images"].reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3),
                             batch["tokens"].reshape(-1, 10)):
      assert tokens[0] == vocab_lib.BOS and vocab_lib.EOS in tokens
      record, error = _identify(image, references)
      assert error < 4.0, (good_records[record].image_path, error)  # TF and Pillow decode alike
      assert vocab.decode(tokens) in {c.lower() for c in good_records[record].captions}
      seen.append(record)
  assert len(set(seen)) == len(seen) == 12  # every image once per epoch


def test_train_is_deterministic_for_a_seed_and_varies_with_epoch(good_records, vocab):
  config = _config(batch_size=4, augment=True, hflip=True)

  def run(seed, epoch):
    return _collect(input_pipeline.train_dataset(good_records, vocab, config, seed=seed, num_devices=1,
                                                 epoch=epoch, process_index=0, process_count=1))

  first, again = run(1, 0), run(1, 0)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(first[0]["tokens"], run(1, 1)[0]["tokens"])
  assert not np.array_equal(first[0]["images"], run(2, 0)[0]["images"])


def test_augmentation_changes_pixels_but_keeps_the_picture(good_records, vocab):
  config = _config(batch_size=12, augment=True)
  batch, = _collect(input_pipeline.train_dataset(good_records, vocab, config, seed=0, num_devices=1,
                                                 process_index=0, process_count=1))
  references = _reference_images(good_records)
  errors = [_identify(image, references)[1] for image in batch["images"][0]]
  assert max(errors) > 4.0  # augmented ...
  assert np.median(errors) < 40.0  # ... but still close to its own picture


def test_hflip_mirrors_some_images_when_asked(good_records, vocab):
  config = _config(batch_size=12, hflip=True)
  batch, = _collect(input_pipeline.train_dataset(good_records, vocab, config, seed=0, num_devices=1,
                                                 process_index=0, process_count=1))
  references = _reference_images(good_records)
  flipped = 0
  for image in batch["images"][0]:
    record, error = _identify(image, references)
    mirrored_record, mirrored_error = _identify(image[:, ::-1], references)
    assert min(error, mirrored_error) < 4.0
    flipped += mirrored_error < error
  assert 0 < flipped < 12


def test_all_captions_mode_and_multiple_epochs(good_records, vocab):
  config = _config(batch_size=8, captions_per_epoch="all")
  batches = _collect(input_pipeline.train_dataset(good_records, vocab, config, seed=0, num_devices=4,
                                                  num_epochs=2, process_index=0, process_count=1))
  assert len(batches) == 2 * (12 * 5 // 8)
  assert batches[0]["tokens"].shape == (4, 2, 10)
  first_epoch = np.concatenate([b["tokens"].reshape(-1, 10) for b in batches[:7]])
  assert len({tuple(t) for t in first_epoch}) == len(first_epoch)  # each caption once


def test_hosts_get_disjoint_shards(good_records, vocab):
  config = _config(batch_size=4)
  shards = [_collect(input_pipeline.train_dataset(good_records, vocab, config, seed=0, num_devices=1,
                                                  process_index=i, process_count=2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3
  references = _reference_images(good_records)
  ids = [{_identify(img, references)[0] for b in shard for img in b["images"].reshape(-1, 32, 32, 3)}
         for shard in shards]
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 12


def test_corrupt_images_are_skipped_counted_and_never_stop_an_epoch(tmp_path, good_records, vocab, caplog):
  broken = _records(tmp_path, BROKEN)
  missing = datasets.CaptionRecord("gone", str(tmp_path / "gone.jpg"), ("a caption",), "train")
  records = good_records[:9] + broken + [missing]
  config = _config(batch_size=12)
  with caplog.at_level(logging.WARNING):
    batches = _collect(input_pipeline.train_dataset(records, vocab, config, seed=0, num_devices=1,
                                                    process_index=0, process_count=1))
  # The missing and the empty file are left out up front: 12 examples, one step; the truncated JPEG
  # and the text file fail in Pillow, the garbled JPEG in TF, and the batch is filled up by repeating
  # good examples.
  assert len(batches) == 1 and batches[0]["images"].shape == (1, 12, IMAGE_SIZE, IMAGE_SIZE, 3)
  references = _reference_images(good_records[:9])
  identified = {_identify(image, references) for image in batches[0]["images"][0]}
  assert {record for record, _ in identified} == set(range(9))
  assert max(error for _, error in identified) < 4.0  # only good images come out
  messages = " ".join(r.getMessage() for r in caplog.records)
  for record in broken + [missing]:  # each named, the garbled JPEG (TF's decoder) too
    assert record.image_path in messages
  for problem in ("truncated or corrupt", "not an image", "file not found", "empty file",
                  "TensorFlow could not decode it"):
    assert problem in messages
  assert "2 of 14 image files are missing or empty" in messages
  assert "epoch 0 skipped 3 of 12 images" in messages


def test_image_dataset_keeps_order_and_masks_failures(tmp_path, good_records, caplog):
  records = good_records[:5] + _records(tmp_path, BROKEN) + [str(tmp_path / "gone.png")]
  batches = _collect(input_pipeline.image_dataset(records, _config(), batch_size=4))
  assert len(batches) == 3
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  # The garbled JPEG (8) fails inside TF's decoder and is dropped; the other failures are masked.
  np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, 5, 6, 7, 9, -1, -1, -1])
  np.testing.assert_array_equal(mask, [True] * 5 + [False] * 7)
  pixels = np.concatenate([b["images"] for b in batches])
  assert pixels.dtype == np.uint8 and pixels.shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert (pixels[5:] == 0).all()
  np.testing.assert_allclose(pixels[:5].astype(float), _reference_images(good_records[:5]), atol=40)
  assert np.abs(pixels[:5] - _reference_images(good_records[:5])).mean() < 3.0
  assert f"{records[8].image_path}: TensorFlow could not decode it" in caplog.text


def test_eval_dataset_ids_and_host_shards(good_records):
  config = _config()
  batches = _collect(input_pipeline.eval_dataset(good_records[:10], config, batch_size=4))
  ids = np.concatenate([b["image_ids"] for b in batches])
  assert list(ids) == [r.image_id for r in good_records[:10]] + ["", ""]
  assert np.concatenate([b["mask"] for b in batches]).sum() == 10
  shards = [_collect(input_pipeline.eval_dataset(good_records[:10], config, batch_size=4, shard_by_host=True,
                                                 process_index=i, process_count=3)) for i in range(3)]
  assert [len(s) for s in shards] == [1, 1, 1]
  for host, shard in enumerate(shards):
    index = shard[0]["index"][shard[0]["mask"]]
    np.testing.assert_array_equal(index, np.arange(host, 10, 3))
    assert list(shard[0]["image_ids"][shard[0]["mask"]]) == [good_records[i].image_id for i in index]


def test_fast_path_matches_pillow_on_large_jpeg_with_dct_scaling(tmp_path):
  path = data_fixtures.write_image(tmp_path / "large.jpg", "rgb_jpeg", seed=5, size=(640, 480))
  batch, = _collect(input_pipeline.image_dataset([str(path)], _config(), batch_size=1))
  reference = images.load_image(path, IMAGE_SIZE).astype(float)
  assert np.abs(batch["images"][0] - reference).mean() < 2.0


@pytest.mark.real_data
def test_real_flickr8k_batch(flickr8k_root):
  import jax
  config = _config(batch_size=8)
  config.image_size = 224
  config.data.max_len = 22
  data_config = config.data
  data_config.layout, data_config.root = "flickr8k", str(flickr8k_root)
  records = datasets.load_records(data_config, "dev")[:16]
  vocab = vocab_lib.Vocabulary.build((c for r in records for c in r.captions), min_count=1)
  num_devices = jax.local_device_count()
  batch = next(input_pipeline.train_dataset(records, vocab, config, seed=0, num_devices=num_devices))
  assert batch["images"].shape == (num_devices, 8 // num_devices, 224, 224, 3)
  assert batch["images"].dtype == np.uint8 and batch["images"].std() > 10
  assert batch["tokens"].shape == (num_devices, 8 // num_devices, 22) and batch["tokens"].dtype == np.int32


IMAGE_SIZE_INPUT_PIPELINE = 32


def _config_input_pipeline(batch_size=4):
  config = tiny.get_config()
  config.image_size = IMAGE_SIZE_INPUT_PIPELINE
  config.batch_size = batch_size
  config.data.max_len = 10
  return config


def _records_input_pipeline(folder, kinds):
  records = []
  for index, kind in enumerate(kinds):
    path = data_fixtures.write_image(folder / f"{index:02d}_{kind}.img", kind, seed=index)
    captions = tuple(f"picture {word} number {index}" for word in ("one", "two", "three"))
    records.append(datasets.CaptionRecord(f"id{index:02d}", str(path), captions, "train"))
  return records


def _vocab(records):
  return vocab_lib.Vocabulary.build((c for r in records for c in r.captions), min_count=1)


def test_leaving_an_epoch_early_names_no_image_as_undecodable(tmp_path, caplog):
  records = _records_input_pipeline(tmp_path, ["rgb_jpeg"] * 12)
  before = input_pipeline.FAILURES.paths
  with caplog.at_level(logging.WARNING):
    batches = input_pipeline.train_dataset(records, _vocab(records), _config_input_pipeline(batch_size=4), seed=0,
                                           num_devices=1, process_index=0, process_count=1)
    next(batches)  # one step of three, then the loop stops (preempted, num_steps reached, ...)
    batches.close()
    del batches
    gc.collect()
  assert input_pipeline.FAILURES.paths - before == frozenset()
  assert "could not decode" not in caplog.text


def test_an_epoch_whose_whole_steps_fail_to_decode_still_has_every_step(tmp_path):
  # 4 good images and 8 that Pillow cannot read (non-empty, so not left out up front): the 4 good
  # examples fill one batch of 4 and the other two steps of the epoch must be filled in.
  records = _records_input_pipeline(tmp_path, ["rgb_jpeg"] * 4 + ["text"] * 8)
  vocab = _vocab(records)
  config = _config_input_pipeline(batch_size=4)
  table = epoch_plan.encode_captions(records, vocab, config.data.max_len)
  expected_steps = epoch_plan.steps_per_epoch(table, config.data.captions_per_epoch, 4)
  assert expected_steps == 3
  for hosts in (1, 2):
    counts = [len(list(input_pipeline.train_dataset(records, vocab, config, seed=0, num_devices=1,
                                                    process_index=host, process_count=hosts)))
              for host in range(hosts)]
    assert counts == [expected_steps] * hosts, (hosts, counts)


@pytest.mark.parametrize("num_records, hosts, batch_size", [(10, 3, 3), (7, 2, 2), (5, 4, 1)])
def test_every_host_yields_as_many_eval_batches(tmp_path, num_records, hosts, batch_size):
  records = _records_input_pipeline(tmp_path, ["rgb_jpeg"] * num_records)
  config = _config_input_pipeline()
  shards = [list(input_pipeline.eval_dataset(records, config, batch_size=batch_size,
                                             shard_by_host=True, process_index=host,
                                             process_count=hosts)) for host in range(hosts)]
  largest_shard = -(-num_records // hosts)  # host 0 holds the most records
  expected = -(-largest_shard // batch_size)
  assert [len(shard) for shard in shards] == [expected] * hosts
  seen = sorted(int(i) for shard in shards for b in shard for i in b["index"][b["mask"]])
  assert seen == list(range(num_records))


def test_the_augmenting_crop_keeps_80_to_100_percent_of_each_side():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.zeros([200, 300, 3], tf.uint8)
  heights, widths = [], []
  for k in range(40):
    crop = input_pipeline._augment_crop(image, tf.constant([7, k], tf.int32))  # pylint: disable=protected-access
    heights.append(int(crop.shape[0]))
    widths.append(int(crop.shape[1]))
  assert 160 <= min(heights) and max(heights) <= 200, (min(heights), max(heights))
  assert 240 <= min(widths) and max(widths) <= 300, (min(widths), max(widths))
  assert max(heights) - min(heights) > 20 and max(widths) - min(widths) > 30  # it does vary
