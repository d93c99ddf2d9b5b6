"""flaxcap/top_k.py: every top-k method gives lax.top_k's values and indices (ties, infinities)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import top_k as top_k_lib


@pytest.mark.parametrize("top_k", [top_k_lib.top_k, top_k_lib.top_k_by_rounds,  # argmax rounds
                                   top_k_lib.top_k_by_rank,  # counting
                                   top_k_lib.top_k_by_kernel,  # the Pallas kernel, interpreted
                                   # the kernel on segments, then a merge: k below and above one
                                   functools.partial(top_k_lib.top_k_by_kernel, segment=16),
                                   functools.partial(top_k_lib.top_k_by_kernel, segment=8)])
@pytest.mark.parametrize("width", [40, 100])
def test_top_k_matches_lax_top_k_with_ties_and_infinities(top_k, width):
  rng = np.random.default_rng(3)
  values = rng.integers(-3, 4, size=(5, width)).astype(np.float32) / 2  # many ties
  values[1, ::3] = -np.inf
  values[2] = -np.inf  # a row with nothing finite: every index still comes back once
  values[3, 7] = np.inf
  values[4] = rng.normal(size=width).astype(np.float32) * 1e-30  # tiny and negative zero-ish values
  values[4, :2] = [0.0, -0.0]
  for k in (1, 3, 12):
    scores, indices = jax.jit(top_k, static_argnums=1)(jnp.asarray(values), k)
    ref_scores, ref_indices = jax.lax.top_k(jnp.asarray(values), k)
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(indices, ref_indices)
    assert indices.dtype == jnp.int32
    # Independent reference: a stable sort, best first, ties to the lower index.
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices[:4], order[:4])


@pytest.mark.parametrize("method", top_k_lib.CANDIDATE_METHODS + ("kernel_segments_padded",))
def test_top_k_of_candidates_matches_lax_top_k_of_the_flat_candidates(method, monkeypatch):
  """Every way of taking the 2K best of [batch, K, V] gives lax.top_k's values and indices, ties
  (to the lower flat index) and infinities included, for vocabularies the chunks divide or not.
  "kernel_segments_padded": the segments' kernel reading keys padded by a pass before it
  (`KERNEL_READS_VALUES` off), not the floats in place."""
  monkeypatch.setattr(top_k_lib, "KERNEL_SEGMENT", 24)  # segments that divide some rows, not others
  if method == "kernel_segments_padded":
    monkeypatch.setattr(top_k_lib, "KERNEL_READS_VALUES", False)
    method = "kernel_segments"
  rng = np.random.default_rng(11)
  top_k = jax.jit(top_k_lib.top_k_of_candidates, static_argnums=(1, 2))
  for k, vocab in [(1, 2), (2, 3), (3, 7), (4, 50), (5, 97), (5, 260), (3, 1000)]:
    values = rng.integers(-3, 3, size=(4, k, vocab)).astype(np.float32) / 2  # many ties
    values[0, :, ::2] = -np.inf
    values[1] = -np.inf  # nothing finite: the lowest indices come back
    values[2, -1, -3:] = np.inf  # the last beam's last tokens (in the padded chunk, if any)
    values[3, 1:] = -np.inf  # the first step: only beam 0 is live
    n = 2 * k
    expected = jax.lax.top_k(jnp.asarray(values.reshape(4, k * vocab)), n)
    scores, indices = top_k(jnp.asarray(values), n, method)
    np.testing.assert_array_equal(indices, expected[1], err_msg=f"K={k} V={vocab}")
    np.testing.assert_array_equal(scores, expected[0], err_msg=f"K={k} V={vocab}")


def test_candidate_top_k_method_by_backend_and_batch(monkeypatch):
  assert top_k_lib.candidate_top_k_method(1) == "flat"  # these tests run on the CPU
  for backend, small, large in (("gpu", "chunks", "kernel_segments"), ("tpu", "chunks", "flat")):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert top_k_lib.candidate_top_k_method(top_k_lib.MAX_CHUNKED_BATCH) == small
    assert top_k_lib.candidate_top_k_method(top_k_lib.MAX_CHUNKED_BATCH + 1) == large
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(top_k_lib, "kernel_available", lambda: False)  # no Pallas Triton: XLA's TopK
  assert top_k_lib.candidate_top_k_method(256) == "flat"
  monkeypatch.setattr(top_k_lib, "CANDIDATE_TOP_K", "chunks")
  assert top_k_lib.candidate_top_k_method(256) == "chunks"
  with pytest.raises(ValueError, match="unknown top-k method"):
    top_k_lib.top_k_of_candidates(jnp.zeros((1, 2, 5)), 4, "sort")


def test_chunked_top_k_when_fewer_than_n_candidates_are_finite():
  """Beam search's first step with vocab < 2K: only beam 0 is finite, so the 2K best include -inf
  entries, and the padded chunk of a vocabulary the chunks do not divide comes into play."""
  rng = np.random.default_rng(0)
  for k, vocab in [(5, 7), (6, 11), (4, 9), (5, 13)]:
    values = np.full((2, k, vocab), -np.inf, np.float32)
    values[:, 0] = rng.normal(size=(2, vocab))
    values[1, 0, ::2] = -np.inf
    expected = jax.lax.top_k(jnp.asarray(values.reshape(2, -1)), 2 * k)
    for method in ("chunks", "chunks_barrier"):
      scores, indices = top_k_lib.top_k_of_candidates(jnp.asarray(values), 2 * k, method)
      np.testing.assert_array_equal(indices, expected[1], err_msg=f"{method} K={k} V={vocab}")
      np.testing.assert_array_equal(scores, expected[0])
