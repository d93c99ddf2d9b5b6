"""Tests of flaxcap/model.py: the loss against numpy, the Captioner with a stand-in encoder, overfitting."""

import functools
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxcap
from configs import tiny
from flaxcap import errors
from flaxcap import model as model_lib
from flaxcap.decoder import Decoder, Encoded

VOCAB = 13


def rng_key(seed):
  """An "rbg" key: on the CPU, threefry's random bits take seconds to compile, rbg's do not."""
  return jax.random.key(seed, impl="rbg")


class TinyConvEncoder(nn.Module):
  """A stand-in encoder: uint8 [B, H, W, 3] -> [B, H/4, W/4, 8], with batch norm to watch `train`."""

  @nn.compact
  def __call__(self, images, *, train=False):
    x = images.astype(jnp.float32) / 255.0
    x = nn.Conv(8, (3, 3), strides=(4, 4))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.relu(x)


def numpy_loss(logits, targets, attention, alpha_c, label_smoothing):
  """Independent reference: plain numpy, explicit loops where it reads clearer."""
  logits, attention = np.asarray(logits, np.float64), np.asarray(attention, np.float64)
  batch, time, vocab = logits.shape
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll_sum = smooth_sum = correct = count = 0.0
  for b in range(batch):
    for t in range(time):
      if targets[b, t] == 0:
        continue
      count += 1
      target = np.full(vocab, label_smoothing / vocab)
      target[targets[b, t]] += 1.0 - label_smoothing
      nll_sum -= log_probs[b, t, targets[b, t]]
      smooth_sum -= (target * log_probs[b, t]).sum()
      correct += logits[b, t].argmax() == targets[b, t]
  reg_terms = []
  for b in range(batch):
    steps = targets[b] != 0
    if steps.any():
      reg_terms.append((1.0 - attention[b, steps].sum(0)) ** 2)
  reg = np.mean(reg_terms)
  return smooth_sum / count + alpha_c * reg, nll_sum / count, reg, correct / count, count


@pytest.mark.parametrize("alpha_c,label_smoothing", [(0.0, 0.0), (1.0, 0.0), (0.7, 0.1)])
def test_caption_loss_matches_numpy(alpha_c, label_smoothing):
  rng = np.random.default_rng(0)
  batch, time, positions = 5, 7, 9
  logits = rng.normal(size=(batch, time, VOCAB)).astype(np.float32) * 3
  targets = rng.integers(1, VOCAB, size=(batch, time))
  lengths = np.array([7, 3, 1, 5, 0])  # the last row is all padding: it must count for nothing
  targets[np.arange(time)[None, :] >= lengths[:, None]] = 0
  targets[0, :3] = logits[0, :3].argmax(-1)  # some right answers for the accuracy
  attention = jax.nn.softmax(rng.normal(size=(batch, time, positions)) * 2, axis=-1)
  loss, metrics = jax.jit(functools.partial(model_lib.caption_loss, alpha_c=alpha_c,
                                            label_smoothing=label_smoothing))(
                                                logits, targets, attention)
  ref_loss, ref_nll, ref_reg, ref_accuracy, ref_count = numpy_loss(logits, targets, attention, alpha_c,
                                                                   label_smoothing)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["cross_entropy"], ref_nll, rtol=1e-5)
  np.testing.assert_allclose(metrics["attention_reg"], ref_reg, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], ref_accuracy, rtol=1e-6)
  assert metrics["num_tokens"] == ref_count == lengths.sum()
  assert ref_accuracy > 0


def test_teacher_forcing_tokens():
  tokens = jnp.array([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
  inputs, targets = model_lib.teacher_forcing_tokens(tokens)
  np.testing.assert_array_equal(inputs, [[1, 5, 6, 2], [1, 7, 2, 0]])
  np.testing.assert_array_equal(targets, [[5, 6, 2, 0], [7, 2, 0, 0]])


def make_captioner(encoder_trainable=False):
  decoder = Decoder(vocab_size=VOCAB, embed_dim=8, hidden_dim=12, attention_dim=6, dropout_rate=0.2)
  return model_lib.Captioner(encoder=TinyConvEncoder(), decoder=decoder,
                             encoder_trainable=encoder_trainable)


def make_batch():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 16, 12, 3)), jnp.uint8)
  tokens = jnp.array([[1, 4, 5, 6, 2, 0], [1, 7, 8, 2, 0, 0]])
  return images, tokens


def test_captioner_paths_agree():
  model = make_captioner()
  images, tokens = make_batch()
  inputs, _ = model_lib.teacher_forcing_tokens(tokens)
  variables = jax.jit(functools.partial(model.init, train=False))(rng_key(1), images, inputs)
  assert set(variables) == {"params", "batch_stats"}
  Captioner = model_lib.Captioner

  @jax.jit
  def all_paths(variables, images, inputs):
    logits, attention = model.apply(variables, images, inputs, train=False)
    features = model.apply(variables, images, method=Captioner.encode_images)
    cached = model.apply(variables, features, inputs, deterministic=True, method=Captioner.decode_features)
    # Cached-feature training needs only the decoder's parameters.
    decoder_only = {"params": {"decoder": variables["params"]["decoder"]}}
    decoder_only_logits, _ = model.apply(decoder_only, features, inputs, deterministic=True,
                                         method=Captioner.decode_features)
    encoded = model.apply(variables, images, method=Captioner.encode)
    carry = model.apply(variables, encoded, 3, method=Captioner.initial_carry)
    step = model.apply(variables, encoded, carry, jnp.ones((2, 3), jnp.int32), method=Captioner.step)
    return (logits, attention), features, cached, decoder_only_logits, encoded, step

  (logits, attention), features, cached, decoder_only_logits, encoded, step = all_paths(
      variables, images, inputs)
  assert logits.shape == (2, 5, VOCAB) and attention.shape == (2, 5, 4 * 3)
  assert features.shape == (2, 4, 3, 8)
  np.testing.assert_allclose(cached[0], logits, atol=1e-6)
  np.testing.assert_allclose(cached[1], attention, atol=1e-6)
  np.testing.assert_allclose(decoder_only_logits, logits, atol=1e-6)
  assert isinstance(encoded, Encoded) and encoded.projected_features.shape == (2, 12, 6)
  step_logits, _, step_attention = step
  assert step_logits.shape == (2, 3, VOCAB) and step_attention.shape == (2, 3, 12)
  np.testing.assert_allclose(step_logits[:, 0], logits[:, 0], atol=1e-5)


@pytest.mark.parametrize("encoder_trainable", [False, True])
def test_frozen_encoder_gets_no_gradient(encoder_trainable):
  model = make_captioner(encoder_trainable)
  images, tokens = make_batch()
  inputs, targets = model_lib.teacher_forcing_tokens(tokens)
  variables = jax.jit(functools.partial(model.init, train=False))(rng_key(1), images, inputs)

  def loss_fn(params):
    mutable = ["batch_stats"] if encoder_trainable else False
    outputs = model.apply({**variables, "params": params}, images, inputs, train=True,
                          rngs={"dropout": rng_key(2)}, mutable=mutable)
    logits, attention = outputs[0] if encoder_trainable else outputs
    return model_lib.caption_loss(logits, targets, attention, alpha_c=1.0)[0]

  grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  encoder_norm = optax.global_norm(grads["encoder"])
  assert (float(encoder_norm) > 0) == encoder_trainable
  assert float(optax.global_norm(grads["decoder"])) > 0


def test_create_model_from_config(monkeypatch):
  config = tiny.get_config()
  model = model_lib.create_model(config, vocab_size=VOCAB, encoder=TinyConvEncoder())
  assert model.decoder.hidden_dim == config.decoder.hidden_dim
  assert model.decoder.dtype == jnp.float32 and not model.encoder_trainable
  assert model.decoder.unroll == 1
  assert model.decoder.recompute_attention is None and model.decoder.feature_dtype is None
  assert model.decoder.pad_columns_to == 1 and not model.decoder.late_projected_grad
  assert not model.decoder.score_vjp and not model.decoder.late_weight_grad
  config.decoder.unroll = 3
  config.decoder.recompute_attention = "true"
  config.decoder.feature_dtype = "bfloat16"
  config.decoder.pad_columns_to = 8
  config.decoder.late_projected_grad = True
  config.decoder.score_vjp = True
  config.decoder.late_weight_grad = True
  decoder = model_lib.create_model(config, vocab_size=VOCAB, encoder=TinyConvEncoder()).decoder
  assert decoder.unroll == 3 and decoder.recompute_attention is True
  assert decoder.feature_dtype == jnp.bfloat16
  assert decoder.pad_columns_to == 8 and decoder.late_projected_grad and decoder.score_vjp
  assert decoder.late_weight_grad
  config.decoder.recompute_attention = "False"
  assert model_lib.create_decoder(config, VOCAB).recompute_attention is False
  config.decoder.recompute_attention = "sometimes"
  with pytest.raises(errors.ConfigError, match="recompute_attention = 'sometimes': use auto, true"):
    model_lib.create_decoder(config, VOCAB)
  config.decoder.recompute_attention = "auto"

  calls = []
  fake_encoders = types.ModuleType("flaxcap.encoders")
  fake_encoders.create_encoder = lambda name, **kwargs: calls.append((name, kwargs)) or TinyConvEncoder()
  monkeypatch.setitem(sys.modules, "flaxcap.encoders", fake_encoders)
  monkeypatch.setattr(flaxcap, "encoders", fake_encoders, raising=False)
  config.encoder.trainable_stages = (5, 6)
  config.half_precision = True
  model = model_lib.create_model(config, vocab_size=VOCAB)
  assert calls == [(config.encoder.name, {"feature_stage": -1, "dtype": jnp.bfloat16,
                                           "trainable_stages": (5, 6), "start_stage": 0})]
  assert model.encoder_trainable and model.decoder.dtype == jnp.bfloat16
  # Frozen BatchNorm: no stage follows the batch's statistics; the stages still train.
  config.encoder.frozen_batch_norm = True
  model = model_lib.create_model(config, vocab_size=VOCAB)
  assert calls[-1][1]["trainable_stages"] == () and model.encoder_trainable


@pytest.mark.parametrize("field,value", [("decoder.dtype", "float16"), ("decoder.hidden_dim", 0),
                                         ("decoder.dropout_rate", 1.0),
                                         ("decoder.attention_activation", "gelu"),
                                         ("decoder.feature_dtype", "float16"),
                                         ("decoder.pad_columns_to", 0)])
def test_create_model_rejects_bad_config(field, value):
  config = tiny.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(errors.ConfigError, match=f"config.{field}"):
    model_lib.create_model(config, vocab_size=VOCAB, encoder=TinyConvEncoder())


def test_model_imports_without_tensorflow_or_encoders():
  code = ("import sys, flaxcap.model, flaxcap.decoder; "
          "bad = [m for m in ('tensorflow', 'flaxcap.encoders', 'torch') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_overfits_a_tiny_set():
  """300 Adam steps on 8 fixed feature grids and captions drive the whole loss to ~0.

  Each caption has 4 targets (3 words and <eos>) on a grid of P = 4 locations, so that the attention
  term can reach 0 as well; the rest of every row is padding.
  """
  rng = np.random.default_rng(0)
  num_images, max_len, vocab = 8, 8, 24
  features = jnp.asarray(rng.normal(size=(num_images, 2, 2, 16)), jnp.float32)
  tokens = np.zeros((num_images, max_len), np.int32)
  tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 1, rng.integers(4, vocab, size=(num_images, 3)), 2
  inputs, targets = model_lib.teacher_forcing_tokens(jnp.asarray(tokens))
  decoder = Decoder(vocab_size=vocab, embed_dim=32, hidden_dim=32, attention_dim=32, dropout_rate=0.0)
  params = jax.jit(functools.partial(decoder.init, deterministic=True))(
      rng_key(0), features, inputs)["params"]
  optimizer = optax.adam(3e-3)

  @jax.jit
  def train_steps(params, opt_state):
    def one_step(_, state):
      params, opt_state, _ = state
      def loss_fn(params):
        logits, attention = decoder.apply({"params": params}, features, inputs, deterministic=False)
        return model_lib.caption_loss(logits, targets, attention, alpha_c=1.0)
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return optax.apply_updates(params, updates), opt_state, metrics
    init_metrics = {k: jnp.zeros(()) for k in ("loss", "cross_entropy", "attention_reg", "accuracy",
                                               "num_tokens")}
    return jax.lax.fori_loop(0, 100, one_step, (params, opt_state, init_metrics))

  opt_state = optimizer.init(params)
  for _ in range(3):
    params, opt_state, metrics = train_steps(params, opt_state)
  assert float(metrics["cross_entropy"]) < 0.05, metrics
  assert float(metrics["accuracy"]) == 1.0, metrics
  assert float(metrics["loss"]) < 0.05, metrics
