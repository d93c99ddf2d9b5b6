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

    scores = attention_scores(projected_features, query, score_weights)

takes the score fusion alone, the softmax and the context product staying XLA's: a program per
image and block of `SCORE_BLOCK_P` positions reads that block once for all K beams, so the grid has
batch x ceil(P / SCORE_BLOCK_P) programs (1,024 at batch 256 and a 7x7 grid). The score fusion is
bound by arithmetic, not bytes: its [256, 5, 49, 512] activations are 32 M tanh evaluations a step,
XLA's rational tanh some 20 float32 operations each, where the projected features it reads (12.8 MB
in bf16) fit in the H100's L2. `kernel_activation(..., approx_tanh=True)` takes the tanh from the
GPU's special-function unit (PTX `tanh.approx.f32`, one instruction, relative error below 2^-10.9;
bfloat16 rounds to 2^-9): an option for either kernel, not a default.

Teacher forcing's gradient kernels are in `attention_grad_kernel`.
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
# `attention_scores`: positions per program, and entries of A per pass of its loop.
SCORE_BLOCK_P = 16
SCORE_TILE = 64


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _approx_tanh(x: jax.Array) -> jax.Array:
  """tanh by the GPU's `tanh.approx.f32` (float32 in and out)."""
  return plgpu.approx_tanh(x.astype(jnp.float32))


def kernel_activation(name: str, *, approx_tanh: bool = False, interpret: bool = False):
  """The elementwise function a kernel applies for the attention activation `name` ("tanh",
  "relu"). `approx_tanh`: "tanh" by `tanh.approx.f32`, where the kernel is compiled for a GPU
  (interpreted, the exact tanh: the instruction is PTX)."""
  if name == "tanh":
    return _approx_tanh if approx_tanh and not interpret else jnp.tanh
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"no kernel activation for {name!r}")


def _add_activate(features: jax.Array, query: jax.Array, activation, compute_dtype) -> jax.Array:
  """act(features + query) as `Decoder._scores` rounds it: the sum and the activation each
  rounded to the compute dtype; float32 out."""
  summed = (features.astype(jnp.float32) + query.astype(jnp.float32)).astype(compute_dtype)
  return activation(summed.astype(jnp.float32)).astype(compute_dtype).astype(jnp.float32)


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
      hidden = _add_activate(features, query, activation, compute_dtype)
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


def _score_kernel(features_ref, query_ref, score_weights_ref, scores_ref, *, activation,
                  block_p: int, tile: int, query_offset: int):
  """One image's block of positions: features_ref [P, A], query_ref [K, >= query_offset + A] (the
  query in columns query_offset...), score_weights_ref [A] -> scores_ref [K, P] (float32) at the
  block's positions, w_a . act(f_p + q_k)."""
  positions, attention_dim = features_ref.shape
  beams = query_ref.shape[0]
  compute_dtype = features_ref.dtype
  first = pl.program_id(0) * block_p
  position_ok = first + jnp.arange(block_p, dtype=jnp.int32) < positions
  tile_ids = jnp.arange(tile, dtype=jnp.int32)

  def add_tile(tile_index, scores):  # scores: K arrays [block_p]
    start = tile_index * tile
    inside = start + tile_ids < attention_dim
    features = plgpu.load(features_ref.at[pl.ds(first, block_p), pl.ds(start, tile)],
                          mask=position_ok[:, None] & inside[None, :], other=0)  # [block_p, tile]
    score_weights = plgpu.load(score_weights_ref.at[pl.ds(start, tile)], mask=inside, other=0)
    score_weights = score_weights.astype(jnp.float32)[None, :]
    new_scores = []
    for beam in range(beams):  # K is static and small: every beam from one load of the block
      query = plgpu.load(query_ref.at[pl.ds(beam, 1), pl.ds(query_offset + start, tile)],
                         mask=inside[None, :], other=0)  # [1, tile]
      hidden = _add_activate(features, query, activation, compute_dtype)
      new_scores.append(scores[beam] + jnp.sum(hidden * score_weights, axis=1))
    return tuple(new_scores)

  scores = lax.fori_loop(0, pl.cdiv(attention_dim, tile), add_tile,
                         tuple(jnp.zeros((block_p,), jnp.float32) for _ in range(beams)))
  for beam in range(beams):
    plgpu.store(scores_ref.at[pl.ds(beam, 1), pl.ds(first, block_p)], scores[beam][None, :],
                mask=position_ok[None, :])


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "num_warps",
                                             "query_offset"))
def attention_scores(projected_features: jax.Array, query: jax.Array, score_weights: jax.Array, *,
                     activation=jnp.tanh, interpret: bool = False, num_warps: int = 4,
                     query_offset: int = 0) -> jax.Array:
  """The additive attention's scores of K queries per image, w_a . act(W_f f_p + W_ha h_k).

  Args:
    projected_features: W_f f, [batch, P, A] in the compute dtype.
    query: W_ha h, [batch, K, A], the same dtype; or with `query_offset`, an array that holds it in
      columns query_offset to query_offset + A, [batch, K, N] (the decoder's product of h: the kernel
      reads the query where that product wrote it, where a slice would copy it first).
    score_weights: w_a, [A] (cast to the compute dtype, as the decoder's product casts it).
    activation: the attention's activation (`kernel_activation`).
    interpret: Pallas' interpreter (any backend; the CPU tests).
    num_warps: the Triton program's warps.

  Returns:
    scores [batch, K, P] float32, as `Decoder._scores` (by sum) up to the summation order.
  """
  positions = projected_features.shape[1]
  beams = query.shape[1]
  if query.dtype != projected_features.dtype:
    raise TypeError(f"attention_scores: query {query.dtype} and projected features "
                    f"{projected_features.dtype} differ.")
  if not 0 <= query_offset <= query.shape[2] - projected_features.shape[2]:
    raise ValueError(f"attention_scores: a query of {projected_features.shape[2]} columns from "
                     f"column {query_offset} does not fit in {query.shape[2]}.")
  kernel = functools.partial(_score_kernel, activation=activation, block_p=SCORE_BLOCK_P,
                             tile=SCORE_TILE, query_offset=query_offset)
  call = pl.pallas_call(
      kernel, grid=(pl.cdiv(positions, SCORE_BLOCK_P),),
      out_shape=jax.ShapeDtypeStruct((beams, positions), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret)
  score_weights = score_weights.astype(projected_features.dtype)
  return jax.vmap(call, in_axes=(0, 0, None))(projected_features, query, score_weights)

