"""A decoding step's soft attention in one GPU kernel (Pallas, Triton): scores, softmax and context.

In a beam search step XLA runs the additive attention as separate kernels: the score fusion
w_a . tanh(W_f f_p + W_ha h) over [batch, K, P, A] (35 us a step at batch 256, beam 5, on an H200),
the softmax, and the per-image context product of the weights with the values (likely the
profile's 24.7 us GEMM fusion; the values are 64 MB at batch 256: [49 x 2,560] per image in bf16).
Here one program per image reads its projected features [P, A] and values [P, C] once for all K
beams, keeps the scores in registers and writes only the context [K, C] and the weights [K, P].

    context, weights = attend(projected_features, query, score_weights, values)

The numerics follow `decoder.Decoder._attend`'s XLA path: the sum inside the activation and the
activation rounded to the compute dtype (the inputs' dtype), the score summed in float32, the softmax
in float32, the weights rounded to the values' dtype for a product with float32 sums. Only the
summation order and the activation's implementation differ (tests: against that path, interpreted).

Measured on an H100 (BENCHMARKS.md, round 5): 101.5 us a call at batch 256, beam 5, where XLA's
score fusion, context product and softmax took ~70 us together, so a search took 3.39 ms against
2.96-3.00 ms. 256 programs of one image each fill the 132 SMs twice, and each walks its beams and
tiles in sequence. Opt-in, kept as the starting point of a faster split of the work.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

# Entries of A the score loop takes at once, and columns of C a context product takes.
ATTENTION_TILE = 32
CONTEXT_TILE = 128
MIN_DOT = 16  # Triton's smallest product dimension: the beams are padded to it for the context


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _attention_kernel(features_ref, query_ref, score_weights_ref, values_ref, context_ref,
                      weights_ref, *, activation, block_p: int, block_k: int):
  """One image: features_ref [P, A], query_ref [K, A], score_weights_ref [A], values_ref [P, C] ->
  context_ref [K, C] (values' dtype), weights_ref [K, P] (float32)."""
  positions, attention_dim = features_ref.shape
  beams = query_ref.shape[0]
  channels = values_ref.shape[1]
  compute_dtype = features_ref.dtype
  position_ids = jnp.arange(block_p, dtype=jnp.int32)
  beam_ids = jnp.arange(block_k, dtype=jnp.int32)
  position_ok = position_ids < positions
  tile_ids = jnp.arange(ATTENTION_TILE, dtype=jnp.int32)

  def beam_scores(beam):
    """[block_p] float32: w_a . act(f_p + q_beam) for every position."""
    def add_tile(tile, scores):
      start = tile * ATTENTION_TILE
      inside = start + tile_ids < attention_dim
      features = plgpu.load(features_ref.at[pl.ds(0, block_p), pl.ds(start, ATTENTION_TILE)],
                            mask=position_ok[:, None] & inside[None, :], other=0)
      query = plgpu.load(query_ref.at[pl.ds(beam, 1), pl.ds(start, ATTENTION_TILE)],
                         mask=inside[None, :], other=0)  # [1, tile]
      score_weights = plgpu.load(score_weights_ref.at[pl.ds(start, ATTENTION_TILE)], mask=inside,
                                 other=0)
      summed = (features.astype(jnp.float32) + query.astype(jnp.float32)).astype(compute_dtype)
      hidden = activation(summed.astype(jnp.float32)).astype(compute_dtype).astype(jnp.float32)
      return scores + jnp.sum(hidden * score_weights.astype(jnp.float32)[None, :], axis=1)
    num_tiles = pl.cdiv(attention_dim, ATTENTION_TILE)
    return lax.fori_loop(0, num_tiles, add_tile, jnp.zeros((block_p,), jnp.float32))

  scores = jnp.full((block_k, block_p), -jnp.inf, jnp.float32)
  for beam in range(beams):  # K is small: one pass over the features per beam
    scores = jnp.where(beam_ids[:, None] == beam, beam_scores(beam)[None, :], scores)
  scores = jnp.where(position_ok[None, :], scores, -jnp.inf)
  beam_ok = beam_ids < beams
  scores = jnp.where(beam_ok[:, None], scores, 0.0)  # padded beams: finite rows, never stored
  scores = scores - jnp.max(scores, axis=1, keepdims=True)
  exponentials = jnp.exp(scores)
  weights = exponentials / jnp.sum(exponentials, axis=1, keepdims=True)
  plgpu.store(weights_ref.at[pl.ds(0, block_k), pl.ds(0, block_p)], weights,
              mask=beam_ok[:, None] & position_ok[None, :])
  weights = weights.astype(values_ref.dtype)
  column_ids = jnp.arange(CONTEXT_TILE, dtype=jnp.int32)

  def context_tile(tile, carry):
    start = tile * CONTEXT_TILE
    inside = start + column_ids < channels
    values = plgpu.load(values_ref.at[pl.ds(0, block_p), pl.ds(start, CONTEXT_TILE)],
                        mask=position_ok[:, None] & inside[None, :], other=0)
    context = jnp.dot(weights, values, preferred_element_type=jnp.float32).astype(context_ref.dtype)
    plgpu.store(context_ref.at[pl.ds(0, block_k), pl.ds(start, CONTEXT_TILE)], context,
                mask=beam_ok[:, None] & inside[None, :])
    return carry
  lax.fori_loop(0, pl.cdiv(channels, CONTEXT_TILE), context_tile, 0)


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "num_warps"))
def attend(projected_features: jax.Array, query: jax.Array, score_weights: jax.Array,
           values: jax.Array, *, activation=jnp.tanh, interpret: bool = False,
           num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
  """Additive attention of K queries per image, one Pallas program per image.

  Args:
    projected_features: W_f f, [batch, P, A] in the compute dtype.
    query: W_ha h, [batch, K, A], the same dtype.
    score_weights: w_a, [A] (cast to the compute dtype, as the decoder's product casts it).
    values: [batch, P, C], what the weights average (the features or their projections).
    activation: the attention's activation (an elementwise jnp function).
    interpret: Pallas' interpreter (any backend; the CPU tests).
    num_warps: the Triton program's warps.

  Returns:
    context [batch, K, C] in the values' dtype, weights [batch, K, P] float32.
  """
  positions = projected_features.shape[1]
  beams = query.shape[1]
  channels = values.shape[2]
  if query.dtype != projected_features.dtype:
    raise TypeError(f"attend: query {query.dtype} and projected features "
                    f"{projected_features.dtype} differ.")
  block_p = max(_next_power_of_two(positions), MIN_DOT)
  block_k = max(_next_power_of_two(beams), MIN_DOT)
  kernel = functools.partial(_attention_kernel, activation=activation, block_p=block_p,
                             block_k=block_k)
  call = pl.pallas_call(
      kernel, grid=(),
      out_shape=(jax.ShapeDtypeStruct((beams, channels), values.dtype),
                 jax.ShapeDtypeStruct((beams, positions), jnp.float32)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret)
  score_weights = score_weights.astype(projected_features.dtype)
  return jax.vmap(call, in_axes=(0, 0, None, 0))(projected_features, query, score_weights, values)
