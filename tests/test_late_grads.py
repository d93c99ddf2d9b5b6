"""flaxcap/late_grads.py: teacher forcing with the projected features' and the step's weights'
gradients taken after the backward scan gives the plain scan's loss and gradients, and its backward
scan keeps no running sum of them."""

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from test_decoder import (ATTN, BATCH, CHANNELS, HIDDEN, POSITIONS, _cached_setup, _loss_and_grads,
                          _assert_same_loss_and_grads, make_decoder, rng_key)

LATE = {"features": {"late_projected_grad": True}, "weights": {"late_weight_grad": True},
        "both": {"late_projected_grad": True, "late_weight_grad": True}}
# The running sums each option removes from the backward scan: the projected features' gradient,
# and the kernels of hidden_proj (h -> 4H gates, the query, the gate's logit) and context_gates, and
# the gate's bias.
PROJECTED_SHAPE = (BATCH, POSITIONS, ATTN)
WEIGHT_SHAPES = ((HIDDEN, 4 * HIDDEN + ATTN + 1), (CHANNELS, 4 * HIDDEN), (1,))


_BASIC = [{}, {"recompute_attention": True}, {"attention_activation": "relu"}, {"gate": False}]


@pytest.mark.parametrize("late,options", [
    *((late, options) for late in LATE for options in _BASIC),
    ("weights", {"pad_columns_to": 8}),
    ("both", {"recompute_attention": True, "score_vjp": True})])
def test_late_grads_give_the_same_loss_and_gradients(late, options):
  activation = options.get("attention_activation", "tanh")
  plain, variables, features, tokens = _cached_setup(gate=options.get("gate", True),
                                                     attention_activation=activation)
  late_decoder = make_decoder(**LATE[late], **options)
  params = variables["params"]
  _assert_same_loss_and_grads(_loss_and_grads(late_decoder)(params, features, tokens),
                              _loss_and_grads(plain)(params, features, tokens))
  same_options = make_decoder(**options)
  logits = [decoder.apply({"params": params}, features, tokens, deterministic=True)[0]
            for decoder in (late_decoder, same_options)]
  np.testing.assert_array_equal(*logits)  # the forward pass is the plain one


@pytest.mark.parametrize("late", ["features", "weights"])
def test_late_grads_in_bfloat16_stay_as_close_to_float32(late):
  """bf16 gradients of both paths against the float32 gradients: the late sums (float32 over the
  steps) are no further from them than the scan's running sums of bf16 shares."""
  plain, variables, features, tokens = _cached_setup()
  params = variables["params"]
  _, reference = _loss_and_grads(plain)(params, features, tokens)
  errors = {}
  for options in ({}, LATE[late]):
    decoder = make_decoder(dtype=jnp.bfloat16, **options)
    _, grads = _loss_and_grads(decoder)(params, features, tokens)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(reference)
    errors[bool(options)] = max(float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-12))
                                for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
  assert errors[True] < 0.05 and errors[True] <= 1.5 * errors[False], errors


def _backward_scan_carry_shapes(decoder, params, features, tokens):
  """Shapes of the loop-carried values of the backward (transposed) scan of a train step."""
  loss = lambda p: jnp.sum(decoder.apply({"params": p}, features, tokens, deterministic=True)[0])
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  scans = []

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        scans.append(eqn)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        collect(sub)
  collect(jaxpr)
  backward = [eqn for eqn in scans if eqn.params.get("reverse")]
  assert backward, [eqn.params.get("reverse") for eqn in scans]
  shapes = []
  for eqn in backward:
    if "num_carry" in eqn.params:  # jax < 0.11: the carry's position among the inputs
      first, count = eqn.params["num_consts"], eqn.params["num_carry"]
      shapes += [tuple(v.aval.shape) for v in eqn.invars[first:first + count]]
    else:  # the outputs: the carry as it is, each per-step output with the scan's length (TIME,
      # distinct from the other sizes) in front
      shapes += [tuple(v.aval.shape) for v in eqn.outvars
                 if v.aval.ndim == 0 or v.aval.shape[0] != eqn.params["length"]]
  return shapes


def test_backward_scan_keeps_no_running_sum_of_what_is_taken_late():
  """Nor one of the features' gradient [batch, P, C], which a train step on cached features does
  not need."""
  plain, variables, features, tokens = _cached_setup()
  params = variables["params"]
  features_shape = (BATCH, POSITIONS, CHANNELS)
  plain_shapes = _backward_scan_carry_shapes(plain, params, features, tokens)
  assert PROJECTED_SHAPE in plain_shapes and all(s in plain_shapes for s in WEIGHT_SHAPES)
  for late, removed in (("features", [PROJECTED_SHAPE]), ("weights", list(WEIGHT_SHAPES)),
                        ("both", [PROJECTED_SHAPE, *WEIGHT_SHAPES])):
    shapes = _backward_scan_carry_shapes(make_decoder(**LATE[late]), params, features, tokens)
    assert features_shape not in shapes, late
    for shape in (PROJECTED_SHAPE, *WEIGHT_SHAPES):
      assert (shape in shapes) == (shape not in removed), (late, shape)


@pytest.mark.parametrize("late", ["features", "both"])
def test_late_grads_give_the_features_their_gradient(late):
  """Fine-tuning the encoder differentiates the features too: the same gradient for them."""
  plain, variables, features, tokens = _cached_setup()
  late_decoder = make_decoder(**LATE[late])

  def grads_of(decoder):
    def loss(params, features):
      logits, attention = decoder.apply({"params": params}, features, tokens, deterministic=False,
                                        rngs={"dropout": rng_key(3)})
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(attention[..., 0] ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], features)

  expected, actual = grads_of(plain), grads_of(late_decoder)
  assert float(jnp.abs(expected[1]).max()) > 0
  for grad, expected_grad in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_late_weight_grad_differentiates_only_what_is_asked():
  """A gradient of one late kernel alone (the others held fixed), of the word embedding alone
  (both late kernels fixed), and of the gate's bias alone: the plain scan's."""
  plain, variables, features, tokens = _cached_setup()
  late = make_decoder(late_projected_grad=True, late_weight_grad=True)
  params = variables["params"]

  def grad_of(decoder, layer):
    def loss(kernel):
      replaced = {**params, layer: {**params[layer], next(iter(params[layer])): kernel}}
      logits, _ = decoder.apply({"params": replaced}, features, tokens, deterministic=True)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.grad(loss))(next(iter(params[layer].values())))

  for layer in ("context_gates", "hidden_proj", "embedding"):
    expected = grad_of(plain, layer)
    assert float(jnp.abs(expected).max()) > 0, layer
    np.testing.assert_allclose(grad_of(late, layer), expected, rtol=1e-5, atol=1e-6)

  def gate_bias_grad(decoder):
    def loss(gate_bias):
      logits, _ = decoder.apply({"params": {**params, "gate_bias": gate_bias}}, features, tokens,
                                deterministic=True)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.grad(loss))(params["gate_bias"])

  expected = gate_bias_grad(plain)
  assert float(jnp.abs(expected).max()) > 0
  np.testing.assert_allclose(gate_bias_grad(late), expected, rtol=1e-5, atol=1e-7)


def test_late_grads_leave_decoding_steps_alone():
  """The options are teacher forcing's: `step` gives the same logits with them."""
  plain, variables, features, _ = _cached_setup()
  late = make_decoder(**LATE["both"])
  encoded = plain.apply(variables, features, method="encode")
  carry = plain.apply(variables, encoded, method="initial_carry")
  tokens = jnp.arange(BATCH, dtype=jnp.int32)
  expected = plain.apply(variables, encoded, carry, tokens, method="step")[0]
  np.testing.assert_array_equal(late.apply(variables, encoded, carry, tokens, method="step")[0],
                                expected)
