"""Tests of flaxcap/beam_select_kernel.py: a beam step's bookkeeping in one Pallas kernel (interpreted
off the GPU, compiled on one) against `beam_search.select` on the same candidates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpu_export
from flaxcap import beam_search as bs
from flaxcap import beam_select_kernel
from flaxcap import top_k

EOS = 2


def _case(seed, batch, beam, vocab):
  """Candidates [batch, K * V] with ties, -inf and -0.0 among them, <eos> often among the best; a
  finished set with -inf slots and scores equal to some candidates'."""
  rng = np.random.default_rng(seed)
  candidates = rng.integers(-40, 1, size=(batch, beam * vocab)).astype(np.float32) / 8
  candidates[:, 0] = -0.0
  candidates[rng.random(candidates.shape) < 0.1] = -np.inf
  # <eos> of every beam among the best: some in the top K (they may finish), some in the next K
  # (they may not, and may not live on either).
  candidates[:, EOS::vocab] = rng.choice([0.0, -0.125, -0.25], size=(batch, beam))
  done_scores = rng.integers(-8, 1, size=(batch, beam)).astype(np.float32) / 4
  done_scores[rng.random(done_scores.shape) < 0.4] = -np.inf
  done_steps = rng.integers(0, 20, size=(batch, beam)).astype(np.int32)
  done_slots = rng.integers(0, beam, size=(batch, beam)).astype(np.int32)
  return (jnp.asarray(candidates), jnp.asarray(done_scores), jnp.asarray(done_steps),
          jnp.asarray(done_slots))


def _bits(x):
  x = np.asarray(x)
  return x.view(np.int32) if x.dtype == np.float32 else x


@pytest.mark.parametrize("batch,beam,vocab,segment", [(3, 5, 37, 16), (2, 3, 11, 8), (1, 1, 5, 4)])
def test_the_kernel_selects_what_beam_search_does(batch, beam, vocab, segment):
  """Live and finished sets equal `beam_search.select`'s bit for bit (ties, -inf and -0.0 included),
  from each segment's 2K best (several segments, the last one short)."""
  ended_late = False
  for seed in range(3):
    candidates, done_scores, done_steps, done_slots = _case(seed, batch, beam, vocab)
    step = jnp.int32(7 + seed)
    top_scores, top_index = top_k.top_k(candidates, 2 * beam)
    expected = bs.select(top_scores, top_index, done_scores, done_steps, done_slots, step,
                         vocab=vocab, eos_id=EOS)
    keys, positions = top_k.segment_winners(candidates, 2 * beam, segment)
    assert keys.shape[-1] > 2 * beam  # more than one segment's winners to merge
    result = beam_select_kernel.select_step(keys, positions, done_scores, done_steps, done_slots,
                                            step, vocab=vocab, eos_id=EOS,
                                            interpret=jax.default_backend() != "gpu")
    for name, got, want in zip(["live_scores", "tokens", "parents", "done_scores", "done_steps",
                                "done_slots"], result, expected):
      np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)
    assert np.any(np.asarray(expected[3]) != np.asarray(done_scores))  # something finished
    ends = np.asarray(top_index) % vocab == EOS
    ended_late |= bool(np.any(ends[:, beam:]))
  assert ended_late or beam == 1  # an <eos> ranked K..2K-1 somewhere


def test_the_kernel_needs_2k_candidates():
  with pytest.raises(ValueError, match="at least 2K"):
    beam_select_kernel.select_step(jnp.zeros((1, 5), jnp.int32), jnp.arange(5)[None],
                                   jnp.zeros((1, 3)), jnp.zeros((1, 3), jnp.int32),
                                   jnp.zeros((1, 3), jnp.int32), 0, vocab=4, eos_id=EOS,
                                   interpret=True)


def test_the_kernel_lowers_to_one_triton_kernel_for_a_gpu():
  """Batch 256, beam 5, the segment winners of 13 segments: one Triton kernel, the finished set
  written in place (its three buffers aliased to outputs)."""
  shapes = (jax.ShapeDtypeStruct((256, 130), jnp.int32), jax.ShapeDtypeStruct((256, 130), jnp.int32),
            jax.ShapeDtypeStruct((256, 5), jnp.float32), jax.ShapeDtypeStruct((256, 5), jnp.int32),
            jax.ShapeDtypeStruct((256, 5), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
  text = gpu_export.export_for_cuda(
      jax.jit(lambda *args: beam_select_kernel.select_step(*args, vocab=2600, eos_id=EOS)), *shapes)
  gpu_export.assert_one_triton_kernel(text, "grid_x = 256 : i32")
  assert "output_operand_alias" in text
