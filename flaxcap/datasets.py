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
import csv
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Iterator

from absl import logging

from flaxcap import errors

SPLITS = ("train", "dev", "test")
LAYOUTS = ("flickr8k", "kaggle", "karpathy", "coco", "tfds")
_FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
_KARPATHY_SPLITS = {"train": "train", "val": "dev", "test": "test", "restval": "restval"}
_COCO_SPLIT_NAMES = {"train": "train", "dev": "val", "test": "test"}
_DATA_HINT = "see the README section 'Data' for the expected layouts"


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


class _SkipLog:
  """Collects what a reader skipped in one file and reports it as one warning."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.by_reason: dict[str, list[str]] = collections.defaultdict(list)

  def add(self, where: str, reason: str) -> None:
    self.by_reason[reason].append(where)

  @property
  def count(self) -> int:
    return sum(len(places) for places in self.by_reason.values())

  def warn(self) -> None:
    if not self.by_reason:
      return
    parts = []
    for reason, places in self.by_reason.items():
      shown = ", ".join(places[:3]) + (f", ... ({len(places) - 3} more)" if len(places) > 3 else "")
      parts.append(f"{len(places)} {reason} ({shown})")
    logging.warning("%s: skipped %d item(s): %s", self.path, self.count, "; ".join(parts))


def _resolve(root: pathlib.Path, value: str, default: str) -> pathlib.Path:
  """`value` (or `default` when empty) as a path; relative paths are taken under `root`."""
  path = pathlib.Path(os.path.expanduser(value or default))
  return path if path.is_absolute() else root / path


def _require_dir(path: pathlib.Path, what: str, field: str) -> pathlib.Path:
  if not path.is_dir():
    raise errors.DataError(f"{path}: {what} folder not found; put it there or set {field} ({_DATA_HINT})")
  return path


def _require_file(path: pathlib.Path, what: str, field: str) -> pathlib.Path:
  if not path.is_file():
    raise errors.DataError(f"{path}: {what} not found; put it there or set {field} ({_DATA_HINT})")
  return path


def _first_existing_dir(root: pathlib.Path, value: str, candidates, what: str) -> pathlib.Path:
  """The image folder: `value` if set, else the first of `candidates` under root that exists."""
  if value:
    return _require_dir(_resolve(root, value, ""), what, "--config.data.images_dir")
  for candidate in candidates:
    if (root / candidate).is_dir():
      return root / candidate
  raise errors.DataError(
      f"{root}: no image folder found (looked for {', '.join(candidates)}); "
      f"set --config.data.images_dir ({_DATA_HINT})")


class _FileIndex:
  """Answers "does this image file exist?" with one directory listing per folder."""

  def __init__(self):
    self._listings: dict[pathlib.Path, frozenset[str]] = {}

  def exists(self, path: pathlib.Path) -> bool:
    folder = path.parent
    if folder not in self._listings:
      try:
        self._listings[folder] = frozenset(os.listdir(folder))
      except OSError:
        self._listings[folder] = frozenset()
    return path.name in self._listings[folder]


def _text_lines(path: pathlib.Path) -> Iterator[tuple[int, str | None]]:
  """(line number, text) of a UTF-8 file; BOM and CR stripped; text is None for undecodable lines."""
  try:
    data = path.read_bytes()
  except OSError as e:
    raise errors.DataError(f"{path}: cannot read ({e.strerror})") from None
  if data.startswith((b"\xff\xfe", b"\xfe\xff")):
    raise errors.DataError(f"{path}: file is UTF-16; save it as UTF-8")
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  for number, raw_line in enumerate(data.split(b"\n"), start=1):
    try:
      yield number, raw_line.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
      yield number, None


def _load_json(path: pathlib.Path, what: str, field: str):
  _require_file(path, what, field)
  try:
    with open(path, "r", encoding="utf-8-sig") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise errors.DataError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON ({e.msg})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path}: cannot read {what} ({e})") from None


def _check_split(split: str, allowed=SPLITS) -> None:
  if split not in allowed:
    raise errors.ConfigError(f"unknown split {split!r}; use one of {', '.join(allowed)}")


def _image_id(filename: str) -> str:
  return pathlib.PurePath(filename).stem


def _records(ordered_names, captions_by_name, images_dir, split) -> list[CaptionRecord]:
  return [CaptionRecord(_image_id(name), str(images_dir / name), tuple(captions_by_name[name]), split)
          for name in ordered_names]


def _read_caption_lines(path: pathlib.Path, images_dir: pathlib.Path, csv_format: bool):
  """Reads Flickr8k.token.txt ("<name>#<n>\\t<caption>") or Kaggle captions.txt ("image,caption").

  Parsed once per process while the file and the image folder are unchanged (so the train and dev
  reads share one parse and one warning).

  Returns:
    {image file name: (captions, ...)} in file order, for images that exist in `images_dir`; shared
    between calls, do not modify.
  """
  file_stat, folder_stat = path.stat(), images_dir.stat()
  return _parse_caption_lines(path, file_stat.st_mtime_ns, file_stat.st_size, images_dir,
                              folder_stat.st_mtime_ns, csv_format)


@functools.lru_cache(maxsize=8)
def _parse_caption_lines(path, unused_mtime, unused_size, images_dir, unused_folder_mtime, csv_format):
  """`_read_caption_lines` without the cache."""
  skips = _SkipLog(path)
  captions = collections.OrderedDict()
  lines_by_name = collections.defaultdict(list)
  seen_keys = set()
  for number, line in _text_lines(path):
    where = f"line {number}"
    if line is None:
      skips.add(where, "lines not valid UTF-8")
      continue
    if not line.strip():
      continue
    if csv_format:
      try:
        fields = next(csv.reader([line]))
      except csv.Error:
        fields = []
      if number == 1 and [f.strip().lower() for f in fields] == ["image", "caption"]:
        continue
      if len(fields) < 2 or not fields[0].strip():
        skips.add(where, "malformed lines (expected 'image,caption')")
        continue
      name, caption = fields[0].strip(), ",".join(fields[1:]).strip()
    else:
      key, tab, caption = line.partition("\t")
      if not tab:
        key, _, caption = line.strip().partition(" ")
      name, hash_sign, caption_number = key.strip().rpartition("#")
      if not hash_sign or not name or not caption_number.isdigit():
        skips.add(where, "malformed lines (expected '<image>#<n><TAB><caption>')")
        continue
      if (name, caption_number) in seen_keys:
        skips.add(where, f"repeated caption ids ({key.strip()})")
        continue
      seen_keys.add((name, caption_number))
      caption = caption.strip()
    if not caption:
      skips.add(where, "empty captions")
      continue
    captions.setdefault(name, []).append(caption)
    lines_by_name[name].append(number)
  files = _FileIndex()
  for name in list(captions):
    if not files.exists(images_dir / name):
      del captions[name]
      numbers = lines_by_name[name]
      skips.add(f"lines {numbers[0]}-{numbers[-1]}: {name}" if len(numbers) > 1 else
                f"line {numbers[0]}: {name}", f"captions of images missing from {images_dir}")
  skips.warn()
  if not captions:
    raise errors.DataError(f"{path}: no usable captions (every line was skipped; see the warning above)")
  return {name: tuple(texts) for name, texts in captions.items()}


def _read_split_list(path: pathlib.Path, captions_by_name) -> list[str] | None:
  """Image names of a Flickr_8k.*Images.txt file that have captions; None if the file is missing."""
  if not path.is_file():
    return None
  skips = _SkipLog(path)
  names, seen = [], set()
  for number, line in _text_lines(path):
    name = line.strip() if line is not None else None
    if name is None:
      skips.add(f"line {number}", "lines not valid UTF-8")
    elif not name:
      continue
    elif name in seen:
      skips.add(f"line {number}: {name}", "repeated images")
    elif name not in captions_by_name:
      skips.add(f"line {number}: {name}", "images with no captions (or no image file)")
    else:
      seen.add(name)
      names.append(name)
  skips.warn()
  return names


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
  _check_split(split)
  root = _require_dir(pathlib.Path(os.path.expanduser(str(root))), "Flickr8k", "--config.data.root")
  images = _first_existing_dir(root, images_dir, _FLICKR8K_IMAGE_DIRS, "Flickr8k image")
  token_file = _require_file(_resolve(root, captions_file, "Flickr8k_text/Flickr8k.token.txt"),
                             "Flickr8k caption file", "--config.data.captions_file")
  captions = _read_caption_lines(token_file, images, csv_format=False)
  split_path = _resolve(root, split_dir, "Flickr8k_text") / f"Flickr_8k.{split}Images.txt"
  names = _read_split_list(split_path, captions)
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


def _karpathy_splits(json_path: pathlib.Path, restval_to_train: bool) -> dict[str, str]:
  """{image file name: split} from a Karpathy JSON."""
  payload = _load_json(json_path, "Karpathy split JSON", "--config.data.split_file")
  entries = payload.get("images") if isinstance(payload, dict) else None
  if not isinstance(entries, list):
    raise errors.DataError(f"{json_path}: not a Karpathy JSON (no \"images\" list)")
  splits = {}
  for entry in entries:
    if isinstance(entry, dict) and entry.get("split") in _KARPATHY_SPLITS and "filename" in entry:
      split = _KARPATHY_SPLITS[entry["split"]]
      splits[entry["filename"]] = "train" if split == "restval" and restval_to_train else split
  return splits


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
  _check_split(split)
  root = _require_dir(pathlib.Path(os.path.expanduser(str(root))), "Kaggle dataset", "--config.data.root")
  images = _first_existing_dir(root, images_dir, _FLICKR8K_IMAGE_DIRS, "Kaggle image")
  csv_path = _require_file(_resolve(root, captions_file, "captions.txt"), "captions CSV",
                           "--config.data.captions_file")
  captions = _read_caption_lines(csv_path, images, csv_format=True)
  if not split_file:
    names = [name for name in captions
             if hash_split(_image_id(name), hash_dev_fraction, hash_test_fraction) == split]
  else:
    split_path = _resolve(root, split_file, "")
    if split_path.is_dir():
      names = _read_split_list(split_path / f"Flickr_8k.{split}Images.txt", captions)
      if names is None:
        logging.info("%s not found: the %s split is empty", split_path / f"Flickr_8k.{split}Images.txt",
                     split)
        return []
    elif split_path.suffix == ".json":
      splits = _karpathy_splits(split_path, restval_to_train)
      names = [name for name in captions if splits.get(name) == split]
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
  _check_split(split, SPLITS if restval_to_train else SPLITS + ("restval",))
  json_path = pathlib.Path(json_path)
  payload = _load_json(json_path, "Karpathy JSON", "--config.data.karpathy_json")
  entries = payload.get("images") if isinstance(payload, dict) else None
  if not isinstance(entries, list):
    raise errors.DataError(f"{json_path}: not a Karpathy JSON (no \"images\" list at the top)")
  images_root = pathlib.Path(images_root)
  skips, files, records = _SkipLog(json_path), _FileIndex(), []
  for index, entry in enumerate(entries):
    where = f"images[{index}]"
    if (not isinstance(entry, dict) or not isinstance(entry.get("filename"), str)
        or entry.get("split") not in _KARPATHY_SPLITS or not isinstance(entry.get("sentences"), list)):
      skips.add(where, "malformed entries (need filename, split, sentences)")
      continue
    entry_split = _KARPATHY_SPLITS[entry["split"]]
    if entry_split == "restval" and restval_to_train:
      entry_split = "train"
    if entry_split != split:
      continue
    captions = []
    for sentence in entry["sentences"]:
      raw = sentence.get("raw") if isinstance(sentence, dict) else None
      if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
        raw = " ".join(sentence["tokens"])
      if isinstance(raw, str) and raw.strip():
        captions.append(raw.strip())
      else:
        skips.add(f"{where}: {entry['filename']}", "empty or malformed sentences")
    path = images_root / entry.get("filepath", "") / entry["filename"]
    if not captions:
      skips.add(f"{where}: {entry['filename']}", "images with no captions")
    elif not files.exists(path):
      skips.add(f"{where}: {path}", "images with no image file")
    else:
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
  payload = _load_json(captions_file, "COCO captions file", "--config.data.captions_file")
  _require_dir(images_dir, "COCO image", "--config.data.images_dir")
  if not isinstance(payload, dict) or not isinstance(payload.get("images"), list) or not isinstance(
      payload.get("annotations"), list):
    raise errors.DataError(f"{captions_file}: not a COCO captions file (needs \"images\" and "
                           "\"annotations\" lists)")
  skips = _SkipLog(captions_file)
  captions = collections.defaultdict(list)
  for index, annotation in enumerate(payload["annotations"]):
    if not isinstance(annotation, dict) or "image_id" not in annotation or not isinstance(
        annotation.get("caption"), str):
      skips.add(f"annotations[{index}]", "malformed annotations (need image_id, caption)")
    elif not annotation["caption"].strip():
      skips.add(f"annotations[{index}]", "empty captions")
    else:
      captions[annotation["image_id"]].append(annotation["caption"].strip())
  files, records, known_ids = _FileIndex(), [], set()
  for index, image in enumerate(payload["images"]):
    where = f"images[{index}]"
    if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
      skips.add(where, "malformed images (need id, file_name)")
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


def _default_karpathy_json(root: pathlib.Path) -> pathlib.Path:
  if (root / "dataset_flickr8k.json").is_file():
    return root / "dataset_flickr8k.json"
  found = sorted(root.glob("dataset_*.json"))
  if len(found) == 1:
    return found[0]
  raise errors.DataError(f"{root}: found {len(found)} dataset_*.json files; set --config.data.karpathy_json")


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
    _require_dir(root, "dataset", "--config.data.root")
    json_path = (_resolve(root, get("karpathy_json", ""), "") if get("karpathy_json", "")
                 else _default_karpathy_json(root))
    images_dir = get("images_dir", "")
    images_root = (_require_dir(_resolve(root, images_dir, ""), "image", "--config.data.images_dir")
                   if images_dir else _karpathy_images_root(root))
    records = read_karpathy(json_path, images_root, split,
                            restval_to_train=get("restval_to_train", True))
  elif layout == "coco":
    _check_split(split)
    _require_dir(root, "COCO", "--config.data.root")
    coco_split = _COCO_SPLIT_NAMES[split]
    captions_file = _resolve(root, get("captions_file", "").replace("{split}", coco_split),
                             f"annotations/captions_{coco_split}2014.json")
    images_dir = _resolve(root, get("images_dir", "").replace("{split}", coco_split),
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
