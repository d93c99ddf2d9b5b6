"""Tests of flaxcap/layers.py: the decoder's dot_general, attention score, tanh, LSTM cell and
matrix casts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import layers


def rng_key(seed):
  """An "rbg" key: on the CPU, threefry's random bits take seconds to compile, rbg's do not."""
  return jax.random.key(seed, impl="rbg")


@pytest.mark.parametrize("lhs_shape", [(1, 7), (2, 7), (1, 3, 7), (2, 3, 7), (3, 4, 7)])
def test_few_rows_dot_general_equals_dot_general(lhs_shape):
  """Up to `MAX_ROWS_AS_VECTORS` rows it multiplies row by row (on the CPU); above, as usual; with
  `column_multiple` on a padded kernel, cut back: the same product either way."""
  rng = np.random.default_rng(sum(lhs_shape))
  lhs = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  dims = (((lhs.ndim - 1,), (0,)), ((), ()))
  for preferred in (None, jnp.float32):
    for column_multiple in (1, 8):
      got = jax.jit(functools.partial(layers.few_rows_dot_general, dimension_numbers=dims,
                                      preferred_element_type=preferred,
                                      column_multiple=column_multiple))(lhs, rhs)
      assert got.shape == (*lhs_shape[:-1], 5) and got.dtype == jnp.float32
      np.testing.assert_allclose(got, np.asarray(lhs) @ np.asarray(rhs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_score_by_sum_equals_the_dense_product(dtype):
  """AttentionScore has nn.Dense(1, use_bias=False)'s parameter (same name, shape and initial
  values, so checkpoints load) and computes its product either way up to summation order."""
  hidden = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 7, 10)), dtype)
  dense = nn.Dense(1, use_bias=False, dtype=dtype, dot_general=functools.partial(  # as it was
      layers.few_rows_dot_general, preferred_element_type=jnp.float32))
  score = layers.AttentionScore(dtype=dtype)
  params = score.init(rng_key(1), hidden)
  dense_params = dense.init(rng_key(1), hidden)
  np.testing.assert_array_equal(params["params"]["kernel"], dense_params["params"]["kernel"])
  expected = np.asarray(dense.apply(params, hidden)[..., 0], np.float32)
  by_dot = score.apply(params, hidden)
  by_sum = score.apply(params, hidden, True)
  assert by_dot.shape == by_sum.shape == hidden.shape[:-1] and by_sum.dtype == jnp.float32
  np.testing.assert_allclose(by_dot, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(by_sum, expected, rtol=1e-5, atol=1e-5)


def test_tanh_gradient_is_exact_for_its_output_in_float32_and_bfloat16():
  """`tanh` (which keeps only its output y for the backward pass): tanh's values, and as gradient
  g (1 - y^2) of its own output to the dtype's rounding, even where y is near +-1 and 1 - y^2 is
  small (float64 reference); jax's tanh gradient up to that rounding."""
  x = np.concatenate([np.linspace(-6, 6, 301), np.random.default_rng(0).normal(size=200) * 3])
  cotangent = np.random.default_rng(1).normal(size=x.shape)
  for dtype, rtol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2**-8)):
    inputs, cotangents = jnp.asarray(x, dtype), jnp.asarray(cotangent, dtype)
    y, vjp = jax.vjp(layers.tanh, inputs)
    np.testing.assert_array_equal(y, jnp.tanh(inputs))
    grad = vjp(cotangents)[0]
    assert y.dtype == grad.dtype == dtype
    y64 = np.asarray(y, np.float64)
    exact = np.asarray(cotangents, np.float64) * (1.0 - y64) * (1.0 + y64)
    np.testing.assert_allclose(np.asarray(grad, np.float64), exact, rtol=rtol, atol=0)
    if dtype == jnp.float32:
      np.testing.assert_allclose(grad, jax.vjp(jnp.tanh, inputs)[1](cotangents)[0], atol=1e-6)


def _lstm_cell_float64(gates, c):
  """The LSTM update in float64 numpy: (c', h')."""
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  in_gate, forget_gate, cell_input, out_gate = np.split(gates, 4, axis=-1)
  new_c = sigmoid(forget_gate) * c + sigmoid(in_gate) * np.tanh(cell_input)
  return new_c, sigmoid(out_gate) * np.tanh(new_c)


def test_lstm_cell_gradients_keep_only_the_gates_and_the_cell_state():
  """`lstm_cell`: the LSTM's update, and as gradients those of a float64 central difference of the
  same update and of jax's autodiff of it, while the backward pass keeps two arrays (the gates and c)
  where autodiff keeps eleven of c's size."""
  rng = np.random.default_rng(5)
  gates = rng.normal(size=(3, 2, 4 * 6)) * 3  # saturated gates too
  c = rng.normal(size=(3, 2, 6)) * 2
  cotangents = (rng.normal(size=c.shape), rng.normal(size=c.shape))
  (new_c, new_h), vjp = jax.vjp(layers.lstm_cell, jnp.asarray(gates, jnp.float32),
                                jnp.asarray(c, jnp.float32))
  expected_c, expected_h = _lstm_cell_float64(gates, c)
  np.testing.assert_allclose(new_c, expected_c, atol=1e-6)
  np.testing.assert_allclose(new_h, expected_h, atol=1e-6)
  assert sorted(leaf.shape for leaf in jax.tree_util.tree_leaves(vjp)) == [c.shape, gates.shape]
  gates_grad, c_grad = vjp(tuple(jnp.asarray(x, jnp.float32) for x in cotangents))

  def loss(gates, c):  # the cotangents' product with the outputs, in float64
    out_c, out_h = _lstm_cell_float64(gates, c)
    return np.sum(out_c * cotangents[0]) + np.sum(out_h * cotangents[1])

  eps = 1e-6
  for array, grad in ((gates, gates_grad), (c, c_grad)):
    numeric = np.zeros_like(array)
    for index in np.ndindex(array.shape):
      step = np.zeros_like(array)
      step[index] = eps
      plus = loss(gates + step, c) if array is gates else loss(gates, c + step)
      minus = loss(gates - step, c) if array is gates else loss(gates, c - step)
      numeric[index] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-5)

  def plain(gates, c):
    in_gate, forget_gate, cell_input, out_gate = jnp.split(gates, 4, axis=-1)
    new_c = jax.nn.sigmoid(forget_gate) * c + jax.nn.sigmoid(in_gate) * jnp.tanh(cell_input)
    return new_c, jax.nn.sigmoid(out_gate) * jnp.tanh(new_c)

  _, plain_vjp = jax.vjp(plain, jnp.asarray(gates, jnp.float32), jnp.asarray(c, jnp.float32))
  assert len(jax.tree_util.tree_leaves(plain_vjp)) > 2
  for grad, plain_grad in zip((gates_grad, c_grad),
                              plain_vjp(tuple(jnp.asarray(x, jnp.float32) for x in cotangents))):
    np.testing.assert_allclose(grad, plain_grad, atol=1e-6)


def test_cast_matrices_casts_the_matrices_only():
  rng = np.random.default_rng(2)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=6), jnp.float32)},
            "embedding": {"embedding": jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)},
            "gate_bias": jnp.asarray(rng.normal(size=1), jnp.float32)}
  assert layers.cast_matrices(params, jnp.float32) is params
  cast = layers.cast_matrices(params, jnp.bfloat16)
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree_util.tree_leaves(cast)):
    if before.ndim >= 2:
      assert after.dtype == jnp.bfloat16, path
      np.testing.assert_array_equal(after, before.astype(jnp.bfloat16))
    else:  # biases and the gate bias, used as they are
      assert after is before, path


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_one_hot_gradient_equals_a_float64_scatter_add(dtype):
  """layers.Embed: nn.Embed's parameter and values; its one-hot gradient sums every token's rows
  (many repeats) as a float64 scatter-add of the same cotangent does, out-of-range ids adding nothing."""
  vocab, features = 37, 24
  rng = np.random.default_rng(5)
  ids = rng.integers(0, vocab, size=(16, 21)).astype(np.int32)
  ids[0, :4] = [vocab, vocab + 3, -vocab - 1, 0]  # out of range: no row, no gradient
  weights = jnp.asarray(rng.normal(size=(16, 21, features)).astype(np.float32))
  one_hot_embed = layers.Embed(vocab, features, dtype=dtype, one_hot_grad=True)
  gather_embed = nn.Embed(vocab, features, dtype=dtype)
  params = one_hot_embed.init(jax.random.PRNGKey(0), jnp.asarray(ids))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, gather_embed.init(jax.random.PRNGKey(0), jnp.asarray(ids)))
  in_range = (ids >= 0) & (ids < vocab)
  np.testing.assert_array_equal(
      np.asarray(one_hot_embed.apply(params, jnp.asarray(ids)), np.float32)[in_range],
      np.asarray(gather_embed.apply(params, jnp.asarray(ids)), np.float32)[in_range])

  def loss(module, params):
    return jnp.sum(module.apply(params, jnp.asarray(ids)).astype(jnp.float32) *
                   weights.astype(dtype).astype(jnp.float32))
  grad = jax.jit(jax.grad(functools.partial(loss, one_hot_embed)))(params)["params"]["embedding"]
  cotangent = np.asarray(weights.astype(dtype).astype(jnp.float32), np.float64)
  expected = np.zeros((vocab, features))
  np.add.at(expected, ids[in_range], cotangent[in_range])
  assert grad.dtype == jnp.float32
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


def test_embed_gradient_is_a_product_only_where_asked():
  """One-hot product where asked, nn.Embed's scatter-add otherwise (by default on the CPU)."""
  ids = jnp.array([[1, 2, 2]])

  def gradient_ops(one_hot_grad):
    embed = layers.Embed(5, 4, one_hot_grad=one_hot_grad)
    params = embed.init(jax.random.PRNGKey(0), ids)
    text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(embed.apply(p, ids) ** 2)))(params))
    return "scatter-add" in text, "dot_general" in text
  assert gradient_ops(True) == (False, True)
  assert gradient_ops(False) == (True, False)
  assert gradient_ops(None) == (True, False)  # these tests run on the CPU
