"""flaxcap/attention_kernel.py: the fused attention of a decoding step and the score kernel
(interpreted on the CPU) give the decoder's XLA attention; each lowers to one Triton kernel for a GPU
(with `tanh.approx.f32` where asked); a search with either gives the same captions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpu_export
from configs import default as default_config
from flaxcap import attention_kernel
from flaxcap import decoding
from flaxcap import model
from flaxcap.decoder import Decoder


def _xla_scores(projected_features, query, score_weights, activation):
  """The decoder's decoding-step scores (`Decoder._scores` by sum), float32 [b, K, P]."""
  dtype = projected_features.dtype
  hidden = activation(projected_features[:, None] + query[:, :, None])  # [b, K, P, A], dtype
  return jnp.sum(hidden.astype(jnp.float32) * score_weights.astype(dtype).astype(jnp.float32),
                 axis=-1)


def _random_inputs(dtype, batch, positions, attention_dim, beams, seed):
  """projected features [b, P, A], query [b, K, A] (dtype), score weights [A] float32."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, positions, attention_dim)), dtype),
          jnp.asarray(rng.normal(size=(batch, beams, attention_dim)), dtype),
          jnp.asarray(rng.normal(size=(attention_dim,)), jnp.float32))


def _xla_attention(projected_features, query, score_weights, values, activation):
  """The decoder's decoding-step attention (`Decoder._scores` by sum, softmax, context product)."""
  scores = _xla_scores(projected_features, query, score_weights, activation)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bkp,bpc->bkc", weights.astype(values.dtype), values), weights


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(3, 49, 72, 5, 300),  # P and C not powers of two, A past a tile
                                   (2, 6, 10, 1, 16),     # one beam, a tiny grid
                                   (1, 20, 64, 3, 130)])
@pytest.mark.parametrize("activation", [jnp.tanh, jax.nn.relu])
def test_fused_attention_equals_the_xla_attention(dtype, shape, activation):
  batch, positions, attention_dim, beams, channels = shape
  projected_features, query, score_weights = _random_inputs(dtype, *shape[:4], seed=sum(shape))
  rng = np.random.default_rng(sum(shape) + 1)
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(3, 49, 72, 5),   # P past three blocks, A past a tile
                                   (2, 6, 10, 1),    # one beam, less than a block and a tile
                                   (1, 17, 130, 3),  # one position into the second block
                                   (2, 16, 64, 2)])  # exactly a block and a tile
@pytest.mark.parametrize("activation", [jnp.tanh, jax.nn.relu])
def test_attention_scores_equal_the_xla_scores(dtype, shape, activation):
  projected_features, query, score_weights = _random_inputs(dtype, *shape, seed=sum(shape))
  scores = attention_kernel.attention_scores(projected_features, query, score_weights,
                                             activation=activation, interpret=True)
  expected = _xla_scores(projected_features, query, score_weights, activation)
  assert scores.shape == expected.shape == (shape[0], shape[3], shape[1])
  assert scores.dtype == jnp.float32
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0, 3, 40])
def test_attention_scores_read_the_query_at_an_offset(offset):
  """`query_offset`: the query read in place from a wider array (the decoder's product of h), with
  other values on both sides, gives the scores of the query alone."""
  projected_features, query, score_weights = _random_inputs(jnp.bfloat16, 3, 49, 72, 5, seed=offset)
  rng = np.random.default_rng(offset + 1)
  around = [jnp.asarray(rng.normal(size=(3, 5, columns)), jnp.bfloat16) for columns in (offset, 7)]
  wide = jnp.concatenate([around[0], query, around[1]], axis=-1)
  scores = attention_kernel.attention_scores(projected_features, wide, score_weights,
                                             query_offset=offset, interpret=True)
  np.testing.assert_array_equal(scores, attention_kernel.attention_scores(
      projected_features, query, score_weights, interpret=True))
  with pytest.raises(ValueError, match="does not fit"):
    attention_kernel.attention_scores(projected_features, wide, score_weights,
                                      query_offset=offset + 8, interpret=True)


@pytest.mark.parametrize("pad_columns_to", [1, 8])
def test_a_search_step_s_score_kernel_reads_the_query_inside_the_product_of_h(pad_columns_to):
  """Compiled for an H100, a beam step's score kernel takes the product of h whole (its columns:
  gates, query, gate logit; padded with pad8), not the query sliced out of it: that slice was a
  kernel of its own in every step."""
  decoder = Decoder(vocab_size=64, embed_dim=128, hidden_dim=128, attention_dim=128,
                    dropout_rate=0.0, dtype=jnp.bfloat16, score_kernel=True,
                    pad_columns_to=pad_columns_to)
  features = jax.ShapeDtypeStruct((16, 7, 7, 256), jnp.float32)
  params = jax.eval_shape(functools.partial(decoder.init, deterministic=True), jax.random.key(0),
                          features, jax.ShapeDtypeStruct((16, 4), jnp.int32))["params"]
  search = jax.jit(lambda p, f: decoding.search(decoder, p, f, beam_size=5, max_len=4))
  text = gpu_export.compile_for_h100(search, params, features)
  calls = [line for line in text.splitlines()
           if "custom-call(" in line and "jit(attention_scores)" in line]
  columns = -(4 * 128 + 128 + 1) // pad_columns_to * -pad_columns_to  # rounded up
  assert calls and all(f"bf16[16,5,{columns}]" in line for line in calls), [c[:300] for c in calls]


def test_kernel_activation():
  assert attention_kernel.kernel_activation("tanh") is jnp.tanh
  assert attention_kernel.kernel_activation("relu", approx_tanh=True) is jax.nn.relu
  assert attention_kernel.kernel_activation("tanh", approx_tanh=True, interpret=True) is jnp.tanh
  assert attention_kernel.kernel_activation("tanh", approx_tanh=True) is not jnp.tanh
  with pytest.raises(ValueError, match="no kernel activation for 'gelu'"):
    attention_kernel.kernel_activation("gelu")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="tanh.approx.f32 is a GPU instruction")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_approx_tanh_scores_are_near_the_exact_ones_on_a_gpu(dtype):
  projected_features, query, score_weights = _random_inputs(dtype, 4, 49, 512, 5, seed=7)
  exact = attention_kernel.attention_scores(projected_features, query, score_weights)
  approx = attention_kernel.attention_scores(
      projected_features, query, score_weights,
      activation=attention_kernel.kernel_activation("tanh", approx_tanh=True))
  assert not np.array_equal(approx, exact)
  # Each of the A = 512 terms moves by at most ~2^-11 relative (bf16: a rounding can flip).
  scale = float(jnp.sum(jnp.abs(score_weights)))
  np.testing.assert_allclose(approx, exact, atol=(1e-3 if dtype == jnp.float32 else 4e-3) * scale)


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
  assert "tanh.approx" not in module


@pytest.mark.parametrize("approx_tanh", [False, True])
def test_attention_scores_lower_to_one_triton_kernel_without_a_gpu(approx_tanh):
  """At beam search's sizes (batch 256, 7x7 grid, A 512, beam 5, bf16): 256 x 4 programs of 16
  positions, the tanh an instruction where asked."""
  shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in [
      ((256, 49, 512), jnp.bfloat16), ((256, 5, 512), jnp.bfloat16), ((512,), jnp.float32)]]
  activation = attention_kernel.kernel_activation("tanh", approx_tanh=approx_tanh)
  scores = functools.partial(attention_kernel.attention_scores, activation=activation)
  gpu_export.assert_one_triton_kernel(gpu_export.export_for_cuda(jax.jit(scores), *shapes),
                                     "grid_x = 4 : i32, grid_y = 256 : i32", approx_tanh)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", [{"fused_attention": True}, {"score_kernel": True},
                                    {"score_kernel": True, "fused_attention": True,
                                     "approx_tanh": True}])  # interpreted: the exact tanh
def test_a_search_with_the_kernels_gives_the_same_captions(dtype, kernel):
  """Decoder(fused_attention=True) or (score_kernel=True): the same tokens and lengths as the XLA
  attention, scores and attention weights to rounding, context projected (beam x steps > P) or
  not."""
  options = dict(vocab_size=23, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0,
                 dtype=dtype)
  decoder, fused = Decoder(**options), Decoder(**kernel, **options)
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


def test_the_config_turns_the_kernels_on():
  config = default_config.get_config()
  decoder = model.create_decoder(config, 30)
  assert not (decoder.fused_attention or decoder.score_kernel or decoder.approx_tanh)
  config.decoder.score_kernel, config.decoder.approx_tanh = True, True
  decoder = model.create_decoder(config, 30)
  assert decoder.score_kernel and decoder.approx_tanh and not decoder.fused_attention
