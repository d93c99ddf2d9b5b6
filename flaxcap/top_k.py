"""Exact top-k for beam search, shaped for each backend: the same result, ties to the lower index.

`lax.top_k` is a kernel of its own everywhere, and the slow one in some places: XLA:CPU turns it into
a full sort inside a loop, and on a GPU XLA's TopK took half of a beam-5 step at batch 256. Here:

    top_k(values, k)                         # lax.top_k's result; on the CPU by k rounds of argmax
    top_k_by_rounds(values, k)               # the same by k rounds of argmax, on any backend
    top_k_by_rank(values, k)                 # the same by counting, for a few dozen entries
    top_k_by_kernel(values, k)               # the same in one Pallas kernel (top_k_kernel.py)
    top_k_by_kernel(values, k, segment=1024) # the kernel on each segment of a row, then a merge
    top_k_of_candidates(candidates, n)       # the n best of [batch, K, V] over K * V: flat, by chunks,
                                             # by rounds or by the kernel

Every method returns what `lax.top_k` returns (values best first; -inf entries too; NaN as largest).
"""

import functools
import importlib

import jax
from jax import lax
import jax.numpy as jnp


def top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis (values best first, ties to the lower index); on the CPU by k
  rounds of argmax.

  XLA:CPU turns a top_k inside a loop into a full sort: 20 steps of top-10 over [32, 13000] took
  2.5 s inside a `lax.scan` and 51 ms outside it, which made the sort most of a beam search's time
  there. k passes of argmax over an order-preserving integer view of the floats are exact, match
  `lax.top_k`'s order (NaN counts as largest, -inf entries are still returned, each index once),
  and cost little for the small k of beam search. Other backends use `lax.top_k`, or for up to
  `MAX_RANKED` entries rank them by counting (`top_k_by_rank`; the same result). On the CPU the
  ranking made a beam-3 search of the shipped model ~1 ms slower (of ~39 ms), so it stays off there.
  """
  if jax.default_backend() != "cpu":
    if values.shape[-1] <= MAX_RANKED:
      return top_k_by_rank(values, k)
    return lax.top_k(values, k)
  return top_k_by_rounds(values, k)


def top_k_by_rounds(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis by k rounds of argmax (`top_k`'s method on the CPU).

  Each round is one reduction over the values (XLA fuses the masking of the earlier rounds' picks
  into it), so on a GPU it is k reduction kernels instead of XLA's TopK kernel.
  """
  keys = order_keys(values)  # same order as the floats
  taken = jnp.iinfo(jnp.int32).min  # below every float's key, -inf included
  positions = lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
  indices = []
  for _ in range(k):
    index = jnp.argmax(keys, axis=-1).astype(jnp.int32)
    indices.append(index)
    keys = jnp.where(positions == index[..., None], taken, keys)
  indices = jnp.stack(indices, axis=-1)
  return jnp.take_along_axis(values, indices, axis=-1), indices


# Up to this many entries, `top_k` ranks them by counting off the CPU (`top_k_by_rank`).
MAX_RANKED = 64


def order_keys(values: jax.Array) -> jax.Array:
  """int32 keys in the order of the float32 values (a total order: -0 < +0, NaN at the ends)."""
  bits = lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def values_of_keys(keys: jax.Array) -> jax.Array:
  """The float32 values of `order_keys` (its inverse)."""
  bits = jnp.where(keys < 0, keys ^ jnp.int32(0x7FFFFFFF), keys)
  return lax.bitcast_convert_type(bits, jnp.float32)


# The Triton warps of `top_k_by_kernel`'s programs; None: `top_k_kernel.row_top_k`'s choice (8 for
# rows of more than 8,192 entries). Read while tracing.
KERNEL_NUM_WARPS: int | None = None


# The row length `top_k_of_candidates`' "kernel_segments" cuts the candidates into (`MAX_CHUNKED_BATCH`
# gives the measurements).
KERNEL_SEGMENT = 1024
# Whether the kernel's programs read their segments of the float32 candidates in place (session 25),
# or a pass before it writes the rows' keys padded to whole segments (as measured on the GPU: on an
# H100 that pass took 6.6 us of a ~250 us beam step at batch 256). The same result. Read while tracing.
KERNEL_READS_VALUES = True


def top_k_by_kernel(values: jax.Array, k: int, segment: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis (values as float32) by `top_k_kernel.row_top_k` over their
  `order_keys`: one Pallas program per row; interpreted off the GPU (Triton is GPU only).

  `segment`: each row is cut into segments of this many entries (the last shorter), the kernel takes
  the k best of every segment, one program each, and `rank_top_k` merges those, ties by position.
  Its programs read the floats in place (`KERNEL_READS_VALUES`).
  One program per row reads a long row alone (at batch 256 of 13,000 candidates: 256 programs on 132
  SMs); segments spread a row over more programs for the price of a small second kernel.
  """
  # Imported here: Pallas' Triton API moving between jax versions must not keep the search from
  # importing (`kernel_available`: XLA's TopK then).
  from flaxcap import top_k_kernel  # pylint: disable=g-import-not-at-top
  row_top_k = functools.partial(top_k_kernel.row_top_k, num_warps=KERNEL_NUM_WARPS,
                                interpret=jax.default_backend() != "gpu")
  length = values.shape[-1]
  if segment is None or segment >= length:
    top_keys, indices = row_top_k(order_keys(values), k)
    return values_of_keys(top_keys), indices
  if KERNEL_READS_VALUES:  # each program reads its segment of the floats in place
    segment_keys, positions = segment_winners(values, k, segment)
    pick = rank_top_k(segment_keys, k, tie_order=positions)
    return values_of_keys(jnp.take_along_axis(segment_keys, pick, axis=-1)), \
        jnp.take_along_axis(positions, pick, axis=-1)
  keys = order_keys(values)
  segments = -(-length // segment)
  # Padding: the lowest key at positions past the row, so it ranks after every entry (k <= length).
  keys = jnp.pad(keys, [(0, 0)] * (keys.ndim - 1) + [(0, segments * segment - length)],
                 constant_values=jnp.iinfo(jnp.int32).min)
  keys = keys.reshape(*keys.shape[:-1], segments, segment)
  segment_keys, segment_positions = row_top_k(keys, min(k, segment))  # [..., segments, k]
  positions = segment_positions + segment * jnp.arange(segments, dtype=jnp.int32)[:, None]
  segment_keys = segment_keys.reshape(*segment_keys.shape[:-2], -1)
  positions = positions.reshape(segment_keys.shape)
  pick = rank_top_k(segment_keys, k, tie_order=positions)
  indices = jnp.take_along_axis(positions, pick, axis=-1)
  return jnp.take_along_axis(values, indices, axis=-1), indices


def segment_winners(values: jax.Array, k: int, segment: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """The k best of each segment of the last axis (`segment` entries, default `KERNEL_SEGMENT`; the
  last one shorter), by `top_k_kernel.row_top_k` reading the float32 values in place: (their
  `order_keys`, their positions), int32 [..., segments * k] each, segment by segment."""
  from flaxcap import top_k_kernel  # pylint: disable=g-import-not-at-top  (as top_k_by_kernel)
  segment_keys, positions = top_k_kernel.row_top_k(
      values.astype(jnp.float32), min(k, segment or KERNEL_SEGMENT),
      segment=segment or KERNEL_SEGMENT, num_warps=KERNEL_NUM_WARPS,
      interpret=jax.default_backend() != "gpu")  # [..., segments, k]
  segment_keys = segment_keys.reshape(*segment_keys.shape[:-2], -1)
  return segment_keys, positions.reshape(segment_keys.shape)


# Whether beam search's step takes its new live and finished sets from the candidates' segment
# winners in one kernel (`beam_select_kernel`) where it ranks the candidates by "kernel_segments":
# the same result. Read while tracing.
SELECT_BY_KERNEL = True


def selects_by_kernel(batch: int, length_penalty, eos_id) -> bool:
  """Whether a beam search step of `batch` images uses `beam_select_kernel` (`SELECT_BY_KERNEL`,
  "kernel_segments" reading the values in place, no length penalty, a static <eos> id)."""
  return (SELECT_BY_KERNEL and KERNEL_READS_VALUES
          and candidate_top_k_method(batch) == "kernel_segments"
          and isinstance(length_penalty, (int, float)) and length_penalty == 0
          and isinstance(eos_id, int))


def rank_top_k(keys: jax.Array, k: int, tie_order: jax.Array | None = None) -> jax.Array:
  """Indices [..., k] of the k largest int32 keys over the last axis (n entries), by counting.

  Entry i's rank is the number of entries that come before it: a larger key, or an equal key and a
  lower `tie_order` (distinct ints, same shape as keys; default: the position). The ranks are then a
  permutation, and rank r's index is read off a [..., k, n] one-hot: element-wise ops and sums over
  n^2 pairs, which XLA fuses into a kernel or two, where a top-k is a kernel of its own (a sort, or
  on a GPU XLA's TopK kernel, which took 45 us for 5 rows of 2,600 and 190 us for 256 rows of 13,000).
  """
  n = keys.shape[-1]
  position = jnp.arange(n, dtype=jnp.int32)
  if tie_order is None:
    earlier = position[None, :] < position[:, None]  # [i, j]: j before i
  else:
    earlier = tie_order[..., None, :] < tie_order[..., :, None]
  before = (keys[..., None, :] > keys[..., :, None]) | (
      (keys[..., None, :] == keys[..., :, None]) & earlier)
  rank = jnp.sum(before, axis=-1, dtype=jnp.int32)  # [..., n], a permutation of 0..n-1
  is_rank = rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, n]
  return jnp.sum(jnp.where(is_rank, position, 0), axis=-1, dtype=jnp.int32)


def top_k_by_rank(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over a short last axis by counting (`rank_top_k`): beam search's merges of 2K."""
  indices = rank_top_k(order_keys(values), k)
  return jnp.take_along_axis(values, indices, axis=-1), indices


# How beam search takes the 2K best of its K * V candidates (`top_k_of_candidates`): one of
# `CANDIDATE_METHODS`; None: by backend and batch (`candidate_top_k_method`).
CANDIDATE_TOP_K: str | None = None
CANDIDATE_METHODS = ("flat", "rounds", "chunks", "chunks_barrier", "kernel", "kernel_segments")

# On a GPU, batches of up to this many images take their candidates by chunks, larger ones by the
# kernel in segments; other accelerators take batches above it flat. Measured on an H200 (beam 5,
# vocab 2,600, bf16): at batch 1 a search took 1.50 ms by chunks, 3.40 ms flat, 1.66 ms by the kernel;
# at batch 256, 13.2 ms by chunks, 7.35 ms flat, 4.48 ms by the kernel on whole rows, and with the
# early stop ("while", 12 steps) 2.84 ms by the kernel on segments of 1,024 against 2.97 (2,048),
# 2.98 (whole rows) and 4.91 flat (bench/probe_gpu9.py, sessions 21-22). Batches in between were
# not measured; the crossover estimated from those two is near 50 images.
MAX_CHUNKED_BATCH = 16


@functools.cache
def kernel_available() -> bool:
  """Whether `top_k_kernel` imports here (Pallas' Triton API moves between jax versions)."""
  try:
    importlib.import_module("flaxcap.top_k_kernel")
  except ImportError:
    return False
  return True


def candidate_top_k_method(batch: int) -> str:
  """The method `top_k_of_candidates` uses for a batch of images by default."""
  if CANDIDATE_TOP_K is not None:
    return CANDIDATE_TOP_K
  backend = jax.default_backend()
  if backend == "cpu":
    return "flat"
  if batch <= MAX_CHUNKED_BATCH:
    return "chunks"
  return "kernel_segments" if backend == "gpu" and kernel_available() else "flat"


def chunk_size(k: int, vocab: int, n: int) -> int:
  """The chunk length for `top_k_by_chunks`: fewest pairs to rank, C^2 + (n * size)^2 for the
  C = K * ceil(V / size) chunk maxima and the n * size entries of the chosen chunks."""
  sizes = range(2, max(vocab // 2, 2) + 1)
  return min(sizes, key=lambda size: (k * -(-vocab // size)) ** 2 + (n * size) ** 2)


def top_k_by_chunks(candidates: jax.Array, n: int, barrier: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
  """`top_k_of_candidates` from the maxima of short chunks of each beam's row (exact, ties too).

  Each row of V is cut into chunks of `size` (the last one padded with -inf); the n chunks with the
  largest maxima (ties to the lower chunk) hold the n best entries: every chunk ranked before the
  chunk of one of them has a maximum that comes before that entry, so fewer than n chunks do. The n
  best of those n * size entries, ties to the lower flat index, are then the result. That is one
  pass over the candidates (the maxima) and two rankings of a few hundred entries each, instead of a
  top-k over all K * V (on a GPU the slowest kernel of a step). The padding entries rank after every
  real entry; only a row of negative NaNs could bring one into the result (they are never returned:
  the index is clipped).

  `barrier`: the chosen chunks' entries, positions and tie order [batch, n * size] are written out
  (`lax.optimization_barrier`) before the final ranking, so that XLA cannot fuse their gathers into
  the ranking's n^2 pairs (on an H200 at batch 256, without it, one ranking fusion took ~400 us a
  step). The same result.
  """
  batch, k, vocab = candidates.shape
  size = chunk_size(k, vocab, n)
  chunks = -(-vocab // size)  # per beam row
  keys = order_keys(candidates)
  if chunks * size > vocab:
    keys = jnp.pad(keys, ((0, 0), (0, 0), (0, chunks * size - vocab)),
                   constant_values=order_keys(jnp.float32(-jnp.inf)))
  keys = keys.reshape(batch, k * chunks, size)
  chosen = rank_top_k(jnp.max(keys, axis=-1), n)  # [batch, n] chunk ids
  entries = jnp.take_along_axis(keys, chosen[:, :, None], axis=1).reshape(batch, n * size)
  tokens = (chosen % chunks)[:, :, None] * size + jnp.arange(size, dtype=jnp.int32)  # [batch, n, size]
  flat_index = ((chosen // chunks)[:, :, None] * vocab + tokens).reshape(batch, n * size)
  padded_index = (chosen[:, :, None] * size + jnp.arange(size, dtype=jnp.int32)).reshape(batch, -1)
  tie_order = jnp.where((tokens < vocab).reshape(batch, -1), flat_index, k * vocab + padded_index)
  if barrier:
    entries, flat_index, tie_order = lax.optimization_barrier((entries, flat_index, tie_order))
  pick = rank_top_k(entries, n, tie_order)
  index = jnp.minimum(jnp.take_along_axis(flat_index, pick, axis=1), k * vocab - 1)
  return jnp.take_along_axis(candidates.reshape(batch, k * vocab), index, axis=1), index


def top_k_of_candidates(candidates: jax.Array, n: int, method: str | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """The n best of candidates [batch, K, V] over the flattened K * V axis, exactly as
  `top_k(candidates.reshape(batch, K * V), n)`: (values [batch, n], flat indices slot * V + token).

  `method` (None: `candidate_top_k_method`), one of `CANDIDATE_METHODS`: "flat", `top_k` over the
  K * V candidates of each image; "rounds", `top_k_by_rounds` over them (on every backend);
  "chunks", `top_k_by_chunks`; "chunks_barrier", the same with its `barrier`; "kernel",
  `top_k_by_kernel` over them (interpreted, so slow, off the GPU); "kernel_segments", the same in
  segments of `KERNEL_SEGMENT`. All give the same result, ties included.
  """
  batch, k, vocab = candidates.shape
  method = method or candidate_top_k_method(batch)
  if method not in CANDIDATE_METHODS:
    raise ValueError(f"unknown top-k method {method!r}; use one of {', '.join(CANDIDATE_METHODS)}.")
  if method.startswith("chunks") and vocab >= 4:
    return top_k_by_chunks(candidates, n, barrier=method == "chunks_barrier")
  flat = candidates.reshape(batch, k * vocab)
  if method.startswith("kernel"):
    return top_k_by_kernel(flat, n, segment=KERNEL_SEGMENT if method == "kernel_segments" else None)
  return top_k_by_rounds(flat, n) if method == "rounds" else top_k(flat, n)
