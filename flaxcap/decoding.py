"""Captions from encoder features: the decoder's single step wrapped for `beam_search`.

The encoded features of an image are computed once and closed over by the step function: the search
carries only the LSTM state per beam, and the step attends each image's K beams against that image's
features without copying them K times. When the search multiplies more context vectors than the grid
has locations (beam_size x max_len > P, e.g. beam 3 over EfficientNet's 7x7 grid), the grid is pushed
through the decoder's context layers once per image (`Decoder.encode(..., project_context=True)`).
"""

import functools

import einops
import jax
import jax.numpy as jnp

from flaxcap import beam_search
from flaxcap import decoder as decoder_lib
from flaxcap import layers
from flaxcap import vocab as vocab_lib


def _step_fn(decoder: decoder_lib.Decoder, decoder_params, features, *, steps_per_image: int,
             word_gate_table=None, project_context: bool | None = None, eos_banned_after=None):
  """(step_fn, initial carry) for the searches of `beam_search` over these features.

  `steps_per_image` is how many context vectors a search multiplies per image (hypotheses x
  steps); above the grid's locations the grid is pushed through the context layers once per image
  (unless `project_context` says otherwise). The decoder's matrices are cast to its compute dtype
  here, once, not in every step (`layers.cast_matrices`). `eos_banned_after` (bool [V] or None):
  after these tokens `<eos>` gets log-probability -1e9, so no caption ends on them.
  """
  variables = {"params": layers.cast_matrices(decoder_params, decoder.dtype)}
  grid_locations = decoder_lib.flatten_features(features).shape[1]
  if project_context is None:
    project_context = steps_per_image > grid_locations
  encoded = decoder.apply(variables, features, project_context, method=decoder_lib.Decoder.encode)
  # w_a as each step's sum uses it (rounded to the compute dtype, in float32), converted once here;
  # with `pad_columns_to`, the h projection's kernel padded once here.
  encoded = encoded._replace(score_weights=variables["params"]["attention_score"]["kernel"][
      :, 0].astype(decoder.dtype).astype(jnp.float32))
  if decoder.pad_columns_to > 1:
    encoded = encoded._replace(hidden_kernel=decoder.apply(
        variables, method=decoder_lib.Decoder.padded_hidden_kernel))
  carry = _narrow_hidden(decoder, decoder.apply(variables, encoded,
                                                method=decoder_lib.Decoder.initial_carry))
  batch = jax.tree_util.tree_leaves(carry)[0].shape[0]

  def step_fn(flat_carry, flat_tokens):
    beams = flat_tokens.shape[0] // batch
    unflatten = functools.partial(einops.rearrange, pattern="(b k) ... -> b k ...", b=batch, k=beams)
    carry = jax.tree_util.tree_map(unflatten, flat_carry)
    logits, new_carry, attention = decoder.apply(
        variables, encoded, carry, unflatten(flat_tokens), word_gates=word_gate_table,
        method=decoder_lib.Decoder.step)
    flatten = functools.partial(einops.rearrange, pattern="b k ... -> (b k) ...")
    log_probs = flatten(jax.nn.log_softmax(logits.astype(jnp.float32)))
    if eos_banned_after is not None:
      banned = jnp.asarray(eos_banned_after)[flat_tokens]
      log_probs = log_probs.at[:, vocab_lib.EOS].set(
          jnp.where(banned, -1e9, log_probs[:, vocab_lib.EOS]))
    return log_probs, jax.tree_util.tree_map(flatten, _narrow_hidden(decoder, new_carry)), \
        flatten(attention)

  return step_fn, carry


def _narrow_hidden(decoder: decoder_lib.Decoder, carry: decoder_lib.LSTMCarry):
  """The carry with h in the decoder's compute dtype: every use of h casts it to that dtype first
  (the step's h projection, the deep output), so the search's results are the same, and with
  bfloat16 each step reorders half the bytes of h and converts none (c stays float32)."""
  return carry._replace(h=carry.h.astype(decoder.dtype))


def search(decoder: decoder_lib.Decoder, decoder_params, features, *, beam_size: int, max_len: int,
           length_penalty: float = 0.0, unroll: int = 1, word_gate_table=None,
           project_context: bool | None = None, eos_banned_after=None,
           early_stop: bool | str | None = None) -> beam_search.BeamSearchResult:
  """Beam (or greedy, when `beam_size` is 1) search from encoder features.

  Args:
    decoder: the (unbound) decoder module.
    decoder_params: its parameters.
    features: encoder features [batch, P, C] or [batch, h, w, C].
    unroll: decoding steps per loop iteration (`beam_search.beam_search`); same results.
    word_gate_table: None, or `Decoder.word_gate_table` of these params [V, 4H], computed once
      outside: each step then looks its words up instead of multiplying (same up to rounding).
    project_context: push the grid through the context's layers once per image
      (`Decoder.encode(..., project_context=True)`); None: when beam_size x max_len > P. Same
      results up to rounding.
    eos_banned_after: None, or bool [V]: no caption ends right after these tokens
      (`Vocabulary.eos_banned_after`: words that almost never end a training caption).
    early_stop: stop once no hypothesis can change the result: False, True / "cond", "while" or
      None, True on the CPU only (`beam_search.beam_search`). Same results.
  Returns:
    `BeamSearchResult` with tokens [batch, beam, max_len], scores [batch, beam], lengths
    [batch, beam] and attention [batch, beam, max_len, P].
  """
  step_fn, carry = _step_fn(decoder, decoder_params, features, steps_per_image=beam_size * max_len,
                            word_gate_table=word_gate_table, project_context=project_context,
                            eos_banned_after=eos_banned_after)
  # Greedy's tokens do not depend on the penalty; its scores are divided by it as beam search's are.
  search_fn = beam_search.greedy_search if beam_size == 1 else functools.partial(
      beam_search.beam_search, beam_size=beam_size)
  return search_fn(step_fn, carry, max_len=max_len, bos_id=vocab_lib.BOS, eos_id=vocab_lib.EOS,
                   length_penalty=length_penalty, unroll=unroll, early_stop=early_stop)


def sample(decoder: decoder_lib.Decoder, decoder_params, features, *, rng: jax.Array,
           num_samples: int, max_len: int, temperature: float = 1.0) -> beam_search.BeamSearchResult:
  """`num_samples` captions per image drawn from the decoder (`beam_search.sample`).

  Args:
    decoder, decoder_params, features: as in `search`.
    rng: a `jax.random` key, or keys [batch], one per image (`beam_search.sample`).
  Returns:
    `BeamSearchResult` with tokens [batch, num_samples, max_len] (zeros after <eos>), scores (each
    sample's log-probability) and lengths [batch, num_samples] (tokens up to and including <eos>).
  """
  step_fn, carry = _step_fn(decoder, decoder_params, features,
                            steps_per_image=num_samples * max_len)
  return beam_search.sample(step_fn, carry, rng=rng, max_len=max_len, bos_id=vocab_lib.BOS,
                            eos_id=vocab_lib.EOS, temperature=temperature, num_samples=num_samples)
