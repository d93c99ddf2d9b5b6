"""The k largest int32 keys of each row in one GPU kernel (Pallas, Triton): beam search's candidates.

XLA's TopK kernel took half of a beam-5 step at batch 256 on an H200 (187 us of ~365 us, over 256
rows of 13,000 candidates); at batch 1 the searches are launch-bound and every method in
`flaxcap.top_k` is several kernels. Here one program per row keeps the row in registers and takes k
rounds of "the largest key ordered after the last pick" (larger keys first, equal keys by
position): a maximum and a minimum over the row each round, no rewriting of the row, no sort, no
second kernel. Rows longer than `MAX_TILE` are read in tiles each round. `top_k.top_k_by_kernel`
turns floats into keys of the same order (`top_k.order_keys`), so that the result is `lax.top_k`'s.

    keys, positions = row_top_k(keys, k)            # int32 [..., n] -> [..., k] each; Triton on a GPU
    row_top_k(keys, k, interpret=True)              # the same kernel, interpreted (CPU tests)
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

# The most entries a program holds at once (a power of two: Triton's blocks are); a longer row is
# read in tiles of this many, once per round.
MAX_TILE = 16384

_INT32_MIN = jnp.iinfo(jnp.int32).min
_INT32_MAX = jnp.iinfo(jnp.int32).max


def _tile_best(keys, positions, last_key, last_position):
  """The largest key ordered after (last_key, last_position), and its lowest position.

  Order: larger keys first, equal keys by position. keys, positions: [tile] int32; the others
  scalars. Returns (key, position), (INT32_MIN, INT32_MAX) where no entry of the tile is after.
  """
  after = (keys < last_key) | ((keys == last_key) & (positions > last_position))
  best_key = jnp.max(jnp.where(after, keys, _INT32_MIN))
  best_position = jnp.min(jnp.where(after & (keys == best_key), positions, _INT32_MAX))
  return best_key, best_position


def _later(best, other):
  """Of two (key, position) picks the one that comes first in the order."""
  first = (other[0] > best[0]) | ((other[0] == best[0]) & (other[1] < best[1]))
  return jnp.where(first, other[0], best[0]), jnp.where(first, other[1], best[1])


def _row_top_k_kernel(keys_ref, top_keys_ref, top_positions_ref, *, k: int, tile: int,
                      out_block: int):
  """One row: keys_ref [n] -> top_keys_ref [k], top_positions_ref [k] (int32)."""
  length = keys_ref.shape[-1]
  num_tiles = -(-length // tile)
  offsets = jnp.arange(tile, dtype=jnp.int32)

  def load_tile(start):
    positions = start + offsets
    inside = positions < length
    # Padding ranks after every entry (key INT32_MIN, position past the row): never picked, k <= n.
    keys = plgpu.load(keys_ref.at[pl.ds(start, tile)], mask=inside, other=_INT32_MIN)
    return keys, positions

  whole_row = load_tile(0) if num_tiles == 1 else None  # kept in registers for every round
  slots = jnp.arange(out_block, dtype=jnp.int32)

  def round_(slot, carry):
    top_keys, top_positions, last_key, last_position = carry
    if whole_row is not None:
      best = _tile_best(*whole_row, last_key, last_position)
    else:
      best = lax.fori_loop(
          0, num_tiles,
          lambda t, best: _later(best, _tile_best(*load_tile(t * tile), last_key, last_position)),
          (jnp.int32(_INT32_MIN), jnp.int32(_INT32_MAX)))
    top_keys = jnp.where(slots == slot, best[0], top_keys)
    top_positions = jnp.where(slots == slot, best[1], top_positions)
    return top_keys, top_positions, best[0], best[1]

  top_keys, top_positions, _, _ = lax.fori_loop(
      0, k, round_, (jnp.zeros(out_block, jnp.int32), jnp.zeros(out_block, jnp.int32),
                     jnp.int32(_INT32_MAX), jnp.int32(-1)))
  wanted = slots < k
  plgpu.store(top_keys_ref.at[pl.ds(0, out_block)], top_keys, mask=wanted)
  plgpu.store(top_positions_ref.at[pl.ds(0, out_block)], top_positions, mask=wanted)


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("k", "interpret", "tile", "num_warps"))
def row_top_k(keys: jax.Array, k: int, *, interpret: bool = False, tile: int | None = None,
              num_warps: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The k largest keys of each row, ties to the lower position, by one Pallas program per row.

  Args:
    keys: int32 [..., n].
    k: 1 <= k <= n.
    interpret: run the kernel in Pallas' interpreter (any backend; for tests on the CPU).
    tile: the entries a program holds at once, a power of two (None: the row's length rounded up
      to one, at most `MAX_TILE`); a longer row is read in tiles once per round.
    num_warps: the Triton program's warps (None: by the tile, 4 to 16).

  Returns:
    (keys [..., k] largest first, positions [..., k]), both int32: `lax.top_k(keys, k)`.
  """
  length = keys.shape[-1]
  if keys.dtype != jnp.int32:
    raise TypeError(f"row_top_k takes int32 keys (top_k.order_keys); got {keys.dtype}.")
  if not 1 <= k <= length:
    raise ValueError(f"row_top_k needs 1 <= k <= {length} (the row length); got k={k}.")
  if tile is None:
    tile = min(_next_power_of_two(length), MAX_TILE)
  elif tile != _next_power_of_two(tile):
    raise ValueError(f"row_top_k's tile must be a power of two; got {tile}.")
  out_block = _next_power_of_two(k)
  if num_warps is None:
    num_warps = min(max(tile // 2048, 4), 16)
  kernel = functools.partial(_row_top_k_kernel, k=k, tile=tile, out_block=out_block)
  call = pl.pallas_call(
      kernel, grid=(),
      out_shape=(jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.int32)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret)
  top_keys, top_positions = jax.vmap(call)(keys.reshape(-1, length))
  return (top_keys.reshape(*keys.shape[:-1], k), top_positions.reshape(*keys.shape[:-1], k))
