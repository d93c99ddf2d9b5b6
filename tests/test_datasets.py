"""Tests for flaxcap.datasets: every layout on tiny fixtures written here, bad input, and real Flickr8k."""

import importlib
import json
import logging
import pathlib
import subprocess
import sys

import data_fixtures
import pytest

from configs import default
from flaxcap import caption_files
from flaxcap import datasets
from flaxcap import errors
from flaxcap import vocab as vocab_lib

TRAIN = [f"{1000 + i}_abc.jpg" for i in range(4)]
DEV = ["2000_dev.jpg", "2001_dev.jpg"]


def _data_config(root, layout, **fields):
  config = default.get_config().data
  config.layout = layout
  config.root = str(root)
  for name, value in fields.items():
    setattr(config, name, value)
  return config


def _warnings(caplog, text):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


@pytest.fixture
def flickr8k_dir(tmp_path):
  """Original layout with the real file's quirks: an id without image, bad lines, CRLF and a BOM."""
  root = data_fixtures.make_flickr8k(tmp_path / "flickr8k", {"train": TRAIN, "dev": DEV, "test": None})
  text_dir = root / "Flickr8k_text"
  token_file = text_dir / "Flickr8k.token.txt"
  lines = token_file.read_text().splitlines()
  lines[2] = lines[2].split("\t")[0] + "\t   "  # empty caption: line 3
  lines += [f"{TRAIN[0]}.1#{k}\tpeople waiting for the subway" for k in range(5)]  # lines 31-35
  lines += ["this line has no tab or hash", f"{TRAIN[1]}#x\tbad caption number", f"{TRAIN[1]}#1\tdup"]
  token_file.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
  # A split entry without captions and a repeated one.
  (text_dir / "Flickr_8k.trainImages.txt").write_text("\n".join(TRAIN + ["9999_nocaps.jpg", TRAIN[0]]))
  return root


def test_flickr8k_layout_reads_splits_in_file_order(flickr8k_dir, caplog):
  train = datasets.load_records(_data_config(flickr8k_dir, "flickr8k"), "train")
  assert [r.image_id for r in train] == [name[:-4] for name in TRAIN]
  first = train[0]
  assert isinstance(first, datasets.CaptionRecord) and first.split == "train"
  assert first.captions == tuple(c for i, c in enumerate(data_fixtures.captions_for(0)) if i != 2)
  assert train[1].captions == tuple(data_fixtures.captions_for(1))  # "dup" of #1 skipped
  assert pathlib.Path(first.image_path) == flickr8k_dir / "Flicker8k_Dataset" / TRAIN[0]
  dev = datasets.load_records(_data_config(flickr8k_dir, "flickr8k"), "dev")
  assert [r.image_id for r in dev] == ["2000_dev", "2001_dev"] and all(r.split == "dev" for r in dev)
  assert all(len(r.captions) == 5 for r in train[1:] + dev)


def test_flickr8k_bad_lines_are_counted_in_one_warning_per_file(flickr8k_dir, caplog):
  datasets.read_flickr8k(flickr8k_dir, "train")
  token_warnings = _warnings(caplog, "Flickr8k.token.txt")
  assert len(token_warnings) == 1
  message = token_warnings[0]
  assert "skipped 5 item(s)" in message
  assert "1 empty captions (line 3)" in message
  assert f"lines 31-35: {TRAIN[0]}.1" in message and "without an image file" in message
  assert "2 malformed lines" in message and "line 36" in message and "line 37" in message
  assert "repeated caption ids" in message and "line 38" in message
  split_warnings = _warnings(caplog, "Flickr_8k.trainImages.txt")
  assert len(split_warnings) == 1
  assert "line 5: 9999_nocaps.jpg" in split_warnings[0] and "line 6" in split_warnings[0]


def test_flickr8k_missing_split_file_is_an_empty_split(flickr8k_dir):
  assert datasets.load_records(_data_config(flickr8k_dir, "flickr8k"), "test") == []


@pytest.mark.parametrize("remove, message", [
    ("", "Flickr8k folder not found"),
    ("Flicker8k_Dataset", "no image folder found"),
    ("Flickr8k_text/Flickr8k.token.txt", "Flickr8k caption file not found"),
])
def test_flickr8k_missing_paths_raise_data_error_naming_them(flickr8k_dir, tmp_path, remove, message):
  root = flickr8k_dir if remove else tmp_path / "nowhere"
  if remove:
    target = root / remove
    if target.is_dir():
      for f in target.iterdir():
        f.unlink()
      target.rmdir()
    else:
      target.unlink()
  with pytest.raises(errors.DataError, match=message) as info:
    datasets.load_records(_data_config(root, "flickr8k"), "train")
  assert str(root) in str(info.value) and "--config.data" in str(info.value)


def test_token_file_with_nothing_usable_is_rejected(flickr8k_dir):
  (flickr8k_dir / "Flickr8k_text" / "Flickr8k.token.txt").write_text("garbage\nmore garbage\n")
  with pytest.raises(errors.DataError, match="no usable captions"):
    datasets.read_flickr8k(flickr8k_dir, "train")


def test_unknown_layout_and_split_raise_config_error(flickr8k_dir):
  with pytest.raises(errors.ConfigError, match="config.data.layout='flickr9k'"):
    datasets.load_records(_data_config(flickr8k_dir, "flickr9k"), "train")
  with pytest.raises(errors.ConfigError, match="unknown split 'val'"):
    datasets.load_records(_data_config(flickr8k_dir, "flickr8k"), "val")


@pytest.fixture
def kaggle_dir(tmp_path):
  root = tmp_path / "kaggle"
  names = TRAIN + DEV
  rows = []
  for index, name in enumerate(names):
    data_fixtures.write_image(root / "Images" / name, "rgb_jpeg", seed=index)
    rows += [(name, caption) for caption in data_fixtures.captions_for(index)]
  rows[0] = (names[0], "A dog, a cat , and a bird")  # quoted comma
  data_fixtures.write_kaggle_csv(root / "captions.txt", rows)
  with open(root / "captions.txt", "a") as f:
    f.write(f"{names[1]},A caption with, an unquoted comma\nno_comma_here\n{names[2]},\n"
            "missing_image.jpg,A ghost image\n")
  return root


def test_kaggle_layout_split_by_folder(kaggle_dir, caplog):
  data_fixtures.make_flickr8k(kaggle_dir / "splits_src", {"train": [], "dev": []})
  split_dir = kaggle_dir / "splits"
  split_dir.mkdir()
  (split_dir / "Flickr_8k.trainImages.txt").write_text("\n".join(TRAIN) + "\n")
  (split_dir / "Flickr_8k.devImages.txt").write_text("\n".join(DEV) + "\n")
  config = _data_config(kaggle_dir, "kaggle", split_file="splits")
  train = datasets.load_records(config, "train")
  assert [r.image_id for r in train] == [n[:-4] for n in TRAIN]
  assert train[0].captions[0] == "A dog, a cat , and a bird"
  assert train[1].captions[-1] == "A caption with, an unquoted comma"
  assert len(train[1].captions) == 6
  assert [r.image_id for r in datasets.load_records(config, "dev")] == ["2000_dev", "2001_dev"]
  assert datasets.load_records(config, "test") == []
  message, = _warnings(caplog, "captions.txt")
  assert "malformed lines (expected 'image,caption') (line 33)" in message
  assert "empty captions (line 34)" in message and "missing_image.jpg" in message


def test_kaggle_layout_split_by_karpathy_json(kaggle_dir):
  entries = [(n, "train", ["x"]) for n in TRAIN[:3]] + [(TRAIN[3], "restval", ["x"])]
  entries += [(DEV[0], "val", ["x"]), (DEV[1], "test", ["x"])]
  (kaggle_dir / "dataset_flickr8k.json").write_text(data_fixtures.karpathy_json(entries))
  config = _data_config(kaggle_dir, "kaggle", split_file="dataset_flickr8k.json")
  assert len(datasets.load_records(config, "train")) == 4
  assert [r.image_id for r in datasets.load_records(config, "dev")] == ["2000_dev"]
  assert [r.image_id for r in datasets.load_records(config, "test")] == ["2001_dev"]
  config.restval_to_train = False
  assert len(datasets.load_records(config, "train")) == 3


def test_kaggle_layout_split_by_hash_is_deterministic_and_disjoint(kaggle_dir):
  config = _data_config(kaggle_dir, "kaggle", hash_dev_fraction=0.3, hash_test_fraction=0.3)
  by_split = {s: [r.image_id for r in datasets.load_records(config, s)] for s in datasets.SPLITS}
  all_ids = sorted(sum(by_split.values(), []))
  assert all_ids == sorted(n[:-4] for n in TRAIN + DEV)
  for split, ids in by_split.items():
    assert all(datasets.hash_split(i, 0.3, 0.3) == split for i in ids)
  # SHA-1 based: these never change across machines or Python versions.
  # (sha1("img0")[:8] / 2**32 = 0.357, img1 0.771, img2 0.599, img3 0.014)
  assert [datasets.hash_split(f"img{i}", 0.3, 0.3) for i in range(4)] == ["test", "train", "test", "dev"]


def test_kaggle_bad_split_file_setting(kaggle_dir):
  (kaggle_dir / "split.txt").write_text("x")
  with pytest.raises(errors.DataError, match="must be a folder"):
    datasets.load_records(_data_config(kaggle_dir, "kaggle", split_file="split.txt"), "train")
  for missing in ("Flickr8k_text", "dataset_flickr8k.json"):  # a typo: not found, and the field
    with pytest.raises(errors.DataError, match=f"{missing}: split file not found.*split_file"):
      datasets.load_records(_data_config(kaggle_dir, "kaggle", split_file=missing), "train")


def test_kaggle_quoted_captions_may_span_lines_and_a_stray_quote_costs_one_line(tmp_path, caplog):
  root = tmp_path / "kaggle"
  names = [f"{index}.jpg" for index in range(5)]
  for index, name in enumerate(names):
    data_fixtures.write_image(root / "Images" / name, "rgb_jpeg", seed=index)
  (root / "captions.txt").write_text(
      "image,caption\n"
      f'{names[0]},"A bird flying\nover the sea ."\n'          # lines 2-3: one caption (pandas' quoting)
      f"{names[1]},A dog .\n"                                    # line 4
      f'{names[2]},"A quote that never closes\n'                 # line 5: stray quote
      + "".join(f"{names[3]},Caption {k} .\n" for k in range(5))  # lines 6-10, read again after it
      + f"{names[4]},...\n{names[4]},?!\n{names[4]},A cat .\n")  # lines 11-12: no words
  records = {r.image_id: r.captions for r in datasets.load_records(
      _data_config(root, "kaggle", hash_dev_fraction=0.0, hash_test_fraction=0.0), "train")}
  assert records == {"0": ("A bird flying over the sea .",), "1": ("A dog .",),
                     "3": tuple(f"Caption {k} ." for k in range(5)), "4": ("A cat .",)}
  message, = _warnings(caplog, "captions.txt")
  assert "1 malformed lines (a quote that does not close) (line 5)" in message
  assert "2 empty captions (line 11, line 12)" in message  # no word once punctuation is removed


def test_kaggle_split_by_karpathy_json_reports_what_it_leaves_out(kaggle_dir, caplog):
  entries = [(n, "train", ["x"]) for n in TRAIN[:2]] + [(DEV[0], "val", ["x"])]
  payload = data_fixtures.karpathy_json(entries).replace(
      '"images": [', '"images": [{"filename": "x.jpg", "split": ["train"]}, ')
  (kaggle_dir / "split.json").write_text(payload)
  config = _data_config(kaggle_dir, "kaggle", split_file="split.json")
  assert len(datasets.load_records(config, "train")) == 2
  assert len(datasets.load_records(config, "dev")) == 1
  message, = _warnings(caplog, "split.json")  # once for both splits
  assert "1 malformed entries (need filename, split) (images[0])" in message
  assert f"3 captioned images it does not list (in no split) ({TRAIN[2]}, {TRAIN[3]}, {DEV[1]})" in (
      message)


def test_flickr8k_split_folder_set_but_missing_names_the_field(flickr8k_dir):
  with pytest.raises(errors.DataError, match="Flickr8k_txt: split file folder not found.*split_file"):
    datasets.load_records(_data_config(flickr8k_dir, "flickr8k", split_file="Flickr8k_txt"), "train")


def test_karpathy_layout(tmp_path, caplog):
  root = tmp_path / "karpathy"
  for index, name in enumerate(TRAIN + DEV):
    data_fixtures.write_image(root / "Flicker8k_Dataset" / name, "rgb_jpeg", seed=index)
  entries = [(TRAIN[0], "train", data_fixtures.captions_for(0)),
             (TRAIN[1], "restval", data_fixtures.captions_for(1)),
             (TRAIN[2], "train", ["", "  "]),  # no usable caption
             ("absent.jpg", "train", ["a caption"]),
             (DEV[0], "val", data_fixtures.captions_for(4)),
             (DEV[1], "test", data_fixtures.captions_for(5))]
  payload = data_fixtures.karpathy_json(entries).replace('"images": [', '"images": [{"broken": 1}, ')
  (root / "dataset_flickr8k.json").write_text(payload)
  config = _data_config(root, "karpathy")
  train = datasets.load_records(config, "train")
  assert [r.image_id for r in train] == ["1000_abc", "1001_abc"]
  assert train[0].captions == tuple(data_fixtures.captions_for(0))
  assert [r.split for r in datasets.load_records(config, "dev")] == ["dev"]
  assert [r.image_id for r in datasets.load_records(config, "test")] == ["2001_dev"]
  config.restval_to_train = False
  assert [r.image_id for r in datasets.load_records(config, "restval")] == ["1001_abc"]
  message = _warnings(caplog, "dataset_flickr8k.json")[0]
  assert "images[0]" in message and "malformed entries" in message
  assert "images[3]: 1002_abc.jpg" in message and "absent.jpg" in message


def test_karpathy_coco_style_filepath_and_cocoid(tmp_path):
  root = tmp_path / "coco"
  data_fixtures.write_image(root / "val2014" / "COCO_val2014_000000000042.jpg", "rgb_jpeg")
  data_fixtures.write_image(root / "train2014" / "COCO_train2014_000000000007.jpg", "rgb_jpeg")
  entries = [("COCO_val2014_000000000042.jpg", "restval", ["a b"], {"filepath": "val2014", "cocoid": 42}),
             ("COCO_train2014_000000000007.jpg", "train", ["c d"], {"filepath": "train2014", "cocoid": 7})]
  (root / "dataset_coco.json").write_text(data_fixtures.karpathy_json(entries))
  records = datasets.load_records(_data_config(root, "karpathy"), "train")
  assert [r.image_id for r in records] == ["42", "7"]
  assert records[0].image_path == str(root / "val2014" / "COCO_val2014_000000000042.jpg")


def test_karpathy_and_coco_entries_of_the_wrong_type_or_repeated_are_counted(tmp_path, caplog):
  root = tmp_path / "karpathy"
  for index, name in enumerate(TRAIN):
    data_fixtures.write_image(root / "Images" / name, "rgb_jpeg", seed=index)
  entries = [(TRAIN[0], "train", ["a dog ."]), (TRAIN[0], "train", ["a cat ."]),
             (TRAIN[1], "train", ["a bird ."], {"filepath": None}),
             (TRAIN[2], "train", ["...", "a fish ."])]
  payload = data_fixtures.karpathy_json(entries).replace(
      '"images": [', '"images": [{"filename": "x.jpg", "split": ["train"], "sentences": []}, ')
  (root / "dataset_flickr8k.json").write_text(payload)
  train = datasets.load_records(_data_config(root, "karpathy"), "train")
  assert [(r.image_id, r.captions) for r in train] == [("1000_abc", ("a dog .",)),
                                                       ("1002_abc", ("a fish .",))]
  message, = _warnings(caplog, "dataset_flickr8k.json")
  assert "2 malformed entries (need filename, split, sentences) (images[0], images[3])" in message
  assert "repeated images (the first entry is kept) (images[2]" in message
  assert "empty or malformed sentences (images[4]" in message

  coco = tmp_path / "coco"
  data_fixtures.write_image(coco / "train2014" / "a.jpg", "rgb_jpeg")
  data_fixtures.write_image(coco / "train2014" / "b.jpg", "rgb_jpeg")
  (coco / "annotations").mkdir()
  payload = json.loads(data_fixtures.coco_json(
      [(1, "a.jpg"), (1, "b.jpg"), (2, "b.jpg")], [(1, "A dog ."), (2, "A cat ."), (2, "!!")]))
  payload["images"].append({"id": [5], "file_name": "b.jpg"})
  payload["annotations"].append({"image_id": [5], "caption": "A list id ."})
  (coco / "annotations" / "captions_train2014.json").write_text(json.dumps(payload))
  records = datasets.load_records(_data_config(coco, "coco"), "train")
  assert [(r.image_id, r.captions) for r in records] == [("1", ("A dog .",)), ("2", ("A cat .",))]
  message, = _warnings(caplog, "captions_train2014.json")
  assert "repeated image ids (the first entry is kept) (images[1]: id 1)" in message
  assert "malformed images (need id, file_name) (images[3])" in message
  assert "malformed annotations (need image_id, caption) (annotations[3])" in message
  assert "empty captions (annotations[2])" in message


def test_karpathy_bad_json_names_file_and_line(tmp_path):
  (tmp_path / "dataset_flickr8k.json").write_text('{"images": [\n  {"filename": }\n]}')
  (tmp_path / "Images").mkdir()
  with pytest.raises(errors.DataError, match=r"dataset_flickr8k.json:2:\d+: Karpathy JSON is not valid"):
    datasets.load_records(_data_config(tmp_path, "karpathy"), "train")


def test_coco_layout(tmp_path, caplog):
  root = tmp_path / "coco"
  for split in ("train", "val"):
    folder = root / f"{split}2014"
    images = [(i, f"COCO_{split}2014_{i:012d}.jpg") for i in (1, 2, 3)]
    for _, name in images[:2]:
      data_fixtures.write_image(folder / name, "rgb_jpeg")
    annotations = [(1, "A dog ."), (2, "A cat ."), (1, "A brown dog ."), (3, "no file"), (9, "orphan"),
                   (2, "   ")]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}2014.json").write_text(
        data_fixtures.coco_json(images, annotations))
  train = datasets.load_records(_data_config(root, "coco"), "train")
  assert [(r.image_id, r.captions) for r in train] == [("1", ("A dog .", "A brown dog .")),
                                                       ("2", ("A cat .",))]
  dev = datasets.load_records(_data_config(root, "coco"), "dev")
  assert dev[0].image_path == str(root / "val2014" / "COCO_val2014_000000000001.jpg")
  message = _warnings(caplog, "captions_train2014.json")[0]
  assert "images[2]" in message and "image_id 9" in message and "annotations[5]" in message
  config = _data_config(root, "coco", captions_file="annotations/captions_{split}2014.json",
                        images_dir="{split}2014")
  assert datasets.load_records(config, "dev") == dev
  with pytest.raises(errors.DataError, match="captions_test2014.json: COCO captions file not found"):
    datasets.load_records(_data_config(root, "coco"), "test")


def test_all_flickr_layouts_give_the_same_records(tmp_path):
  root = data_fixtures.make_flickr8k(tmp_path / "f8k", {"train": TRAIN, "dev": DEV})
  token_lines = (root / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines()
  rows = [(line.split("#")[0], line.split("\t")[1]) for line in token_lines]
  data_fixtures.write_kaggle_csv(root / "captions.txt", rows)
  captions = {}
  for name, caption in rows:
    captions.setdefault(name, []).append(caption)
  entries = [(n, "train", captions[n]) for n in TRAIN] + [(n, "val", captions[n]) for n in DEV]
  (root / "dataset_flickr8k.json").write_text(data_fixtures.karpathy_json(entries))
  for split in ("train", "dev"):
    reference = datasets.load_records(_data_config(root, "flickr8k"), split)
    assert len(reference) == len(TRAIN if split == "train" else DEV)
    assert datasets.load_records(_data_config(root, "karpathy"), split) == reference
    for split_file in ("Flickr8k_text", "dataset_flickr8k.json"):
      assert datasets.load_records(_data_config(root, "kaggle", split_file=split_file), split) == reference


def test_tfds_builder_prepares_offline_and_tfds_layout_matches(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  root = data_fixtures.make_flickr8k(tmp_path / "f8k", {"train": TRAIN, "dev": DEV})
  importlib.import_module("flaxcap.tfds_flickr8k")  # registers the "flickr8k" builder
  data_dir = tmp_path / "tfds"
  loaded = tfds.load("flickr8k", split="validation", data_dir=str(data_dir),
                     download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
                         manual_dir=str(root))})
  examples = list(tfds.as_numpy(loaded))
  assert sorted(e["image/filename"].decode() for e in examples) == sorted(DEV)
  assert examples[0]["image"].shape == (30, 40, 3) and len(examples[0]["captions"]) == 5
  config = _data_config(root, "tfds", tfds_data_dir=str(data_dir))
  for split in ("train", "dev"):
    from_tfds = datasets.load_records(config, split)
    reference = datasets.load_records(_data_config(root, "flickr8k"), split)
    key = lambda r: r.image_id  # noqa: E731
    assert ([(r.image_id, r.captions) for r in sorted(from_tfds, key=key)] ==
            [(r.image_id, r.captions) for r in sorted(reference, key=key)])
    for record in from_tfds:
      exported = pathlib.Path(record.image_path)
      assert exported.read_bytes() == (root / "Flicker8k_Dataset" / exported.name).read_bytes()
  with pytest.raises(errors.DataError, match="not prepared"):
    datasets.load_records(_data_config(root, "tfds", tfds_name="coco_captions",
                                       tfds_data_dir=str(data_dir)), "train")


def test_datasets_module_does_not_import_tensorflow():
  code = "import sys, flaxcap.datasets; assert 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])


@pytest.mark.real_data
def test_real_flickr8k(flickr8k_root, caplog):
  caption_files.clear_cache()  # another test may have parsed (and warned about) the real files
  config = _data_config(flickr8k_root, "flickr8k")
  train = datasets.load_records(config, "train")
  dev = datasets.load_records(config, "dev")
  assert (len(train), len(dev)) == (6000, 1000)
  assert all(len(r.captions) == 5 for r in train + dev)
  assert not {r.image_id for r in train} & {r.image_id for r in dev}
  assert all(pathlib.Path(r.image_path).is_file() for r in dev)
  assert any("2258277193_586949ec62.jpg.1" in m for m in _warnings(caplog, "Flickr8k.token.txt"))
  vocab = vocab_lib.Vocabulary.build((c for r in train for c in r.captions), min_count=5)
  assert 2000 < len(vocab) < 4000, len(vocab)
  assert vocab.words[4] == "a"
  for layout, split_file in (("kaggle", "Flickr8k_text"), ("karpathy", "")):
    other = _data_config(flickr8k_root, layout, split_file=split_file)
    assert datasets.load_records(other, "dev") == dev


TRAIN_CAPTION_FILES = ["1000_a.jpg", "1001_b.jpg"]


def test_a_token_line_with_a_space_for_its_tab_is_read(tmp_path):
  root = data_fixtures.make_flickr8k(tmp_path / "flickr8k", {"train": TRAIN_CAPTION_FILES})
  token_file = root / "Flickr8k_text" / "Flickr8k.token.txt"
  lines = token_file.read_text().splitlines()
  name_and_number, caption = lines[0].split("\t")
  lines[0] = f"{name_and_number} {caption}"
  token_file.write_text("\n".join(lines) + "\n")
  caption_files.clear_cache()
  records = datasets.load_records(_data_config(root, "flickr8k"), "train")
  assert records[0].captions == tuple(data_fixtures.captions_for(0))


def test_an_image_name_holding_a_hash_sign_keeps_it(tmp_path):
  """The caption number follows the last '#': "photo#2.jpg#0" is caption 0 of photo#2.jpg."""
  names = ["photo#2.jpg", "plain.jpg"]
  root = data_fixtures.make_flickr8k(tmp_path / "flickr8k", {"train": names})
  caption_files.clear_cache()
  records = datasets.load_records(_data_config(root, "flickr8k"), "train")
  assert [pathlib.Path(r.image_path).name for r in records] == names
  assert records[0].captions == tuple(data_fixtures.captions_for(0))


def test_a_quoted_caption_of_exactly_the_line_limit_is_read_whole(tmp_path):
  root = tmp_path / "kaggle"
  names = ["0.jpg", "1.jpg"]
  for index, name in enumerate(names):
    data_fixtures.write_image(root / "Images" / name, "rgb_jpeg", seed=index)
  limit = caption_files.MAX_LINES_PER_CSV_ROW
  words = [f"word{k}" for k in range(limit)]
  (root / "captions.txt").write_text(
      "image,caption\n" + f'{names[0]},"' + "\n".join(words) + '"\n' + f"{names[1]},A dog .\n")
  caption_files.clear_cache()
  records = {r.image_id: r.captions for r in datasets.load_records(
      _data_config(root, "kaggle", hash_dev_fraction=0.0, hash_test_fraction=0.0), "train")}
  assert records == {"0": (" ".join(words),), "1": ("A dog .",)}


def test_an_image_added_for_a_captioned_id_is_found_on_the_next_read(tmp_path):
  root = data_fixtures.make_flickr8k(tmp_path / "flickr8k", {"train": TRAIN_CAPTION_FILES})
  images_dir = root / "Flicker8k_Dataset"
  (images_dir / TRAIN_CAPTION_FILES[1]).unlink()
  caption_files.clear_cache()
  token_file = root / "Flickr8k_text" / "Flickr8k.token.txt"
  first = caption_files.read_caption_lines(token_file, images_dir, csv_format=False)
  assert list(first) == [TRAIN_CAPTION_FILES[0]]
  data_fixtures.write_image(images_dir / TRAIN_CAPTION_FILES[1], "rgb_jpeg", seed=1)
  again = caption_files.read_caption_lines(token_file, images_dir, csv_format=False)
  assert list(again) == TRAIN_CAPTION_FILES
