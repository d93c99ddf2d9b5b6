"""Tests of flaxcap/decoding.py: the decoder's step driven by beam_search, context projected or not."""

import functools
import math
import re

import einops
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

import gpu_export
from flaxcap import beam_search as bs
from flaxcap import decoding
from flaxcap import top_k as top_k_lib
from flaxcap import vocab as vocab_lib
from flaxcap.decoder import Decoder

BATCH, GRID_H, GRID_W, CHANNELS, VOCAB = 2, 2, 3, 8, 23  # P = 6 grid locations


def _plain_search(decoder, params, features, *, beam_size, max_len):
  """The reference: beam_search over Decoder.step with the grid encoded the plain way."""
  variables = {"params": params}
  encoded = decoder.apply(variables, features, method=Decoder.encode)
  assert encoded.context_projections is None
  carry = decoder.apply(variables, encoded, method=Decoder.initial_carry)

  def step_fn(flat_carry, flat_tokens):
    beams = functools.partial(einops.rearrange, pattern="(b k) ... -> b k ...", b=BATCH)
    flat = functools.partial(einops.rearrange, pattern="b k ... -> (b k) ...")
    logits, new_carry, attention = decoder.apply(
        variables, encoded, jax.tree.map(beams, flat_carry), beams(flat_tokens), method=Decoder.step)
    return jax.nn.log_softmax(flat(logits)), jax.tree.map(flat, new_carry), flat(attention)

  return bs.beam_search(step_fn, carry, beam_size=beam_size, max_len=max_len, bos_id=vocab_lib.BOS,
                        eos_id=vocab_lib.EOS)


def _init(decoder, seed, features, tokens):
  """The decoder's parameters, initialized in one compiled program (op by op, each shape compiles)."""
  init = jax.jit(functools.partial(decoder.init, deterministic=True))
  return init(jax.random.key(seed), features, tokens)["params"]


@pytest.mark.parametrize("beam_size,max_len", [(3, 5), (2, 3)])  # beam x steps > P = 6, then < P
def test_search_equals_plain_beam_search(beam_size, max_len):
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0)
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  tokens = jnp.zeros((BATCH, max_len), jnp.int32)
  params = _init(decoder, 0, features, tokens)
  params = jax.tree.map(lambda x: 3.0 * x, params)  # sharper distributions: no near-ties
  result = jax.jit(functools.partial(decoding.search, decoder, beam_size=beam_size, max_len=max_len))(
      params, features)
  reference = jax.jit(functools.partial(_plain_search, decoder, beam_size=beam_size, max_len=max_len))(
      params, features)
  np.testing.assert_array_equal(result.tokens, reference.tokens)
  np.testing.assert_array_equal(result.lengths, reference.lengths)
  np.testing.assert_allclose(result.scores, reference.scores, rtol=1e-5)
  np.testing.assert_allclose(result.aux, reference.aux, atol=1e-5)
  assert len(set(map(tuple, np.asarray(result.tokens)[:, 0]))) > 1  # not a degenerate model


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_a_bfloat16_search_keeps_h_in_bfloat16_with_the_plain_searchs_results(monkeypatch, backend):
  """`decoding.search` carries h in the compute dtype (every use of h casts it to that dtype
  first) and converts w_a once outside its loop: the plain search, whose carry keeps h in float32
  and whose steps convert w_a, finds the same captions and scores. "gpu": the GPU's paths (the
  attention's sum, the merges by counting), traced as on a GPU and run here."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0,
                    dtype=jnp.bfloat16)
  rng = np.random.default_rng(6)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  params = _init(decoder, 1, features, jnp.zeros((BATCH, 3), jnp.int32))
  params = jax.tree.map(lambda x: 3.0 * x, params)
  step_fn, carry = decoding._step_fn(decoder, params, features, steps_per_image=6)
  assert carry.h.dtype == jnp.bfloat16 and carry.c.dtype == jnp.float32
  assert step_fn(carry, jnp.full((BATCH,), vocab_lib.BOS))[1].h.dtype == jnp.bfloat16
  search = functools.partial(decoding.search, decoder, beam_size=2, max_len=3)  # 2 x 3 = P: plain
  result = jax.jit(search)(params, features)
  reference = jax.jit(functools.partial(_plain_search, decoder, beam_size=2, max_len=3))(
      params, features)
  np.testing.assert_array_equal(result.tokens, reference.tokens)
  np.testing.assert_allclose(result.scores, reference.scores, rtol=1e-6)
  np.testing.assert_allclose(result.aux, reference.aux, atol=1e-6)


def test_score_weights_computed_outside_the_loop_give_the_steps_scores(monkeypatch):
  """A bfloat16 step's attention sum (the GPU's: `layers.AttentionScore(by_sum=True)`) with w_a
  converted once outside the loop (`Encoded.score_weights`, as `decoding` passes it) gives the
  step's own logits and attention; w_a not rounded to bfloat16 first would not."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the step sums (traced, run here)
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0,
                    dtype=jnp.bfloat16)
  rng = np.random.default_rng(7)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  params = _init(decoder, 2, features, jnp.zeros((BATCH, 3), jnp.int32))
  variables = {"params": params}
  encoded = decoder.apply(variables, features, method=Decoder.encode)
  carry = decoder.apply(variables, encoded, 3, method=Decoder.initial_carry)
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, 3)), jnp.int32)
  step = jax.jit(lambda e: decoder.apply(variables, e, carry, tokens, method=Decoder.step))
  kernel = params["attention_score"]["kernel"][:, 0]
  logits, _, attention = step(encoded)
  hoisted_logits, _, hoisted_attention = step(
      encoded._replace(score_weights=kernel.astype(jnp.bfloat16).astype(jnp.float32)))
  np.testing.assert_allclose(hoisted_logits, logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(hoisted_attention, attention, rtol=1e-6, atol=1e-7)
  _, _, unrounded_attention = step(encoded._replace(score_weights=kernel))
  assert np.max(np.abs(unrounded_attention - attention)) > 1e-5


def test_project_context_can_be_forced_either_way():
  """`project_context` overrides the choice by shape (beam 2 x 3 steps < P = 6 would not project);
  the search is the same up to rounding."""
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0)
  rng = np.random.default_rng(6)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  params = _init(decoder, 1, features, jnp.zeros((BATCH, 4), jnp.int32))
  results = [jax.jit(functools.partial(decoding.search, decoder, beam_size=2, max_len=3,
                                       project_context=project))(params, features)
             for project in (None, True, False)]
  for result in results[1:]:
    np.testing.assert_array_equal(result.tokens, results[0].tokens)
    np.testing.assert_allclose(result.scores, results[0].scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.aux, results[0].aux, atol=1e-5)


def test_word_gate_table_gives_the_same_search():
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0)
  rng = np.random.default_rng(6)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  params = _init(decoder, 1, features, jnp.zeros((BATCH, 4), jnp.int32))
  params = jax.tree.map(lambda x: 3.0 * x, params)  # sharper distributions: no near-ties
  table = decoder.apply({"params": params}, method=Decoder.word_gate_table)
  search = jax.jit(functools.partial(decoding.search, decoder, beam_size=3, max_len=8))
  plain, looked_up = search(params, features), search(params, features, word_gate_table=table)
  np.testing.assert_array_equal(looked_up.tokens, plain.tokens)
  np.testing.assert_array_equal(looked_up.lengths, plain.lengths)
  np.testing.assert_allclose(looked_up.scores, plain.scores, rtol=1e-5)
  np.testing.assert_allclose(looked_up.aux, plain.aux, atol=1e-5)


def _loop_primitives(jaxpr, inside=False):
  """{primitive name: (count outside loops, count inside)} over a jaxpr and its sub-jaxprs."""
  counts = {}
  for eqn in jaxpr.eqns:
    outside, within = counts.get(eqn.primitive.name, (0, 0))
    counts[eqn.primitive.name] = (outside + (not inside), within + inside)
    for sub in jax_core.jaxprs_in_params(eqn.params):
      for name, (o, w) in _loop_primitives(sub, inside or eqn.primitive.name in ("while", "scan")
                                           ).items():
        outside, within = counts.get(name, (0, 0))
        counts[name] = (outside + o, within + w)
  return counts


@pytest.mark.parametrize("early_stop", [False, "while"])
def test_padded_columns_pad_the_h_projection_once_outside_the_loop(early_stop):
  """pad_columns_to=8: the h projection's kernel (4H + A + 1 = 75 columns) padded once per search,
  not in every step (XLA keeps a pad inside a loop); the same search. (The step's other kernels
  have multiples of 8 columns here, as at the tutorial's sizes.)"""
  decoder = Decoder(vocab_size=24, embed_dim=16, hidden_dim=16, attention_dim=10, dropout_rate=0.0)
  padded = decoder.clone(pad_columns_to=8)
  rng = np.random.default_rng(6)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  params = _init(decoder, 1, features, jnp.zeros((BATCH, 4), jnp.int32))
  params = jax.tree.map(lambda x: 3.0 * x, params)  # sharper distributions: no near-ties
  searches = [functools.partial(decoding.search, d, beam_size=3, max_len=8, early_stop=early_stop)
              for d in (decoder, padded)]
  plain, with_padding = (jax.jit(search)(params, features) for search in searches)
  np.testing.assert_array_equal(with_padding.tokens, plain.tokens)
  np.testing.assert_allclose(with_padding.scores, plain.scores, rtol=1e-5)
  np.testing.assert_allclose(with_padding.aux, plain.aux, atol=1e-5)
  pads = _loop_primitives(jax.make_jaxpr(searches[1])(params, features).jaxpr)["pad"]
  assert pads[0] >= 1 and pads[1] == 0, pads  # (outside loops, inside)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_no_caption_ends_on_a_banned_word(beam_size):
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0)
  rng = np.random.default_rng(7)
  features = jnp.asarray(rng.normal(size=(8, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  params = _init(decoder, 1, features, jnp.zeros((8, 4), jnp.int32))
  params = jax.tree.map(lambda x: 3.0 * x, params)
  search = jax.jit(functools.partial(decoding.search, decoder, beam_size=beam_size, max_len=8))
  free = search(params, features)
  nothing_banned = search(params, features, eos_banned_after=jnp.zeros([VOCAB], bool))
  np.testing.assert_array_equal(nothing_banned.tokens, free.tokens)
  np.testing.assert_allclose(nothing_banned.scores, free.scores, rtol=1e-6)

  def last_words(result):
    tokens, lengths = np.asarray(result.tokens)[:, 0], np.asarray(result.lengths)[:, 0]
    ended = [row for row in range(len(tokens)) if tokens[row, lengths[row] - 1] == vocab_lib.EOS]
    return {row: tokens[row, lengths[row] - 2] for row in ended}, tokens

  free_endings, free_tokens = last_words(free)
  assert free_endings, "the random decoder should end some captions before max_len"
  banned = np.zeros([VOCAB], bool)
  banned[list(free_endings.values())] = True
  constrained = search(params, features, eos_banned_after=jnp.asarray(banned))
  endings, tokens = last_words(constrained)
  assert not any(banned[word] for word in endings.values()), endings
  assert not np.array_equal(tokens, free_tokens)


@pytest.mark.parametrize("method", ["kernel", "kernel_segments", None, "chunks", "flat"])
@pytest.mark.parametrize("early_stop", [None, "while"])
def test_the_gpu_code_paths_of_a_search_lower_for_a_gpu(monkeypatch, method, early_stop):
  """With jax.default_backend() saying "gpu", the branches the CPU never traces (the score as a
  sum, the merges by counting, the candidates' top-k by chunks or by the Pallas kernel, bf16
  matrices cast once) lower for a "cuda" target, each Pallas kernel one Triton call inside the loop."""
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0,
                    dtype=jnp.bfloat16)
  features = jax.ShapeDtypeStruct((BATCH, GRID_H, GRID_W, CHANNELS), jnp.float32)
  params = jax.eval_shape(functools.partial(decoder.init, deterministic=True), jax.random.key(0),
                          features, jax.ShapeDtypeStruct((BATCH, 4), jnp.int32))["params"]
  monkeypatch.setattr(top_k_lib, "CANDIDATE_TOP_K", method)  # None: the library's (chunks here)
  monkeypatch.setattr(top_k_lib, "KERNEL_SEGMENT", 32)  # 3 x 23 candidates: 3 segments
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  search = jax.jit(lambda p, f: decoding.search(decoder, p, f, beam_size=3, max_len=5,
                                                early_stop=early_stop))
  module = gpu_export.export_for_cuda(search, params, features)
  # "kernel_segments": the segments' top-k, then the new live and finished sets (beam_select_kernel).
  assert module.count("@__gpu$xla.gpu.triton") == {"kernel": 1, "kernel_segments": 2}.get(method, 0)


def test_context_projections_are_one_gemm_of_their_own_compiled_for_an_h100():
  """XLA's GPU compiler merged the context's products with feature_proj's (they share the grid) into
  one GEMM, then copied the context's columns out: a [batch, P, 4H + E] copy per search (43 us at
  batch 256 on an H100 in round 5). `encode` keeps them apart, so that GEMM writes the projections."""
  decoder = Decoder(vocab_size=VOCAB, embed_dim=128, hidden_dim=128, attention_dim=128,
                    dropout_rate=0.0, dtype=jnp.bfloat16)
  features = jax.ShapeDtypeStruct((16, 7, 7, 256), jnp.float32)
  params = jax.eval_shape(functools.partial(decoder.init, deterministic=True), jax.random.key(0),
                          features, jax.ShapeDtypeStruct((16, 4), jnp.int32))["params"]
  encode = jax.jit(lambda p, f: decoder.apply({"params": p}, f, True, method=Decoder.encode))
  text = gpu_export.compile_for_h100(encode, params, features)
  size = 16 * 49 * 640  # [batch, P, 4H + E]
  moved = [line.strip()[:120] for line in text.splitlines()
           if re.search(r"= bf16\[([\d,]*)\]\S* (concatenate|slice|copy|transpose)\(", line)
           and math.prod(map(int, re.search(r"bf16\[([\d,]*)\]", line).group(1).split(","))) == size]
  written = [line for line in text.splitlines() if re.search(r"= bf16\[(784,640|640,784)\]\S* dot\(", line)]
  assert written and not moved, moved


def test_the_gate_scales_the_context_product_s_weights_compiled_for_an_h100():
  """beta(h) scales the attention weights the context's product reads, not its result: compiled
  for an H100 at the probe's sizes (batch 256), XLA then computes beta inside the kernel that casts
  the weights, where it had been a kernel of its own ([batch, K, 1]) in every step."""
  decoder = Decoder(vocab_size=2600, embed_dim=512, hidden_dim=512, attention_dim=512,
                    dropout_rate=0.0, dtype=jnp.bfloat16)
  features = jax.ShapeDtypeStruct((256, 7, 7, 1280), jnp.float32)
  params = jax.eval_shape(functools.partial(decoder.init, deterministic=True), jax.random.key(0),
                          features, jax.ShapeDtypeStruct((256, 4), jnp.int32))["params"]
  search = jax.jit(lambda p, f: decoding.search(decoder, p, f, beam_size=5, max_len=4))
  text = gpu_export.compile_for_h100(search, params, features)
  assert "while(" in text
  gates = [line.strip()[:160] for line in text.splitlines()
           if re.search(r"= f32\[256,5,1\]\S* fusion\(", line)]
  assert not gates, gates


BATCH, GRID_H, GRID_W, CHANNELS, VOCAB = 4, 2, 3, 8, 23
MAX_LEN = 6


def _model(seed=3):
  decoder = Decoder(vocab_size=VOCAB, embed_dim=12, hidden_dim=16, attention_dim=10, dropout_rate=0.0)
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  init = jax.jit(functools.partial(decoder.init, deterministic=True))
  params = init(jax.random.key(seed), features, jnp.zeros((BATCH, 4), jnp.int32))["params"]
  params = jax.tree.map(lambda x: 3.0 * x, params)  # sharper distributions: no near-ties
  return decoder, params, features


def _replayed_log_probs(decoder, params, features, tokens, lengths):
  """float64 [batch, K]: sum of log P(token_t | tokens_<t) over each beam's first `length` tokens."""
  variables = {"params": params}
  beams = tokens.shape[1]
  encoded, carry = jax.jit(lambda f: (lambda e: (e, decoder.apply(
      variables, e, beams, method=Decoder.initial_carry)))(decoder.apply(
          variables, f, method=Decoder.encode)))(features)
  step = jax.jit(lambda carry, previous: decoder.apply(variables, encoded, carry, previous,
                                                         method=Decoder.step))
  previous = np.full(tokens.shape[:2], vocab_lib.BOS, np.int32)
  total = np.zeros(tokens.shape[:2])
  for t in range(tokens.shape[2]):
    logits, carry, _ = step(carry, jnp.asarray(previous))
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    chosen = np.take_along_axis(log_probs, tokens[:, :, t, None], axis=2)[..., 0]
    total += np.where(t < lengths, chosen, 0.0)
    previous = tokens[:, :, t]
  return total


def test_beam_scores_are_the_log_probability_over_the_gnmt_penalty():
  alpha = 1.0
  decoder, params, features = _model()
  result = jax.jit(functools.partial(decoding.search, decoder, beam_size=3, max_len=MAX_LEN,
                                     length_penalty=alpha))(params, features)
  tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
  assert len(set(lengths.reshape(-1))) > 1  # beams of several lengths: the penalty matters
  log_probs = _replayed_log_probs(decoder, params, features, tokens, lengths)
  expected = log_probs / ((5.0 + lengths) / 6.0) ** alpha
  np.testing.assert_allclose(np.asarray(result.scores), expected, rtol=1e-4, atol=1e-4)
  # Beams come best first by that score.
  assert (np.diff(np.asarray(result.scores), axis=1) <= 1e-6).all()


def test_greedy_scores_get_the_same_length_penalty():
  decoder, params, features = _model()
  result = jax.jit(functools.partial(decoding.search, decoder, beam_size=1, max_len=MAX_LEN,
                                     length_penalty=1.0))(params, features)
  tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
  log_probs = _replayed_log_probs(decoder, params, features, tokens, lengths)
  np.testing.assert_allclose(np.asarray(result.scores), log_probs / ((5.0 + lengths) / 6.0),
                             rtol=1e-4, atol=1e-4)


def test_sampling_at_a_tiny_temperature_is_greedy_search():
  # `decoding.sample(temperature=...)` reached no test (no caller passes it): dropping it from the
  # call to beam_search.sample left every test passing. Near temperature 0 every sample is the argmax.
  decoder, params, features = _model()
  greedy = jax.jit(functools.partial(decoding.search, decoder, beam_size=1, max_len=MAX_LEN))(
      params, features)
  samples = jax.jit(functools.partial(decoding.sample, decoder, num_samples=8, max_len=MAX_LEN,
                                      temperature=1e-3))(params, features, rng=jax.random.key(0))
  expected = np.repeat(np.asarray(greedy.tokens), 8, axis=1)
  np.testing.assert_array_equal(np.asarray(samples.tokens), expected)
  np.testing.assert_array_equal(np.asarray(samples.lengths), np.repeat(np.asarray(greedy.lengths), 8, 1))
