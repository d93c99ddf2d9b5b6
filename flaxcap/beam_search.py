"""Batched, jittable caption decoding: beam search, greedy search and sampling.

Model-agnostic: every search drives a pure step function and imports no model.

    step_fn(state, tokens) -> (log_probs, new_state, aux)
      state:     pytree, leaves [rows, ...] (rows = batch * beam); the decoder carry
      tokens:    int32 [rows], the previous token of each row (<bos> at the first step)
      log_probs: [rows, vocab], normalised log-probabilities of the next token
      aux:       pytree, leaves [rows, ...], recorded per step (e.g. attention [rows, P])

Rows are grouped by image: row `b * beam + k` is beam `k` of image `b`. `init_state` has leaves
[batch, ...]; the searches repeat it to [batch * beam, ...] themselves. Scalar leaves (e.g. a step
counter) are passed through untouched.

State that is the same for every beam of an image, the encoder features above all, does not belong
in the state: the step function closes over it at [batch, ...] and views the tokens and carry as
[batch, beam, ...] to attend, so the features are never copied per beam or gathered per step:

    def caption(params, features, *, beam_size):   # features [batch, P, C]; call under jax.jit
      batch = features.shape[0]
      encoded = decoder.apply(params, features, method=Decoder.encode)   # once per image

      def step_fn(carry, flat_tokens):               # carry: (c, h), each [batch * beam, hidden]
        beams = lambda x: x.reshape(batch, -1, *x.shape[1:])             # -> [batch, beam, ...]
        flat = lambda x: x.reshape(-1, *x.shape[2:])                     # -> [batch * beam, ...]
        logits, carry, attention = decoder.apply(
            params, encoded, jax.tree.map(beams, carry), beams(flat_tokens), method=Decoder.step)
        return (jax.nn.log_softmax(flat(logits)), jax.tree.map(flat, carry), flat(attention))

      init_carry = decoder.apply(params, encoded, None, method=Decoder.initial_carry)  # [batch, H]
      return beam_search(step_fn, init_carry, beam_size=beam_size, max_len=20,
                         bos_id=vocab.BOS, eos_id=vocab.EOS, length_penalty=0.6)
      # -> tokens [batch, beam, 20], scores, lengths [batch, beam], aux [batch, beam, 20, P]

Beam search (the algorithm of the Flax WMT example, with fixed shapes and a `lax.scan`):
  * Each step expands the K live hypotheses of an image into K * vocab candidates and keeps the
    2K best, so that K live beams survive even when up to K candidates end at once. How, changes
    speed, never the result (`top_k.top_k_of_candidates`): `lax.top_k` (on the CPU by rounds of
    argmax), or for small batches off the CPU, from the maxima of short chunks of the candidates. Off
    the CPU the merges of the 2K with the live and finished sets rank their few entries by counting
    (`top_k.top_k_by_rank`). On a GPU, where the candidates are ranked on segments by a Pallas
    kernel, the rest of the step's ranking is one more kernel (`beam_select_kernel`, without a
    length penalty; `select` is the same in XLA).
  * A candidate ending in <eos> joins the finished set (the K best finished so far) if it ranks in
    the top K of the 2K; the remaining non-<eos> candidates, best first, fill the K live slots. (The
    Flax example admits <eos> candidates from all 2K ranks; with the top-K rule, as in Hugging
    Face's BeamSearchScorer, beam_size=1 is exactly greedy search when length_penalty=0.)
  * Length: the number of generated tokens including the <eos>, excluding <bos>; a hypothesis
    that ends with <eos> at step t (0-based) has length t + 1. A hypothesis still live after
    `max_len` steps counts as finished with length `max_len` (it has no <eos>).
  * Finished scores are log P(tokens) / ((5 + length) / 6) ** length_penalty (GNMT); live scores
    are raw log-probabilities. Result slots that hold no real hypothesis (only when the vocabulary
    cannot fill the beam, or every candidate has log-probability -inf) get score -inf, length 0,
    tokens 0 and aux 0.

Ancestry: the scan carries only [batch, beam] vectors (scores, and for finished hypotheses the
end step and the slot fed into that step) plus the model state, which is gathered once per step
with a single `take` along the flat batch*beam axis. Each step emits the chosen token and parent
slot of every live beam (as one int32, token * K + parent) and the step's aux. After the scan,
the parent pointers of the K returned hypotheses are followed backwards on [batch, beam]
indices, and their tokens and aux are gathered once, straight into the [batch, beam, max_len,
...] layout. That reads O(max_len * batch * beam * aux) once; carrying token and aux histories in
the scan and re-gathering them every step (as the Flax example does for tokens) would move
O(max_len**2 * batch * beam * aux).

All K beams of an image start from the same state, so beams 1..K-1 start at score -inf and the
first step only expands beam 0.

Early stop: once no live hypothesis of any image can still enter its finished set, the remaining
steps change nothing that is returned. A live hypothesis with raw score s can only end with a score
<= s, so it can finish no better than max(s / penalty(L)) over the lengths L still possible (the
penalty is monotonic in L, so the first or the last). Greedy search and sampling are over once every
row has produced <eos>. `early_stop` says how a search stops (`flaxcap.step_loop`), each way with
the full search's results (the steps not taken emit zeros, which the back trace never reads);
`BeamSearchResult.steps` counts the steps taken:
  * False: a `lax.scan` of all `max_len` steps.
  * True or "cond": the scan with a `lax.cond` per iteration; differentiable (`jax.grad` through
    `sample`).
  * "while": a `lax.while_loop` over the steps taken, checked every `unroll` steps; not
    reverse-differentiable.
  * None (the default): True on the CPU, False elsewhere, where each check costs a host round trip
    (`bench/beam_search.py --early_stop=off,cond,while` measures them).
A trained captioner's captions end after ~10-12 of 20 steps (`bench/early_stop.py`).
"""

from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flaxcap import step_loop
from flaxcap import top_k as top_k_lib

PyTree = Any
StepFn = Callable[[PyTree, jax.Array], tuple[jax.Array, PyTree, PyTree]]


class BeamSearchResult(NamedTuple):
  """What every search returns (a pytree, so it can leave `jax.jit`).

  Attributes:
    tokens: int32 [batch, beam, max_len], generated tokens (no <bos>), <eos>, then 0.
    scores: float32 [batch, beam]; beam search: length-penalised log-probabilities, best first.
    lengths: int32 [batch, beam], generated tokens including <eos> (0 for an empty slot).
    aux: pytree of [batch, beam, max_len, ...], the step function's aux for each returned token
      (0 after the end).
    steps: int32 [], the decoding steps taken: `max_len`, or fewer with the early stop.
  """
  tokens: jax.Array
  scores: jax.Array
  lengths: jax.Array
  aux: PyTree
  steps: jax.Array


def _batch_size(init_state: PyTree) -> int:
  sizes = {x.shape[0] for x in jax.tree.leaves(init_state) if jnp.ndim(x) > 0}
  if len(sizes) != 1:
    raise ValueError("init_state must hold arrays that share one leading batch dimension; "
                     f"found leading sizes {sorted(sizes)}.")
  return sizes.pop()


def _repeat_rows(tree: PyTree, repeats: int) -> PyTree:
  """[batch, ...] -> [batch * repeats, ...]; row b * repeats + k is a copy of row b."""
  return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, repeats, axis=0), tree)


def _take_rows(tree: PyTree, rows: jax.Array) -> PyTree:
  """Gathers rows [n] along the leading axis of every non-scalar leaf."""
  return jax.tree.map(
      lambda x: x if jnp.ndim(x) == 0 else x.at[rows].get(mode="promise_in_bounds"), tree)


def _length_penalty(length: jax.Array, alpha) -> jax.Array:
  """GNMT penalty ((5 + length) / 6) ** alpha."""
  return jnp.power((5.0 + length.astype(jnp.float32)) / 6.0, jnp.asarray(alpha, jnp.float32))


def _penalize(scores: jax.Array, length: jax.Array, alpha) -> jax.Array:
  if isinstance(alpha, (int, float)) and alpha == 0:
    return scores
  return scores / _length_penalty(length, alpha)


def _check_static(**counts: int) -> None:
  """Raises ValueError unless each of these static arguments (max_len, unroll, ...) is an int >= 1."""
  for name, value in counts.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an int >= 1; got {value!r}.")


def _check_log_probs(log_probs: jax.Array, rows: int, eos_id) -> int:
  if log_probs.ndim != 2 or log_probs.shape[0] != rows:
    raise ValueError(f"step_fn must return log_probs of shape [{rows}, vocab]; "
                     f"got {log_probs.shape}.")
  vocab = log_probs.shape[1]
  if isinstance(eos_id, (int, np.integer)) and not 0 <= eos_id < vocab:
    raise ValueError(f"eos_id {eos_id} is not a token of step_fn's vocabulary of {vocab}.")
  return vocab


def select(top_scores, top_index, done_scores, done_steps, done_slots, step, *, vocab: int,
           eos_id, length_penalty=0.0):
  """A beam search step's new live and finished sets from its 2K best candidates.

  Args:
    top_scores, top_index: [batch, 2K], the candidates best first, flat index slot * vocab + token.
    done_scores, done_steps, done_slots: the finished set, [batch, K] each.
    step: this step (0-based).

  Returns:
    (live_scores, tokens, parents, done_scores, done_steps, done_slots), [batch, K] each, best first.
    (`beam_select_kernel.select_step` is the same in one GPU kernel, from the candidates' segment
    winners, without a length penalty.)
  """
  k = done_scores.shape[1]
  neg_inf = jnp.float32(-jnp.inf)
  top_slots = (top_index // vocab).astype(jnp.int32)
  top_tokens = (top_index % vocab).astype(jnp.int32)
  ends = top_tokens == eos_id

  # Finished set: <eos> candidates among the top K ranks compete with the K finished so far.
  new_done = jnp.where(ends[:, :k], _penalize(top_scores[:, :k], step + 1, length_penalty), neg_inf)
  done_scores, pick = top_k_lib.top_k(jnp.concatenate([done_scores, new_done], axis=1), k)
  done_steps = jnp.take_along_axis(
      jnp.concatenate([done_steps, jnp.full_like(done_steps, step)], axis=1), pick, axis=1)
  done_slots = jnp.take_along_axis(
      jnp.concatenate([done_slots, top_slots[:, :k]], axis=1), pick, axis=1)

  # Live set: the K best candidates that did not end.
  live_scores, pick = top_k_lib.top_k(jnp.where(ends, neg_inf, top_scores), k)
  parents = jnp.take_along_axis(top_slots, pick, axis=1)  # [batch, K]
  tokens = jnp.take_along_axis(top_tokens, pick, axis=1)  # [batch, K]
  return live_scores, tokens, parents, done_scores, done_steps, done_slots


def beam_search(step_fn: StepFn, init_state: PyTree, *, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, length_penalty=0.0, unroll: int = 1,
                early_stop: bool | str | None = None) -> BeamSearchResult:
  """Beam search over `step_fn` for a batch of images (see the module docstring).

  Args:
    step_fn: (state [batch*beam, ...], tokens int32 [batch*beam]) ->
      (log_probs [batch*beam, vocab], new_state, aux [batch*beam, ...]).
    init_state: pytree with leaves [batch, ...]; repeated to [batch*beam, ...] here.
    beam_size: K, hypotheses kept per image (static).
    max_len: decoding steps, the longest caption including <eos> (static).
    bos_id: token fed at the first step.
    eos_id: token that ends a hypothesis.
    length_penalty: GNMT alpha (a float, or a traced scalar); 0 ranks by log-probability.
    unroll: steps per loop iteration (static): of the `lax.scan` (>= max_len unrolls the whole
      search: no loop, at the price of a longer compilation), or with early_stop="while" between
      two checks of the stop. The results do not depend on it.
    early_stop: False, True / "cond", "while" or None (True on the CPU only): whether and how to
      stop once no live hypothesis can win; the results are the same (module docstring).

  Returns:
    BeamSearchResult with tokens [batch, K, max_len], scores [batch, K] best first,
    lengths [batch, K] and aux leaves [batch, K, max_len, ...].
  """
  _check_static(beam_size=beam_size, max_len=max_len, unroll=unroll)
  batch = _batch_size(init_state)
  k = beam_size
  neg_inf = jnp.float32(-jnp.inf)
  batch_offsets = (jnp.arange(batch, dtype=jnp.int32) * k)[:, None]  # [batch, 1]

  def search_step(carry, step):
    state, last_tokens, live_scores, done_scores, done_steps, done_slots = carry
    log_probs, new_state, aux = step_fn(state, last_tokens)
    vocab = _check_log_probs(log_probs, batch * k, eos_id)
    if vocab < 2:
      raise ValueError("beam_search needs a vocabulary of at least 2 tokens.")
    # [batch, K * vocab] candidates; flat index = parent slot * vocab + token.
    candidates = live_scores[:, :, None] + log_probs.astype(jnp.float32).reshape(batch, k, vocab)
    if top_k_lib.selects_by_kernel(batch, length_penalty, eos_id):
      from flaxcap import beam_select_kernel  # pylint: disable=g-import-not-at-top  (Pallas)
      live_scores, tokens, parents, done_scores, done_steps, done_slots = \
          beam_select_kernel.select_step(
              *top_k_lib.segment_winners(candidates.reshape(batch, k * vocab), 2 * k),
              done_scores, done_steps, done_slots, step, vocab=vocab, eos_id=eos_id,
              interpret=jax.default_backend() != "gpu")
    else:
      top_scores, top_index = top_k_lib.top_k_of_candidates(candidates, 2 * k)  # [batch, 2K]
      live_scores, tokens, parents, done_scores, done_steps, done_slots = select(
          top_scores, top_index, done_scores, done_steps, done_slots, step, vocab=vocab,
          eos_id=eos_id, length_penalty=length_penalty)
    state = _take_rows(new_state, (batch_offsets + parents).reshape(-1))
    aux = jax.tree.map(lambda a: a.reshape(batch, k, *a.shape[1:]), aux)
    carry = (state, tokens.reshape(-1), live_scores, done_scores, done_steps, done_slots)
    return carry, (tokens * k + parents, aux)  # one history for both: one write a step

  live_scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (batch, 1))
  carry = (_repeat_rows(init_state, k), jnp.full((batch * k,), bos_id, jnp.int32), live_scores,
           jnp.full((batch, k), -jnp.inf, jnp.float32), jnp.zeros((batch, k), jnp.int32),
           jnp.zeros((batch, k), jnp.int32))

  def is_over(carry, step):
    """Whether no live hypothesis can still beat the worst of its image's K finished ones."""
    _, _, live_scores, done_scores, _, _ = carry
    best_end = jnp.maximum(_penalize(live_scores, step + 1, length_penalty),
                           _penalize(live_scores, jnp.int32(max_len), length_penalty))
    return jnp.all(jnp.min(done_scores, axis=1) >= jnp.max(best_end, axis=1))

  carry, history, steps_taken = step_loop.run_steps(
      search_step, is_over, carry, max_len, unroll, step_loop.loop_for(early_stop))
  _, _, live_scores, done_scores, done_steps, done_slots = carry

  # Hypotheses still live after max_len steps finish there (end step max_len = "no <eos>").
  scores, pick = top_k_lib.top_k(jnp.concatenate(
      [done_scores, _penalize(live_scores, jnp.int32(max_len), length_penalty)], axis=1), k)
  end_steps = jnp.take_along_axis(
      jnp.concatenate([done_steps, jnp.full_like(done_steps, max_len)], axis=1), pick, axis=1)
  slots = jnp.take_along_axis(
      jnp.concatenate([done_slots, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k))],
                      axis=1), pick, axis=1)
  valid = scores > neg_inf
  lengths = jnp.where(valid, jnp.minimum(end_steps + 1, max_len), 0)
  tokens, aux = _back_trace(history, slots, end_steps, valid, eos_id=eos_id)
  return BeamSearchResult(tokens=tokens, scores=scores, lengths=lengths, aux=aux, steps=steps_taken)


def _back_trace(history, slots, end_steps, valid, *, eos_id):
  """Follows parent pointers from the returned hypotheses back to step 0.

  Args:
    history: (token * K + parent [T, batch, K], aux leaves [T, batch, K, ...]), where step t's
      tokens/parents describe the live slots after step t and aux[t] belongs to the slots fed
      into step t.
    slots: [batch, K]; for a finished hypothesis the slot fed into its <eos> step, for one live at
      the end its live slot after the last step.
    end_steps: [batch, K], the step of the <eos>, or T for hypotheses without one.
    valid: bool [batch, K], slots holding a real hypothesis.
    eos_id: the <eos> token.

  Returns:
    tokens int32 [batch, K, T] and aux leaves [batch, K, T, ...].
  """
  step_choices, step_aux = history
  max_len, batch, k = step_choices.shape
  step_tokens, step_parents = step_choices // k, step_choices % k

  # Walk the parent pointers backwards on [batch, K] indices only (tiny; unrolled, max_len static).
  def trace_step(cursor, step_and_parents):
    step, parents = step_and_parents
    fed_slot = jnp.where(end_steps > step, jnp.take_along_axis(parents, cursor, axis=1), cursor)
    return fed_slot, (cursor, fed_slot)

  steps = jnp.arange(max_len, dtype=jnp.int32)
  _, (live_slots, fed_slots) = lax.scan(trace_step, slots, (steps, step_parents), reverse=True,
                                        unroll=True)  # [T, batch, K]: slot after / fed into step t

  # Then gather every token and aux once, straight into the [batch, K, T, ...] layout.
  steps = steps[:, None, None]
  inside = end_steps > steps  # position t holds a token from the live history
  at_end = end_steps == steps  # position t holds the hypothesis' <eos>
  keep = jnp.moveaxis((inside | at_end) & valid, 0, 2)  # [batch, K, T]
  tokens = jnp.where(inside, jnp.take_along_axis(step_tokens, live_slots, axis=2),
                     jnp.where(at_end, eos_id, 0))
  tokens = jnp.where(keep, jnp.moveaxis(tokens, 0, 2), 0)
  # Row of step_aux flattened to [T * batch * K, ...] for each (b, k, t).
  rows = (steps * batch + jnp.arange(batch, dtype=jnp.int32)[:, None]) * k + fed_slots
  rows = jnp.moveaxis(rows, 0, 2)

  def gather_aux(a):
    picked = a.reshape(max_len * batch * k, *a.shape[3:]).at[rows].get(mode="promise_in_bounds")
    return jnp.where(keep.reshape(*keep.shape, *([1] * (a.ndim - 3))), picked, 0).astype(a.dtype)

  return tokens, jax.tree.map(gather_aux, step_aux)


def _decode_one_per_row(step_fn, init_state, choose, *, copies, max_len, bos_id, eos_id,
                        length_penalty=0.0, unroll: int = 1, early_stop=None) -> BeamSearchResult:
  """Extends `copies` hypotheses per image by one chosen token per step (greedy and sampling).

  `choose(log_probs [rows, vocab], step) -> tokens [rows]`. Scores are the summed model
  log-probabilities of the chosen tokens, divided by the GNMT penalty of the length.
  """
  _check_static(max_len=max_len, unroll=unroll, num_samples=copies)
  batch = _batch_size(init_state)
  rows = batch * copies

  def decode_step(carry, step):
    state, last_tokens, scores, lengths, done = carry
    log_probs, state, aux = step_fn(state, last_tokens)
    _check_log_probs(log_probs, rows, eos_id)
    log_probs = log_probs.astype(jnp.float32)
    chosen = choose(log_probs, step).astype(jnp.int32)
    active = ~done
    scores = scores + jnp.where(active, jnp.take_along_axis(log_probs, chosen[:, None], 1)[:, 0], 0)
    lengths = lengths + active.astype(jnp.int32)
    done = done | (chosen == eos_id)
    tokens = jnp.where(active, chosen, 0)
    aux = jax.tree.map(
        lambda a: jnp.where(active.reshape(rows, *([1] * (a.ndim - 1))), a, 0).astype(a.dtype),
        aux)
    return (state, tokens, scores, lengths, done), (tokens, aux)

  carry = (_repeat_rows(init_state, copies), jnp.full((rows,), bos_id, jnp.int32),
           jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.int32),
           jnp.zeros((rows,), bool))
  all_done = lambda carry, step: jnp.all(carry[-1])  # every later step would emit zeros
  carry, (tokens, aux), steps_taken = step_loop.run_steps(
      decode_step, all_done, carry, max_len, unroll, step_loop.loop_for(early_stop))
  _, _, scores, lengths, _ = carry

  def by_image(a):  # [T, rows, ...] -> [batch, copies, T, ...]
    return jnp.moveaxis(a, 0, 1).reshape(batch, copies, max_len, *a.shape[2:])

  return BeamSearchResult(
      tokens=by_image(tokens),
      scores=_penalize(scores, lengths, length_penalty).reshape(batch, copies),
      lengths=lengths.reshape(batch, copies), aux=jax.tree.map(by_image, aux), steps=steps_taken)


def greedy_search(step_fn: StepFn, init_state: PyTree, *, max_len: int, bos_id: int,
                  eos_id: int, length_penalty=0.0, unroll: int = 1,
                  early_stop: bool | str | None = None) -> BeamSearchResult:
  """Most probable next token at every step until <eos>; shapes as `beam_search` with beam 1.

  Calls `step_fn` on [batch] rows (beam 1), so a step function written for `beam_search` works
  unchanged. `length_penalty` only rescales the returned scores; it never changes the tokens.
  Equals `beam_search(..., beam_size=1)` when length_penalty is 0 (with a penalty, beam search
  may keep extending a hypothesis past greedy's <eos> and prefer the longer one). `unroll` as in
  `beam_search`; `early_stop` as in `beam_search`: stop once every row has ended.
  """
  return _decode_one_per_row(step_fn, init_state, lambda log_probs, _: jnp.argmax(log_probs, -1),
                             copies=1, max_len=max_len, bos_id=bos_id, eos_id=eos_id,
                             length_penalty=length_penalty, unroll=unroll, early_stop=early_stop)


def _filter_logits(logits: jax.Array, *, top_k: int, top_p: float) -> jax.Array:
  """Sets logits [rows, vocab] outside the top-k and the top-p nucleus to -inf (ties kept)."""
  if 0 < top_k < logits.shape[-1]:
    kth_best = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_best, -jnp.inf, logits)
  if top_p < 1.0:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Smallest set of most probable tokens whose mass reaches top_p; the best token always stays.
    kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(descending, kept - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _row_keys(rng: jax.Array, batch: int, copies: int) -> jax.Array | None:
  """None for one key; for keys [batch] (typed, or raw uint32 [batch, 2]) a key per row
  [batch * copies]: sample n of image b draws with fold_in(keys[b], n)."""
  rng = jnp.asarray(rng)
  key_ndim = 0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1
  if rng.ndim == key_ndim:
    return None
  if rng.ndim != key_ndim + 1 or rng.shape[0] != batch:
    raise ValueError(f"rng: one key or a key per image [{batch}]; got shape {rng.shape}")
  copy_index = jnp.tile(jnp.arange(copies), batch)
  return jax.vmap(jax.random.fold_in)(jnp.repeat(rng, copies, axis=0), copy_index)


def sample(step_fn: StepFn, init_state: PyTree, *, rng: jax.Array, max_len: int, bos_id: int,
           eos_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           num_samples: int = 1, early_stop: bool | str | None = None) -> BeamSearchResult:
  """Draws `num_samples` captions per image: temperature, then top-k, then top-p (nucleus).

  Args:
    step_fn, init_state, max_len, bos_id, eos_id: as in `beam_search`; step_fn sees
      [batch * num_samples] rows (row b * num_samples + n is sample n of image b).
    rng: a `jax.random` key; the same key gives the same samples. Or keys [batch], one per image:
      image b's samples then depend on its key alone, not on the other images of the batch (a
      batch split over devices samples what it samples whole).
    temperature: > 0; divides the log-probabilities before the filters.
    top_k: keep the k most probable tokens (0: all; static).
    top_p: keep the smallest set of most probable tokens with probability >= top_p (1: all).
    num_samples: captions per image (static).
    early_stop: as in `beam_search`: stop once every sample has ended; same samples.

  Returns:
    BeamSearchResult with beam = num_samples in draw order (not sorted); scores are the samples'
    log-probabilities under the unmodified model (no temperature, filter or length penalty).
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0 (use greedy_search for 0); got {temperature}.")
  if top_k < 0 or not 0.0 < top_p <= 1.0 or num_samples < 1:
    raise ValueError(f"need top_k >= 0, 0 < top_p <= 1 and num_samples >= 1; got top_k={top_k}, "
                     f"top_p={top_p}, num_samples={num_samples}.")

  row_keys = _row_keys(rng, _batch_size(init_state), num_samples)

  def choose(log_probs, step):
    logits = _filter_logits(log_probs / temperature, top_k=top_k, top_p=top_p)
    if row_keys is None:
      return jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1)
    draw = lambda key, row_logits: jax.random.categorical(jax.random.fold_in(key, step), row_logits)
    return jax.vmap(draw)(row_keys, logits)

  return _decode_one_per_row(step_fn, init_state, choose, copies=num_samples, max_len=max_len,
                             bos_id=bos_id, eos_id=eos_id, early_stop=early_stop)
