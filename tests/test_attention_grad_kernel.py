"""flaxcap/attention_grad_kernel.py: teacher forcing's attention gradient kernels (interpreted on the
CPU) give autodiff's gradients of the XLA scores and `attention_grad`'s sum over the steps; each
lowers to one Triton kernel for a GPU, with `tanh.approx.f32` only where asked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpu_export
from flaxcap import attention_grad
from flaxcap import attention_grad_kernel
from test_attention_kernel import _random_inputs, _xla_scores


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 49, 72, 3),    # P past a block, A past a tile, 3 beams
                                   (3, 196, 130, 1),  # the tutorial's grid, teacher forcing
                                   (1, 5, 10, 2),     # less than a block and a tile
                                   (2, 32, 64, 1)])   # exactly a block and a tile
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_score_grads_equal_autodiffs_of_the_xla_scores(dtype, shape, activation):
  """The query's and w_a's gradients of sum(ds * scores), random ds, against jax.grad of the XLA
  path's scores (with `layers.tanh`, as the decoder), to float32 summation order."""
  projected_features, query, score_weights = _random_inputs(dtype, *shape, seed=sum(shape))
  batch, positions, _, beams = shape
  cotangents = jnp.asarray(np.random.default_rng(1).normal(size=(batch, beams, positions)),
                           jnp.float32)
  function = attention_grad.layers.ATTENTION_ACTIVATIONS[activation]
  expected_query, expected_weights = jax.grad(
      lambda q, w: jnp.sum(_xla_scores(projected_features, q, w, function) * cotangents),
      argnums=(0, 1))(query, score_weights)
  query_grads, weight_grads = attention_grad_kernel.score_grads(
      projected_features, query, cotangents, score_weights, activation=activation, interpret=True)
  assert query_grads.shape == query.shape and weight_grads.shape == (batch, shape[2])
  assert query_grads.dtype == weight_grads.dtype == jnp.float32
  # autodiff sums the query's gradient in its dtype: bf16 rounding of a sum of P terms
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  scale = float(jnp.max(jnp.abs(expected_query.astype(jnp.float32))))
  np.testing.assert_allclose(query_grads, expected_query.astype(jnp.float32), rtol=tolerance,
                             atol=tolerance * scale)
  # and w_a's rounded to the compute dtype (the kernel's cast to it)
  weights_tolerance = 1e-4 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(jnp.sum(weight_grads, axis=0), expected_weights,
                             rtol=weights_tolerance,
                             atol=weights_tolerance * float(jnp.max(jnp.abs(expected_weights))))


def test_score_grads_lower_to_one_triton_kernel_without_a_gpu():
  """At teacher forcing's tutorial sizes (batch 512, 14x14 grid, A 512, one query, bf16): 8 x 512
  programs of 64 entries of A, the tanh an instruction where asked."""
  shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in [
      ((512, 196, 512), jnp.bfloat16), ((512, 1, 512), jnp.bfloat16), ((512, 1, 196), jnp.float32),
      ((512,), jnp.float32)]]
  for approx_tanh in (False, True):
    grads = functools.partial(attention_grad_kernel.score_grads, approx_tanh=approx_tanh)
    gpu_export.assert_one_triton_kernel(gpu_export.export_for_cuda(jax.jit(grads), *shapes),
                                       "grid_x = 8 : i32, grid_y = 512 : i32", approx_tanh)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 49, 72),    # P and A past a block and a tile
                                   (1, 3, 32, 64),    # exactly one block and one tile
                                   (2, 1, 7, 10)])    # one step, less than a block and a tile
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_projected_features_grad_kernel_equals_the_xla_sum(dtype, shape, activation):
  """The projected features' gradient summed over T steps: the kernel (interpreted) against
  `attention_grad.projected_features_grad` (itself tested against autodiff), random inputs."""
  batch, steps, positions, attention_dim = shape
  rng = np.random.default_rng(sum(shape))
  projected = jnp.asarray(rng.normal(size=(batch, positions, attention_dim)), dtype)
  queries = jnp.asarray(rng.normal(size=(batch, steps, attention_dim)), dtype)
  score_grads = jnp.asarray(rng.normal(size=(batch, steps, positions)), jnp.float32)
  score_weights = jnp.asarray(rng.normal(size=(attention_dim,)), jnp.float32)
  actual = attention_grad_kernel.projected_features_grad(projected, queries, score_grads, score_weights,
                                                    activation=activation, interpret=True)
  expected = attention_grad.projected_features_grad(projected, queries, score_grads,
                                                    score_weights.astype(dtype), activation)
  assert actual.shape == projected.shape and actual.dtype == dtype
  scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32))))
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2  # one bf16 rounding of the float32 sum
  np.testing.assert_allclose(actual.astype(jnp.float32), expected.astype(jnp.float32),
                             rtol=tolerance, atol=tolerance * scale)


def test_projected_features_grad_kernel_lowers_to_one_triton_kernel_without_a_gpu():
  """At the tutorial's sizes (batch 512, 14x14 grid, A 512, 21 steps, bf16): 7 x 8 x 512 programs."""
  shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in [
      ((512, 196, 512), jnp.bfloat16), ((512, 21, 512), jnp.bfloat16), ((512, 21, 196), jnp.float32),
      ((512,), jnp.float32)]]
  module = gpu_export.export_for_cuda(jax.jit(attention_grad_kernel.projected_features_grad), *shapes)
  gpu_export.assert_one_triton_kernel(module, "grid_x = 7 : i32, grid_y = 8 : i32, grid_z = 512 : i32")
