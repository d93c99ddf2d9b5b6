"""TFDS builder for Flickr8k, prepared offline from a manual dir, and the `tfds` layout reader.

Importing this module registers the builder, after which

    tfds.load("flickr8k", split="train", data_dir=...,
              download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
                  manual_dir="/path/to/flickr8k")})

prepares the dataset once from the original layout (see `datasets.read_flickr8k`) and loads it. Splits
are "train", "validation" (Flickr8k's dev) and "test" (when Flickr_8k.testImages.txt exists). Features:
"image" (the JPEG bytes as they were on disk), "image/filename" and "captions" (the five raw captions).

`read_tfds` turns a prepared TFDS dataset (this builder or TFDS's own "coco_captions") into
`CaptionRecord`s. The rest of flaxcap reads image files by path, so it writes each image's encoded
bytes, unchanged, to an export folder once (`<data_dir>/flaxcap_images/<name>/<version>/<split>/`).
This module imports TensorFlow; `flaxcap.datasets` imports it only for the tfds layout.
"""

from __future__ import annotations

import os
import pathlib

from absl import logging
import tensorflow_datasets as tfds

from flaxcap import datasets
from flaxcap import errors

_TFDS_SPLITS = (("train", "train"), ("validation", "dev"), ("test", "test"))

_CITATION = """@article{hodosh2013framing,
  title={Framing image description as a ranking task: Data, models and evaluation metrics},
  author={Hodosh, Micah and Young, Peter and Hockenmaier, Julia},
  journal={Journal of Artificial Intelligence Research}, volume={47}, pages={853--899}, year={2013}}"""


class Flickr8k(tfds.core.GeneratorBasedBuilder):
  """Flickr8k: 8,000 Flickr photos with five captions each (Hodosh et al. 2013)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: official train/dev/test splits from the manual dir."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the original Flickr8k distribution in the manual dir (or pass
  `DownloadConfig(manual_dir=...)`):
    Flicker8k_Dataset/*.jpg
    Flickr8k_text/Flickr8k.token.txt
    Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt
  A missing split file leaves that split out.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Flickr8k image captions (research use only; photos belong to their owners).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/filename": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }),
        homepage="https://hockenmaier.cs.illinois.edu/8k-pictures.html",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir))
    generators = {}
    for tfds_split, split in _TFDS_SPLITS:
      records = datasets.read_flickr8k(manual_dir, split)
      if records:
        generators[tfds_split] = self._generate_examples(records)
    if not generators:
      raise errors.DataError(f"{manual_dir}: no Flickr_8k.*Images.txt split file has usable images")
    return generators

  def _generate_examples(self, records):
    for record in records:
      yield record.image_id, {
          "image": record.image_path,
          "image/filename": os.path.basename(record.image_path),
          "captions": list(record.captions),
      }


def _tfds_split(builder, split: str, restval_to_train: bool) -> list[str]:
  """TFDS split names holding flaxcap's `split` ("dev" is "validation" or "val")."""
  available = set(builder.info.splits.keys())
  if split == "dev":
    names = [name for name in ("validation", "val") if name in available][:1]
  elif split == "train" and restval_to_train and "restval" in available:
    names = ["train", "restval"]
  else:
    names = [split] if split in available else []
  return [name for name in names if name in available]


def _write_once(path: pathlib.Path, data: bytes) -> None:
  if path.is_file() and path.stat().st_size == len(data):
    return
  tmp_path = path.with_name(path.name + ".tmp")
  tmp_path.write_bytes(data)
  os.replace(tmp_path, path)


def read_tfds(name: str, split: str, *, manual_dir: str = "", data_dir: str = "", export_dir: str = "",
              restval_to_train: bool = True) -> list[datasets.CaptionRecord]:
  """Records of a TFDS captioning dataset ("flickr8k" or "coco_captions"), with images exported to files.

  Args:
    name: the TFDS name.
    split: "train", "dev" or "test".
    manual_dir: for "flickr8k": the original layout, prepared from on first use.
    data_dir: the TFDS data dir ("" = TFDS's default, ~/tensorflow_datasets).
    export_dir: where image files are written (default <data_dir>/flaxcap_images/<name>/<version>).
    restval_to_train: for coco_captions: add the "restval" split to train.

  Returns:
    One record per example, in TFDS order; image_path points into export_dir.
  """
  datasets.check_split(split)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise errors.ConfigError(f"config.data.tfds_name={name!r}: no such TFDS dataset ({e})") from None
  if not builder.is_prepared():
    if name != "flickr8k":
      raise errors.DataError(
          f"{builder.data_dir}: TFDS dataset {name!r} is not prepared; run `tfds build {name} "
          f"--data_dir=...` where it can download, then set --config.data.tfds_data_dir")
    if not manual_dir:
      raise errors.DataError("the tfds layout prepares flickr8k from --config.data.root (the original "
                             "Flickr8k layout); set it")
    logging.info("Preparing TFDS flickr8k from %s into %s", manual_dir, builder.data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  export_root = pathlib.Path(export_dir) if export_dir else (
      pathlib.Path(builder.data_dir).parents[1] / "flaxcap_images" / name / str(builder.version))
  records = []
  for tfds_split in _tfds_split(builder, split, restval_to_train):
    folder = export_root / tfds_split
    folder.mkdir(parents=True, exist_ok=True)
    examples = builder.as_dataset(split=tfds_split, decoders={"image": tfds.decode.SkipDecoding()})
    for example in tfds.as_numpy(examples):
      filename = os.path.basename(example["image/filename"].decode("utf-8"))
      captions = example["captions"]
      if isinstance(captions, dict):  # coco_captions: {"id", "text"}
        captions = captions["text"]
      captions = tuple(text.decode("utf-8").strip() for text in captions)
      image_id = str(example["image/id"]) if "image/id" in example else pathlib.PurePath(filename).stem
      path = folder / filename
      _write_once(path, example["image"])
      records.append(datasets.CaptionRecord(image_id, str(path), tuple(c for c in captions if c), split))
  return records
