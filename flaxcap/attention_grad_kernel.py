"""Teacher forcing's attention gradients in GPU kernels (Pallas, Triton), recomputing the activation
instead of reading a stored one (`Decoder.score_vjp` with `score_kernel`, whose forward scores are
`attention_kernel.attention_scores`):

    query_grads, weight_grads = score_grads(projected_features, query, score_grads_, score_weights)
    feature_grads = projected_features_grad(projected_features, queries, score_grads_, score_weights)

The first runs in each step of the backward scan (`attention_grad.recomputed_scores`): both sums
over P, the query's and w_a's, from one recomputation per element and one read of the projected
features. The second runs once after it (`late_grads.scan_with_late_grads`): the
projected features' gradient summed over the steps, one read of each block of the projected
features and one write of its gradient, nothing of [batch, T, P, A] formed. Both round as autodiff
of `Decoder._scores` rounds (`attention_grad.activation_and_slopes`, `hidden_grads`); tanh by
`tanh.approx.f32` where asked (`attention_kernel.kernel_activation`). Interpreted off the GPU.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from flaxcap import attention_grad
from flaxcap import attention_kernel

# `score_grads`: entries of A a program takes, and positions per pass of its loop.
GRAD_TILE = 64
GRAD_BLOCK_P = 32


def _score_grads_kernel(features_ref, query_ref, score_grads_ref, score_weights_ref,
                        query_grads_ref, weight_grads_ref, *, activation: str, activate,
                        block_p: int, tile: int):
  """One image's tile of A: features_ref [P, A], query_ref [K, A], score_grads_ref [K, P] (float32),
  score_weights_ref [A] -> query_grads_ref [K, A], weight_grads_ref [A] (float32) at the tile's
  entries: sum over P of d act(f_p + q_k) / d(f_p + q_k) * ds_kp w_a, and of ds_kp act(f_p + q_k)
  (over K too)."""
  positions, attention_dim = features_ref.shape
  beams = query_ref.shape[0]
  compute_dtype = features_ref.dtype
  first_a = pl.program_id(0) * tile
  entry_ok = first_a + jnp.arange(tile, dtype=jnp.int32) < attention_dim
  columns = pl.ds(first_a, tile)
  score_weights = plgpu.load(score_weights_ref.at[columns], mask=entry_ok, other=0)[None, :]
  queries = [plgpu.load(query_ref.at[pl.ds(beam, 1), columns], mask=entry_ok[None, :], other=0)
             for beam in range(beams)]  # [1, tile] each
  position_ids = jnp.arange(block_p, dtype=jnp.int32)

  def add_block(block, sums):  # sums: K query gradients and the weights' gradient, [tile] each
    first_p = block * block_p
    position_ok = first_p + position_ids < positions
    features = plgpu.load(features_ref.at[pl.ds(first_p, block_p), columns],
                          mask=position_ok[:, None] & entry_ok[None, :], other=0)
    new_sums = list(sums)
    for beam in range(beams):  # every beam from one load of the block
      grads = plgpu.load(score_grads_ref.at[pl.ds(beam, 1), pl.ds(first_p, block_p)],
                         mask=position_ok[None, :], other=0.0).T  # [block_p, 1]; 0 past P
      summed = (features.astype(jnp.float32) + queries[beam].astype(jnp.float32)).astype(compute_dtype)
      activated, slopes = attention_grad.activation_and_slopes(summed, activation, activate)
      summed_grads = attention_grad.hidden_grads(grads, score_weights, compute_dtype) * slopes
      new_sums[beam] = sums[beam] + jnp.sum(summed_grads, axis=0)
      new_sums[beams] = new_sums[beams] + jnp.sum(grads * activated, axis=0)
    return tuple(new_sums)

  sums = lax.fori_loop(0, pl.cdiv(positions, block_p), add_block,
                       tuple(jnp.zeros((tile,), jnp.float32) for _ in range(beams + 1)))
  for beam in range(beams):
    plgpu.store(query_grads_ref.at[pl.ds(beam, 1), columns], sums[beam][None, :],
                mask=entry_ok[None, :])
  plgpu.store(weight_grads_ref.at[columns], sums[beams], mask=entry_ok)


@functools.partial(jax.jit, static_argnames=("activation", "approx_tanh", "interpret", "num_warps"))
def score_grads(projected_features: jax.Array, query: jax.Array, score_grads_: jax.Array,
                score_weights: jax.Array, *, activation: str = "tanh", approx_tanh: bool = False,
                interpret: bool = False, num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
  """The additive attention scores' gradients with respect to the query and to w_a, in one pass.

  Recomputes act(W_f f_p + W_ha h_k) (rounded as `Decoder._scores`) once per element and takes
  both sums over P from it: a program per image and `GRAD_TILE` entries of A, reading the image's
  projected features once for all K beams (`attention_grad.recomputed_scores`' backward pass).

  Args:
    projected_features: W_f f, [batch, P, A] in the compute dtype.
    query: W_ha h, [batch, K, A], the same dtype.
    score_grads_: the scores' cotangents ds, [batch, K, P] float32.
    score_weights: w_a, [A] (cast to the compute dtype, as the decoder's product casts it).
    activation: "tanh" or "relu"; approx_tanh: tanh by `tanh.approx.f32` where compiled for a GPU.
    interpret: Pallas' interpreter (any backend; the CPU tests).
    num_warps: the Triton program's warps.

  Returns:
    (the query's gradient [batch, K, A], the weights' gradient per image [batch, A]), float32:
    sum_p ds w_a act'(...) and sum_{k, p} ds act(...), the activation's cotangent rounded to the
    compute dtype as autodiff rounds it.
  """
  positions, attention_dim = projected_features.shape[1:]
  beams = query.shape[1]
  if query.dtype != projected_features.dtype:
    raise TypeError(f"score_grads: query {query.dtype} and projected features "
                    f"{projected_features.dtype} differ.")
  activate = attention_kernel.kernel_activation(activation, approx_tanh=approx_tanh, interpret=interpret)
  kernel = functools.partial(_score_grads_kernel, activation=activation, activate=activate,
                             block_p=GRAD_BLOCK_P, tile=GRAD_TILE)
  call = pl.pallas_call(
      kernel, grid=(pl.cdiv(attention_dim, GRAD_TILE),),
      out_shape=(jax.ShapeDtypeStruct((beams, attention_dim), jnp.float32),
                 jax.ShapeDtypeStruct((attention_dim,), jnp.float32)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret)
  score_weights = score_weights.astype(projected_features.dtype)
  return jax.vmap(call, in_axes=(0, 0, 0, None))(projected_features, query, score_grads_,
                                                 score_weights)


def _projected_features_grad_kernel(features_ref, queries_ref, score_grads_ref, score_weights_ref,
                                    grads_ref, *, activation: str, activate, block_p: int,
                                    tile: int):
  """One image's block of positions and tile of A: features_ref [P, A], queries_ref [T, A],
  score_grads_ref [T, P] (float32), score_weights_ref [A] -> grads_ref [P, A] at the block, the
  sum over the T steps of ds_tp w_a act'(f_p + q_t) (the compute dtype)."""
  positions, attention_dim = features_ref.shape
  steps = queries_ref.shape[0]
  compute_dtype = features_ref.dtype
  first_p = pl.program_id(0) * block_p
  first_a = pl.program_id(1) * tile
  position_ok = first_p + jnp.arange(block_p, dtype=jnp.int32) < positions
  entry_ok = first_a + jnp.arange(tile, dtype=jnp.int32) < attention_dim
  rows, columns = pl.ds(first_p, block_p), pl.ds(first_a, tile)
  block_ok = position_ok[:, None] & entry_ok[None, :]
  features = plgpu.load(features_ref.at[rows, columns], mask=block_ok, other=0)
  score_weights = plgpu.load(score_weights_ref.at[columns], mask=entry_ok, other=0)[None, :]

  def add_step(step, total):
    query = plgpu.load(queries_ref.at[pl.ds(step, 1), columns], mask=entry_ok[None, :], other=0)
    grads = plgpu.load(score_grads_ref.at[pl.ds(step, 1), rows], mask=position_ok[None, :],
                       other=0.0).T  # [block_p, 1]
    summed = (features.astype(jnp.float32) + query.astype(jnp.float32)).astype(compute_dtype)
    _, slopes = attention_grad.activation_and_slopes(summed, activation, activate)
    return total + attention_grad.hidden_grads(grads, score_weights, compute_dtype) * slopes

  total = lax.fori_loop(0, steps, add_step, jnp.zeros((block_p, tile), jnp.float32))
  plgpu.store(grads_ref.at[rows, columns], total.astype(grads_ref.dtype), mask=block_ok)


@functools.partial(jax.jit, static_argnames=("activation", "approx_tanh", "interpret", "num_warps"))
def projected_features_grad(projected_features: jax.Array, queries: jax.Array,
                            score_grads_: jax.Array, score_weights: jax.Array, *,
                            activation: str = "tanh", approx_tanh: bool = False,
                            interpret: bool = False, num_warps: int = 4) -> jax.Array:
  """`attention_grad.projected_features_grad` (the projected features' gradient summed over the
  teacher-forced steps, after the backward scan) in one pass: a program per image, block of
  `GRAD_BLOCK_P` positions and `GRAD_TILE` entries of A reads its block once and loops over the
  steps, so nothing of [batch, T, P, A] is formed.

  Args:
    projected_features: pf [batch, P, A], the compute dtype.
    queries: q_t [batch, T, A], the same dtype.
    score_grads_: ds_t [batch, T, P], float32.
    score_weights: w_a [A] (cast to the compute dtype, as the decoder's product casts it).
    activation: "tanh" or "relu"; approx_tanh: tanh by `tanh.approx.f32` where compiled for a GPU.
    interpret: Pallas' interpreter (any backend; the CPU tests).
    num_warps: the Triton program's warps.

  Returns:
    d pf [batch, P, A] in the compute dtype, the steps summed in float32.
  """
  positions, attention_dim = projected_features.shape[1:]
  if queries.dtype != projected_features.dtype:
    raise TypeError(f"projected_features_grad: queries {queries.dtype} and projected features "
                    f"{projected_features.dtype} differ.")
  activate = attention_kernel.kernel_activation(activation, approx_tanh=approx_tanh, interpret=interpret)
  kernel = functools.partial(_projected_features_grad_kernel, activation=activation,
                             activate=activate, block_p=GRAD_BLOCK_P, tile=GRAD_TILE)
  call = pl.pallas_call(
      kernel, grid=(pl.cdiv(positions, GRAD_BLOCK_P), pl.cdiv(attention_dim, GRAD_TILE)),
      out_shape=jax.ShapeDtypeStruct((positions, attention_dim), projected_features.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret)
  score_weights = score_weights.astype(projected_features.dtype)
  return jax.vmap(call, in_axes=(0, 0, 0, None))(projected_features, queries, score_grads_,
                                                 score_weights)
