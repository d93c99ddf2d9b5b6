"""Robust reading of caption files for `flaxcap.datasets`.

Text files are read as UTF-8 with a BOM and CRLF line ends tolerated; an undecodable or malformed line
is skipped, never fatal. What a reader skips in one file is reported in one absl warning that names the
file, the lines and the reason (`SkipLog`). Missing files and folders raise `errors.DataError` naming
the path and the config field to set. No TensorFlow here.
"""

from __future__ import annotations

import collections
import csv
import functools
import json
import os
import pathlib
from typing import Iterator

from absl import logging

from flaxcap import errors
from flaxcap import vocab as vocab_lib

DATA_HINT = "see the README section 'Data' for the expected layouts"


class SkipLog:
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


def resolve(root: pathlib.Path, value: str, default: str) -> pathlib.Path:
  """`value` (or `default` when empty) as a path; relative paths are taken under `root`."""
  path = pathlib.Path(os.path.expanduser(value or default))
  return path if path.is_absolute() else root / path


def require_dir(path: pathlib.Path, what: str, field: str) -> pathlib.Path:
  """`path` if it is a folder, else errors.DataError naming it and the config `field` to set."""
  if not path.is_dir():
    raise errors.DataError(f"{path}: {what} folder not found; put it there or set {field} ({DATA_HINT})")
  return path


def require_file(path: pathlib.Path, what: str, field: str) -> pathlib.Path:
  """`path` if it is a file, else errors.DataError naming it and the config `field` to set."""
  if not path.is_file():
    raise errors.DataError(f"{path}: {what} not found; put it there or set {field} ({DATA_HINT})")
  return path


def first_existing_dir(root: pathlib.Path, value: str, candidates, what: str) -> pathlib.Path:
  """The image folder: `value` if set, else the first of `candidates` under root that exists."""
  if value:
    return require_dir(resolve(root, value, ""), what, "--config.data.images_dir")
  for candidate in candidates:
    if (root / candidate).is_dir():
      return root / candidate
  raise errors.DataError(
      f"{root}: no image folder found (looked for {', '.join(candidates)}); "
      f"set --config.data.images_dir ({DATA_HINT})")


class FileIndex:
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


def text_lines(path: pathlib.Path) -> Iterator[tuple[int, str | None]]:
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


def load_json(path: pathlib.Path, what: str, field: str):
  require_file(path, what, field)
  try:
    with open(path, "r", encoding="utf-8-sig") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise errors.DataError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON ({e.msg})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path}: cannot read {what} ({e})") from None


def read_caption_lines(path: pathlib.Path, images_dir: pathlib.Path, csv_format: bool):
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


def clear_cache() -> None:
  """Forgets parsed caption files, so the next read parses (and warns) again."""
  _parse_caption_lines.cache_clear()


@functools.lru_cache(maxsize=8)
def _parse_caption_lines(path, unused_mtime, unused_size, images_dir, unused_folder_mtime, csv_format):
  """`read_caption_lines` without the cache."""
  skips = SkipLog(path)
  captions = collections.OrderedDict()
  lines_by_name = collections.defaultdict(list)
  lines = []  # (number, text) of the decodable lines
  for number, line in text_lines(path):
    if line is None:
      skips.add(f"line {number}", "lines not valid UTF-8")
    else:
      lines.append((number, line))
  rows = _csv_rows(lines, skips) if csv_format else _token_rows(lines, skips)
  for number, name, caption in rows:
    if not vocab_lib.tokenize(caption):  # nothing but spaces and punctuation
      skips.add(f"line {number}", "empty captions")
      continue
    captions.setdefault(name, []).append(caption)
    lines_by_name[name].append(number)
  files = FileIndex()
  for name in list(captions):
    if not files.exists(images_dir / name):
      del captions[name]
      numbers = lines_by_name[name]
      skips.add(f"lines {numbers[0]}-{numbers[-1]}: {name}" if len(numbers) > 1 else
                f"line {numbers[0]}: {name}", f"image ids without an image file in {images_dir}")
  skips.warn()
  if not captions:
    raise errors.DataError(f"{path}: no usable captions (every line was skipped; see the warning above)")
  return {name: tuple(texts) for name, texts in captions.items()}


def _token_rows(lines, skips):
  """(line number, image name, caption) of Flickr8k.token.txt lines "<name>#<n><TAB><caption>"."""
  seen_keys = set()
  for number, line in lines:
    if not line.strip():
      continue
    where = f"line {number}"
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
    yield number, name, caption.strip()


MAX_LINES_PER_CSV_ROW = 4  # a quoted caption may hold line breaks; a quote open longer is a stray one


def _csv_rows(lines, skips):
  """(first line number, image name, caption) of the rows of a Kaggle captions.txt ("image,caption").

  A quoted caption may span lines (as pandas and Python's csv write captions with line breaks): it is
  read whole, its line breaks as spaces. A quote still open after `MAX_LINES_PER_CSV_ROW` lines makes
  its first line malformed, and reading goes on at the next line.
  """
  start = 0
  while start < len(lines):
    reader = csv.reader(text + "\n" for _, text in lines[start:])
    consumed = 0  # lines of lines[start:] read into earlier rows
    while True:
      try:
        fields = next(reader)
      except StopIteration:
        return
      except csv.Error:  # e.g. a NUL byte: this row's first line is malformed; resume after it
        fields = None
      span = reader.line_num - consumed
      number = lines[start + consumed][0]
      if fields is None or span > MAX_LINES_PER_CSV_ROW:
        reason = ("malformed lines (a quote that does not close)" if fields is not None
                  else "malformed lines (not CSV)")
        skips.add(f"line {number}", reason)
        start += consumed + 1
        break
      consumed = reader.line_num
      if not "".join(fields).strip():
        continue
      if number == 1 and [f.strip().lower() for f in fields] == ["image", "caption"]:
        continue
      if len(fields) < 2 or not fields[0].strip():
        skips.add(f"line {number}", "malformed lines (expected 'image,caption')")
        continue
      yield number, fields[0].strip(), " ".join(",".join(fields[1:]).split())


def read_split_list(path: pathlib.Path, captions_by_name) -> list[str] | None:
  """Image names of a Flickr_8k.*Images.txt file that have captions; None if the file is missing."""
  if not path.is_file():
    return None
  skips = SkipLog(path)
  names, seen = [], set()
  for number, line in text_lines(path):
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
