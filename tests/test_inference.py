"""Inference: Captioner.load, batched captioning with failures, export, and the infer.py CLI."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import cli_env
import data_fixtures
from flaxcap import checkpoints
from flaxcap import errors
import infer  # the CLI's own functions (REPO_ROOT is on sys.path)
from flaxcap import inference
from flaxcap import images as images_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BROKEN = {"notes.jpg": "text", "empty.jpg": "empty",
          "truncated.jpg": "truncated_jpeg", "bomb.png": "bomb_png"}
ODD_BUT_GOOD = ("cmyk_jpeg", "png16_rgb", "gif_animated", "gray_jpeg", "rgba_png")


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
  return inference.Captioner.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def photo_folder(shapes_root, tmp_path_factory):
  """Good shape photos, odd-but-valid formats, and broken files, in nested folders."""
  folder = tmp_path_factory.mktemp("photos")
  shapes = sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:3]
  for index, path in enumerate(shapes):
    (folder / "nested" / f"shape{index}.jpg").parent.mkdir(parents=True, exist_ok=True)
    (folder / "nested" / f"shape{index}.jpg").write_bytes(path.read_bytes())
  for kind in ODD_BUT_GOOD:
    suffix = {"png16_rgb": ".png", "gif_animated": ".gif", "rgba_png": ".png"}.get(kind, ".jpg")
    data_fixtures.write_image(folder / f"{kind}{suffix}", kind, size=(70, 50))
  for name, kind in BROKEN.items():
    data_fixtures.write_image(folder / "broken" / name, kind)
  return folder


def test_loaded_weights_live_on_the_device(captioner):
  leaves = jax.tree.leaves((captioner.decoder_params, captioner.encoder_variables))
  assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)


def test_captions_stream_in_order_and_report_failures(captioner, photo_folder):
  paths = [str(p) for p in inference.find_images(photo_folder)] + [str(photo_folder / "gone.jpg")]
  results = list(captioner.caption(paths, beam_size=3, batch_size=4))
  by_source = {r.source: r for r in results}
  assert set(by_source) == set(paths)
  failures = {pathlib.Path(s).name: r for s, r in by_source.items()
              if isinstance(r, inference.Failure)}
  assert set(failures) == {"notes.jpg", "empty.jpg", "truncated.jpg", "bomb.png", "gone.jpg"}
  for name, failure in failures.items():
    assert name in failure.message and "\n" not in failure.message
  assert "decompression bomb" in failures["bomb.png"].message
  captions = [r for r in results if isinstance(r, inference.Caption)]
  assert len(captions) == 3 + len(ODD_BUT_GOOD)
  h, w = captioner.feature_grid_shape
  for caption in captions:
    assert caption.attention.shape == (len(caption.words), h, w)
    np.testing.assert_allclose(caption.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert len(caption.alternatives) == 3
    assert caption.alternatives[0] == (caption.text, caption.score)
    assert [s for _, s in caption.alternatives] == sorted(
        [s for _, s in caption.alternatives], reverse=True)


def test_results_come_one_per_input_in_the_inputs_order(captioner, shapes_root, photo_folder):
  good = [str(p) for p in sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:3]]
  bad = [str(photo_folder / "broken" / "truncated.jpg"), str(photo_folder / "gone.jpg")]
  inputs = [bad[0], good[0], bad[1], good[1], good[2]]
  one_by_one = {path: next(captioner.caption([path], beam_size=2)).text for path in good}
  for batch_size in (1, 16):  # each image its own batch; all in one, flushed at the end
    results = list(captioner.caption(inputs, beam_size=2, batch_size=batch_size))
    assert [r.source for r in results] == inputs, batch_size
    assert [isinstance(r, inference.Failure) for r in results] == [True, False, True, False, False]
    assert [r.text for r in results if isinstance(r, inference.Caption)] == [
        one_by_one[path] for path in good]
  (only,) = captioner.caption(good[0], beam_size=2)  # a path alone is one input, not its letters
  assert only.source == good[0] and only.text == one_by_one[good[0]]


def test_images_in_memory_in_any_layout_caption_as_their_uint8_rgb(captioner, shapes_root):
  path = sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[3]
  rgb = np.asarray(Image.open(path).convert("RGB"))
  gray = np.asarray(Image.open(path).convert("L"))
  opaque = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
  inputs = [rgb, rgb / 255.0, (rgb / 255.0).astype(np.float32), Image.open(path), opaque,
            rgb.astype(np.int64), gray, gray[:, :, None], np.repeat(gray[:, :, None], 3, axis=2),
            rgb.astype(np.float32), rgb[None], rgb[:, :, :2], "not an image".encode()]
  results = list(captioner.caption(inputs, beam_size=2))  # one batch of 16
  assert len(results) == len(inputs)
  colour, gray_ones = results[:6], results[6:9]
  assert all(isinstance(r, inference.Caption) for r in colour + gray_ones)
  for group, reference in ((colour, colour[0]), (gray_ones, gray_ones[2])):  # same pixels: the same
    assert [r.text for r in group] == [reference.text] * len(group)     # caption, up to the rounding
    np.testing.assert_allclose([r.score for r in group], reference.score, atol=1e-4)  # of a batch row
  failures = results[9:]
  assert all(isinstance(r, inference.Failure) for r in failures), failures
  assert "[0, 1]" in failures[0].message and "input 9" in failures[0].message  # floats 0..255
  assert "shape (1," in failures[1].message and "shape" in failures[2].message
  assert "input 12 (bytes)" in failures[3].message
  assert all("\n" not in f.message for f in failures)


@pytest.mark.parametrize("option, value", [
    ("beam_size", 0), ("beam_size", -1), ("max_len", 0), ("batch_size", 0), ("batch_size", 2.5),
    ("length_penalty", float("nan")), ("min_ending_rate", -0.1), ("consensus_neighbours", -1),
    ("consensus_beam_weight", float("inf"))])
def test_search_options_out_of_range_are_config_errors_naming_the_option(
    captioner, shapes_root, option, value):
  path = str(sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[0])
  with pytest.raises(errors.ConfigError, match=option):
    next(captioner.caption([path], **{option: value}))


def test_find_images_lists_broken_links_for_captioning_to_report(captioner, tmp_path, shapes_root):
  photo = sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[0]
  (tmp_path / "photo.jpg").write_bytes(photo.read_bytes())
  (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
  (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
  (tmp_path / "folder.jpg").mkdir()
  (tmp_path / "notes.txt").write_text("not an image")
  found = inference.find_images(tmp_path)
  assert [p.name for p in found] == ["gone.jpg", "loop.png", "photo.jpg"]
  results = {pathlib.Path(r.source).name: r for r in captioner.caption(found, beam_size=1)}
  assert "symbolic link to a missing file" in results["gone.jpg"].message
  assert isinstance(results["loop.png"], inference.Failure)
  assert isinstance(results["photo.jpg"], inference.Caption)


def test_a_model_whose_files_do_not_fit_together_is_a_checkpoint_error(tiny_checkpoint, tmp_path):
  export = checkpoints.export(tiny_checkpoint, tmp_path / "model")
  words = json.loads((export / "vocab.json").read_text())
  fewer = tmp_path / "fewer_words"
  shutil.copytree(export, fewer)
  (fewer / "vocab.json").write_text(json.dumps(
      {**words, "words": words["words"][:-3], "ending_rates": words["ending_rates"][:-3]}))
  with pytest.raises(errors.CheckpointError, match="do not fit its config and vocabulary"):
    inference.Captioner.load(fewer)
  no_config = tmp_path / "no_config"
  shutil.copytree(export, no_config)
  (no_config / "config.json").write_text("{}")
  with pytest.raises(errors.CheckpointError, match="no_config: its config or parameters lack"):
    inference.Captioner.load(no_config)


def test_batch_padding_does_not_change_captions(captioner, shapes_root):
  paths = [str(p) for p in sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:5]]
  one_by_one = [next(captioner.caption([p], beam_size=3)).text for p in paths]
  batched = [r.text for r in captioner.caption(paths, beam_size=3, batch_size=4)]
  assert one_by_one == batched


def test_arrays_and_paths_give_the_same_caption(captioner, shapes_root):
  path = sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[0]
  array = np.asarray(Image.open(path).convert("RGB"))
  from_path, from_array = captioner.caption([str(path), array], beam_size=2)
  assert from_path.text == from_array.text and from_array.source == ""


def test_export_round_trip(tiny_checkpoint, captioner, shapes_root, tmp_path):
  out = checkpoints.export(tiny_checkpoint, tmp_path / "model")
  exported = inference.Captioner.load(out)
  assert exported.vocab == captioner.vocab
  paths = [str(p) for p in sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:4]]
  original = list(captioner.caption(paths, beam_size=3, batch_size=4))
  compact = list(exported.caption(paths, beam_size=3, batch_size=4))
  for a, b in zip(original, compact):  # float16 params: the same words, nearly the same scores
    assert a.text == b.text
    assert abs(a.score - b.score) < 0.05


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    inference.Captioner.load(tmp_path / "nope")
  with pytest.raises(errors.CheckpointError, match="no complete checkpoint"):
    inference.Captioner.load(tmp_path)


def _infer(*args):
  env = cli_env.cli_env()
  return subprocess.run([sys.executable, str(REPO_ROOT / "infer.py"), *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_infer_cli_folder_json_overlays_and_exit_code(tiny_checkpoint, photo_folder, tmp_path):
  result = _infer(f"--checkpoint={tiny_checkpoint}", f"--images={photo_folder}", "--json",
                  f"--attention_out={tmp_path / 'overlays'}", "--beam_size=2")
  assert result.returncode == 1, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert len(lines) == 3 + len(ODD_BUT_GOOD)
  assert all(set(line) == {"image", "caption", "score"} for line in lines)
  errors_printed = [l for l in result.stderr.splitlines() if l.startswith("infer.py: error:")]
  assert len(errors_printed) == 4, result.stderr[-3000:]  # notes, empty, truncated, bomb
  assert "Traceback" not in result.stderr
  overlays = sorted(p.name for p in (tmp_path / "overlays").glob("*.png"))
  assert len(overlays) == len(lines)
  overlay = Image.open(tmp_path / "overlays" / overlays[0])
  assert overlay.size[0] > 200 and overlay.size[1] > 150


def test_infer_cli_scores_a_dataset_split(tiny_checkpoint, shapes_root):
  # METEOR (a Java process, 10-20 s; tests/test_metrics.py checks it) is left out with --metrics.
  result = _infer(f"--checkpoint={tiny_checkpoint}", f"--dataset={shapes_root}", "--split=dev",
                  "--beam_size=1", "--metrics=BLEU,CIDEr")
  assert result.returncode == 0, result.stderr[-2000:]
  names = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
  assert names == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"], result.stdout


def test_infer_cli_dataset_json_scores_each_readable_image_against_its_own_references(
    tiny_checkpoint, shapes_root, tmp_path):
  from flaxcap import datasets  # pylint: disable=g-import-not-at-top
  from flaxcap import metrics  # pylint: disable=g-import-not-at-top
  root = tmp_path / "shapes"
  shutil.copytree(shapes_root, root)
  broken = sorted((root / "Flicker8k_Dataset").glob("*.jpg"))[1]  # between two readable images
  broken.write_bytes(broken.read_bytes()[:300])
  result = _infer(f"--checkpoint={tiny_checkpoint}", f"--dataset={root}", "--split=dev",
                  "--beam_size=1", "--json", "--metrics=BLEU,ROUGE-L,CIDEr")  # no JVM for METEOR
  assert result.returncode == 1, result.stderr[-2000:]  # an image failed
  assert [l for l in result.stderr.splitlines() if l.startswith("infer.py: error:")] == [
      l for l in result.stderr.splitlines() if broken.name in l]
  *caption_lines, summary = [json.loads(line) for line in result.stdout.splitlines()]
  _, config, _ = checkpoints.load_for_inference(tiny_checkpoint)
  config.data.root = str(root)
  records = {pathlib.Path(r.image_path).name: r for r in datasets.load_records(config.data, "dev")}
  del records[broken.name]
  assert sorted(pathlib.Path(line["image"]).name for line in caption_lines) == sorted(records)
  captions = {pathlib.Path(line["image"]).name: line["caption"] for line in caption_lines}
  captioner = inference.Captioner.load(tiny_checkpoint)  # each caption is its own image's
  for name, text in captions.items():
    assert next(captioner.caption([records[name].image_path], beam_size=1)).text == text
  expected = metrics.score({name: list(r.captions) for name, r in records.items()}, captions,
                           metrics=("BLEU", "ROUGE-L", "CIDEr"))
  assert summary["images"] == len(records) and summary["failed"] == 1
  assert summary["beam_size"] == 1
  assert summary["consensus"] == 0  # no index in this model: the beam's best
  assert "METEOR" not in summary["scores"] and summary["scores"] == pytest.approx(expected)


def test_infer_cli_without_inputs_is_a_usage_error():
  result = _infer()
  assert result.returncode != 0 and "--image" in result.stderr


def test_infer_cli_bad_values_and_an_empty_folder_are_one_line_errors(tiny_checkpoint, shapes_root,
                                                                     tmp_path):
  photo = str(sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[0])
  (tmp_path / "empty").mkdir()
  (tmp_path / "a_file").write_text("")
  a_file = tmp_path / "a_file"
  empty, missing = tmp_path / "empty", tmp_path / "missing"
  for flag, message in (("--beam_size=0", "beam_size must be a whole number >= 1"),
                        (f"--attention_out={a_file}", f"{a_file}: cannot be"),
                        (f"--image={empty}", f"--image {empty}: a folder, not an image file"),
                        (f"--images={a_file}", f"--images {a_file}: a file, not a folder"),
                        (f"--images={missing}", f"--images {missing}: no such folder")):
    result = _infer(f"--checkpoint={tiny_checkpoint}", f"--image={photo}", flag)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"infer.py: error: {message}")
    assert not result.stdout
  result = _infer(f"--checkpoint={tiny_checkpoint}", f"--image={photo}",
                  f"--images={tmp_path / 'empty'}")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert f"infer.py: error: {tmp_path / 'empty'}: no image files" in result.stderr
  assert result.stdout.startswith(f"{photo}: ")


def test_min_ending_rate_bans_rare_last_words(captioner, shapes_root):
  paths = [str(p) for p in sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:6]]
  rates = dict(zip(captioner.vocab.words, captioner.vocab.ending_rates))
  free = list(captioner.caption(paths, beam_size=2, min_ending_rate=0.0))
  assert all(c.words for c in free)
  threshold = max(rates[c.text.split()[-1]] for c in free) + 1e-3  # bans every free last word
  held = list(captioner.caption(paths, beam_size=2, min_ending_rate=threshold))
  for caption in held:
    words = caption.text.split()
    assert rates[words[-1]] >= threshold or len(words) == captioner.config.eval.max_len, words
  assert [c.text for c in held] != [c.text for c in free]
  # Everything banned: every caption runs to the longest allowed.
  forced = list(captioner.caption(paths, beam_size=2, max_len=6, min_ending_rate=1.01))
  assert all(len(c.text.split()) == 6 for c in forced), [c.text for c in forced]


def test_overlays_of_photos_with_one_name_never_overwrite_each_other(tmp_path):
  used, out = set(), tmp_path / "overlays"
  out.mkdir()
  for folder, shade in (("a", 40), ("b", 120), ("c", 200)):
    path = tmp_path / folder / "photo.jpg"
    path.parent.mkdir()
    Image.fromarray(np.full((20, 30, 3), shade, np.uint8)).save(path)
    result = inference.Caption(text="a dog", score=-1.0, tokens=np.array([4, 5]), words=["a", "dog"],
                               attention=np.full((2, 2, 2), 0.25, np.float32),
                               alternatives=[("a dog", -1.0)], source=str(path))
    infer._write_overlay(result, out, used)  # pylint: disable=protected-access
  assert sorted(p.name for p in out.iterdir()) == ["photo.png", "photo_2.png", "photo_3.png"]


class _KeepsTheLastBeam:
  """A stand-in consensus index: every image keeps its last beam."""

  def rerank(self, pooled, candidates, neighbours, beam_scores=None, beam_score_weight=0.0):
    del pooled, neighbours, beam_scores, beam_score_weight
    return np.array([len(texts) - 1 for texts in candidates])


@pytest.fixture(scope="module")
def captioner_inference(tiny_checkpoint):
  return inference.Captioner.load(tiny_checkpoint)


def test_a_reranked_caption_is_wholly_its_chosen_beams(captioner_inference, shapes_root, monkeypatch):
  # Batches of 4 at beam 4 and the config's search options: the program test_consensus compiles.
  beam_size, max_len = 4, captioner_inference.config.eval.max_len
  min_ending_rate = float(captioner_inference.config.eval.min_ending_rate)
  monkeypatch.setattr(captioner_inference, "consensus_index", _KeepsTheLastBeam())
  paths = sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:8]
  h, w = captioner_inference.feature_grid_shape
  last, lengths_differ = beam_size - 1, False
  for start in (0, 4):
    batch = np.stack([images_lib.load_image(p, image_size=captioner_inference.config.image_size)
                      for p in paths[start:start + 4]])
    raw, _ = captioner_inference._compiled(beam_size, max_len, float(captioner_inference.config.eval.length_penalty))(
        captioner_inference.encoder_variables, captioner_inference.decoder_params, captioner_inference.word_gate_table,
        captioner_inference._eos_banned_after(min_ending_rate), batch)  # pylint: disable=protected-access
    tokens, lengths, attention = (np.asarray(x) for x in (raw.tokens, raw.lengths, raw.aux))
    lengths_differ |= bool((lengths[:, last] != lengths[:, 0]).any())
    captions = captioner_inference.caption_arrays(batch, beam_size=beam_size, consensus_neighbours=3)
    for row, caption in enumerate(captions):
      length = int(lengths[row, last])
      assert caption.beam_index == last
      assert (caption.text, caption.score) == caption.alternatives[last]
      np.testing.assert_array_equal(caption.tokens, tokens[row, last, :length])
      assert caption.words == [captioner_inference.vocab.words[t] for t in tokens[row, last, :length]]
      assert captioner_inference.vocab.decode(caption.tokens) == caption.text
      np.testing.assert_allclose(caption.attention,
                                 attention[row, last, :length].reshape(length, h, w), atol=1e-6)
  assert lengths_differ, "no image's last beam differs in length from its first"


def test_find_images_takes_suffixes_in_any_case(tmp_path):
  for name in ("PHOTO.JPG", "scan.Png", "b.jpeg", "notes.TXT"):
    (tmp_path / name).write_bytes(b"x")
  assert [p.name for p in inference.find_images(tmp_path)] == ["PHOTO.JPG", "b.jpeg", "scan.Png"]


def test_min_ending_rate_defaults_to_the_models_config(captioner_inference, shapes_root, monkeypatch):
  # A model whose config bans every ending (no word ends 101% of its occurrences): without the
  # option, every caption runs to max_len.
  monkeypatch.setattr(captioner_inference.config.eval, "min_ending_rate", 1.01)
  paths = [str(p) for p in sorted((shapes_root / "Flicker8k_Dataset").glob("*.jpg"))[:6]]
  results = list(captioner_inference.caption(paths, beam_size=2, max_len=6))
  assert all(len(r.text.split()) == 6 for r in results), [r.text for r in results]
