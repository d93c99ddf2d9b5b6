"""The optimizer: schedules against their formulas, per-group learning rates, frozen parameters,
clipping and the plateau scale, against plain-numpy Adam."""

import math

import jax
import numpy as np
import pytest

from configs import tiny
from flaxcap import errors
from flaxcap import optimizer


def _config(**optimizer_fields):
  config = tiny.get_config()
  config.num_epochs = 4
  for name, value in optimizer_fields.items():
    config.optimizer[name] = value
  return config


@pytest.mark.parametrize("warmup", [0, 6])
def test_cosine_schedule_warms_up_linearly_then_decays_to_zero_at_the_last_step(warmup):
  config = _config(warmup_steps=warmup, schedule="cosine")
  rate = optimizer.create_learning_rate_fn(config, steps_per_epoch=10, base_learning_rate=0.2)
  total = 40
  for step in range(total + 1):
    if step < warmup:
      expected = 0.2 * step / warmup
    else:
      expected = 0.2 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert float(rate(step)) == pytest.approx(expected, abs=1e-7), step
  for schedule in ("constant", "plateau"):
    constant = optimizer.create_learning_rate_fn(_config(warmup_steps=0, schedule=schedule), 10, 0.2)
    assert [float(constant(step)) for step in (0, 17, 40)] == pytest.approx([0.2] * 3)


def _numpy_adam(gradients, learning_rate, b1=0.9, b2=0.999, eps=1e-8):
  """The parameter changes of Adam (bias-corrected) over a sequence of gradients."""
  m = v = np.zeros_like(gradients[0])
  changes = []
  for t, gradient in enumerate(gradients, start=1):
    m = b1 * m + (1 - b1) * gradient
    v = b2 * v + (1 - b2) * gradient ** 2
    changes.append(-learning_rate * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return changes


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_each_group_gets_its_learning_rate_frozen_stages_none_and_the_plateau_scale_applies():
  config = _config(warmup_steps=0, schedule="constant", learning_rate=1e-2, grad_clip_norm=1e9)
  config.encoder.learning_rate = 1e-3
  config.encoder.trainable_stages = (8,)
  rng = np.random.default_rng(0)
  params = {"decoder": {"w": rng.normal(size=(3, 2)).astype(np.float32)},
            "encoder": {"stage8_conv": {"kernel": rng.normal(size=(2, 2)).astype(np.float32)},
                        "stage1_block0": {"kernel": rng.normal(size=(2,)).astype(np.float32)}}}
  labels = optimizer.param_labels(params, config)
  assert labels == {"decoder": {"w": "decoder"},
                    "encoder": {"stage8_conv": {"kernel": "encoder_trainable"},
                                "stage1_block0": {"kernel": "frozen"}}}
  tx = optimizer.create_optimizer(config, steps_per_epoch=10, param_labels=labels)
  state = tx.init(params)
  gradients = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
               for _ in range(3)]
  updates_seen = []
  for step, gradient in enumerate(gradients):
    if step == 2:  # the host halves the rate (plateau decay) before the third update
      state[-1].hyperparams["step_size"] = np.float32(0.5 * optimizer.plateau_scale(state))
    updates, state = tx.update(gradient, state, params)
    updates_seen.append(jax.device_get(updates))
  for path, rate in ((("decoder", "w"), 1e-2), (("encoder", "stage8_conv", "kernel"), 1e-3)):
    expected = _numpy_adam([_leaf(g, path) for g in gradients], rate)
    expected[2] = 0.5 * expected[2]
    for seen, want in zip(updates_seen, expected):
      np.testing.assert_allclose(_leaf(seen, path), want, rtol=1e-4, atol=1e-9)
  for seen in updates_seen:
    np.testing.assert_array_equal(seen["encoder"]["stage1_block0"]["kernel"], 0.0)
  assert float(optimizer.plateau_scale(state)) == 0.5


def test_the_global_gradient_norm_is_clipped_before_adam():
  config = _config(warmup_steps=0, schedule="constant", learning_rate=1.0, grad_clip_norm=0.5,
                   name="adamw", weight_decay=0.0)
  params = {"decoder": {"w": np.ones((4,), np.float32)}}
  tx = optimizer.create_optimizer(config, 10, optimizer.param_labels(params, config))
  state = tx.init(params)
  # Adam's first step is the sign of the gradient whatever its size: two steps show the clipping.
  big = {"decoder": {"w": np.array([3.0, -4.0, 0.0, 0.0], np.float32)}}  # norm 5 -> 0.5
  small = {"decoder": {"w": np.array([0.03, 0.04, 0.0, 0.0], np.float32)}}  # under the limit
  first, state = tx.update(big, state, params)
  second, state = tx.update(small, state, params)
  clipped = big["decoder"]["w"] * 0.1
  expected = _numpy_adam([clipped, small["decoder"]["w"]], 1.0)
  np.testing.assert_allclose(np.asarray(first["decoder"]["w"]), expected[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(second["decoder"]["w"]), expected[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "linear", "config.optimizer.schedule='linear'"),
    ("name", "sgd", "config.optimizer.name='sgd'"),
])
def test_unknown_schedule_or_optimizer_is_a_config_error(field, value, message):
  config = _config(**{field: value})
  params = {"decoder": {"w": np.ones((2,), np.float32)}}
  with pytest.raises(errors.ConfigError, match=message):
    optimizer.create_optimizer(config, 10, optimizer.param_labels(params, config))
