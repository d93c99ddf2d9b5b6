"""Frozen-encoder feature cache: encode every image once, then train the decoder from memory.

The cache lives under `<workdir>/features/` as one float16 `.npy` per split plus a JSON file naming the
encoder, stage, image size, the image ids in row order and a hash of the image files' sizes and
modification times. A cache whose description differs from the current config and files is rebuilt. This path imports no TensorFlow: images are decoded with Pillow in threads.
"""

import concurrent.futures
import hashlib
import json
import os
import pathlib
from typing import Callable, Sequence

from absl import logging
import einops
import numpy as np
import tqdm

from flaxcap import errors
from flaxcap import images as images_lib


def _describe(config, split: str, records, feature_stage: int, weights_id: str) -> dict:
  weights = {"weights_id": weights_id} if weights_id else {}
  return weights | {
      "encoder": config.encoder.name,
      "weights": config.encoder.weights,
      "feature_stage": feature_stage,
      "image_size": config.image_size,
      "split": split,
      "image_ids": [r.image_id for r in records],
      "files": _files_digest(r.image_path for r in records),
  }


def _files_digest(paths) -> str:
  """A hash of each image file's path, size and modification time: an image replaced or repaired
  under the same name (or one that became readable) makes the cache stale."""
  digest = hashlib.sha1()
  for path in paths:
    try:
      stat = os.stat(path)
      digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:
      digest.update(f"{path}\0missing\n".encode())
  return digest.hexdigest()


def _load_batch(paths: Sequence[str], image_size: int, pool) -> tuple[np.ndarray, np.ndarray]:
  """Decodes `paths` to uint8 [len(paths), size, size, 3] and a validity mask [len(paths)]."""
  def load(path):
    try:
      return images_lib.load_image(path, image_size=image_size)
    except errors.ImageError as e:
      logging.warning("%s", e)
      return None
  decoded = list(pool.map(load, paths))
  valid = np.array([image is not None for image in decoded])
  blank = np.zeros((image_size, image_size, 3), np.uint8)
  return np.stack([blank if image is None else image for image in decoded]), valid


def encode_records(records, encode_fn: Callable[[np.ndarray], np.ndarray], *, image_size: int,
                   batch_size: int = 64, num_threads: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Runs `encode_fn` over every record's image.

  Args:
    records: `CaptionRecord`s; their `image_path` is decoded with Pillow.
    encode_fn: uint8 images [batch, size, size, 3] -> features [batch, h, w, channels]; it is called
      with a fixed batch size (the last batch is padded) so that it compiles once.
  Returns:
    features: float16 [num_records, h * w, channels], rows in record order.
    valid: bool [num_records], False where the image could not be read (its row is zeros).
  """
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  features, valid = [], []
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    starts = range(0, len(records), batch_size)
    next_batch = pool.submit(_load_batch, [r.image_path for r in records[:batch_size]],
                             image_size, pool) if records else None
    for start in tqdm.tqdm(starts, desc="encoding images", unit="batch", leave=False):
      batch_images, batch_valid = next_batch.result()
      following = records[start + batch_size:start + 2 * batch_size]
      if following:  # decode the next batch while the encoder runs on this one
        next_batch = pool.submit(_load_batch, [r.image_path for r in following], image_size, pool)
      count = len(batch_images)
      if count < batch_size:
        batch_images = np.concatenate(
            [batch_images, np.zeros((batch_size - count,) + batch_images.shape[1:], np.uint8)])
      grid = np.asarray(encode_fn(batch_images))[:count]
      features.append(einops.rearrange(grid, "b h w c -> b (h w) c").astype(np.float16))
      valid.append(batch_valid)
  return np.concatenate(features), np.concatenate(valid)


def cached_features(workdir: str | os.PathLike, config, split: str, records,
                    encode_fn: Callable[[np.ndarray], np.ndarray],
                    feature_stage: int | None = None, weights_id: str = "") -> tuple[np.ndarray, list]:
  """Returns (features [N, P, C] float16, the records that have an image), encoding on a cache miss.

  Records whose image cannot be read are dropped with one warning (their names are logged singly by
  the decoder). The returned features are memory-mapped from `<workdir>/features/<split>.npy`.
  `feature_stage` names the stage `encode_fn` stops at, when it is not `config.encoder.feature_stage`
  (fine-tuning caches the output of the frozen stages before the trainable ones); `weights_id`
  names encoder weights that are not `config.encoder.weights` (a fine-tuned run's).
  """
  cache_dir = pathlib.Path(workdir) / "features"
  cache_dir.mkdir(parents=True, exist_ok=True)
  features_path = cache_dir / f"{split}.npy"
  meta_path = cache_dir / f"{split}.json"
  if feature_stage is None:
    feature_stage = config.encoder.feature_stage
  description = _describe(config, split, records, feature_stage, weights_id)
  if features_path.exists() and meta_path.exists():
    meta = json.loads(meta_path.read_text())
    if meta["description"] == description:
      logging.info("Using cached %s features %s", split, features_path)
      by_id = {r.image_id: r for r in records}
      return np.load(features_path, mmap_mode="r"), [by_id[i] for i in meta["kept_ids"]]
  logging.info("Encoding %d %s images with %s", len(records), split, config.encoder.name)
  features, valid = encode_records(records, encode_fn, image_size=config.image_size)
  if not valid.all():
    logging.warning("%d of %d %s images could not be read and were skipped", (~valid).sum(),
                    len(records), split)
  kept = [r for r, ok in zip(records, valid) if ok]
  tmp_path = features_path.with_suffix(".tmp.npy")
  np.save(tmp_path, features[valid])
  os.replace(tmp_path, features_path)  # atomic: a killed run never leaves half a cache
  meta_path.write_text(json.dumps({"description": description,
                                   "kept_ids": [r.image_id for r in kept]}))
  return np.load(features_path, mmap_mode="r"), kept
