"""Checkpoints: exporting the average of several models (a model soup) and its checks."""

import json
import pathlib
import shutil
import subprocess
import sys

from flax import serialization
from flax import traverse_util
import numpy as np
import pytest

import cli_env
from configs import tiny
from flaxcap import checkpoints
from flaxcap import errors
from flaxcap import inference
from flaxcap import vocab as vocab_lib
import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _steps(workdir):
  """The tiny run's two kept checkpoints (different epochs of one run: different parameters)."""
  steps = sorted((workdir / checkpoints.LATEST_DIR).iterdir(), key=lambda p: int(p.name))
  assert len(steps) >= 2, steps
  return steps[-2:]


def _flat_params(path):
  variables, _, _ = checkpoints.load_for_inference(path)
  return traverse_util.flatten_dict(variables, sep="/")


def _rewrite_export(directory, *, params=None, config=None):
  """Edits an exported model in place: `params(flat) -> flat`, `config(dict) -> dict`."""
  if params is not None:
    tree = serialization.msgpack_restore((directory / checkpoints.EXPORT_PARAMS).read_bytes())
    flat = params(traverse_util.flatten_dict(tree, sep="/"))
    (directory / checkpoints.EXPORT_PARAMS).write_bytes(
        serialization.msgpack_serialize(traverse_util.unflatten_dict(flat, sep="/")))
  if config is not None:
    (directory / "config.json").write_text(json.dumps(config(
        json.loads((directory / "config.json").read_text()))))


def test_export_of_two_checkpoints_holds_their_mean(tiny_checkpoint, tmp_path):
  first, second = _steps(tiny_checkpoint)
  soup = checkpoints.export([first, second], tmp_path / "soup")
  averaged, a, b = _flat_params(soup), _flat_params(first), _flat_params(second)
  assert averaged.keys() == a.keys() == b.keys()
  moved = 0
  for name, leaf in averaged.items():
    expected = ((np.asarray(a[name], np.float64) + np.asarray(b[name], np.float64)) / 2)
    np.testing.assert_allclose(leaf, expected.astype(np.float16), rtol=1e-3, atol=1e-4,
                               err_msg=name)
    moved += not np.allclose(a[name], b[name])
  assert moved > len(averaged) // 2  # the two epochs differ, so the mean is neither of them
  # The soup is a model like any export: it loads and captions.
  captioner = inference.Captioner.load(soup)
  assert captioner.vocab == inference.Captioner.load(first).vocab


def test_export_of_one_checkpoint_in_a_list_equals_its_export(tiny_checkpoint, tmp_path):
  first, _ = _steps(tiny_checkpoint)
  alone = checkpoints.export(first, tmp_path / "alone")
  listed = checkpoints.export([first], tmp_path / "listed")
  assert ((alone / checkpoints.EXPORT_PARAMS).read_bytes()
          == (listed / checkpoints.EXPORT_PARAMS).read_bytes())


@pytest.mark.parametrize("edit, message", [
    (dict(config=lambda c: {**c, "encoder": {**c["encoder"], "feature_stage": 5}}),
     "config.encoder.feature_stage = 5"),
    (dict(params=lambda flat: {name: (leaf[:-1] if "embed" in name else leaf)
                               for name, leaf in flat.items()}), "embed.* has shape"),
    (dict(params=lambda flat: {name: leaf for name, leaf in flat.items() if "embed" not in name}),
     "embed.* is in .*first only"),
])
def test_models_that_cannot_be_averaged_are_named(tiny_checkpoint, tmp_path, edit, message):
  first_step, _ = _steps(tiny_checkpoint)
  first = checkpoints.export(first_step, tmp_path / "first")
  other = checkpoints.export(first_step, tmp_path / "other")
  _rewrite_export(other, **edit)
  with pytest.raises(errors.CheckpointError, match=f"^{other}: .*{message}"):
    checkpoints.export([first, other], tmp_path / "soup")
  assert not (tmp_path / "soup").exists()


def test_models_with_another_vocabulary_cannot_be_averaged(tiny_checkpoint, tmp_path):
  first_step, _ = _steps(tiny_checkpoint)
  first = checkpoints.export(first_step, tmp_path / "first")
  other = checkpoints.export(first_step, tmp_path / "other")
  vocab = json.loads((other / "vocab.json").read_text())
  words = vocab["words"] if isinstance(vocab, dict) else vocab
  words[-1] = words[-1] + "x"
  (other / "vocab.json").write_text(json.dumps(vocab))
  with pytest.raises(errors.CheckpointError, match=f"^{other}: its vocabulary"):
    checkpoints.export([first, other], tmp_path / "soup")


def test_export_cli_averages_repeated_checkpoints(tiny_checkpoint, tmp_path):
  first, second = _steps(tiny_checkpoint)
  env = cli_env.cli_env()
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "export.py"), f"--checkpoint={first}",
       f"--checkpoint={second}", f"--out={tmp_path / 'soup'}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(tmp_path / "soup")  # the one line a script can read
  library = checkpoints.export([first, second], tmp_path / "library")
  assert ((tmp_path / "soup" / checkpoints.EXPORT_PARAMS).read_bytes()
          == (library / checkpoints.EXPORT_PARAMS).read_bytes())
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "export.py"), f"--checkpoint={first}",
       f"--checkpoint={tmp_path / 'missing'}", f"--out={tmp_path / 'bad'}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"export.py: error: {tmp_path / 'missing'}: checkpoint directory does not exist")


def test_export_cli_errors_are_one_line_and_leave_no_half_written_model(tiny_checkpoint, tmp_path):
  env = cli_env.cli_env()
  (tmp_path / "no_images").mkdir()
  (tmp_path / "a_file").write_text("")
  for arguments, message in (
      ([f"--out={tmp_path / 'a_file'}"], f"--out {tmp_path / 'a_file'}: a file is there"),
      ([f"--out={tmp_path / 'model'}", f"--consensus_data={tmp_path / 'gone'}"],
       f"--consensus_data {tmp_path / 'gone'}: no such folder"),
      ([f"--out={tmp_path / 'model'}", f"--data_root={tmp_path / 'gone'}"],
       f"--data_root {tmp_path / 'gone'}: no such folder"),
      ([f"--out={tmp_path / 'model'}", f"--consensus_data={tmp_path / 'no_images'}"],
       f"{tmp_path / 'no_images'}: no image folder found")):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "export.py"), f"--checkpoint={tiny_checkpoint}", *arguments],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"export.py: error: {message}")
    assert not (tmp_path / "model").exists()  # the index failed: the export is removed with it
  # A folder that was there before is the user's: a failed export leaves it and what it held.
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "notes.txt").write_text("keep me")
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "export.py"), f"--checkpoint={tiny_checkpoint}",
       f"--out={tmp_path / 'theirs'}", f"--consensus_data={tmp_path / 'no_images'}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "export.py"), f"--checkpoint={tiny_checkpoint}",
       f"--out={tmp_path / 'model'}", "stray"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "unexpected arguments: stray" in result.stderr
  assert not (tmp_path / "model").exists()
  with pytest.raises(errors.CheckpointError, match="a_file: cannot hold the exported model"):
    checkpoints.export(tiny_checkpoint, tmp_path / "a_file")


def test_checkpoints_keep_the_vocabulary_ending_rates(tiny_checkpoint):
  _, _, vocab = checkpoints.load_for_inference(tiny_checkpoint)
  assert vocab.ending_rates is not None and vocab.ending_rates.max() > 0


def test_export_rebuilds_ending_rates_of_an_old_vocabulary(tiny_checkpoint, shapes_root, tmp_path):
  _, _, vocab = checkpoints.load_for_inference(tiny_checkpoint)
  old = checkpoints.export(tiny_checkpoint, tmp_path / "old")
  payload = json.loads((old / "vocab.json").read_text())
  del payload["ending_rates"]  # as vocabularies were saved before they kept them
  (old / "vocab.json").write_text(json.dumps(payload))
  assert inference.Captioner.load(old).vocab.ending_rates is None
  upgraded = checkpoints.export(old, tmp_path / "upgraded", data_root=shapes_root)
  rebuilt = inference.Captioner.load(upgraded).vocab
  assert rebuilt == vocab
  np.testing.assert_allclose(rebuilt.ending_rates, vocab.ending_rates, atol=1e-6)
  other_data = tmp_path / "other_data"  # the same images, one more caption with a new word
  shutil.copytree(shapes_root, other_data)
  tokens = other_data / "Flickr8k_text" / "Flickr8k.token.txt"
  first_image = tokens.read_text().splitlines()[0].split("#")[0]
  tokens.write_text(tokens.read_text() + f"{first_image}#5\tA zebra .\n")
  with pytest.raises(errors.CheckpointError, match=f"^{old}: the vocabulary built from"):
    checkpoints.export(old, tmp_path / "wrong", data_root=other_data)


def test_quiet_orbax_drops_orbax_info_and_keeps_its_warnings_and_other_libraries():
  import logging  # pylint: disable=g-import-not-at-top

  def record(level, path, message="message"):
    return logging.LogRecord("absl", level, path, 1, message, (), None)

  orbax_file = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not checkpoints.quiet_orbax(record(logging.INFO, orbax_file))
  assert not checkpoints.quiet_orbax(record(logging.DEBUG, orbax_file))
  assert checkpoints.quiet_orbax(record(logging.WARNING, orbax_file))
  assert checkpoints.quiet_orbax(record(logging.INFO, "/work/flaxcap/train_lib.py"))
  assert not checkpoints.quiet_orbax(record(logging.WARNING, orbax_file, "Given directory is read only=x"))
  assert checkpoints.quiet_orbax(record(logging.ERROR, orbax_file, "read_only=True"))


def test_offer_best_keeps_the_highest_metric(tmp_path):
  store = checkpoints.CheckpointStore(tmp_path, keep=2, best_metric="CIDEr")
  config, vocab = tiny.get_config(), vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ["a"])
  state = lambda value: {"w": np.full(3, value, np.float32)}
  try:
    assert store.offer_best(4, state(1), config, vocab, {"CIDEr": 1.0})
    assert store.offer_best(8, state(2), config, vocab, {"CIDEr": 2.0})       # better: replaces
    assert not store.offer_best(12, state(3), config, vocab, {"CIDEr": 1.5})  # worse: refused
    assert not store.offer_best(16, state(4), config, vocab, {"CIDEr": 2.0})  # equal: refused
    assert store.best_value() == 2.0 and store.best.best_step() == 8
  finally:
    store.close()
  assert sorted(p.name for p in (pathlib.Path(tmp_path) / checkpoints.BEST_DIR).iterdir()
                if p.name.isdigit()) == ["8"]


MUST_MATCH = ("image_size", "batch_size", "encoder.name", "encoder.weights", "encoder.feature_stage",
              "encoder.trainable_stages", "decoder.embed_dim", "decoder.hidden_dim",
              "decoder.attention_dim", "decoder.gate", "decoder.prev2out", "decoder.ctx2out",
              "decoder.attention_activation", "data.max_len", "data.captions_per_epoch",
              "vocab.min_count", "vocab.max_size", "self_critical.num_samples")


def _vocab():
  return vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ["a", "dog"])


def _state(value):
  return {"params": {"decoder": {"w": np.full(3, value, np.float32)}}, "step": np.int32(value)}


def _store_with_best_and_latest(workdir):
  store = checkpoints.CheckpointStore(workdir, keep=2, best_metric="CIDEr")
  config = tiny.get_config()
  try:
    store.save_latest(10, _state(1.0), config, _vocab())
    assert store.offer_best(10, _state(1.0), config, _vocab(), {"CIDEr": 2.0})
    store.save_latest(20, _state(2.0), config, _vocab())  # worse: not offered, only the latest
    store.record_evaluation({"step": 10, "CIDEr": 2.0})
    store.record_evaluation({"step": 20, "CIDEr": 1.0})
  finally:
    store.close()
  return config


def _weight(variables):
  return float(np.asarray(variables["params"]["decoder"]["w"])[0])


def test_a_workdir_loads_its_best_and_a_folder_its_own(tmp_path):
  _store_with_best_and_latest(tmp_path)
  assert _weight(checkpoints.load_for_inference(tmp_path)[0]) == 1.0  # best/, step 10
  assert _weight(checkpoints.load_for_inference(tmp_path / checkpoints.LATEST_DIR)[0]) == 2.0
  assert _weight(checkpoints.load_for_inference(tmp_path / checkpoints.BEST_DIR)[0]) == 1.0
  assert _weight(checkpoints.load_for_inference(tmp_path / checkpoints.LATEST_DIR / "10")[0]) == 1.0


def test_evaluations_are_oldest_first(tmp_path):
  _store_with_best_and_latest(tmp_path)
  store = checkpoints.CheckpointStore(tmp_path, keep=2, best_metric="CIDEr")
  try:
    assert [entry["step"] for entry in store.evaluations()] == [10, 20]
    store.record_evaluation({"step": 30, "CIDEr": 0.5})
    assert [entry["step"] for entry in store.evaluations()] == [10, 20, 30]
  finally:
    store.close()
  assert [e["step"] for e in json.loads((tmp_path / checkpoints.EVALUATIONS_FILE).read_text())] == [
      10, 20, 30]


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, str):
    return value + "_other"
  if isinstance(value, (list, tuple)):
    return list(value) + [99]
  if value is None:
    return 1
  raise TypeError(value)


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resumable")
  return workdir, _store_with_best_and_latest(workdir)


@pytest.mark.parametrize("field", MUST_MATCH)
def test_resuming_with_any_model_setting_changed_is_refused(resumable, field):
  workdir, config = resumable
  checkpoints.check_resume_config(workdir, config)  # the same config: resumes
  changed = ml_collections.ConfigDict(json.loads(config.to_json()))
  *parents, name = field.split(".")
  owner = changed
  for parent in parents:
    owner = owner[parent]
  owner[name] = _changed(owner[name])
  with pytest.raises(errors.CheckpointError, match=f"config.{field} = "):
    checkpoints.check_resume_config(workdir, changed)



def test_load_for_inference_keeps_the_batch_norm_statistics(tmp_path):
  # A fine-tuned encoder's running statistics are part of the model: they are loaded with it.
  store = checkpoints.CheckpointStore(tmp_path, keep=1, best_metric="CIDEr")
  state = {"params": {"decoder": {"w": np.ones(3, np.float32)}},
           "batch_stats": {"encoder": {"bn": {"mean": np.arange(4, dtype=np.float32)}}}}
  try:
    store.save_latest(5, state, tiny.get_config(), _vocab())
  finally:
    store.close()
  variables, _, _ = checkpoints.load_for_inference(tmp_path)
  np.testing.assert_array_equal(variables["batch_stats"]["encoder"]["bn"]["mean"], np.arange(4))
