"""Training: overfitting a tiny set, 4 devices == 1 device, kill-and-resume, and bad input."""

import contextlib
import functools
import json
import math
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli_env
from configs import tiny
from flaxcap import checkpoints
from flaxcap import encoders
from flaxcap import errors
from flaxcap import feature_cache
from flaxcap import model as model_lib
from flaxcap import train_data
from flaxcap import replication
from flaxcap import train_lib
from recording_writer import RecordingWriter
import shapes_data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(shapes_root, **overrides):
  return shapes_data.tiny_config(shapes_root, **overrides)


def test_overfits_shapes_and_greedy_decodes_training_captions(shapes_root, shared_features_workdir,
                                                               monkeypatch):
  scalars = {}
  monkeypatch.setattr(train_lib, "_summary_writer", lambda workdir: RecordingWriter(scalars))
  config = _config(shapes_root, num_epochs=30, loss__alpha_c=0.0, optimizer__learning_rate=3e-3,
                   optimizer__schedule="constant", eval__every_epochs=30, eval__patience=0,
                   checkpoint__every_steps=1000, log_every_steps=10,
                   data__captions_per_epoch="all")  # 10 steps of 8 captions per epoch
  workdir = shared_features_workdir()
  final = train_lib.train_and_evaluate(config, workdir)
  losses = scalars["train/loss"]
  assert losses[max(losses)] < 0.02 < losses[min(losses)]
  assert list(scalars["train/learning_rate"].values()) == pytest.approx([3e-3] * 30)  # constant
  epoch_losses = scalars["epoch/loss"]  # each epoch's mean, at its last step
  assert sorted(epoch_losses) == list(range(10, 301, 10))
  assert epoch_losses[300] < 0.02 < epoch_losses[10]
  assert epoch_losses[10] == pytest.approx(losses[10])  # the same 10 steps: one logging window
  assert final["BLEU-4"] > 0.99

  from flaxcap import inference  # pylint: disable=g-import-not-at-top
  captioner = inference.Captioner.load(workdir)
  token_file = shapes_root / "Flickr8k_text" / "Flickr8k.token.txt"
  expected = {line.split("#")[0]: line.split("\t")[1].lower().rstrip(" .")
              for line in token_file.read_text().splitlines()}
  paths = [str(shapes_root / "Flicker8k_Dataset" / name) for name in sorted(expected)]
  results = list(captioner.caption(paths, beam_size=1, batch_size=16))
  assert [r.text for r in results] == [expected[name] for name in sorted(expected)]


def _run_steps(num_devices, config, feature_table, token_batches, encoder=None, encoder_variables=None):
  """Runs `train_step` pmapped over the first `num_devices` devices on the same global batches.

  `encoder`: a trainable encoder tail over the rows of `feature_table` (fine-tuning), with its
  `encoder_variables`; None: the table holds a frozen encoder's features. Returns the variables.
  """
  model, state = _initial_state(config, feature_table, encoder, encoder_variables)
  devices = jax.local_devices()[:num_devices]
  step = _pmapped_step(model, num_devices)
  state = replication.replicate(state, devices)
  table = replication.replicate(feature_table, devices)
  for image_index, tokens in token_batches:
    batch = {"image_index": image_index.reshape(num_devices, -1),
             "tokens": tokens.reshape(num_devices, -1, tokens.shape[-1])}
    state, _ = step(state, batch, table)
  state = jax.device_get(replication.unreplicate(state))
  return {"params": state.params, "batch_stats": state.batch_stats}


def _initial_state(config, feature_table, encoder=None, encoder_variables=None):
  """(model, the train state `create_train_state` makes) for a vocabulary of 20 words."""
  if encoder is None:
    model = model_lib.create_model(config, vocab_size=20)
  else:
    model = train_lib.training_model(config, 20, encoder)
  data = types.SimpleNamespace(feature_table=feature_table, encoder=encoder,
                               encoder_variables=encoder_variables, encoder_from_checkpoint=False)
  return model, train_lib.create_train_state(config, model, data, steps_per_epoch=10)


@functools.lru_cache(maxsize=4)
def _pmapped_step(model, num_devices):
  return jax.pmap(functools.partial(train_step_fn, model=model), axis_name=train_lib.AXIS,
                  devices=jax.local_devices()[:num_devices])


def train_step_fn(state, batch, table, *, model):
  return train_lib.train_step(state, batch, table, model=model, alpha_c=1.0, label_smoothing=0.1)


def _random_batches(rng, config, num_images, count=3):
  """`count` global batches of 8: (image_index int32 [8], tokens int32 [8, max_len]), of uneven
  lengths so that devices hold different token counts."""
  batches = []
  for _ in range(count):
    tokens = rng.integers(4, 20, size=(8, config.data.max_len)).astype(np.int32)
    tokens[:, 0] = 1
    lengths = rng.integers(3, config.data.max_len, size=8)
    for row, length in enumerate(lengths):
      tokens[row, length] = 2
      tokens[row, length + 1:] = 0
    batches.append((rng.integers(0, num_images, size=8).astype(np.int32), tokens))
  return batches


def _max_difference(tree, other):
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.abs(np.asarray(a, np.float32) - b).max()), tree, other)))


def test_four_devices_match_one_device():
  assert jax.local_device_count() >= 4, "conftest forces 4 host devices"
  config = tiny.get_config()
  rng = np.random.default_rng(0)
  feature_table = rng.normal(size=(32, 4, 16)).astype(np.float32)
  batches = _random_batches(rng, config, 32)
  one = _run_steps(1, config, feature_table, batches)
  four = _run_steps(4, config, feature_table, batches)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                         one, four)
  # One step is the optimizer's update with the gradient of model.caption_loss (the attention term
  # and label smoothing of train_step_fn included), computed here without the train step.
  model, state = _initial_state(config, feature_table)
  image_index, tokens = batches[0]

  def loss(params):
    input_tokens, target_tokens = model_lib.teacher_forcing_tokens(tokens)
    logits, attention = model.apply({"params": params}, feature_table[image_index], input_tokens,
                                    deterministic=True, method=model_lib.Captioner.decode_features)
    return model_lib.caption_loss(logits, target_tokens, attention, alpha_c=1.0,
                                  label_smoothing=0.1)[0]

  expected = jax.jit(lambda state: state.apply_gradients(grads=jax.grad(loss)(state.params)).params)(
      state)  # one program: op by op, the optimizer's update compiles each of its many small ops
  first = _run_steps(1, config, feature_table, batches[:1])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         first["params"], jax.device_get(expected))
  assert _max_difference(one, first) > 0  # the later steps moved the parameters


def test_late_gradients_on_four_devices_match_the_plain_step_on_one():
  """The decoder's late gradients (`late_grads`: a custom VJP of the scan) under the pmapped train
  step: the parameters after a few steps are the plain step's."""
  config = tiny.get_config()
  rng = np.random.default_rng(1)
  feature_table = rng.normal(size=(32, 4, 16)).astype(np.float32)
  batches = _random_batches(rng, config, 32)[:3]
  plain = _run_steps(1, config, feature_table, batches)
  config.decoder.late_projected_grad = True
  config.decoder.late_weight_grad = True
  late = _run_steps(4, config, feature_table, batches)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                         plain, late)


def test_fine_tuning_on_four_devices_matches_one_device_with_synchronized_batch_norm():
  """Lite0's stage 0 (3x3 conv + BatchNorm) trained on 16x16 images, with stage 0's output as the
  feature grid: with the BatchNorm statistics reduced across devices (the default), 4 devices give
  1 device's parameters and running statistics."""
  config = tiny.get_config()
  config.encoder.feature_stage = 0
  config.encoder.trainable_stages = (0,)
  config.encoder.learning_rate = 1e-2
  encoder = model_lib.create_encoder(config)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(32, 16, 16, 3), dtype=np.uint8)
  # Variables moved off their initial values (unit variance, zero mean) so that the statistics count.
  variables = jax.jit(encoder.init)(jax.random.key(0), images[:1])
  variables = jax.tree_util.tree_map(
      lambda leaf: leaf + rng.uniform(0.1, 0.5, leaf.shape).astype(np.float32), variables)
  batches = _random_batches(rng, config, 32, count=2)
  one = _run_steps(1, config, images, batches, encoder, variables)
  assert _max_difference(one["params"]["encoder"], variables["params"]) > 1e-3  # the stage trained
  assert _max_difference(one["batch_stats"]["encoder"], variables["batch_stats"]) > 1e-3
  four = _run_steps(4, config, images, batches, encoder, variables)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         one, four)
  # (Each device's own statistics, sync_batch_norm=False, differed by 0.04: the encoder's test shows
  # the difference without a train step, tests/test_encoders.py.)
  config.encoder.sync_batch_norm = False
  assert train_lib.training_model(config, 20, encoder).encoder.batch_norm_axis is None


class _Killed(Exception):
  pass


def test_kill_and_resume_gives_the_same_losses(shapes_root, shared_features_workdir, monkeypatch):
  config = _config(shapes_root, batch_size=4, num_epochs=3, log_every_steps=1,
                   checkpoint__every_steps=3, eval__every_epochs=10)
  uninterrupted, resumed = {}, {}
  monkeypatch.setattr(train_lib, "_summary_writer", lambda w: RecordingWriter(uninterrupted))
  workdir_a, workdir_b = shared_features_workdir("a"), shared_features_workdir("b")
  train_lib.train_and_evaluate(config, workdir_a)

  kill_at = 6  # mid-epoch 2 (4 steps per epoch)
  original_save = checkpoints.CheckpointStore.save_latest

  def save_then_die(self, step, *args):
    original_save(self, step, *args)
    if step == kill_at:
      raise _Killed()

  monkeypatch.setattr(checkpoints.CheckpointStore, "save_latest", save_then_die)
  monkeypatch.setattr(train_lib, "_summary_writer", lambda w: RecordingWriter({}))
  with pytest.raises(_Killed):
    train_lib.train_and_evaluate(config, workdir_b)
  monkeypatch.setattr(checkpoints.CheckpointStore, "save_latest", original_save)
  monkeypatch.setattr(train_lib, "_summary_writer", lambda w: RecordingWriter(resumed))
  train_lib.train_and_evaluate(config, workdir_b)

  # Cosine decay over the 12 steps: the rate of the update that made each logged step.
  base = config.optimizer.learning_rate
  for step, rate in uninterrupted["train/learning_rate"].items():
    assert rate == pytest.approx(base * 0.5 * (1 + np.cos(np.pi * (step - 1) / 12)), rel=1e-5)
  assert sorted(uninterrupted["epoch/loss"]) == [4, 8, 12]
  assert sorted(resumed["epoch/loss"]) == [8, 12]  # epoch 2 from its step 7 on, then epoch 3
  assert resumed["epoch/loss"][12] == pytest.approx(uninterrupted["epoch/loss"][12], rel=1e-5)
  after = {step: loss for step, loss in uninterrupted["train/loss"].items() if step > kill_at}
  assert sorted(resumed["train/loss"]) == sorted(after)
  np.testing.assert_allclose([resumed["train/loss"][s] for s in sorted(after)],
                             [after[s] for s in sorted(after)], rtol=1e-5)
  final_a = checkpoints.load_for_inference(pathlib.Path(workdir_a) / checkpoints.LATEST_DIR)[0]
  final_b = checkpoints.load_for_inference(pathlib.Path(workdir_b) / checkpoints.LATEST_DIR)[0]
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                         final_a, final_b)


def test_a_run_stopped_around_an_evaluation_resumes_with_the_same_evaluations(
    shapes_root, shared_features_workdir, monkeypatch):
  # Metrics that never improve after the first: the plateau halves the learning rate after every
  # later evaluation. A fingerprint of the parameters tells which state each evaluation saw.
  def fake_evaluate(config, params, data, batch_stats=None):
    return {"CIDEr": 1.0, "fingerprint": float(sum(np.asarray(leaf, np.float64).sum()
                                                   for leaf in jax.tree_util.tree_leaves(params)))}

  monkeypatch.setattr(train_lib, "evaluate", fake_evaluate)
  monkeypatch.setattr(train_lib, "_summary_writer", lambda w: RecordingWriter({}))
  config = _config(shapes_root, batch_size=4, num_epochs=3, eval__every_epochs=1,  # 4 steps an epoch
                   eval__patience=0, eval__best_metric="CIDEr", checkpoint__every_steps=1000,
                   optimizer__schedule="plateau", optimizer__plateau_patience=1)
  workdir_a, workdir_b = shared_features_workdir("a"), shared_features_workdir("b")
  train_lib.train_and_evaluate(config, workdir_a)
  expected = checkpoints.CheckpointStore(workdir_a, keep=1, best_metric="CIDEr").evaluations()
  assert [(e["step"], e["plateau_scale"]) for e in expected] == [(4, 1.0), (8, 0.5), (12, 0.25)]

  # Killed while saving the first best state (its epoch's checkpoint already written), then right
  # after recording the second evaluation (the halved scale not yet in any checkpoint).
  original_offer, original_record = (checkpoints.CheckpointStore.offer_best,
                                     checkpoints.CheckpointStore.record_evaluation)

  def die_in_offer(self, step, *args):
    if step == 4:
      raise _Killed()
    return original_offer(self, step, *args)

  def die_after_record(self, entry):
    original_record(self, entry)
    if entry["step"] == 8:
      raise _Killed()

  monkeypatch.setattr(checkpoints.CheckpointStore, "offer_best", die_in_offer)
  with pytest.raises(_Killed):
    train_lib.train_and_evaluate(config, workdir_b)
  monkeypatch.setattr(checkpoints.CheckpointStore, "offer_best", original_offer)
  monkeypatch.setattr(checkpoints.CheckpointStore, "record_evaluation", die_after_record)
  with pytest.raises(_Killed):
    train_lib.train_and_evaluate(config, workdir_b)
  monkeypatch.setattr(checkpoints.CheckpointStore, "record_evaluation", original_record)
  train_lib.train_and_evaluate(config, workdir_b)

  resumed = checkpoints.CheckpointStore(workdir_b, keep=1, best_metric="CIDEr").evaluations()
  assert [(e["step"], e["plateau_scale"]) for e in resumed] == [(4, 1.0), (8, 0.5), (12, 0.25)]
  np.testing.assert_allclose([e["metrics"]["fingerprint"] for e in resumed],
                             [e["metrics"]["fingerprint"] for e in expected], rtol=1e-6)
  assert sorted(p.name for p in (pathlib.Path(workdir_b) / checkpoints.BEST_DIR).iterdir()) == ["4"]

  # Stopped early by patience: the same command again trains nothing more.
  config.num_epochs, config.eval.patience = 5, 1
  workdir_c = shared_features_workdir("c")
  train_lib.train_and_evaluate(config, workdir_c)
  latest = pathlib.Path(workdir_c) / checkpoints.LATEST_DIR
  assert max(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == 8
  assert train_lib.train_and_evaluate(config, workdir_c)["CIDEr"] == 1.0
  assert max(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == 8


def _train_cli(*args, **kwargs):
  env = cli_env.cli_env()
  return subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"),
                           "--config", str(REPO_ROOT / "configs" / "tiny.py"), *args],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs)


def test_sigkill_during_checkpointing_never_leaves_an_unloadable_directory(shapes_root,
                                                                          shared_features_workdir):
  workdir = pathlib.Path(shared_features_workdir())  # features cached: the runs go straight to training
  steps_dir = workdir / checkpoints.LATEST_DIR
  for delay in (0.0, 0.7):
    process = _train_cli(f"--workdir={workdir}", f"--config.data.root={shapes_root}",
                         "--config.num_epochs=1000", "--config.checkpoint.every_steps=1",
                         "--config.eval.every_epochs=1000")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
      if steps_dir.is_dir() and len([p for p in steps_dir.iterdir() if p.name.isdigit()]) >= 2:
        break
      time.sleep(0.05)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    variables, config, vocab = checkpoints.load_for_inference(steps_dir)
    assert "decoder" in variables["params"] and len(vocab) > 4
  # A half-written step directory, as a kill mid-save leaves it, is ignored.
  latest = max(int(p.name) for p in steps_dir.iterdir() if p.name.isdigit())
  (steps_dir / f"{latest + 1}.orbax-checkpoint-tmp-1234").mkdir()
  (steps_dir / f"{latest + 1}.orbax-checkpoint-tmp-1234" / "state").write_text("garbage")
  variables, _, _ = checkpoints.load_for_inference(steps_dir)
  assert "decoder" in variables["params"]


@pytest.mark.parametrize("override, message", [
    ("--config.encoder.name=alexnet", "alexnet"),
    ("--config.data.root=/nonexistent/flickr8k", "/nonexistent/flickr8k"),
])
def test_cli_bad_config_is_one_line(override, message, shapes_root, tmp_path):
  process = _train_cli(f"--workdir={tmp_path}", f"--config.data.root={shapes_root}", override)
  _, stderr = process.communicate(timeout=400)
  assert process.returncode == 1
  lines = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
  assert len(lines) == 1 and message in lines[0], stderr[-2000:]
  assert "Traceback" not in stderr


@pytest.mark.parametrize("arguments, message", [
    (["--config=configs/nope.py"], "--config configs/nope.py: no such file"),
    (["--config.no_such_field=3"], "a --config.<field> override names a field the config does not "
                                   "have ('no_such_field')"),
    (["--config.data.nope=3"], "('nope')"),
    (["--config={syntax_error}"], "syntax_error.py: cannot be loaded (SyntaxError: "),
])
def test_cli_config_that_cannot_be_read_is_one_line(arguments, message, tmp_path):
  (tmp_path / "syntax_error.py").write_text("def get_config(:\n")
  arguments = [a.format(syntax_error=tmp_path / "syntax_error.py") for a in arguments]
  process = _train_cli(f"--workdir={tmp_path / 'run'}", *arguments)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
  assert stderr.strip().splitlines() == [stderr.strip().splitlines()[-1]]
  assert stderr.startswith("train.py: error: ") and message in stderr, stderr
  assert not (tmp_path / "run").exists()


def test_resuming_with_another_model_or_epoch_is_one_error_before_any_encoding(
    shapes_root, shared_features_workdir):
  workdir = pathlib.Path(shared_features_workdir())
  train_lib.train_and_evaluate(_config(shapes_root, num_epochs=1), str(workdir))
  cache = workdir / "features" / "train.json"
  stamp = cache.stat().st_mtime_ns
  for field, value, shown in (("encoder__feature_stage", -2, "-1"), ("image_size", 96, "64"),
                              ("batch_size", 4, "8"), ("decoder__attention_dim", 16, None)):
    name = field.replace("__", ".")
    with pytest.raises(errors.CheckpointError, match=f"trained with config.{name} = "
                       + (shown or "") + ".*use a new --workdir"):
      train_lib.train_and_evaluate(_config(shapes_root, num_epochs=2, **{field: value}), str(workdir))
  assert cache.stat().st_mtime_ns == stamp  # refused before the features were looked at
  # Epochs of another length (the training split changed): the step count no longer says where the
  # run stands.
  record = workdir / checkpoints.EVALUATIONS_FILE
  entries = json.loads(record.read_text())
  entries[-1]["step"] += 1
  record.write_text(json.dumps(entries))
  with pytest.raises(errors.CheckpointError, match="an epoch is now 2 steps .*use a new --workdir"):
    train_lib.train_and_evaluate(_config(shapes_root, num_epochs=2), str(workdir))


def test_data_a_run_cannot_learn_from_is_one_error_before_training(shapes_root, tmp_path, caplog):
  with pytest.raises(errors.ConfigError, match="config.vocab.min_count=100000: no word of the 'train'"):
    train_lib.train_and_evaluate(_config(shapes_root, vocab__min_count=100000), str(tmp_path / "a"))
  # The shapes set lists every image in train and dev: said, since dev scores are then not held out.
  assert any("16 of the 16 dev images are also in train" in r.getMessage() for r in caplog.records)
  root = tmp_path / "broken_dev"
  shutil.copytree(shapes_root, root)
  text = root / "Flickr8k_text"
  broken = [f"broken{k}.jpg" for k in range(2)]
  for name in broken:
    (root / "Flicker8k_Dataset" / name).write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
  with open(text / "Flickr8k.token.txt", "a") as f:
    f.writelines(f"{name}#0\ta broken image\n" for name in broken)
  (text / "Flickr_8k.devImages.txt").write_text("\n".join(broken) + "\n")
  with pytest.raises(errors.DataError, match="not one image of the 'dev' split could be read"):
    train_lib.train_and_evaluate(_config(root), str(tmp_path / "b"))
  assert not (tmp_path / "b" / checkpoints.LATEST_DIR).exists()  # stopped before any training


def test_empty_split_is_an_error(shapes_root, tmp_path):
  (shapes_root.parent / "empty").mkdir(exist_ok=True)
  config = _config(shapes_root, data__eval_split="test")  # no Flickr_8k.testImages.txt
  with pytest.raises(errors.DataError, match="'test' split is empty"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shapes_root, shared_features_workdir,
                                                           monkeypatch):
  config = _config(shapes_root, num_epochs=1)
  workdir = shared_features_workdir()
  train_lib.train_and_evaluate(config, workdir)
  good_step = max(int(p.name) for p in (pathlib.Path(workdir) / checkpoints.LATEST_DIR).iterdir()
                  if p.name.isdigit())
  original = feature_cache.cached_features
  monkeypatch.setattr(feature_cache, "cached_features", lambda *a, **k: (
      lambda features, records: (np.full_like(features, np.nan), records))(*original(*a, **k)))
  config.num_epochs = 2
  writers = []
  monkeypatch.setattr(train_lib, "_summary_writer",
                      lambda workdir: writers.append(RecordingWriter({})) or writers[-1])
  with pytest.raises(errors.TrainingError, match=f"at step {good_step + 1}.*{good_step}"):
    train_lib.train_and_evaluate(config, workdir)
  assert len(writers) == 1 and writers[0].closed  # closed on the way out, not left to atexit
  variables, _, _ = checkpoints.load_for_inference(pathlib.Path(workdir) / checkpoints.LATEST_DIR)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(variables))


def test_vocabulary_mismatch_with_checkpoint_is_an_error(shapes_root, tmp_path):
  root = tmp_path / "shapes"
  shutil.copytree(shapes_root, root)
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(_config(root, num_epochs=1), workdir)
  with pytest.raises(errors.CheckpointError, match=r"trained with config\.vocab\.min_count = \d+, "
                     "the config now says 30"):
    train_lib.train_and_evaluate(_config(root, num_epochs=2, vocab__min_count=30), workdir)
  # The same config, other training captions: the words change.
  token_file = root / "Flickr8k_text" / "Flickr8k.token.txt"
  token_file.write_text(token_file.read_text().replace("square", "box"))
  with pytest.raises(errors.CheckpointError, match="its vocabulary does not match the one built from "
                     "the data .*the training captions changed"):
    train_lib.train_and_evaluate(_config(root, num_epochs=2), workdir)


def test_cached_feature_training_and_inference_never_import_tensorflow():
  code = ("import sys; import flaxcap.train_lib, flaxcap.inference, flaxcap.decoding; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def _changed_stages(trained, reference):
  """{top-level name: whether any leaf differs} between two encoder parameter trees."""
  return {name: any(not np.allclose(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(trained[name]), jax.tree_util.tree_leaves(reference[name])))
          for name in reference}


def test_fine_tuning_trains_the_chosen_encoder_stages_from_images(shapes_root, tmp_path):
  # Features from stage 2 keep the compiled encoder (forward through stages 0-2, backward through 2)
  # small: the whole Lite0 made this test a quarter of the suite's time on 2 cores.
  config = _config(shapes_root, num_epochs=1, encoder__feature_stage=2, encoder__trainable_stages=(2,),
                   encoder__learning_rate=1e-2, data__cache_features=False)
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "features").exists()  # images went through the encoder every step
  variables, _, _ = checkpoints.load_for_inference(tmp_path / checkpoints.LATEST_DIR)
  _, pretrained = model_lib.pretrained_encoder(config)
  changed = _changed_stages(variables["params"]["encoder"], pretrained["params"])
  assert changed, "no encoder parameters"
  trained = {name for name, moved in changed.items() if moved}
  assert trained and all(name.startswith("stage2_") for name in trained), trained
  assert any(name.startswith("stage1_") for name in changed)  # frozen stages are there, unchanged


def test_fine_tuning_the_last_stages_trains_from_the_cached_output_of_the_frozen_ones(
    shapes_root, tmp_path, monkeypatch):
  """Stages 7-8 of Lite0 trained on a cache of stage 6's output: no images, no tf.data; only those
  stages (and their BatchNorm statistics) move, and the eval split is encoded with them."""
  monkeypatch.setitem(sys.modules, "flaxcap.input_pipeline", None)  # importing it fails the test
  config = _config(shapes_root, num_epochs=1, encoder__trainable_stages=(7, 8),
                   encoder__learning_rate=1e-2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  data = train_data.prepare(config, tmp_path)  # the cache is there: no encoding
  assert data.feature_table.shape[1:] == encoders.feature_shape("efficientnet_lite0", 64, 6)
  variables, _, _ = checkpoints.load_for_inference(tmp_path / checkpoints.LATEST_DIR)
  _, pretrained = model_lib.pretrained_encoder(config)
  changed = _changed_stages(variables["params"]["encoder"], pretrained["params"])
  assert {name for name, moved in changed.items() if moved} == {"stage7_block0", "stage8_conv",
                                                                 "stage8_bn"}
  stats = _changed_stages(variables["batch_stats"]["encoder"], pretrained["batch_stats"])
  assert {name for name, moved in stats.items() if moved} == {"stage7_block0", "stage8_bn"}

  # The eval features come from the trained tail over the cache: the whole trained encoder's output
  # on the images, up to the cache's float16 rounding (far from the pretrained encoder's).
  tail_features = data.eval_feature_grid(variables["params"],
                                         {"encoder": variables["batch_stats"]["encoder"]})
  encode = jax.jit(model_lib.create_encoder(config).apply)  # compiled once, for both variable sets
  trained = {"params": variables["params"]["encoder"],
             "batch_stats": variables["batch_stats"]["encoder"]}
  whole_features = {}
  for name, encoder_variables in (("trained", trained), ("pretrained", pretrained)):
    features, valid = feature_cache.encode_records(
        data.eval_records, functools.partial(encode, encoder_variables), image_size=config.image_size)
    assert valid.all()
    whole_features[name] = np.asarray(features, np.float32)
  assert np.abs(whole_features["trained"] - tail_features).max() < 0.05
  assert np.abs(whole_features["pretrained"] - tail_features).max() > 0.05

  # A frozen run started from this one keeps its fine-tuned encoder: in its feature cache and in its
  # checkpoints (so that inference loads it too); neither reads the pretrained weights.
  monkeypatch.setattr(model_lib, "pretrained_encoder", None)
  frozen = _config(shapes_root, num_epochs=1, init_checkpoint=str(tmp_path / checkpoints.LATEST_DIR))
  frozen_workdir = tmp_path / "frozen"
  train_lib.train_and_evaluate(frozen, str(frozen_workdir))
  frozen_data = train_data.prepare(frozen, frozen_workdir)
  assert np.abs(np.asarray(frozen_data.eval_features, np.float32)
                - whole_features["trained"]).max() < 0.05
  carried, _, _ = checkpoints.load_for_inference(frozen_workdir / checkpoints.LATEST_DIR)
  for a, b in zip(jax.tree_util.tree_leaves(carried["params"]["encoder"]),
                  jax.tree_util.tree_leaves(variables["params"]["encoder"])):
    np.testing.assert_array_equal(a, b)
  from flaxcap import inference  # pylint: disable=g-import-not-at-top
  captioner = inference.Captioner.load(frozen_workdir)
  assert np.array_equal(captioner.encoder_variables["params"]["stage8_conv"]["kernel"],
                        variables["params"]["encoder"]["stage8_conv"]["kernel"])


def test_a_run_starts_from_init_checkpoint(shapes_root, tiny_checkpoint, shared_features_workdir):
  start, _, _ = checkpoints.load_for_inference(tiny_checkpoint)
  config = _config(shapes_root, num_epochs=1, init_checkpoint=str(tiny_checkpoint),
                   optimizer__learning_rate=0.0)  # no update: the run ends where it started
  workdir = shared_features_workdir()
  train_lib.train_and_evaluate(config, workdir)
  ended, _, _ = checkpoints.load_for_inference(pathlib.Path(workdir) / checkpoints.LATEST_DIR)
  for a, b in zip(jax.tree_util.tree_leaves(start["params"]["decoder"]),
                  jax.tree_util.tree_leaves(ended["params"]["decoder"])):
    np.testing.assert_array_equal(a, b)
  config = _config(shapes_root, init_checkpoint=str(tiny_checkpoint), decoder__hidden_dim=16)
  with pytest.raises(errors.ConfigError, match="decoder's parameter shapes"):
    train_lib.train_and_evaluate(config, shared_features_workdir("other_decoder"))
  config = _config(shapes_root, init_checkpoint=str(tiny_checkpoint), encoder__feature_stage=7)
  with pytest.raises(errors.ConfigError, match="config.encoder.feature_stage"):
    train_lib.train_and_evaluate(config, str(pathlib.Path(workdir).parent / "other_encoder"))


@pytest.mark.parametrize("num_devices", [1, 4])
def test_replicate_places_arrays_so_a_pmapped_step_compiles_once(num_devices):
  """`replication.replicate`: a copy per device, placed as the step's outputs, so feeding a step its own
  outputs does not trace and compile it again (with flax's `jax_utils.replicate` it did, on step 2)."""
  devices = jax.local_devices()[:num_devices]
  assert len(devices) == num_devices  # the suite runs with 4 host devices (tests/conftest.py)
  traces = []

  def step(state, batch):
    traces.append(1)  # runs once per trace
    return {"w": state["w"] + batch, "step": state["step"] + 1}, jnp.sum(batch)

  p_step = jax.pmap(step, axis_name=train_lib.AXIS, donate_argnums=(0,), devices=devices)
  weights = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
  state = replication.replicate({"w": weights, "step": np.int32(0)}, devices)
  batch = replication.replicate(np.ones((4,), np.float32), devices)
  for _ in range(3):
    state, _ = p_step(state, batch)
  assert len(traces) == 1
  np.testing.assert_array_equal(np.asarray(state["step"]), [3] * num_devices)
  for copy in np.asarray(state["w"]):
    np.testing.assert_allclose(copy, weights + 3.0)


@contextlib.contextmanager
def _programs_lowered():
  """Yields the list of the programs JAX lowers to XLA inside the block (every program new to this
  process, whether then compiled or found in the persistent compilation cache)."""
  names = []

  def listen(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      names.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_train_state_creation_replication_and_fetching_lower_no_op_per_parameter_shape():
  """Run op by op, the decoder's initializers, the optimizer's slots, `replicate`'s `leaf[None]` and
  `unreplicate`'s `x[0]` each lowered and compiled a program per parameter shape: hundreds of
  compilations at each run's start (and each checkpoint's) for the whole Lite0."""
  config = tiny.get_config()
  config.decoder.embed_dim, config.decoder.hidden_dim, config.decoder.attention_dim = 18, 22, 26
  model = model_lib.create_model(config, 29)  # sizes no other test uses: no program is cached
  data = types.SimpleNamespace(feature_table=np.zeros((3, 2, 2, 14), np.float16),
                               encoder_from_checkpoint=False)
  with _programs_lowered() as lowered:
    state = train_lib.create_train_state(config, model, data, steps_per_epoch=5)
  parameter_shapes = {np.shape(leaf) for leaf in jax.tree_util.tree_leaves(state.params)}
  # The PRNG key (made, split, unstacked: 4), the decoder init and the optimizer init: 6 at most.
  assert len(lowered) <= 6 < len(parameter_shapes), lowered

  with _programs_lowered() as lowered:
    fetched = replication.unreplicate(replication.replicate(state))
  assert len(lowered) <= 3, lowered  # the PRNG key: its copy (1) and its fetch (2)
  for original, copy in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)),
                            jax.tree_util.tree_leaves((fetched.params, fetched.opt_state))):
    np.testing.assert_array_equal(np.asarray(original), copy)
  np.testing.assert_array_equal(jax.random.key_data(fetched.rng), jax.random.key_data(state.rng))


def test_summarize_divides_each_sum_by_its_own_count():
  sums = {"num_tokens": np.array([10., 20.]), "num_images": np.array([2., 3.]),
          "cross_entropy": np.array([5., 10.]), "attention_penalty": np.array([1., 4.]),
          "correct": np.array([3., 7.])}
  out = train_lib.summarize(sums, alpha_c=0.5)
  assert out["cross_entropy"] == 0.5 and out["attention_penalty"] == 1.0
  assert out["loss"] == 0.5 + 0.5 * 1.0 and out["accuracy"] == 10 / 30
  assert math.isclose(out["perplexity"], math.exp(0.5))


def test_plateau_decays_every_plateau_patience_epochs_and_the_last_epoch_is_evaluated(
    shapes_root, shared_features_workdir, monkeypatch):
  monkeypatch.setattr(train_lib, "evaluate", lambda config, params, data, batch_stats=None:
                      {"CIDEr": 1.0})  # never improves after the first evaluation
  monkeypatch.setattr(train_lib, "_summary_writer", lambda w: RecordingWriter({}))
  config = shapes_data.tiny_config(shapes_root, batch_size=4, num_epochs=5, eval__every_epochs=2,
                                   eval__patience=0, eval__best_metric="CIDEr",
                                   checkpoint__every_steps=1000, optimizer__schedule="plateau",
                                   optimizer__plateau_patience=2)
  workdir = shared_features_workdir("p")
  train_lib.train_and_evaluate(config, workdir)
  entries = checkpoints.CheckpointStore(workdir, keep=1, best_metric="CIDEr").evaluations()
  # Evaluated after epochs 2, 4 and the last one, 5 (no multiple of 2); best at epoch 2.
  assert [(e["epoch"], e["epochs_since_best"], e["plateau_scale"]) for e in entries] == [
      (2, 0, 1.0), (4, 2, 0.5), (5, 3, 0.5)]


def test_dropout_keys_differ_across_devices_and_steps():
  """Under vmap with the mesh's axis name (4 "devices"), two steps: 8 distinct keys, the same again
  for the same step."""
  keys = jax.vmap(lambda _, step: train_lib.dropout_key(jax.random.key(3), step),
                  in_axes=(0, None), axis_name=train_lib.AXIS)
  data = [jax.random.key_data(keys(np.zeros(4), step)) for step in (5, 6)]
  assert len({tuple(np.asarray(row).ravel()) for step in data for row in step}) == 8
  np.testing.assert_array_equal(jax.random.key_data(keys(np.zeros(4), 5)), data[0])


def _config_train_data(**data):
  config = tiny.get_config()
  config.encoder.trainable_stages = (7, 8)
  for name, value in data.items():
    setattr(config.data, name, value)
  return config


def test_cached_tail_starts_at_the_first_trainable_stage():
  config = _config_train_data(cache_features=True, augment=False, hflip=False)
  count = encoders.num_stages(config.encoder.name)
  assert train_data.tail_start_stage(config) == min(encoders.stage_index(s, count, "x")
                                                    for s in (7, 8))


@pytest.mark.parametrize("data", [dict(augment=True), dict(hflip=True), dict(cache_features=False)])
def test_any_image_augmentation_or_no_cache_trains_from_images(data):
  config = _config_train_data(**{"cache_features": True, "augment": False, "hflip": False, **data})
  assert train_data.tail_start_stage(config) == 0
  config.encoder.trainable_stages = ()
  assert train_data.tail_start_stage(config) == 0
