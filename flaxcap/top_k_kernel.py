"""The k largest int32 keys of each row in one GPU kernel (Pallas, Triton): beam search's candidates.

XLA's TopK kernel took half of a beam-5 step at batch 256 on an H200 (187 us of ~365 us, over 256
rows of 13,000 candidates); at batch 1 the searches are launch-bound and every method in
`flaxcap.top_k` is several kernels. Here one program per row keeps the row in registers and takes k
rounds of "the largest key ordered after the last pick" (larger keys first, equal keys by
position): a maximum and a minimum over the row each round, no rewriting of the row, no sort, no
second kernel. Rows longer than `MAX_TILE` are read in tiles each round. Floats are ranked by
keys of the same order (`top_k.order_keys`), so that the result is `lax.top_k`'s; given float32
values, the kernel makes those keys as it reads them.

    keys, positions = row_top_k(keys, k)            # int32 [..., n] -> [..., k] each; Triton on a GPU
    row_top_k(values, k, segment=1024)              # float32 [..., n] -> [..., segments, k]: each
                                                    # segment's k best, a program each, read in place
    row_top_k(keys, k, interpret=True)              # the same kernel, interpreted (CPU tests)
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from flaxcap import top_k

# The most entries a program holds at once (a power of two: Triton's blocks are); a longer row is
# read in tiles of this many, once per round.
MAX_TILE = 16384

_INT32_MIN = jnp.iinfo(jnp.int32).min
_INT32_MAX = jnp.iinfo(jnp.int32).max


def best_after(keys, positions, last_key, last_position):
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
                      out_block: int, segment: int | None):
  """One row, or one segment of it (`segment` entries from program_id(0) * segment): keys_ref [n]
  (int32 keys, or float32 values turned into `top_k.order_keys` as they are read) -> top_keys_ref
  [k] or [segments, k], top_positions_ref the same (int32; positions in the row)."""
  length = keys_ref.shape[-1]
  first = 0 if segment is None else pl.program_id(0) * segment
  end = length if segment is None else jnp.minimum(first + segment, length)
  num_tiles = -(-(length if segment is None else segment) // tile)
  offsets = jnp.arange(tile, dtype=jnp.int32)
  from_values = keys_ref.dtype == jnp.float32

  def load_tile(start):
    positions = first + start + offsets
    inside = positions < end
    # Padding ranks after every entry (key INT32_MIN, position past the row or segment): never
    # picked ahead of one, k <= its entries.
    keys = plgpu.load(keys_ref.at[pl.ds(first + start, tile)], mask=inside,
                      other=0.0 if from_values else _INT32_MIN)
    if from_values:
      keys = jnp.where(inside, top_k.order_keys(keys), _INT32_MIN)
    return keys, positions

  whole_row = load_tile(0) if num_tiles == 1 else None  # kept in registers for every round
  slots = jnp.arange(out_block, dtype=jnp.int32)

  def round_(slot, carry):
    top_keys, top_positions, last_key, last_position = carry
    if whole_row is not None:
      best = best_after(*whole_row, last_key, last_position)
    else:
      best = lax.fori_loop(
          0, num_tiles,
          lambda t, best: _later(best, best_after(*load_tile(t * tile), last_key, last_position)),
          (jnp.int32(_INT32_MIN), jnp.int32(_INT32_MAX)))
    top_keys = jnp.where(slots == slot, best[0], top_keys)
    top_positions = jnp.where(slots == slot, best[1], top_positions)
    return top_keys, top_positions, best[0], best[1]

  top_keys, top_positions, _, _ = lax.fori_loop(
      0, k, round_, (jnp.zeros(out_block, jnp.int32), jnp.zeros(out_block, jnp.int32),
                     jnp.int32(_INT32_MAX), jnp.int32(-1)))
  wanted = slots < k
  if segment is None:
    plgpu.store(top_keys_ref.at[pl.ds(0, out_block)], top_keys, mask=wanted)
    plgpu.store(top_positions_ref.at[pl.ds(0, out_block)], top_positions, mask=wanted)
  else:
    row = pl.ds(pl.program_id(0), 1)
    plgpu.store(top_keys_ref.at[row, pl.ds(0, out_block)], top_keys[None, :], mask=wanted[None, :])
    plgpu.store(top_positions_ref.at[row, pl.ds(0, out_block)], top_positions[None, :],
                mask=wanted[None, :])


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("k", "interpret", "tile", "num_warps", "segment"))
def row_top_k(keys: jax.Array, k: int, *, interpret: bool = False, tile: int | None = None,
              num_warps: int | None = None, segment: int | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """The k largest keys of each row, ties to the lower position, by one Pallas program per row.

  Args:
    keys: int32 [..., n], or float32 values, ranked by their `top_k.order_keys` (computed as the kernel
      reads them: no pass over the row to make keys first).
    k: 1 <= k <= n (with `segment`, k <= segment).
    interpret: run the kernel in Pallas' interpreter (any backend; for tests on the CPU).
    tile: the entries a program holds at once, a power of two (None: the row's length rounded up
      to one, at most `MAX_TILE`); a longer row is read in tiles once per round.
    num_warps: the Triton program's warps (None: by the tile, 4 to 16).
    segment: None, or the k best of each segment of this many entries of a row (the last one
      shorter), one program each, read in place.

  Returns:
    (keys [..., k] largest first, positions [..., k]), both int32: `lax.top_k(keys, k)` (of the
    keys). With `segment`, [..., segments, k] each: every segment's k best, positions in the row;
    a segment of fewer than k entries fills its last places with key INT32_MIN at positions past
    it, which rank after every entry.
  """
  length = keys.shape[-1]
  if keys.dtype not in (jnp.int32, jnp.float32):
    raise TypeError(f"row_top_k takes int32 keys or float32 values; got {keys.dtype}.")
  span = length if segment is None else segment
  if not 1 <= k <= min(span, length):
    raise ValueError(f"row_top_k needs 1 <= k <= {min(span, length)} (the row or segment length); "
                     f"got k={k}.")
  if tile is None:
    tile = min(_next_power_of_two(span), MAX_TILE)
  elif tile != _next_power_of_two(tile):
    raise ValueError(f"row_top_k's tile must be a power of two; got {tile}.")
  out_block = _next_power_of_two(k)
  if num_warps is None:
    num_warps = min(max(tile // 2048, 4), 16)
  kernel = functools.partial(_row_top_k_kernel, k=k, tile=tile, out_block=out_block,
                             segment=segment)
  out = (k,) if segment is None else (-(-length // segment), k)
  call = pl.pallas_call(
      kernel, grid=() if segment is None else out[:1],
      out_shape=(jax.ShapeDtypeStruct(out, jnp.int32), jax.ShapeDtypeStruct(out, jnp.int32)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret)
  top_keys, top_positions = jax.vmap(call)(keys.reshape(-1, length))
  return (top_keys.reshape(*keys.shape[:-1], *out), top_positions.reshape(*keys.shape[:-1], *out))
