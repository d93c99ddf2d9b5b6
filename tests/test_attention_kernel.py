"""flaxcap/attention_kernel.py: the fused attention of a decoding step (interpreted on the CPU) gives
the decoder's XLA attention; it lowers to one Triton kernel for a GPU; a search with it gives the
same captions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpu_export
from flaxcap import attention_kernel
from flaxcap import decoding
from flaxcap.decoder import Decoder


def _xla_attention(projected_features, query, score_weights, values, activation):
  """The decoder's decoding-step attention (`Decoder._scores` by sum, softmax, context product)."""
  dtype = projected_features.dtype
  hidden = activation(projected_features[:, None] + query[:, :, None])  # [b, K, P, A], dtype
  scores = jnp.sum(hidden.astype(jnp.float32) *
                   score_weights.astype(dtype).astype(jnp.float32), axis=-1)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bkp,bpc->bkc", weights.astype(values.dtype), values), weights


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(3, 49, 72, 5, 300),  # P and C not powers of two, A past a tile
                                   (2, 6, 10, 1, 16),     # one beam, a tiny grid
                                   (1, 20, 64, 3, 130)])
@pytest.mark.parametrize("activation", [jnp.tanh, jax.nn.relu])
def test_fused_attention_equals_the_xla_attention(dtype, shape, activation):
  batch, positions, attention_dim, beams, channels = shape
  rng = np.random.default_rng(sum(shape))
  projected_features = jnp.asarray(rng.normal(size=(batch, positions, attention_dim)), dtype)
  query = jnp.asarray(rng.normal(size=(batch, beams, attention_dim)), dtype)
  score_weights = jnp.asarray(rng.normal(size=(attention_dim,)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(batch, positions, channels)), dtype)
  context, weights = attention_kernel.attend(projected_features, query, score_weights, values,
                                             activation=activation, interpret=True)
  ref_context, ref_weights = _xla_attention(projected_features, query, score_weights, values,
                                            activation)
  assert context.shape == ref_context.shape and context.dtype == dtype
  assert weights.shape == ref_weights.shape and weights.dtype == jnp.float32
  np.testing.assert_allclose(weights, ref_weights, atol=2e-6)
  np.testing.assert_allclose(np.asarray(jnp.sum(weights, -1)), 1.0, rtol=1e-5)
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: one rounding of a weight can differ
  np.testing.assert_allclose(np.asarray(context, np.float32), np.asarray(ref_context, np.float32),
                             atol=tolerance * float(jnp.max(jnp.abs(values.astype(jnp.float32)))))


def test_attend_rejects_mixed_dtypes():
  with pytest.raises(TypeError, match="query bfloat16 and projected features float32 differ"):
    attention_kernel.attend(jnp.zeros((1, 4, 8)), jnp.zeros((1, 2, 8), jnp.bfloat16), jnp.zeros(8),
                            jnp.zeros((1, 4, 16)), interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fused_attention_lowers_to_one_triton_kernel_without_a_gpu(dtype):
  """At beam search's sizes (batch 256, 7x7 grid, A 512, beam 5, context projections 2,560)."""
  shapes = [jax.ShapeDtypeStruct(shape, d) for shape, d in [
      ((256, 49, 512), dtype), ((256, 5, 512), dtype), ((512,), jnp.float32),
      ((256, 49, 2560), dtype)]]
  module = gpu_export.export_for_cuda(jax.jit(attention_kernel.attend), *shapes)
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
  assert "grid_x = 256" in module


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_search_with_the_fused_attention_gives_the_same_captions(dtype):
  """Decoder(fused_attention=True): the same tokens and lengths as the XLA attention, scores and
  attention weights to rounding, context projected (beam x steps > P) or not."""
  options = dict(vocab_size=23, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0,
                 dtype=dtype)
  decoder, fused = Decoder(**options), Decoder(fused_attention=True, **options)
  rng = np.random.default_rng(2)
  features = jnp.asarray(rng.normal(size=(3, 2, 3, 8)), jnp.float32)
  init = jax.jit(functools.partial(decoder.init, deterministic=True))
  params = init(jax.random.key(1), features, jnp.zeros((3, 4), jnp.int32))["params"]
  params = jax.tree.map(lambda x: 3.0 * x, params)  # sharper distributions: no near-ties
  for max_len in (4, 1):  # 3 x 4 > P = 6: the context's projections; 3 x 1: the features
    search = functools.partial(decoding.search, beam_size=3, max_len=max_len)
    expected = jax.jit(functools.partial(search, decoder))(params, features)
    result = jax.jit(functools.partial(search, fused))(params, features)
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_array_equal(result.lengths, expected.lengths)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(result.scores, expected.scores, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(result.aux, expected.aux, atol=tolerance)
