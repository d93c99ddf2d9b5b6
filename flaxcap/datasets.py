"""Caption dataset readers: files on disk -> `CaptionRecord`s (image id, image path, captions, split).

Layouts (`config.data.layout`):
  flickr8k  the original distribution: Flicker8k_Dataset/ + Flickr8k_text/Flickr8k.token.txt +
            Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt (a missing split file = an empty split).
  kaggle    an image folder + captions.txt ("image,caption" CSV); the split comes from a folder of
            Flickr_8k.*Images.txt, a Karpathy JSON, or a hash of the image id.
  karpathy  dataset_{flickr8k,flickr30k,coco}.json + an image root ("val" -> "dev", "restval" -> "train").
  coco      captions_{train,val}2014.json (COCO captions format) + image folders ("dev" = val2014).
  tfds      a TFDS dataset: "flickr8k" (flaxcap's builder, prepared offline from config.data.root) or
            "coco_captions"; see `flaxcap.tfds_flickr8k`.

Bad lines and entries (malformed, empty caption, id without image file, split entry without captions)
are skipped; each file's skips are counted in one absl warning that names the file, the lines and why.
A missing folder or file raises `errors.DataError` naming the path and what to do. Readers never
decode images, and this module does not import TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import pathlib

from absl import logging

from flaxcap import caption_files
from flaxcap import errors
from flaxcap import vocab as vocab_lib

SPLITS = ("train", "dev", "test")
LAYOUTS = ("flickr8k", "kaggle", "karpathy", "coco", "tfds")
_FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
_KARPATHY_SPLITS = {"train": "train", "val": "dev", "test": "test", "restval": "restval"}
_COCO_SPLIT_NAMES = {"train": "train", "dev": "val", "test": "test"}


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
  """One image with its reference captions.

  Attributes:
    image_id: a stable id: the file name without extension for Flickr ("1000268201_693b08cb0e"), the
      numeric image id for COCO ("391895").
    image_path: path of the image file.
    captions: the raw reference captions, in file order (tokenize with `vocab.tokenize`).
    split: "train", "dev" or "test" ("restval" when not folded into train).
  """
  image_id: str
  image_path: str
  captions: tuple[str, ...]
  split: str


def check_split(split: str, allowed=SPLITS) -> None:
  """Raises errors.ConfigError unless `split` is one of `allowed`."""
  if split not in allowed:
    raise errors.ConfigError(f"unknown split {split!r}; use one of {', '.join(allowed)}")


def _image_id(filename: str) -> str:
  return pathlib.PurePath(filename).stem


def _records(ordered_names, captions_by_name, images_dir, split) -> list[CaptionRecord]:
  return [CaptionRecord(_image_id(name), str(images_dir / name), tuple(captions_by_name[name]), split)
          for name in ordered_names]


def read_flickr8k(root, split: str, *, images_dir: str = "", captions_file: str = "",
                  split_dir: str = "") -> list[CaptionRecord]:
  """Reads the original Flickr8k layout.

  Args:
    root: the folder holding Flicker8k_Dataset/ and Flickr8k_text/.
    split: "train", "dev" or "test".
    images_dir, captions_file, split_dir: overrides, relative to root (defaults Flicker8k_Dataset,
      Flickr8k_text/Flickr8k.token.txt, Flickr8k_text).

  Returns:
    Records in the split file's order; [] (with a log line) when Flickr_8k.<split>Images.txt is missing.
  """
  check_split(split)
  root = caption_files.require_dir(pathlib.Path(os.path.expanduser(str(root))), "Flickr8k",
                                   "--config.data.root")
  images = caption_files.first_existing_dir(root, images_dir, _FLICKR8K_IMAGE_DIRS, "Flickr8k image")
  token_file = caption_files.require_file(
      caption_files.resolve(root, captions_file, "Flickr8k_text/Flickr8k.token.txt"),
      "Flickr8k caption file", "--config.data.captions_file")
  captions = caption_files.read_caption_lines(token_file, images, csv_format=False)
  if split_dir:
    caption_files.require_dir(caption_files.resolve(root, split_dir, ""), "split file",
                              "--config.data.split_file")
  split_path = caption_files.resolve(root, split_dir, "Flickr8k_text") / f"Flickr_8k.{split}Images.txt"
  names = caption_files.read_split_list(split_path, captions)
  if names is None:
    logging.info("%s not found: the %s split is empty", split_path, split)
    return []
  return _records(names, captions, images, split)


def hash_split(image_id: str, dev_fraction: float, test_fraction: float) -> str:
  """A split from the SHA-1 of the image id: the same on every machine and Python version."""
  position = int(hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32
  if position < dev_fraction:
    return "dev"
  return "test" if position < dev_fraction + test_fraction else "train"


def _karpathy_split(entry, restval_to_train: bool) -> str | None:
  """A Karpathy JSON entry's split ("val" -> "dev", "restval" -> "train" if asked), or None when the
  entry is malformed (not a dict, or its filename, split or filepath of the wrong type)."""
  if (not isinstance(entry, dict) or not isinstance(entry.get("filename"), str)
      or not isinstance(entry.get("split"), str) or entry["split"] not in _KARPATHY_SPLITS
      or not isinstance(entry.get("filepath", ""), str)):
    return None
  split = _KARPATHY_SPLITS[entry["split"]]
  return "train" if split == "restval" and restval_to_train else split


@functools.lru_cache(maxsize=4)
def _kaggle_splits(json_path: pathlib.Path, unused_mtime: int, restval_to_train: bool,
                   captioned_names: tuple[str, ...]) -> dict[str, str]:
  """{image file name: split} of the captioned images from a Karpathy JSON; what it leaves out
  (malformed entries, captioned images it does not list) is counted in one warning per JSON."""
  payload = caption_files.load_json(json_path, "Karpathy split JSON", "--config.data.split_file")
  entries = payload.get("images") if isinstance(payload, dict) else None
  if not isinstance(entries, list):
    raise errors.DataError(f"{json_path}: not a Karpathy JSON (no \"images\" list)")
  skips, splits = caption_files.SkipLog(json_path), {}
  for index, entry in enumerate(entries):
    split = _karpathy_split(entry, restval_to_train)
    if split is None:
      skips.add(f"images[{index}]", "malformed entries (need filename, split)")
    else:
      splits[entry["filename"]] = split
  for name in captioned_names:
    if name not in splits:
      skips.add(name, "captioned images it does not list (in no split)")
  skips.warn()
  return {name: splits[name] for name in captioned_names if name in splits}


def read_kaggle(root, split: str, *, images_dir: str = "", captions_file: str = "", split_file: str = "",
                hash_dev_fraction: float = 0.1, hash_test_fraction: float = 0.1,
                restval_to_train: bool = True) -> list[CaptionRecord]:
  """Reads the Kaggle layout: an image folder + captions.txt ("image,caption" CSV with a header).

  Args:
    root: the dataset folder.
    split: "train", "dev" or "test".
    images_dir: the image folder (default: the first of Images/, images/, Flicker8k_Dataset/ under root).
    captions_file: the CSV (default root/captions.txt).
    split_file: a folder of Flickr_8k.{train,dev,test}Images.txt, a Karpathy dataset_*.json, or ""
      to split by `hash_split(image_id, hash_dev_fraction, hash_test_fraction)`.
    restval_to_train: with a Karpathy JSON, whether "restval" images count as train.

  Returns:
    Records in the split folder's order, else in the CSV's order.
  """
  check_split(split)
  root = caption_files.require_dir(pathlib.Path(os.path.expanduser(str(root))), "Kaggle dataset",
                                   "--config.data.root")
  images = caption_files.first_existing_dir(root, images_dir, _FLICKR8K_IMAGE_DIRS, "Kaggle image")
  csv_path = caption_files.require_file(caption_files.resolve(root, captions_file, "captions.txt"),
                                        "captions CSV", "--config.data.captions_file")
  captions = caption_files.read_caption_lines(csv_path, images, csv_format=True)
  if not split_file:
    names = [name for name in captions
             if hash_split(_image_id(name), hash_dev_fraction, hash_test_fraction) == split]
  else:
    split_path = caption_files.resolve(root, split_file, "")
    if split_path.is_dir():
      names = caption_files.read_split_list(split_path / f"Flickr_8k.{split}Images.txt", captions)
      if names is None:
        logging.info("%s not found: the %s split is empty", split_path / f"Flickr_8k.{split}Images.txt",
                     split)
        return []
    elif split_path.suffix == ".json" and split_path.is_file():
      splits = _kaggle_splits(split_path, split_path.stat().st_mtime_ns, restval_to_train,
                              tuple(captions))
      names = [name for name in captions if splits.get(name) == split]
    elif not split_path.exists():
      caption_files.require_file(split_path, "split file", "--config.data.split_file")
    else:
      raise errors.DataError(
          f"{split_path}: --config.data.split_file must be a folder of Flickr_8k.*Images.txt files or a "
          f"Karpathy dataset_*.json (or empty to split by hash)")
  return _records(names, captions, images, split)


def read_karpathy(json_path, images_root, split: str, *, restval_to_train: bool = True
                  ) -> list[CaptionRecord]:
  """Reads a Karpathy split JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json).

  Args:
    json_path: the JSON file: {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}],
      "cocoid"?}]}.
    images_root: folder the file names are relative to (with "filepath" in between for COCO).
    split: "train", "dev" ("val") or "test"; "restval" only when `restval_to_train` is False.
    restval_to_train: fold "restval" into train (the usual COCO set-up: 113k train images).

  Returns:
    Records in JSON order; ids are "cocoid" when present, else the file name without extension.
  """
  check_split(split, SPLITS if restval_to_train else SPLITS + ("restval",))
  json_path = pathlib.Path(json_path)
  payload = caption_files.load_json(json_path, "Karpathy JSON", "--config.data.karpathy_json")
  entries = payload.get("images") if isinstance(payload, dict) else None
  if not isinstance(entries, list):
    raise errors.DataError(f"{json_path}: not a Karpathy JSON (no \"images\" list at the top)")
  images_root = pathlib.Path(images_root)
  skips, files, records = caption_files.SkipLog(json_path), caption_files.FileIndex(), []
  seen_paths = set()
  for index, entry in enumerate(entries):
    where = f"images[{index}]"
    entry_split = _karpathy_split(entry, restval_to_train)
    if entry_split is None or not isinstance(entry.get("sentences"), list):
      skips.add(where, "malformed entries (need filename, split, sentences)")
      continue
    if entry_split != split:
      continue
    captions = []
    for sentence in entry["sentences"]:
      raw = sentence.get("raw") if isinstance(sentence, dict) else None
      if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
        raw = " ".join(sentence["tokens"])
      if isinstance(raw, str) and vocab_lib.tokenize(raw):
        captions.append(raw.strip())
      else:
        skips.add(f"{where}: {entry['filename']}", "empty or malformed sentences")
    path = images_root / entry.get("filepath", "") / entry["filename"]
    if not captions:
      skips.add(f"{where}: {entry['filename']}", "images with no captions")
    elif path in seen_paths:
      skips.add(f"{where}: {path}", "repeated images (the first entry is kept)")
    elif not files.exists(path):
      skips.add(f"{where}: {path}", "images with no image file")
    else:
      seen_paths.add(path)
      image_id = str(entry["cocoid"]) if "cocoid" in entry else _image_id(entry["filename"])
      records.append(CaptionRecord(image_id, str(path), tuple(captions), split))
  skips.warn()
  return records


def read_coco(captions_file, images_dir, split: str) -> list[CaptionRecord]:
  """Reads a COCO captions file (captions_train2014.json style) and its image folder.

  Args:
    captions_file: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}.
    images_dir: the folder holding the file names (e.g. train2014/).
    split: the split name given to the records.

  Returns:
    Records in the order of "images", captions in the order of "annotations"; ids are str(image id).
  """
  captions_file, images_dir = pathlib.Path(captions_file), pathlib.Path(images_dir)
  payload = caption_files.load_json(captions_file, "COCO captions file", "--config.data.captions_file")
  caption_files.require_dir(images_dir, "COCO image", "--config.data.images_dir")
  if not isinstance(payload, dict) or not isinstance(payload.get("images"), list) or not isinstance(
      payload.get("annotations"), list):
    raise errors.DataError(f"{captions_file}: not a COCO captions file (needs \"images\" and "
                           "\"annotations\" lists)")
  skips = caption_files.SkipLog(captions_file)
  captions = collections.defaultdict(list)
  for index, annotation in enumerate(payload["annotations"]):
    if not isinstance(annotation, dict) or not _is_coco_id(annotation.get("image_id")) or not isinstance(
        annotation.get("caption"), str):
      skips.add(f"annotations[{index}]", "malformed annotations (need image_id, caption)")
    elif not vocab_lib.tokenize(annotation["caption"]):
      skips.add(f"annotations[{index}]", "empty captions")
    else:
      captions[annotation["image_id"]].append(annotation["caption"].strip())
  files, records, known_ids = caption_files.FileIndex(), [], set()
  for index, image in enumerate(payload["images"]):
    where = f"images[{index}]"
    if not isinstance(image, dict) or not _is_coco_id(image.get("id")) or not isinstance(
        image.get("file_name"), str):
      skips.add(where, "malformed images (need id, file_name)")
      continue
    if image["id"] in known_ids:
      skips.add(f"{where}: id {image['id']}", "repeated image ids (the first entry is kept)")
      continue
    known_ids.add(image["id"])
    path = images_dir / image["file_name"]
    if not captions.get(image["id"]):
      skips.add(f"{where}: {image['file_name']}", "images with no captions")
    elif not files.exists(path):
      skips.add(f"{where}: {path}", "images with no image file")
    else:
      records.append(CaptionRecord(str(image["id"]), str(path), tuple(captions[image["id"]]), split))
  orphans = [image_id for image_id in captions if image_id not in known_ids]
  for image_id in orphans:
    skips.add(f"image_id {image_id}", "captions of ids missing from \"images\"")
  skips.warn()
  return records


def _is_coco_id(value) -> bool:
  return isinstance(value, (int, str)) and not isinstance(value, bool)


def _default_karpathy_json(root: pathlib.Path) -> pathlib.Path:
  if (root / "dataset_flickr8k.json").is_file():
    return root / "dataset_flickr8k.json"
  found = sorted(root.glob("dataset_*.json"))
  if len(found) == 1:
    return found[0]
  raise errors.DataError(f"{root}: found {len(found)} dataset_*.json files; set --config.data.karpathy_json")


def rooted_at(data_config, root: str):
  """A copy of config.data reading the same layout under another root (its file paths cleared)."""
  moved = data_config.copy_and_resolve_references()
  moved.root = str(root)
  moved.images_dir = moved.captions_file = moved.karpathy_json = ""
  return moved


def load_records(data_config, split: str) -> list[CaptionRecord]:
  """Reads `split` of the dataset that `data_config` (config.data) describes.

  Args:
    data_config: config.data; `layout` picks the reader, `root` and the path fields say where the files
      are (relative paths are under root), see configs/default.py.
    split: "train", "dev" or "test" (Karpathy/COCO "val" is "dev").

  Returns:
    The split's records; may be empty when the split is not defined by the files (e.g. Flickr8k
    without Flickr_8k.testImages.txt).

  Raises:
    errors.ConfigError: unknown layout or split.
    errors.DataError: a folder or file is missing or unusable.
  """
  get = data_config.get
  layout, root = get("layout", "flickr8k"), pathlib.Path(os.path.expanduser(get("root", "")))
  if layout == "flickr8k":
    records = read_flickr8k(root, split, images_dir=get("images_dir", ""),
                            captions_file=get("captions_file", ""), split_dir=get("split_file", ""))
  elif layout == "kaggle":
    records = read_kaggle(
        root, split, images_dir=get("images_dir", ""), captions_file=get("captions_file", ""),
        split_file=get("split_file", ""), hash_dev_fraction=get("hash_dev_fraction", 0.1),
        hash_test_fraction=get("hash_test_fraction", 0.1),
        restval_to_train=get("restval_to_train", True))
  elif layout == "karpathy":
    caption_files.require_dir(root, "dataset", "--config.data.root")
    json_path = (caption_files.resolve(root, get("karpathy_json", ""), "") if get("karpathy_json", "")
                 else _default_karpathy_json(root))
    images_dir = get("images_dir", "")
    images_root = (caption_files.require_dir(caption_files.resolve(root, images_dir, ""), "image",
                                             "--config.data.images_dir")
                   if images_dir else _karpathy_images_root(root))
    records = read_karpathy(json_path, images_root, split,
                            restval_to_train=get("restval_to_train", True))
  elif layout == "coco":
    check_split(split)
    caption_files.require_dir(root, "COCO", "--config.data.root")
    coco_split = _COCO_SPLIT_NAMES[split]
    captions_file = caption_files.resolve(root, get("captions_file", "").replace("{split}", coco_split),
                                          f"annotations/captions_{coco_split}2014.json")
    images_dir = caption_files.resolve(root, get("images_dir", "").replace("{split}", coco_split),
                                       f"{coco_split}2014")
    records = read_coco(captions_file, images_dir, split)
  elif layout == "tfds":
    from flaxcap import tfds_flickr8k  # pylint: disable=g-import-not-at-top  (imports TF)
    records = tfds_flickr8k.read_tfds(
        get("tfds_name", "flickr8k"), split, manual_dir=str(root) if get("root", "") else "",
        data_dir=get("tfds_data_dir", ""), export_dir=get("images_dir", ""),
        restval_to_train=get("restval_to_train", True))
  else:
    raise errors.ConfigError(f"config.data.layout={layout!r} is not one of {', '.join(LAYOUTS)}")
  if not records:
    logging.warning("layout %s under %s: the %s split has no records", layout, root, split)
  return records


def _karpathy_images_root(root: pathlib.Path) -> pathlib.Path:
  """Default image root of the karpathy layout: a Flickr image folder under root, else root (COCO)."""
  for candidate in _FLICKR8K_IMAGE_DIRS + ("flickr30k-images", "flickr30k_images"):
    if (root / candidate).is_dir():
      return root / candidate
  return root
