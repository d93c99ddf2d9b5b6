"""flaxcap/top_k_kernel.py: the Pallas kernel (interpreted on the CPU) gives lax.top_k's keys and
positions: ties, the extreme keys, rows in tiles, batch axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpu_export
from flaxcap import top_k as top_k_lib
from flaxcap import top_k_kernel

INT32 = np.iinfo(np.int32)


def _reference(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Independent of lax: a stable sort, largest first, ties to the lower position."""
  order = np.argsort(-keys.astype(np.int64), axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(keys, order, axis=-1), order


@pytest.mark.parametrize("tile", [None, 16])  # the whole row in registers, or 4 tiles of 16 per round
def test_row_top_k_matches_a_stable_sort_with_ties_and_extreme_keys(tile):
  rng = np.random.default_rng(5)
  keys = rng.integers(-4, 4, size=(2, 3, 50)).astype(np.int32)  # many ties
  keys[0, 0, [3, 40]] = INT32.max
  keys[0, 1, :] = INT32.min  # the padding's key too: the row's own entries still come first
  keys[1, 2, 49] = INT32.max  # in the last, partial tile
  keys[1, 0] = rng.integers(INT32.min, INT32.max, size=50, dtype=np.int32)
  for k in (1, 7, 50):
    top_keys, positions = top_k_kernel.row_top_k(jnp.asarray(keys), k, interpret=True, tile=tile)
    ref_keys, ref_positions = _reference(keys, k)
    assert top_keys.shape == positions.shape == (2, 3, k)
    assert top_keys.dtype == positions.dtype == jnp.int32
    np.testing.assert_array_equal(positions, ref_positions, err_msg=f"k={k}")
    np.testing.assert_array_equal(top_keys, ref_keys, err_msg=f"k={k}")
    np.testing.assert_array_equal((top_keys, positions), jax.lax.top_k(jnp.asarray(keys), k))


@pytest.mark.parametrize("segment", [8, 16, 64])  # 7 segments, the last of 2; 4, the last 2; one
def test_row_top_k_on_segments_of_float_values_matches_each_segments_sort(segment):
  """Float32 values, read in place by one program per segment: each segment's k best by the
  values' order (ties, infinities, -0 < +0), positions in the row; a segment shorter than k ends
  with INT32_MIN keys at positions past it."""
  rng = np.random.default_rng(9)
  values = (rng.integers(-3, 4, size=(3, 50)) / 2).astype(np.float32)  # many ties
  values[0, ::5] = -np.inf
  values[1, 49] = np.inf  # the last segment's last entry
  values[2, :4] = [0.0, -0.0, -1e-30, 1e-30]
  keys = np.asarray(top_k_lib.order_keys(jnp.asarray(values)))
  for k in (1, 3, min(segment, 7)):
    top_keys, positions = top_k_kernel.row_top_k(jnp.asarray(values), k, interpret=True,
                                                 segment=segment)
    segments = -(-50 // segment)
    assert top_keys.shape == positions.shape == (3, segments, k)
    for index in range(segments):
      start = index * segment
      part = keys[:, start:start + segment]
      taken = min(k, part.shape[1])
      ref_keys, ref_positions = _reference(part, taken)
      np.testing.assert_array_equal(top_keys[:, index, :taken], ref_keys, err_msg=f"k={k}")
      np.testing.assert_array_equal(positions[:, index, :taken], ref_positions + start)
      assert np.all(top_keys[:, index, taken:] == INT32.min)
      assert np.all(positions[:, index, taken:] >= start + part.shape[1])


def test_row_top_k_rejects_other_dtypes_k_out_of_range_and_odd_tiles():
  with pytest.raises(TypeError, match="int32 keys or float32 values"):
    top_k_kernel.row_top_k(jnp.zeros((2, 8), jnp.float16), 3, interpret=True)
  with pytest.raises(ValueError, match="1 <= k <= 8"):
    top_k_kernel.row_top_k(jnp.zeros((2, 8), jnp.int32), 9, interpret=True)
  with pytest.raises(ValueError, match="1 <= k <= 4"):
    top_k_kernel.row_top_k(jnp.zeros((2, 8), jnp.int32), 5, interpret=True, segment=4)
  with pytest.raises(ValueError, match="power of two"):
    top_k_kernel.row_top_k(jnp.zeros((2, 8), jnp.int32), 3, interpret=True, tile=6)


@pytest.mark.parametrize("length, k, num_warps, expected_warps", [
    (13_000, 10, None, 8),  # beam 5 x vocab 2,600: one tile of 16,384
    (13_000, 10, 16, 16),
    (40_000, 7, None, 8),  # 3 tiles
    (700, 6, None, 4)])
def test_row_top_k_lowers_to_one_triton_kernel_without_a_gpu(length, k, num_warps, expected_warps):
  """Pallas' Triton lowering runs at export time for a "cuda" target, on any machine: it catches
  what Triton would refuse (blocks that are not powers of two, unsupported operations) before a GPU
  does. Compiling the Triton IR to PTX still needs one (bench/triton_compile.py, with triton)."""
  module = gpu_export.export_for_cuda(
      jax.jit(lambda keys: top_k_kernel.row_top_k(keys, k, num_warps=num_warps)),
      jax.ShapeDtypeStruct((256, length), jnp.int32))
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
  assert "grid_x = 256" in module
  assert f"num_warps = {expected_warps} : i32" in module


def test_row_top_k_on_segments_of_floats_lowers_to_one_triton_kernel_without_a_gpu():
  """Beam 5 x vocab 2,600 at batch 256 in segments of 1,024, read as floats: one Triton call whose
  grid is a row's 13 segments by the 256 rows."""
  module = gpu_export.export_for_cuda(
      jax.jit(lambda values: top_k_kernel.row_top_k(values, 10, segment=1024)),
      jax.ShapeDtypeStruct((256, 13_000), jnp.float32))
  assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
  assert "grid_x = 13" in module and "grid_y = 256" in module
