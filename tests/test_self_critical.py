"""Self-critical training: the baseline, the policy gradient against a step-by-step reference, and
a run from a cross-entropy checkpoint that raises the reward."""

import functools
import pathlib
import types

from flax import jax_utils
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from flaxcap import checkpoints
from flaxcap import decoding
from flaxcap import errors
from flaxcap import model as model_lib
from flaxcap import self_critical
from flaxcap import sentence_scores
from flaxcap import replication
from flaxcap import train_data
from flaxcap import train_lib
from flaxcap import vocab as vocab_lib
from recording_writer import RecordingWriter

NUM_IMAGES, GRID, CHANNELS, VOCAB, SAMPLES, MAX_LEN = 6, 4, 16, 20, 3, 7


def test_caption_reward_adds_weighted_sentence_bleu_to_cider_d():
  references = [["a dog runs in the grass", "a brown dog is running in the grass",
                 "a dog running on a lawn"],
                ["two children play on the beach", "kids playing in the sand", "two kids at the sea"]]
  images = [0, 0, 1, 1]
  captions = ["a brown dog runs in the grass", "a dog", "two kids play in the sand", "a dog runs"]
  ended = [True, True, False, True]
  cider = sentence_scores.CiderD(references, end_token=self_critical.REWARD_END_TOKEN)(images, captions, ended)
  bleu = sentence_scores.SentenceBleu(references)(images, captions)
  assert bleu[0] > 0.3 and bleu[3] < 0.01  # a 4-gram match and none
  mixed = self_critical.CaptionReward(references, reward_end=True, bleu_weight=0.5)
  np.testing.assert_allclose(mixed(images, captions, ended), cider + 0.5 * bleu, rtol=1e-12)
  cider_only = self_critical.CaptionReward(references, reward_end=True, bleu_weight=0.0)
  np.testing.assert_allclose(cider_only(images, captions, ended), cider, rtol=1e-12)
  assert cider_only.bleu is None
  with pytest.raises(errors.ConfigError, match="bleu_weight"):
    self_critical.CaptionReward(references, reward_end=True, bleu_weight=-1.0)


def test_advantage_is_reward_minus_mean_of_the_other_samples():
  rewards = np.random.default_rng(0).random((5, 4))
  expected = np.array([[row[k] - np.mean(np.delete(row, k)) for k in range(4)] for row in rewards])
  np.testing.assert_allclose(self_critical.advantages(rewards), expected, rtol=1e-12)
  np.testing.assert_allclose(self_critical.advantages(rewards).sum(-1), 0, atol=1e-12)
  with pytest.raises(errors.ConfigError, match="num_samples >= 2"):
    self_critical.advantages(rewards[:, :1])


def _setup():
  config = tiny.get_config()
  model = model_lib.create_model(config, vocab_size=VOCAB)
  rng = np.random.default_rng(1)
  feature_table = rng.normal(size=(NUM_IMAGES, GRID, CHANNELS)).astype(np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(feature_table[:1]),
                      jnp.zeros((1, MAX_LEN), jnp.int32), deterministic=True,
                      method=model_lib.Captioner.decode_features)["params"]
  params = jax.tree_util.tree_map(lambda x: 2.0 * x, dict(params))  # peakier: varied samples
  return model, feature_table, params


def _samples(model, params, feature_table, image_index, seed=3):
  result = decoding.sample(model.decoder, params["decoder"], jnp.asarray(feature_table[image_index]),
                           rng=jax.random.key(seed), num_samples=SAMPLES, max_len=MAX_LEN)
  return result


def _state(model, params):
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1.0))


def _update(num_devices, model, state, batch, feature_table):
  devices = jax.local_devices()[:num_devices]
  step = jax.pmap(functools.partial(self_critical.policy_gradient_step, model=model,
                                    axis_name="batch"), axis_name="batch", devices=devices)
  split = {name: value.reshape((num_devices, -1) + value.shape[1:]) for name, value in batch.items()}
  new_state, sums = step(jax_utils.replicate(state, devices=devices), split,
                         jax_utils.replicate(feature_table, devices=devices))
  return jax.device_get(replication.unreplicate(new_state).params), jax.device_get(
      replication.unreplicate(sums))


def test_policy_gradient_equals_the_gradient_of_the_sampled_log_probabilities():
  """The update's teacher-forced log-probabilities (nn.scan) are the sampler's own (Decoder.step),
  and its gradient is that of -sum(advantage * log p(sample)) / #tokens computed through the sampler;
  4 devices give the 1-device update."""
  model, feature_table, params = _setup()
  image_index = np.array([0, 3, 5, 1], np.int32)
  result = _samples(model, params, feature_table, image_index)
  tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
  assert len({tuple(row) for row in tokens.reshape(-1, MAX_LEN)}) > 4  # varied samples
  assert (lengths < MAX_LEN).any() and (lengths == MAX_LEN).any() or lengths.min() < lengths.max()
  rewards = np.random.default_rng(2).random(lengths.shape).astype(np.float32)
  advantage = self_critical.advantages(rewards).astype(np.float32)
  batch = {"image_index": image_index, "tokens": tokens, "lengths": lengths, "reward": rewards,
           "advantage": advantage}

  def reference_loss(params):
    scores = _samples(model, params, feature_table, image_index).scores  # same key: same tokens
    return -jnp.sum(advantage * scores) / lengths.sum()

  reference_grads = jax.jit(jax.grad(reference_loss))(params)
  expected = jax.tree_util.tree_map(lambda p, g: p - g, params, reference_grads)
  new_params, sums = _update(1, model, _state(model, params), batch, feature_table)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         new_params, expected)
  np.testing.assert_allclose(sums["negative_log_likelihood"], -np.sum(result.scores), rtol=1e-5)
  assert sums["num_tokens"] == lengths.sum() and sums["num_samples"] == lengths.size
  assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(reference_grads)) > 1e-4

  four_params, four_sums = _update(4, model, _state(model, params), batch, feature_table)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                         four_params, new_params)
  np.testing.assert_allclose(four_sums["policy_loss"], sums["policy_loss"], rtol=1e-5)


def test_samples_do_not_depend_on_the_device_count():
  """The sampling step draws each image's captions with the step's key folded with the image's
  position in the global batch: 4 devices sample what 1 device samples, and a key per image is
  what `decoding.sample` is given."""
  model, feature_table, params = _setup()
  image_index = np.array([0, 3, 5, 1, 2, 4, 0, 3], np.int32)  # image 0 twice: positions differ
  rng = jax.random.key(11)
  samples = {}
  for num_devices in (1, 4):
    devices = jax.local_devices()[:num_devices]
    step = jax.pmap(functools.partial(self_critical.sample_step, decoder=model.decoder,
                                      num_samples=SAMPLES, max_len=MAX_LEN, axis_name="batch"),
                    axis_name="batch", devices=devices)
    tokens, lengths = step(jax_utils.replicate(params, devices=devices),
                           image_index.reshape(num_devices, -1),
                           jax_utils.replicate(feature_table, devices=devices),
                           jax_utils.replicate(rng, devices=devices))
    samples[num_devices] = (np.asarray(tokens).reshape(len(image_index), SAMPLES, MAX_LEN),
                            np.asarray(lengths).reshape(len(image_index), SAMPLES))
  np.testing.assert_array_equal(samples[1][0], samples[4][0])
  np.testing.assert_array_equal(samples[1][1], samples[4][1])
  assert not np.array_equal(samples[1][0][0], samples[1][0][6])  # same image, another position
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, np.arange(len(image_index)))
  direct = decoding.sample(model.decoder, params["decoder"], jnp.asarray(feature_table[image_index]),
                           rng=keys, num_samples=SAMPLES, max_len=MAX_LEN)
  np.testing.assert_array_equal(np.asarray(direct.tokens), samples[1][0])


def _scst_config(shapes_root, init_checkpoint, **overrides):
  config = tiny.get_config()
  config.data.root = str(shapes_root)
  config.self_critical.num_samples = 4
  config.init_checkpoint = str(init_checkpoint)
  config.batch_size = 4
  config.optimizer.learning_rate = 1e-3  # 1e-2 raised the reward in some seeds and lowered it in one
  config.num_epochs = 10
  config.optimizer.schedule = "constant"
  config.eval.patience = 0
  config.eval.every_epochs = 10
  config.log_every_steps = 4
  config.checkpoint.every_steps = 1000  # at each epoch's end only
  for name, value in overrides.items():
    config[name] = value
  return config


def _expected_reward(config, data, params, num_samples=32):
  """The mean reward of `num_samples` captions sampled for each training image (a fixed key)."""
  model = model_lib.create_model(config, len(data.vocab))
  result = decoding.sample(model.decoder, params["decoder"], jnp.asarray(data.feature_table, jnp.float32),
                           rng=jax.random.key(0), num_samples=num_samples, max_len=config.eval.max_len)
  tokens = np.asarray(result.tokens).reshape(-1, config.eval.max_len)
  reward = self_critical.CaptionReward([record.captions for record in data.train_records],
                                       reward_end=True, bleu_weight=0.0)
  image_index = np.repeat(np.arange(len(data.train_records)), num_samples)
  ended = (tokens == vocab_lib.EOS).any(axis=-1)
  return float(np.mean(reward(image_index, [data.vocab.decode(row) for row in tokens], ended)))


class _Killed(Exception):
  pass


def test_self_critical_run_raises_the_reward_and_resumes(shapes_root, tiny_checkpoint,
                                                          shared_features_workdir, monkeypatch):
  scalars = {}
  monkeypatch.setattr(train_lib, "_summary_writer", lambda workdir: RecordingWriter(scalars))
  start, _, _ = checkpoints.load_for_inference(tiny_checkpoint)
  config = _scst_config(shapes_root, tiny_checkpoint)  # 4 steps of 4 images an epoch
  workdir_a, workdir_b = shared_features_workdir("a"), shared_features_workdir("b")
  train_lib.train_and_evaluate(config, workdir_a)
  assert len(scalars["train/reward"]) == config.num_epochs  # logged every 4 steps: once an epoch
  trained, saved_config, _ = checkpoints.load_for_inference(pathlib.Path(workdir_a) / checkpoints.LATEST_DIR)
  # The objective itself, measured with 32 samples of each training image under one key: CIDEr-D
  # (0..10, with the end token) rose from 0.52 to 0.79-0.88 over seeds 0-3 (the epoch means of the
  # training samples, 4 an image, are too noisy to compare).
  data = train_data.prepare(config, pathlib.Path(workdir_a))
  before = _expected_reward(config, data, start["params"])
  after = _expected_reward(config, data, trained["params"])
  assert after > 1.3 * before, (before, after)
  assert saved_config.self_critical.num_samples == 4
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                 start["params"]["decoder"], trained["params"]["decoder"])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3

  # Killed after the checkpoint of step 24 and run again: the later steps repeat exactly.
  original_save = checkpoints.CheckpointStore.save_latest

  def save_then_die(self, step, *args):
    original_save(self, step, *args)
    if step == 24:
      raise _Killed()

  monkeypatch.setattr(checkpoints.CheckpointStore, "save_latest", save_then_die)
  with pytest.raises(_Killed):
    train_lib.train_and_evaluate(config, workdir_b)
  monkeypatch.setattr(checkpoints.CheckpointStore, "save_latest", original_save)
  resumed = {}
  monkeypatch.setattr(train_lib, "_summary_writer", lambda workdir: RecordingWriter(resumed))
  train_lib.train_and_evaluate(config, workdir_b)
  later = sorted(step for step in scalars["train/reward"] if step > 24)
  assert sorted(resumed["train/reward"]) == later
  np.testing.assert_allclose([resumed["train/reward"][s] for s in later],
                             [scalars["train/reward"][s] for s in later], rtol=1e-5)


def test_bad_self_critical_configs_are_one_line_errors(shapes_root, tiny_checkpoint, tmp_path,
                                                       shared_features_workdir):
  with pytest.raises(errors.ConfigError, match="init_checkpoint is empty"):
    train_lib.train_and_evaluate(_scst_config(shapes_root, ""), str(tmp_path / "a"))
  with pytest.raises(errors.ConfigError, match="nowhere.*does not exist"):
    train_lib.train_and_evaluate(_scst_config(shapes_root, tmp_path / "nowhere"), str(tmp_path / "b"))
  config = _scst_config(shapes_root, tiny_checkpoint)
  config.self_critical.num_samples = 1
  with pytest.raises(errors.ConfigError, match="num_samples >= 2"):
    train_lib.train_and_evaluate(config, str(tmp_path / "c"))
  config = _scst_config(shapes_root, tiny_checkpoint)
  config.encoder.trainable_stages = (6,)
  with pytest.raises(errors.ConfigError, match="cached features"):
    train_lib.train_and_evaluate(config, str(tmp_path / "d"))
  config = _scst_config(shapes_root, tiny_checkpoint)
  config.vocab.min_count = 30  # a different vocabulary from the checkpoint's
  with pytest.raises(errors.ConfigError, match="vocabulary"):
    train_lib.train_and_evaluate(config, shared_features_workdir("e"))


def test_step_scores_each_sample_against_its_own_image_with_its_ending():
  vocab = vocab_lib.Vocabulary(list(vocab_lib.SPECIAL_TOKENS) + ["a", "dog", "cat"])
  # 2 devices x 1 image, 2 samples each, max_len 4: [image 7: "a dog <eos>", "a dog cat"(cut)],
  # [image 3: "cat <eos>", "dog cat a"(cut)]
  tokens = np.array([[[[4, 5, 2, 0], [4, 5, 6, 4]]], [[[6, 2, 0, 0], [5, 6, 4, 5]]]], np.int32)
  lengths = np.array([[[3, 4]], [[2, 4]]], np.int32)
  seen = {}

  def reward(image_index, captions, ended):
    seen.update(image_index=list(image_index), captions=list(captions), ended=list(ended))
    return np.array([1.0, 2.0, 3.0, 5.0])

  scst = object.__new__(self_critical.SelfCritical)
  scst.num_samples = 2
  scst.data = types.SimpleNamespace(vocab=vocab)
  scst.reward = reward
  scst._sample = lambda params, image_index, table, rng: (tokens, lengths)
  scst._update = lambda state, batch, table: batch
  state = types.SimpleNamespace(rng=jax.random.key(0)[None], step=np.zeros(1, np.int32), params={})
  batch = scst.step(state, {"image_index": np.array([[7], [3]], np.int32)}, None)
  assert seen["image_index"] == [7, 7, 3, 3]
  assert seen["captions"] == ["a dog", "a dog cat a", "cat", "dog cat a dog"]
  assert seen["ended"] == [True, False, True, False]
  np.testing.assert_allclose(batch["advantage"].reshape(-1), [-1, 1, -2, 2])
