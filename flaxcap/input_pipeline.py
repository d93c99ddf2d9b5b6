"""tf.data input pipelines: records -> uint8 image batches (+ caption tokens) as numpy, ready for pmap.

Decoding: JPEGs that look whole (FF D8 FF ... FF D9) are decoded by TensorFlow (libjpeg, scaled down
by 1/2, 1/4 or 1/8 in the DCT when the image is at least that much larger than `config.image_size`);
every other file (PNG, BMP, GIF, CMYK/16-bit/alpha modes, damaged JPEGs) goes through Pillow
(`images.decode_image_bytes`) inside `tf.numpy_function`. Images are resized to a square
[image_size, image_size] with antialiased bilinear filtering (aspect ratio not kept). A file that
cannot be decoded never stops an epoch: it is skipped (training) or masked out (evaluation), logged
once by name and counted.

Importing this module hides every GPU from TensorFlow: JAX owns the accelerators.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from flaxcap import epoch_plan
from flaxcap import errors
from flaxcap import images

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialized its devices; it may then see the GPU.
  logging.warning("input_pipeline imported after TensorFlow initialized its devices: TF may use the GPU")

_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_DCT_SCALES = (8, 4, 2, 1)


class _FailureLog:
  """Thread-safe record of undecodable files: each is logged once, all are counted."""

  def __init__(self):
    self._lock = threading.Lock()
    self._seen: set[str] = set()

  def record(self, path: str, message: str) -> None:
    with self._lock:
      first_time = path not in self._seen
      self._seen.add(path)
    if first_time:
      logging.warning("skipping unreadable image: %s", message)

  @property
  def paths(self) -> frozenset[str]:
    with self._lock:
      return frozenset(self._seen)


FAILURES = _FailureLog()


def _pillow_decode(path: bytes, contents: bytes, image_size: np.ndarray) -> tuple[np.ndarray, bool]:
  name = path.decode("utf-8", "replace")
  try:
    image = images.decode_image_bytes(contents, name=name, exif_transpose=False,
                                      draft_size=int(image_size))
    return image, True
  except errors.ImageError as e:
    FAILURES.record(name, str(e))
    return np.zeros([1, 1, 3], np.uint8), False


def _decode_jpeg(contents: tf.Tensor, image_size: int) -> tf.Tensor:
  """TF JPEG decode at the largest DCT scale 1/r that keeps both sides >= image_size."""
  shape = tf.image.extract_jpeg_shape(contents)
  shortest = tf.minimum(shape[0], shape[1])
  branch = tf.constant(len(_DCT_SCALES) - 1)
  for index in reversed(range(len(_DCT_SCALES) - 1)):
    branch = tf.where(shortest >= _DCT_SCALES[index] * image_size, tf.constant(index), branch)
  decoders = [
      (lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r)) for r in _DCT_SCALES]
  return tf.switch_case(branch, decoders)


def decode_image(path: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Reads and decodes one file in the graph.

  Args:
    path: scalar string tensor.
    image_size: the size the image will be resized to (bounds DCT down-scaling).

  Returns:
    (uint8 [height, width, 3], ok). When ok is False the image is a [1, 1, 3] placeholder.
  """
  contents = tf.io.read_file(path)
  length = tf.strings.length(contents)
  tail = tf.strings.substr(contents, tf.maximum(length - 2, 0), 2)
  whole_jpeg = tf.logical_and(tf.strings.substr(contents, 0, 3) == _JPEG_START, tail == _JPEG_END)

  def pillow():
    image, ok = tf.numpy_function(_pillow_decode, [path, contents, image_size], [tf.uint8, tf.bool],
                                  stateful=False)
    return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(ok, [])

  image, ok = tf.cond(whole_jpeg, lambda: (_decode_jpeg(contents, image_size), tf.constant(True)),
                      pillow)
  return tf.ensure_shape(image, [None, None, 3]), ok


def _augment_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """A random crop keeping 80-100% of each side."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  fractions = tf.random.stateless_uniform([4], seed=seed, minval=0.0, maxval=1.0)
  crop_height = tf.maximum(1, tf.cast(tf.cast(height, tf.float32) * (0.8 + 0.2 * fractions[0]), tf.int32))
  crop_width = tf.maximum(1, tf.cast(tf.cast(width, tf.float32) * (0.8 + 0.2 * fractions[1]), tf.int32))
  top = tf.cast(tf.cast(height - crop_height, tf.float32) * fractions[2], tf.int32)
  left = tf.cast(tf.cast(width - crop_width, tf.float32) * fractions[3], tf.int32)
  return image[top:top + crop_height, left:left + crop_width]


def _augment_colour(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast and saturation jitter of a float image in [0, 1]."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = tf.image.stateless_random_brightness(image, 0.1, seed=seeds[0])
  image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seed=seeds[1])
  image = tf.image.stateless_random_saturation(image, 0.8, 1.2, seed=seeds[2])
  return tf.clip_by_value(image, 0.0, 1.0)


def preprocess(path: tf.Tensor, image_size: int, *, seed: tf.Tensor | None = None, augment: bool = False,
               hflip: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
  """Decode, optionally augment, and resize one image.

  Args:
    path: scalar string tensor.
    image_size: output side.
    seed: int32 [2] stateless seed, needed when augment or hflip.
    augment: random crop and colour jitter.
    hflip: random horizontal flip (off by default: it swaps "left" and "right" in captions).

  Returns:
    (uint8 [image_size, image_size, 3], ok).
  """
  image, ok = decode_image(path, image_size)
  if augment:
    image = _augment_crop(image, seed)
  resized = tf.cond(
      tf.reduce_all(tf.shape(image)[:2] == image_size),
      lambda: tf.cast(image, tf.float32),
      lambda: tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True))
  if augment:
    resized = _augment_colour(resized / 255.0, tf.random.experimental.stateless_fold_in(seed, 1)) * 255.0
  if hflip:
    resized = tf.image.stateless_random_flip_left_right(resized, tf.random.experimental.stateless_fold_in(
        seed, 2))
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8), ok


def _file_present(path: str) -> str | None:
  """None if `path` is a non-empty file, else what is wrong with it."""
  try:
    size = os.stat(path).st_size
  except FileNotFoundError:
    return "file not found"
  except OSError as e:
    return f"cannot read file ({e.strerror})"
  return None if size else "empty file (0 bytes)"


def _check_files(paths: Sequence[str]) -> np.ndarray:
  """bool [len(paths)]: which files exist and are not empty (the others are logged once)."""
  present = np.ones([len(paths)], bool)
  for index, path in enumerate(paths):
    problem = _file_present(path)
    if problem:
      present[index] = False
      FAILURES.record(path, f"{path}: {problem}")
  if not present.all():
    logging.warning("input_pipeline: %d of %d image files are missing or empty and are left out",
                    (~present).sum(), len(paths))
  return present


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def train_dataset(records: Sequence, vocab, config, *, seed: int, num_devices: int, epoch: int = 0,
                  num_epochs: int | None = 1, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Training batches for pmap, epoch after epoch.

  Args:
    records: the training CaptionRecords.
    vocab: a `vocab.Vocabulary`; captions are tokenized once, up front.
    config: the full config (uses batch_size, image_size, data.max_len, data.captions_per_epoch,
      data.augment, data.hflip).
    seed: with the epoch, fixes caption choice, order and augmentation.
    num_devices: local devices (jax.local_device_count()).
    epoch: the first epoch to produce (for resuming).
    num_epochs: how many epochs to produce; None = forever.
    process_index, process_count: this host's shard (default jax.process_index()/process_count()).

  Yields:
    {"images": uint8 [num_devices, per_device_batch, image_size, image_size, 3],
     "tokens": int32 [num_devices, per_device_batch, max_len]}, exactly
    `epoch_plan.steps_per_epoch(...)` batches per epoch. An image that cannot be decoded is skipped
    (logged once by name, counted per epoch); the epoch's last batch is then filled up by repeating
    examples so that every host makes the same number of steps.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  records = [r for r, ok in zip(records, _check_files([r.image_path for r in records])) if ok]
  if not records:
    raise errors.DataError("train_dataset: no readable training image (see the warnings above)")
  table = epoch_plan.encode_captions(records, vocab, config.data.max_len)
  per_host, per_device = epoch_plan.batch_split(config.batch_size, num_devices, process_count)
  paths = np.asarray([r.image_path for r in records], dtype=object)
  image_size, augment, hflip = config.image_size, bool(config.data.augment), bool(config.data.hflip)

  def to_example(example):
    image, ok = preprocess(example["path"], image_size, seed=example["seed"], augment=augment,
                           hflip=hflip)
    return {"images": image, "tokens": example["tokens"], "ok": ok, "index": example["index"]}

  current = epoch
  while num_epochs is None or current < epoch + num_epochs:
    plan = epoch_plan.plan_epoch(table, captions_per_epoch=config.data.captions_per_epoch,
                                 global_batch_size=config.batch_size, seed=seed, epoch=current,
                                 process_index=process_index, process_count=process_count)
    flat_seeds = plan.example_seed.reshape(-1)
    examples = tf.data.Dataset.from_tensor_slices({
        "path": paths[plan.record_index.reshape(-1)].astype(str),
        "tokens": table.tokens[plan.caption_index.reshape(-1)],
        "seed": np.stack([np.full_like(flat_seeds, seed % (2**31 - 1)), flat_seeds], axis=1),
        "index": np.arange(len(flat_seeds), dtype=np.int64),
    })
    batches = (examples.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .ignore_errors(log_warning=True)
               .filter(lambda example: example["ok"])
               .map(lambda example: {"images": example["images"], "tokens": example["tokens"],
                                     "index": example["index"]})
               .batch(per_host).prefetch(tf.data.AUTOTUNE).with_options(_options()))
    named = _name_dropped(batches.as_numpy_iterator(), paths[plan.record_index.reshape(-1)])
    yield from _full_batches(named, plan.steps, per_host, num_devices, per_device, current)
    current += 1


def _name_dropped(batches, example_paths: np.ndarray):
  """Passes the batches on without their "index"; names each example that never came out, the ones
  TF's decoder failed on (`ignore_errors` drops them, logging only to TF's silenced C++ log). Once the
  batches run out, or when they are left early, for the examples before the last one seen."""
  seen, last, finished = np.zeros(len(example_paths), bool), -1, False
  try:
    for batch in batches:
      seen[batch["index"]] = True
      last = max(last, int(batch["index"].max(initial=-1)))
      yield {key: value for key, value in batch.items() if key != "index"}
    finished = True
  finally:
    for dropped in np.flatnonzero(~seen[:len(seen) if finished else last + 1]):
      path = str(example_paths[dropped])
      FAILURES.record(path, f"{path}: TensorFlow could not decode it")


def _full_batches(batches, steps: int, per_host: int, num_devices: int, per_device: int, epoch: int):
  """Reshapes to [devices, per_device, ...]; fills short batches and missing steps by repetition."""
  seen, produced, last = 0, 0, None
  for batch in batches:
    count = len(batch["tokens"])
    seen += count
    if count < per_host:
      batch = {key: np.resize(value, (per_host,) + value.shape[1:]) for key, value in batch.items()}
    last = {key: value.reshape((num_devices, per_device) + value.shape[1:]) for key, value in batch.items()}
    produced += 1
    yield last
  skipped = steps * per_host - seen
  if skipped:
    logging.warning("input_pipeline: epoch %d skipped %d of %d images that could not be decoded (see "
                    "the warnings above)", epoch, skipped, steps * per_host)
  if last is None:
    raise errors.DataError(f"epoch {epoch}: none of the {steps * per_host} training images could be "
                           "decoded")
  for _ in range(steps - produced):
    yield last


def image_dataset(records_or_paths: Sequence, config, *, batch_size: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Every image once, in order, for encoding (the feature cache) or evaluation.

  Args:
    records_or_paths: CaptionRecords or image paths.
    config: the full config (uses image_size).
    batch_size: images per batch.

  Yields:
    {"images": uint8 [batch_size, image_size, image_size, 3], "index": int32 [batch_size],
     "mask": bool [batch_size]}. index is the position in `records_or_paths` (-1 in the padding of
    the last batch); mask is False for padding and for images that could not be decoded (their
    pixels are zeros). Every index appears at most once, in increasing order.
  """
  paths = [item if isinstance(item, (str, os.PathLike)) else item.image_path for item in records_or_paths]
  paths = [os.fspath(path) for path in paths]
  present = _check_files(paths)
  image_size = config.image_size

  def to_example(path, index, is_present):
    def load():
      return preprocess(path, image_size)

    def absent():
      return tf.zeros([image_size, image_size, 3], tf.uint8), tf.constant(False)

    image, ok = tf.cond(is_present, load, absent)  # failed decodes are zeros already (1x1 placeholder)
    return {"images": image, "index": index, "mask": ok}

  examples = tf.data.Dataset.from_tensor_slices(
      (np.asarray(paths, dtype=str).reshape(-1), np.arange(len(paths), dtype=np.int32), present))
  batches = (examples.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
             .ignore_errors(log_warning=True)
             .batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options()))
  seen = np.zeros([len(paths)], bool)
  for batch in batches.as_numpy_iterator():
    seen[batch["index"]] = True
    count = len(batch["index"])
    if count < batch_size:
      pad = batch_size - count
      batch = {"images": np.concatenate([batch["images"], np.zeros((pad,) + batch["images"].shape[1:],
                                                                   np.uint8)]),
               "index": np.concatenate([batch["index"], np.full([pad], -1, np.int32)]),
               "mask": np.concatenate([batch["mask"], np.zeros([pad], bool)])}
    yield batch
  for dropped in np.flatnonzero(~seen):  # elements that TF's decoder failed on (ignore_errors)
    FAILURES.record(paths[dropped], f"{paths[dropped]}: TensorFlow could not decode it")


def eval_dataset(records: Sequence, config, *, batch_size: int, shard_by_host: bool = False,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation batches: images with their ids; references are `records[index].captions`.

  Args:
    records: the evaluation CaptionRecords.
    config: the full config (uses image_size).
    batch_size: images per batch.
    shard_by_host: give each host every process_count-th record; all hosts yield the same number of
      batches (the short ones are padded).

  Yields:
    {"images": uint8 [batch_size, image_size, image_size, 3], "image_ids": str [batch_size] ("" for
     padding), "index": int32 [batch_size] into `records` (-1 for padding), "mask": bool [batch_size]}
    (mask is False for padding and for images that could not be decoded).
  """
  positions = np.arange(len(records))
  num_batches = None
  if shard_by_host:
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    positions = positions[process_index::process_count]
    num_batches = math.ceil(math.ceil(len(records) / process_count) / batch_size)
  produced = 0
  shard = [records[i] for i in positions]
  for batch in image_dataset(shard, config, batch_size=batch_size):
    produced += 1
    yield _with_ids(batch, positions, records)
  while num_batches is not None and produced < num_batches:
    produced += 1
    empty = {"images": np.zeros((batch_size, config.image_size, config.image_size, 3), np.uint8),
             "index": np.full([batch_size], -1, np.int32), "mask": np.zeros([batch_size], bool)}
    yield _with_ids(empty, positions, records)


def _with_ids(batch, positions, records):
  local = batch["index"]
  index = np.where(local >= 0, positions[np.maximum(local, 0)] if len(positions) else -1, -1)
  image_ids = np.asarray([records[i].image_id if i >= 0 else "" for i in index], dtype=object)
  return {"images": batch["images"], "image_ids": image_ids, "index": index.astype(np.int32),
          "mask": batch["mask"]}
