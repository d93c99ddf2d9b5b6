"""Tests for flaxcap.beam_search against plain-Python references on random Markov "models".

The model: for each batch row, a fixed random table of next-token log-probabilities conditioned on
the position and the previous token, log_probs[row, position, previous, next] (the position keeps
two captions that use the same transitions in another order from tying). Its state also carries a
running hash of every token fed so far, h_t = 0.5 h_{t-1} + embed[fed_t], returned as aux, so a
wrong beam ancestry (in the state gather or in the aux back-trace) shows up as a wrong aux."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import beam_search as bs
from flaxcap import top_k as top_k_lib

BOS, EOS = 1, 2
BATCH, VOCAB, MAX_LEN, HASH_DIM = 4, 7, 6, 3
SEEDS = (0, 1, 2)


# ----------------------------------------------------------------------------------------------
# The random Markov model, as JAX step functions (compiled once per static configuration).


def random_tables(seed, *, batch=BATCH, max_len=MAX_LEN, vocab=VOCAB, scale=1.5):
  """float32 log-probabilities [batch, max_len (position), vocab (previous), vocab (next)] and a
  hash embedding [vocab, HASH_DIM]."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, max_len, vocab, vocab)) * scale
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  embed = rng.normal(size=(vocab, HASH_DIM))
  return log_probs.astype(np.float32), embed.astype(np.float32)


def markov_step_fn(table, embed):

  def step_fn(state, tokens):
    log_probs = table[state["row"], state["position"], tokens]
    hashed = 0.5 * state["hash"] + embed[tokens]
    new_state = {"row": state["row"], "hash": hashed, "position": state["position"] + 1}
    return log_probs, new_state, {"hash": hashed, "fed": tokens}

  return step_fn


def markov_init_state(table):
  batch = table.shape[0]
  # "position" is a scalar leaf: the searches pass it through without a batch dimension.
  return {"row": jnp.arange(batch, dtype=jnp.int32), "hash": jnp.zeros((batch, HASH_DIM)),
          "position": jnp.int32(0)}


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len"))
def jax_beam_search(table, embed, length_penalty, *, beam_size, max_len=MAX_LEN):
  return bs.beam_search(markov_step_fn(table, embed), markov_init_state(table), beam_size=beam_size,
                        max_len=max_len, bos_id=BOS, eos_id=EOS, length_penalty=length_penalty)


@functools.partial(jax.jit, static_argnames=("max_len",))
def jax_greedy(table, embed, *, max_len=MAX_LEN):
  return bs.greedy_search(markov_step_fn(table, embed), markov_init_state(table), max_len=max_len,
                          bos_id=BOS, eos_id=EOS)


@functools.partial(jax.jit, static_argnames=("max_len", "temperature", "top_k", "top_p",
                                             "num_samples"))
def jax_sample(table, embed, rng, *, max_len=MAX_LEN, temperature=1.0, top_k=0, top_p=1.0,
               num_samples=1):
  return bs.sample(markov_step_fn(table, embed), markov_init_state(table), rng=rng,
                   max_len=max_len, bos_id=BOS, eos_id=EOS, temperature=temperature, top_k=top_k,
                   top_p=top_p, num_samples=num_samples)


# ----------------------------------------------------------------------------------------------
# Independent plain-Python references (no JAX).


def gnmt_score(log_prob, length, alpha):
  return np.float32(log_prob / np.float32(((5.0 + length) / 6.0) ** alpha))


def reference_beam_search(next_log_probs, *, beam_size, max_len, eos_id, alpha):
  """The search in loops and sorts; next_log_probs(prefix) -> float32 [vocab].

  Returns [(score, tokens)] best first, at most beam_size. Candidates of probability 0 never count.
  """
  live = [((), np.float32(0.0))]
  finished = []
  for step in range(max_len):
    candidates = []
    for prefix, log_prob in live:
      for token, token_log_prob in enumerate(next_log_probs(prefix)):
        total = np.float32(log_prob + token_log_prob)
        if total != -np.inf:
          candidates.append((total, prefix + (token,)))
    candidates.sort(key=lambda candidate: -candidate[0])  # stable: earlier beam, smaller id first
    candidates = candidates[:2 * beam_size]
    for rank, (total, tokens) in enumerate(candidates):
      if tokens[-1] == eos_id and rank < beam_size:
        finished.append((gnmt_score(total, step + 1, alpha), tokens))
    finished = sorted(finished, key=lambda hyp: -hyp[0])[:beam_size]
    live = [(tokens, total) for total, tokens in candidates if tokens[-1] != eos_id][:beam_size]
  at_max_len = [(gnmt_score(total, max_len, alpha), tokens) for tokens, total in live]
  return sorted(finished + at_max_len, key=lambda hyp: -hyp[0])[:beam_size]


def all_hypotheses(next_log_probs, *, max_len, vocab, eos_id, alpha):
  """Brute force: every caption the search could return, [(score, tokens)] best first."""
  hypotheses = []

  def extend(prefix, log_prob):
    for token, token_log_prob in enumerate(next_log_probs(prefix)):
      total, tokens = np.float32(log_prob + token_log_prob), prefix + (token,)
      if token == eos_id or len(tokens) == max_len:
        hypotheses.append((gnmt_score(total, len(tokens), alpha), tokens))
      else:
        extend(tokens, total)

  extend((), np.float32(0.0))
  assert len(hypotheses) == sum((vocab - 1)**n for n in range(max_len)) + (vocab - 1)**max_len
  return sorted(hypotheses, key=lambda hyp: -hyp[0])


def markov_model(table, row):
  return lambda prefix: table[row, len(prefix), prefix[-1] if prefix else BOS]


def expected_aux(tokens, embed):
  """The hash and fed token the model sees at each position of a caption."""
  hashed, hashes = np.zeros(HASH_DIM, np.float32), []
  fed = [BOS] + list(tokens[:-1])
  for token in fed:
    hashed = np.float32(0.5) * hashed + embed[token]
    hashes.append(hashed)
  return np.array(hashes), np.array(fed)


def assert_matches(result, row, reference, *, max_len):
  """result (numpy BeamSearchResult) at `row` holds exactly the reference hypotheses, in order."""
  beam = result.scores.shape[1]
  for slot in range(beam):
    if slot < len(reference):
      score, tokens = reference[slot]
      length = len(tokens)
      assert result.lengths[row, slot] == length, (row, slot)
      np.testing.assert_array_equal(result.tokens[row, slot, :length], tokens)
      np.testing.assert_array_equal(result.tokens[row, slot, length:], 0)
      np.testing.assert_allclose(result.scores[row, slot], score, rtol=1e-6, atol=1e-6)
    else:  # an empty slot: fewer hypotheses exist than the beam holds
      assert result.scores[row, slot] == -np.inf
      assert result.lengths[row, slot] == 0
      np.testing.assert_array_equal(result.tokens[row, slot], np.zeros(max_len))


def to_numpy(result):
  return jax.tree.map(np.asarray, result)


# ----------------------------------------------------------------------------------------------
# The top-k method beam search takes its candidates with (flaxcap/top_k.py) never changes results.


@pytest.mark.parametrize("vocab", [VOCAB, 40])
def test_beam_search_with_any_candidate_top_k_gives_the_same_results(monkeypatch, vocab):
  table, embed = random_tables(SEEDS[2], vocab=vocab)
  step_fn = markov_step_fn(jnp.asarray(table), jnp.asarray(embed))

  def search(method):
    monkeypatch.setattr(top_k_lib, "CANDIDATE_TOP_K", method)  # read while tracing: a fresh jit each
    return to_numpy(jax.jit(functools.partial(
        bs.beam_search, step_fn, beam_size=4, max_len=MAX_LEN, bos_id=BOS, eos_id=EOS,
        length_penalty=0.6))(markov_init_state(table)))

  flat = search("flat")
  for method in [m for m in top_k_lib.CANDIDATE_METHODS if m != "flat"]:
    assert_same_results(search(method), flat)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_the_select_kernel_gives_the_same_search(monkeypatch, beam_size):
  """With the candidates ranked on segments ("kernel_segments"), a step's new live and finished sets
  from `beam_select_kernel` (interpreted here) give the search `beam_search.select`'s results."""
  table, embed = random_tables(SEEDS[1], vocab=40)
  step_fn = markov_step_fn(jnp.asarray(table), jnp.asarray(embed))
  monkeypatch.setattr(top_k_lib, "CANDIDATE_TOP_K", "kernel_segments")
  monkeypatch.setattr(top_k_lib, "KERNEL_SEGMENT", 16)  # several segments an image

  def search(by_kernel):
    monkeypatch.setattr(top_k_lib, "SELECT_BY_KERNEL", by_kernel)  # read while tracing
    run = functools.partial(bs.beam_search, step_fn, beam_size=beam_size, max_len=MAX_LEN,
                            bos_id=BOS, eos_id=EOS)
    kernels = str(jax.make_jaxpr(run)(markov_init_state(table))).count("pallas_call")
    return to_numpy(jax.jit(run)(markov_init_state(table))), kernels

  (by_kernel, kernels), (plain, plain_kernels) = search(True), search(False)
  assert (kernels, plain_kernels) == (2, 1)  # the segments' top-k, then the selection
  assert_same_results(by_kernel, plain)
  for row in range(BATCH):
    reference = reference_beam_search(markov_model(table, row), beam_size=beam_size,
                                      max_len=MAX_LEN, eos_id=EOS, alpha=0.0)
    np.testing.assert_allclose(by_kernel.scores[row], [score for score, _ in reference], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Beam search.


@pytest.mark.parametrize("length_penalty", [0.0, 0.6])
def test_beam_search_matches_reference(length_penalty):
  for seed in SEEDS:
    table, embed = random_tables(seed)
    for beam_size in (1, 2, 3, 4):
      result = to_numpy(jax_beam_search(table, embed, length_penalty, beam_size=beam_size))
      assert result.tokens.shape == (BATCH, beam_size, MAX_LEN)
      assert np.all(np.diff(result.scores, axis=1) <= 0), "scores must be sorted best first"
      for row in range(BATCH):
        reference = reference_beam_search(markov_model(table, row), beam_size=beam_size,
                                          max_len=MAX_LEN, eos_id=EOS, alpha=length_penalty)
        assert len(reference) == beam_size
        assert_matches(result, row, reference, max_len=MAX_LEN)


def test_beam_search_aux_follows_beam_ancestry():
  beam_size = 4
  for seed in SEEDS:
    table, embed = random_tables(seed)
    result = to_numpy(jax_beam_search(table, embed, 0.6, beam_size=beam_size))
    assert result.aux["hash"].shape == (BATCH, beam_size, MAX_LEN, HASH_DIM)
    for row in range(BATCH):
      for slot in range(beam_size):
        length = result.lengths[row, slot]
        hashes, fed = expected_aux(result.tokens[row, slot, :length], embed)
        np.testing.assert_allclose(result.aux["hash"][row, slot, :length], hashes, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(result.aux["fed"][row, slot, :length], fed)
        np.testing.assert_array_equal(result.aux["hash"][row, slot, length:], 0)


@pytest.mark.parametrize("length_penalty", [0.0, 0.6])
def test_wide_beam_finds_exhaustive_optimum(length_penalty):
  vocab, max_len, beam_size = 4, 4, 128  # 121 captions exist; every one fits in the beam
  for seed in SEEDS[:2]:
    table, embed = random_tables(seed, max_len=max_len, vocab=vocab, scale=2.0)
    result = to_numpy(jax_beam_search(table, embed, length_penalty, beam_size=beam_size,
                                      max_len=max_len))
    for row in range(BATCH):
      everything = all_hypotheses(markov_model(table, row), max_len=max_len, vocab=vocab,
                                  eos_id=EOS, alpha=length_penalty)
      assert_matches(result, row, everything, max_len=max_len)  # the optimum first, then the rest
      np.testing.assert_array_equal(result.aux["hash"][row, len(everything):], 0)


def test_greedy_equals_beam_size_one_and_argmax_reference():
  for seed in SEEDS:
    table, embed = random_tables(seed)
    greedy = to_numpy(jax_greedy(table, embed))
    beam = to_numpy(jax_beam_search(table, embed, 0.0, beam_size=1))
    for field in ("tokens", "scores", "lengths"):
      np.testing.assert_array_equal(getattr(greedy, field), getattr(beam, field))
    np.testing.assert_allclose(greedy.aux["hash"], beam.aux["hash"], rtol=1e-6)
    for row in range(BATCH):
      tokens, log_prob = [], np.float32(0.0)
      while len(tokens) < MAX_LEN and (not tokens or tokens[-1] != EOS):
        next_log_probs = markov_model(table, row)(tuple(tokens))
        tokens.append(int(np.argmax(next_log_probs)))
        log_prob = np.float32(log_prob + next_log_probs[tokens[-1]])
      assert_matches(greedy, row, [(log_prob, tuple(tokens))], max_len=MAX_LEN)
      hashes, _ = expected_aux(tokens, embed)
      np.testing.assert_allclose(greedy.aux["hash"][row, 0, :len(tokens)], hashes, rtol=1e-5)


@pytest.mark.parametrize("unroll", [2, MAX_LEN])
def test_unrolled_searches_give_the_same_results(unroll):
  table, embed = random_tables(SEEDS[1])
  step_fn = markov_step_fn(jnp.asarray(table), jnp.asarray(embed))
  init_state = markov_init_state(table)
  for search, kwargs in ((bs.beam_search, {"beam_size": 3, "length_penalty": 0.6}),
                         (bs.greedy_search, {})):
    rolled, unrolled = (to_numpy(jax.jit(functools.partial(
        search, step_fn, max_len=MAX_LEN, bos_id=BOS, eos_id=EOS, unroll=u, **kwargs))(init_state))
                        for u in (1, unroll))
    for field in ("tokens", "scores", "lengths"):
      np.testing.assert_array_equal(getattr(unrolled, field), getattr(rolled, field))
    np.testing.assert_allclose(unrolled.aux["hash"], rolled.aux["hash"], rtol=1e-6)


def ending_tables(seed, *, max_len, eos_boost):
  """Like `random_tables`, with <eos> made more likely (by exp(eos_boost)), so captions end early."""
  table, embed = random_tables(seed, max_len=max_len)
  logits = table.astype(np.float64)
  logits[..., EOS] += eos_boost
  return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32), embed


STEP_CALLS = []  # one entry per step_fn call of `counted_search`, from a debug callback


@functools.partial(jax.jit, static_argnames=("kind", "beam_size", "max_len", "early_stop", "unroll"))
def counted_search(table, embed, *, kind, beam_size=1, max_len, length_penalty=0.0,
                   early_stop, unroll=1):
  """beam_search, greedy_search or sample ("beam", "greedy", "sample") on the Markov model, with
  every call of the step function recorded in STEP_CALLS. The length penalty is traced: one
  compilation serves every value."""

  def counted_step_fn(state, tokens):
    jax.debug.callback(lambda: STEP_CALLS.append(1))
    return markov_step_fn(table, embed)(state, tokens)

  common = dict(max_len=max_len, bos_id=BOS, eos_id=EOS, early_stop=early_stop)
  init_state = markov_init_state(table)
  if kind == "beam":
    return bs.beam_search(counted_step_fn, init_state, beam_size=beam_size,
                          length_penalty=length_penalty, unroll=unroll, **common)
  if kind == "greedy":
    return bs.greedy_search(counted_step_fn, init_state, unroll=unroll, **common)
  return bs.sample(counted_step_fn, init_state, rng=jax.random.key(0, impl="rbg"),
                   num_samples=3, **common)


def counting_search(table, embed, **kwargs):
  """(`counted_search`'s result as numpy, how many times it called the step function)."""
  STEP_CALLS.clear()
  result = to_numpy(jax.block_until_ready(counted_search(table, embed, **kwargs)))
  return result, len(STEP_CALLS)


def assert_same_results(a, b):
  for field in ("tokens", "scores", "lengths"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  for name in a.aux:
    np.testing.assert_array_equal(a.aux[name], b.aux[name])


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, -0.5])
def test_early_stop_gives_the_full_searchs_results(length_penalty):
  max_len = 12
  stopped_early = masked_steps = 0
  for beam_size in (1, 4):
    search = functools.partial(counting_search, kind="beam", beam_size=beam_size,
                               max_len=max_len, length_penalty=length_penalty)
    for seed in SEEDS:
      for eos_boost in (0.0, 2.0, 4.0):
        table, embed = ending_tables(seed, max_len=max_len, eos_boost=eos_boost)
        full, full_steps = search(table, embed, early_stop=False)
        assert full_steps == full.steps == max_len
        for loop in ("cond", "while"):
          early, early_steps = search(table, embed, early_stop=loop)
          assert early_steps == early.steps  # the result says how many steps the search took
          assert_same_results(early, full)
          stopped_early += early_steps < max_len
          # The while loop checking every 5 steps (12 is no multiple): at most 4 steps more, the
          # last turn's past max_len masked; the same results.
          chunked, chunked_steps = search(table, embed, early_stop="while", unroll=5)
          assert chunked.steps == min(chunked_steps, max_len)
          assert early_steps <= chunked.steps <= early_steps + 4
          assert chunked_steps % 5 == 0
          assert_same_results(chunked, full)
          masked_steps += chunked_steps > max_len
  assert stopped_early > 0, "the early stop never triggered; the test compares nothing"
  assert masked_steps > 0, "no chunked search ran past max_len; its masking is untested"


@pytest.mark.parametrize("kind", ["greedy", "sample"])
def test_early_stop_of_greedy_and_sampling_gives_the_same_results(kind):
  max_len = 12
  for seed in SEEDS:
    table, embed = ending_tables(seed, max_len=max_len, eos_boost=3.0)
    full, full_steps = counting_search(table, embed, kind=kind, max_len=max_len, early_stop=False)
    assert full_steps == full.steps == max_len
    for loop in ("cond", "while"):
      early, early_steps = counting_search(table, embed, kind=kind, max_len=max_len,
                                           early_stop=loop)
      assert_same_results(early, full)
      assert early_steps == early.steps == full.lengths.max() < max_len  # after the last <eos>
    if kind == "greedy":  # the while loop checking every 5 steps
      chunked, _ = counting_search(table, embed, kind=kind, max_len=max_len, early_stop="while",
                                   unroll=5)
      assert_same_results(chunked, full)



def eos_after_bos_table(seed, eos_probability):
  table, embed = random_tables(seed)
  probs = np.exp(table.astype(np.float64))
  first = probs[:, 0, BOS]  # the first step: position 0 after <bos>
  first *= (1 - eos_probability) / (1 - first[:, EOS:EOS + 1])
  first[:, EOS] = eos_probability
  return np.log(probs).astype(np.float32), embed


@pytest.mark.parametrize("length_penalty", [0.0, 0.6])
def test_model_that_ends_at_once(length_penalty):
  beam_size = 3
  for seed in SEEDS:
    table, embed = eos_after_bos_table(seed, 0.9)
    result = to_numpy(jax_beam_search(table, embed, length_penalty, beam_size=beam_size))
    np.testing.assert_array_equal(result.tokens[:, 0], [[EOS] + [0] * (MAX_LEN - 1)] * BATCH)
    np.testing.assert_array_equal(result.lengths[:, 0], 1)
    np.testing.assert_allclose(result.scores[:, 0], np.log(0.9), rtol=1e-5)
    for row in range(BATCH):
      reference = reference_beam_search(markov_model(table, row), beam_size=beam_size,
                                        max_len=MAX_LEN, eos_id=EOS, alpha=length_penalty)
      assert_matches(result, row, reference, max_len=MAX_LEN)
    greedy = to_numpy(jax_greedy(table, embed))
    np.testing.assert_array_equal(greedy.lengths, 1)


@pytest.mark.parametrize("length_penalty", [0.0, 0.6])
def test_model_that_never_ends(length_penalty):
  beam_size = 3
  for seed in SEEDS:
    table, embed = random_tables(seed)
    table = table.copy()
    table[..., EOS] = -np.inf  # <eos> impossible: every hypothesis runs to max_len
    result = to_numpy(jax_beam_search(table, embed, length_penalty, beam_size=beam_size))
    assert np.all(np.isfinite(result.scores))
    np.testing.assert_array_equal(result.lengths, MAX_LEN)
    assert not np.any(result.tokens == EOS)
    for row in range(BATCH):
      reference = reference_beam_search(markov_model(table, row), beam_size=beam_size,
                                        max_len=MAX_LEN, eos_id=EOS, alpha=length_penalty)
      assert_matches(result, row, reference, max_len=MAX_LEN)
    greedy = to_numpy(jax_greedy(table, embed))
    np.testing.assert_array_equal(greedy.lengths, MAX_LEN)
    assert np.all(np.isfinite(greedy.scores))


def test_bad_init_state_is_rejected():
  step_fn = lambda state, tokens: (jnp.zeros((tokens.shape[0], 5)), state, None)
  with pytest.raises(ValueError, match="leading batch dimension"):
    bs.beam_search(step_fn, {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}, beam_size=2,
                   max_len=3, bos_id=BOS, eos_id=EOS)
  with pytest.raises(ValueError, match="temperature"):
    bs.sample(step_fn, jnp.zeros((2, 3)), rng=jax.random.key(0), max_len=3, bos_id=BOS, eos_id=EOS,
              temperature=0.0)


SEARCHES = {
    "beam": lambda step_fn, state, **kw: bs.beam_search(step_fn, state, beam_size=2, **kw),
    "greedy": bs.greedy_search,
    "sample": lambda step_fn, state, **kw: bs.sample(step_fn, state, rng=jax.random.key(0), **kw),
}


@pytest.mark.parametrize("search", sorted(SEARCHES))
@pytest.mark.parametrize("arguments, message", [
    (dict(max_len=0), "max_len must be an int >= 1; got 0"),
    (dict(max_len=2.0), "max_len must be an int >= 1; got 2.0"),
    (dict(unroll=0), "unroll must be an int >= 1; got 0"),
    (dict(eos_id=VOCAB), f"eos_id {VOCAB} is not a token of step_fn's vocabulary of {VOCAB}"),
    (dict(eos_id=-1), "eos_id -1 is not a token"),
])
def test_bad_arguments_of_every_search_are_named(search, arguments, message):
  table, embed = map(jnp.asarray, random_tables(0))
  arguments = {"max_len": MAX_LEN, "bos_id": BOS, "eos_id": EOS, **arguments}
  if search == "sample" and "unroll" in arguments:  # sample has no unroll
    arguments.pop("unroll")
    arguments["num_samples"], message = 0, "num_samples >= 1; got .* num_samples=0"
  with pytest.raises(ValueError, match=message):
    SEARCHES[search](markov_step_fn(table, embed), markov_init_state(table), **arguments)


# ----------------------------------------------------------------------------------------------
# Sampling.


def test_sample_top_k_1_equals_greedy():
  for seed in SEEDS:
    table, embed = random_tables(seed)
    greedy = to_numpy(jax_greedy(table, embed))
    sampled = to_numpy(jax_sample(table, embed, jax.random.key(seed), temperature=0.7, top_k=1,
                                  num_samples=3))
    for field in ("tokens", "scores", "lengths"):
      np.testing.assert_array_equal(getattr(sampled, field),
                                    np.repeat(getattr(greedy, field), 3, axis=1))


def allowed_tokens(log_probs, *, temperature, top_k, top_p, slack=1e-5):
  """The tokens a filtered sampler may draw: the top_k best, then the top_p nucleus."""
  order = sorted(range(len(log_probs)), key=lambda token: -log_probs[token])
  if top_k:
    order = order[:top_k]
  weights = [math.exp(log_probs[token] / temperature) for token in order]
  allowed, mass = set(), 0.0
  for token, weight in zip(order, weights):
    if mass >= top_p * sum(weights) + slack:
      break
    allowed.add(token)
    mass += weight
  return allowed


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 3, 1.0), (1.0, 0, 0.6), (1.3, 4, 0.7)])
def test_sample_draws_only_allowed_tokens(temperature, top_k, top_p):
  num_samples = 32
  for seed in SEEDS[:2]:
    table, embed = random_tables(seed)
    result = to_numpy(jax_sample(table, embed, jax.random.key(seed), temperature=temperature,
                                 top_k=top_k, top_p=top_p, num_samples=num_samples))
    for row in range(BATCH):
      for n in range(num_samples):
        length = result.lengths[row, n]
        tokens = tuple(int(t) for t in result.tokens[row, n, :length])
        log_prob = np.float32(0.0)
        for position, token in enumerate(tokens):
          next_log_probs = markov_model(table, row)(tokens[:position])
          assert token in allowed_tokens(next_log_probs, temperature=temperature, top_k=top_k,
                                         top_p=top_p), (row, n, tokens)
          log_prob = np.float32(log_prob + next_log_probs[token])
        assert length == MAX_LEN or tokens[-1] == EOS
        assert EOS not in tokens[:-1]
        np.testing.assert_array_equal(result.tokens[row, n, length:], 0)
        np.testing.assert_allclose(result.scores[row, n], log_prob, rtol=1e-5)  # model log-prob
        hashes, _ = expected_aux(tokens, embed)
        np.testing.assert_allclose(result.aux["hash"][row, n, :length], hashes, rtol=1e-5)


@pytest.mark.parametrize("keys", ["one key", "a key per image"])
def test_sample_is_deterministic_for_a_key_and_follows_the_distribution(keys):
  table, embed = random_tables(0)
  temperature, num_samples = 2.0, 4000
  key = (lambda seed: jax.random.key(seed)) if keys == "one key" else (
      lambda seed: jax.random.split(jax.random.key(seed), BATCH))
  first = to_numpy(jax_sample(table, embed, key(7), temperature=temperature,
                              num_samples=num_samples, max_len=2))
  again = to_numpy(jax_sample(table, embed, key(7), temperature=temperature,
                              num_samples=num_samples, max_len=2))
  other = to_numpy(jax_sample(table, embed, key(8), temperature=temperature,
                              num_samples=num_samples, max_len=2))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert not np.array_equal(first.tokens, other.tokens)
  for row in range(BATCH):
    tempered = np.exp(table[row, 0, BOS].astype(np.float64) / temperature)
    tempered /= tempered.sum()
    frequencies = np.bincount(first.tokens[row, :, 0], minlength=VOCAB) / num_samples
    np.testing.assert_allclose(frequencies, tempered, atol=0.04)  # > 5 standard errors


def test_sample_with_a_key_per_image_draws_each_image_as_it_would_alone():
  table, embed = random_tables(1)
  keys = jax.random.split(jax.random.key(3), BATCH)
  whole = to_numpy(jax_sample(table, embed, keys, num_samples=5, temperature=1.5))
  assert len({tuple(row) for row in whole.tokens.reshape(-1, MAX_LEN)}) > BATCH  # varied samples
  for row in (0, 2):
    alone = to_numpy(jax_sample(table[row:row + 1], embed, keys[row:row + 1], num_samples=5,
                                temperature=1.5))
    np.testing.assert_array_equal(alone.tokens[0], whole.tokens[row])
    np.testing.assert_allclose(alone.scores[0], whole.scores[row], rtol=1e-6)
  raw_keys = jax.vmap(jax.random.key_data)(keys)  # uint32 [batch, 2]: the same keys
  np.testing.assert_array_equal(
      to_numpy(jax_sample(table, embed, raw_keys, num_samples=5, temperature=1.5)).tokens,
      whole.tokens)
  with pytest.raises(ValueError, match="a key per image"):
    jax_sample(table, embed, keys[:2], num_samples=5)


def test_sample_with_top_p_follows_the_tempered_nucleus():
  """Frequencies of the first token = tempered probabilities renormalised over the nucleus of the
  *tempered* distribution (a lower bound the 'only allowed tokens' test lacks)."""
  table, embed = random_tables(0)
  temperature, top_p, n = 2.0, 0.7, 4000
  result = to_numpy(jax_sample(table, embed, jax.random.key(7), temperature=temperature,
                               top_p=top_p, num_samples=n, max_len=2))
  for row in range(BATCH):
    log_probs = table[row, 0, BOS].astype(np.float64)
    nucleus = sorted(allowed_tokens(log_probs, temperature=temperature, top_k=0, top_p=top_p,
                                    slack=0.0))
    expected = np.zeros(VOCAB)
    expected[nucleus] = np.exp(log_probs[nucleus] / temperature)
    expected /= expected.sum()
    frequencies = np.bincount(result.tokens[row, :, 0], minlength=VOCAB) / n
    np.testing.assert_allclose(frequencies, expected, atol=0.04)


def test_filter_logits_keeps_exactly_the_nucleus():
  rng = np.random.default_rng(5)
  for top_k, top_p in [(3, 1.0), (0, 0.6), (4, 0.7), (0, 0.9), (0, 0.3)]:
    logits = (rng.normal(size=(32, VOCAB)) * 1.5).astype(np.float32)
    filtered = np.asarray(bs._filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    for row in range(len(logits)):
      kept = set(np.flatnonzero(np.isfinite(filtered[row])).tolist())
      assert kept == allowed_tokens(logits[row], temperature=1.0, top_k=top_k, top_p=top_p,
                                    slack=0.0), (top_k, top_p, row)


def test_greedy_length_penalty_divides_the_score_by_the_gnmt_penalty():
  table, embed = random_tables(1)
  step_fn = markov_step_fn(jnp.asarray(table), jnp.asarray(embed))
  plain, penalised = (to_numpy(bs.greedy_search(step_fn, markov_init_state(table), max_len=6,
                                                bos_id=BOS, eos_id=EOS, length_penalty=alpha))
                      for alpha in (0.0, 0.6))
  np.testing.assert_array_equal(plain.tokens, penalised.tokens)
  expected = plain.scores / ((5.0 + plain.lengths) / 6.0) ** 0.6
  np.testing.assert_allclose(penalised.scores, expected, rtol=1e-6)


def test_equal_finished_scores_keep_the_earlier_hypothesis_first():
  """'<eos>' (step 0) and 'w <eos>' (step 1) both score exactly -1: the earlier-finished one stays
  first, as in the reference's stable sort and lax.top_k's ties-to-lower-index."""
  vocab, max_len, w = 4, 3, 3
  table = np.full((1, max_len, vocab, vocab), -8.0, np.float32)
  table[0, 0, BOS] = [-3.0, -np.inf, -1.0, -0.5]   # <eos> -1.0, w -0.5
  table[0, 1, w, EOS] = -0.5                      # 'w <eos>' = -1.0 exactly
  step_fn = markov_step_fn(jnp.asarray(table), jnp.zeros((vocab, 3)))
  init = {"row": jnp.zeros((1,), jnp.int32), "hash": jnp.zeros((1, 3)), "position": jnp.int32(0)}
  result = to_numpy(bs.beam_search(step_fn, init, beam_size=2, max_len=max_len, bos_id=BOS,
                                   eos_id=EOS, length_penalty=0.0))
  reference = reference_beam_search(lambda p: table[0, len(p), p[-1] if p else BOS], beam_size=2,
                                    max_len=max_len, eos_id=EOS, alpha=0.0)
  assert [tokens for _, tokens in reference] == [(EOS,), (w, EOS)]
  np.testing.assert_array_equal(result.scores[0], [-1.0, -1.0])
  np.testing.assert_array_equal(result.tokens[0, 0], [EOS, 0, 0])
  np.testing.assert_array_equal(result.tokens[0, 1], [w, EOS, 0])
