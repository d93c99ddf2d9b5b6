"""A beam search step's bookkeeping in one GPU kernel (Pallas, Triton): from the candidates' segment
winners to the new live and finished sets, a program per image.

After `top_k_kernel.row_top_k` has taken the 2K best of each segment of an image's K * V candidates,
`beam_search` merges those into the image's 2K best, lets the ones that end in <eos> (among the top K)
into the finished set, and fills the K live slots with the best others. In XLA that is 5 fusions and
3 copies a step (the finished set is read and rewritten, so XLA writes it to a new buffer and copies
it back into the loop's), each a launch of a microsecond or two for a few kilobytes: on an H100 (round
5's profile, batch 256) ~20 us of a ~250 us step. Here one program per image does all of it, in
registers, and rewrites the finished set in place.

    live_scores, tokens, parents, done_scores, done_steps, done_slots = select_step(
        segment_keys, positions, done_scores, done_steps, done_slots, step, vocab=V, eos_id=EOS)

The result is `beam_search`'s, ties included: every ranking here is "larger key first, equal keys by
position", the order of `top_k.rank_top_k` and `lax.top_k`. Without a length penalty only (a
finished score is the raw log-probability).
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from flaxcap import top_k
from flaxcap import top_k_kernel

_INT32_MIN = jnp.iinfo(jnp.int32).min
_INT32_MAX = jnp.iinfo(jnp.int32).max
# `top_k.order_keys(-inf)`: an ended candidate's key in the live ranking.
_NEG_INF_KEY = int(np.array(-np.inf, np.float32).view(np.int32)) ^ 0x7FFFFFFF


def _ranked(keys, positions, count: int, block: int):
  """The `count` first entries of (keys, positions) [n] in the order larger key first, equal keys
  by position: (keys, positions), each [block] with those in its first `count` places."""
  slots = jnp.arange(block, dtype=jnp.int32)

  def round_(slot, carry):
    top_keys, top_positions, last_key, last_position = carry
    best_key, best_position = top_k_kernel.best_after(keys, positions, last_key, last_position)
    return (jnp.where(slots == slot, best_key, top_keys),
            jnp.where(slots == slot, best_position, top_positions), best_key, best_position)

  top_keys, top_positions, _, _ = lax.fori_loop(
      0, count, round_, (jnp.zeros(block, jnp.int32), jnp.zeros(block, jnp.int32),
                         jnp.int32(_INT32_MAX), jnp.int32(-1)))
  return top_keys, top_positions


def _pick(values, picks):
  """values [n] at picks [m] (positions in 0..n-1): [m], by a one-hot sum (exact for integers; Triton
  has no gather)."""
  hits = picks[:, None] == jnp.arange(values.shape[0], dtype=jnp.int32)[None, :]
  return jnp.sum(jnp.where(hits, values[None, :], 0), axis=1)


def _select_kernel(keys_ref, positions_ref, done_scores_ref, done_steps_ref, done_slots_ref,
                   step_ref, live_scores_ref, tokens_ref, parents_ref, new_done_scores_ref,
                   new_done_steps_ref, new_done_slots_ref, *, beam: int, vocab: int, eos_id: int,
                   block: int, beam_block: int):
  """One image: keys_ref, positions_ref [n] (the segments' winners: `order_keys` of the candidates,
  their flat indices slot * vocab + token), the finished set [beam] each, step_ref [1]; writes the
  live set [beam] (scores, tokens, parent slots) and the finished set [beam] (in place).

  Scores are ranked and moved as their int32 `order_keys` (exact, -0.0 included)."""
  n = keys_ref.shape[0]
  inside = jnp.arange(block, dtype=jnp.int32) < n
  keys = plgpu.load(keys_ref.at[pl.ds(0, block)], mask=inside, other=_INT32_MIN)
  positions = plgpu.load(positions_ref.at[pl.ds(0, block)], mask=inside, other=_INT32_MAX)
  neg_inf_key = jnp.int32(_NEG_INF_KEY)
  # The 2K best candidates, best first: top_k.top_k_by_kernel's merge (ties by flat index).
  two_k = 2 * beam
  rank = jnp.arange(2 * beam_block, dtype=jnp.int32)
  best_keys, best_index = _ranked(keys, positions, two_k, 2 * beam_block)
  best_slots, best_tokens = best_index // vocab, best_index % vocab
  ends = (best_tokens == eos_id) & (rank < two_k)

  slot = jnp.arange(beam_block, dtype=jnp.int32)
  in_beam = slot < beam
  done_keys = jnp.where(in_beam, top_k.order_keys(plgpu.load(
      done_scores_ref.at[pl.ds(0, beam_block)], mask=in_beam, other=0.0)), _INT32_MIN)
  done_steps = plgpu.load(done_steps_ref.at[pl.ds(0, beam_block)], mask=in_beam, other=0)
  done_slots = plgpu.load(done_slots_ref.at[pl.ds(0, beam_block)], mask=in_beam, other=0)
  step = jnp.max(plgpu.load(step_ref.at[pl.ds(0, 1)]))

  # Finished set: the <eos> candidates among the top K join the K finished so far, and the K best
  # stay: top_k over [finished (positions 0..K-1) | new (K..2K-1)], ties to the earlier entry.
  new_keys = jnp.where(in_beam, _pick(jnp.where(ends, best_keys, neg_inf_key), slot), _INT32_MIN)
  new_slots = _pick(best_slots, slot)
  merged_keys = jnp.where(rank < beam_block, _pick(done_keys, rank),
                          _pick(new_keys, rank - beam_block))  # [2 * beam_block], by block
  merged_positions = jnp.where(rank < beam_block, rank, rank - beam_block + beam)
  valid = (rank % beam_block) < beam
  merged_keys = jnp.where(valid, merged_keys, _INT32_MIN)
  merged_positions = jnp.where(valid, merged_positions, _INT32_MAX)
  done_ranked_keys, done_pick = _ranked(merged_keys, merged_positions, beam, beam_block)
  from_done = done_pick < beam
  new_done_steps = jnp.where(from_done, _pick(done_steps, done_pick), step)
  new_done_slots = jnp.where(from_done, _pick(done_slots, done_pick),
                             _pick(new_slots, done_pick - beam))

  # Live set: the K best candidates that do not end (an ended one ranks as -inf).
  live_keys = jnp.where(rank < two_k, jnp.where(ends, neg_inf_key, best_keys), _INT32_MIN)
  live_ranked_keys, live_pick = _ranked(live_keys, rank, beam, beam_block)

  def store(ref, values):
    plgpu.store(ref.at[pl.ds(0, beam_block)], values, mask=in_beam)

  store(live_scores_ref, top_k.values_of_keys(live_ranked_keys))
  store(tokens_ref, _pick(best_tokens, live_pick))
  store(parents_ref, _pick(best_slots, live_pick))
  store(new_done_scores_ref, top_k.values_of_keys(done_ranked_keys))
  store(new_done_steps_ref, new_done_steps)
  store(new_done_slots_ref, new_done_slots)


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("vocab", "eos_id", "interpret", "num_warps"))
def select_step(segment_keys: jax.Array, positions: jax.Array, done_scores: jax.Array,
                done_steps: jax.Array, done_slots: jax.Array, step: jax.Array, *, vocab: int,
                eos_id: int, interpret: bool = False, num_warps: int = 1):
  """`beam_search`'s step after the candidates' top-k, without a length penalty, one program per
  image.

  Args:
    segment_keys: int32 [batch, n]: the `top_k.order_keys` of each segment's 2K best candidates
      (`top_k_kernel.row_top_k(..., segment=...)`, flattened; n >= 2K).
    positions: int32 [batch, n]: their flat indices, parent slot * vocab + token (distinct).
    done_scores, done_steps, done_slots: the finished set, [batch, K] (float32, int32, int32).
    step: int32 scalar, this step (0-based).
    vocab, eos_id: static.
    interpret: Pallas' interpreter (any backend; for tests on the CPU).

  Returns:
    (live_scores [batch, K] best first, tokens, parents: the live set; done_scores, done_steps,
    done_slots: the new finished set, best first, written over the old one's buffers).
  """
  beam = done_scores.shape[1]
  if segment_keys.shape[-1] < 2 * beam:
    raise ValueError(f"select_step needs at least 2K = {2 * beam} candidates an image; "
                     f"got {segment_keys.shape[-1]}.")
  block = _next_power_of_two(segment_keys.shape[-1])
  beam_block = _next_power_of_two(beam)
  kernel = functools.partial(_select_kernel, beam=beam, vocab=vocab, eos_id=eos_id, block=block,
                             beam_block=beam_block)
  row = lambda dtype: jax.ShapeDtypeStruct((beam,), dtype)  # noqa: E731
  call = pl.pallas_call(
      kernel, grid=(),
      out_shape=(row(jnp.float32), row(jnp.int32), row(jnp.int32), row(jnp.float32),
                 row(jnp.int32), row(jnp.int32)),
      input_output_aliases={2: 3, 3: 4, 4: 5},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret)
  step = jnp.reshape(jnp.asarray(step, jnp.int32), (1,))
  return jax.vmap(call, in_axes=(0, 0, 0, 0, 0, None))(
      segment_keys, positions, done_scores.astype(jnp.float32), done_steps.astype(jnp.int32),
      done_slots.astype(jnp.int32), step)
