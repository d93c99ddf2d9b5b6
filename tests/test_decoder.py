"""Tests of flaxcap/decoder.py: teacher forcing vs stepping, beams, encode-once, dropout, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import decoder as decoder_lib
from flaxcap import layers
from flaxcap.decoder import Decoder, Encoded, LSTMCarry

# Distinct sizes so that a kernel's shape names the layer it belongs to.
BATCH, GRID_H, GRID_W, CHANNELS = 3, 3, 4, 6
TIME, VOCAB, EMBED, HIDDEN, ATTN = 5, 17, 14, 16, 10
POSITIONS = GRID_H * GRID_W


def make_decoder(**overrides):
  kwargs = dict(vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, attention_dim=ATTN,
                dropout_rate=0.3)
  kwargs.update(overrides)
  return Decoder(**kwargs)


def rng_key(seed):
  """An "rbg" key: on the CPU, threefry's random bits take seconds to compile, rbg's do not."""
  return jax.random.key(seed, impl="rbg")


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(BATCH, GRID_H, GRID_W, CHANNELS)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, TIME)), jnp.int32)
  return features, tokens


@functools.lru_cache(maxsize=None)
def _cached_setup(gate=True, prev2out=True, ctx2out=True, attention_activation="tanh"):
  decoder = make_decoder(gate=gate, prev2out=prev2out, ctx2out=ctx2out,
                         attention_activation=attention_activation)
  features, tokens = make_inputs()
  variables = jax.jit(functools.partial(decoder.init, deterministic=True))(
      rng_key(42), features, tokens)
  return decoder, variables, features, tokens


def stepped_decode(decoder, variables, features, tokens):
  """The reference: a Python loop over `step`, one token at a time."""
  encoded = decoder.apply(variables, features, method=Decoder.encode)
  carry = decoder.apply(variables, encoded, method=Decoder.initial_carry)
  all_logits, all_attention = [], []
  for t in range(tokens.shape[1]):
    logits, carry, attention = decoder.apply(variables, encoded, carry, tokens[:, t], method=Decoder.step)
    all_logits.append(logits)
    all_attention.append(attention)
  return jnp.stack(all_logits, axis=1), jnp.stack(all_attention, axis=1)


@pytest.mark.parametrize("options", [
    dict(),
    dict(gate=False, prev2out=False, ctx2out=False, attention_activation="relu"),
])
def test_teacher_forcing_equals_step_loop(options):
  decoder, variables, features, tokens = _cached_setup(**options)
  logits, attention = jax.jit(functools.partial(decoder.apply, deterministic=True))(
      variables, features, tokens)
  ref_logits, ref_attention = jax.jit(functools.partial(stepped_decode, decoder))(
      variables, features, tokens)
  assert logits.shape == (BATCH, TIME, VOCAB) and logits.dtype == jnp.float32
  assert attention.shape == (BATCH, TIME, POSITIONS) and attention.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(attention, ref_attention, atol=1e-6)
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
  assert float(jnp.std(logits)) > 1e-3  # not a degenerate output


def test_flat_and_grid_features_agree():
  decoder, variables, features, tokens = _cached_setup()
  flat = features.reshape(BATCH, POSITIONS, CHANNELS)
  apply = jax.jit(functools.partial(decoder.apply, deterministic=True))
  np.testing.assert_allclose(apply(variables, features, tokens)[0], apply(variables, flat, tokens)[0],
                             atol=1e-6)
  np.testing.assert_array_equal(decoder_lib.flatten_features(features)[:, GRID_W + 1],
                                features[:, 1, 1])


def test_encode_shapes_and_initial_carry():
  decoder, variables, features, _ = _cached_setup()
  encoded = decoder.apply(variables, features, method=Decoder.encode)
  assert isinstance(encoded, Encoded)
  assert encoded.features.shape == (BATCH, POSITIONS, CHANNELS)
  assert encoded.projected_features.shape == (BATCH, POSITIONS, ATTN)
  carry = decoder.apply(variables, encoded, method=Decoder.initial_carry)
  assert isinstance(carry, LSTMCarry)
  c, h = carry  # unpacks like the (c, h) tuple of the contract
  assert c.shape == h.shape == (BATCH, HIDDEN)
  beams = decoder.apply(variables, encoded, 4, method=Decoder.initial_carry)
  assert beams.c.shape == beams.h.shape == (BATCH, 4, HIDDEN)
  np.testing.assert_array_equal(beams.h, jnp.broadcast_to(h[:, None], beams.h.shape))
  # Independent check of h0 = tanh(W mean_p f + b)[H:].
  params = variables["params"]["init_state"]
  mean = np.asarray(features).reshape(BATCH, POSITIONS, CHANNELS).mean(1)
  expected = np.tanh(mean @ np.asarray(params["kernel"]) + np.asarray(params["bias"]))
  np.testing.assert_allclose(c, expected[:, :HIDDEN], atol=1e-5)
  np.testing.assert_allclose(h, expected[:, HIDDEN:], atol=1e-5)


def _random_step_inputs(rng, shape):
  """A random LSTMCarry (c, h each [*shape, HIDDEN]) and previous tokens [*shape] for `Decoder.step`."""
  carry = LSTMCarry(*(jnp.asarray(rng.normal(size=(*shape, HIDDEN)), jnp.float32) for _ in "ch"))
  return carry, jnp.asarray(rng.integers(0, VOCAB, size=shape), jnp.int32)


def _jitted_step(decoder):
  return jax.jit(functools.partial(decoder.apply, method=Decoder.step))


def test_beam_step_equals_separate_steps():
  decoder, variables, features, _ = _cached_setup()
  beam = 4
  encoded = decoder.apply(variables, features, method=Decoder.encode)
  carry, tokens = _random_step_inputs(np.random.default_rng(7), (BATCH, beam))
  step = _jitted_step(decoder)
  logits, new_carry, attention = step(variables, encoded, carry, tokens)
  assert logits.shape == (BATCH, beam, VOCAB)
  assert attention.shape == (BATCH, beam, POSITIONS)
  assert new_carry.h.shape == (BATCH, beam, HIDDEN)
  for k in range(beam):
    single = LSTMCarry(c=carry.c[:, k], h=carry.h[:, k])
    ref_logits, ref_carry, ref_attention = step(variables, encoded, single, tokens[:, k])
    np.testing.assert_allclose(logits[:, k], ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(attention[:, k], ref_attention, atol=1e-6)
    np.testing.assert_allclose(new_carry.c[:, k], ref_carry.c, atol=1e-5)
    np.testing.assert_allclose(new_carry.h[:, k], ref_carry.h, atol=1e-5)
  # Beams that differ attend differently: the beam axis is real, not broadcast.
  assert float(jnp.abs(attention[:, 0] - attention[:, 1]).max()) > 1e-4


@pytest.mark.parametrize("options", [dict(), dict(gate=False, ctx2out=False)])
def test_projected_context_step_equals_plain_step(options):
  decoder, variables, features, _ = _cached_setup(**options)
  beam = 3
  plain = decoder.apply(variables, features, method=Decoder.encode)
  projected = decoder.apply(variables, features, True, method=Decoder.encode)
  assert plain.context_projections is None
  width = 4 * HIDDEN + (EMBED if options.get("ctx2out", True) else 0)
  assert projected.context_projections.shape == (BATCH, POSITIONS, width)
  # Independent check: the context gates are a bias-free linear map of each grid location.
  kernel = np.asarray(variables["params"]["context_gates"]["kernel"])
  np.testing.assert_allclose(projected.context_projections[..., :4 * HIDDEN],
                             np.asarray(plain.features) @ kernel, atol=1e-5)
  carry, tokens = _random_step_inputs(np.random.default_rng(11), (BATCH, beam))
  step = _jitted_step(decoder)
  logits, new_carry, attention = step(variables, plain, carry, tokens)
  p_logits, p_carry, p_attention = step(variables, projected, carry, tokens)
  np.testing.assert_allclose(p_logits, logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(p_carry.c, new_carry.c, atol=1e-5)
  np.testing.assert_allclose(p_carry.h, new_carry.h, atol=1e-5)
  np.testing.assert_allclose(p_attention, attention, atol=1e-6)
  assert float(jnp.std(logits)) > 1e-3


def test_word_gate_table_step_equals_plain_step():
  decoder, variables, features, _ = _cached_setup()
  table = decoder.apply(variables, method=Decoder.word_gate_table)
  assert table.shape == (VOCAB, 4 * HIDDEN)
  params = variables["params"]  # independent check: E[v] W + b for every token v
  np.testing.assert_allclose(
      table, np.asarray(params["embedding"]["embedding"]) @ np.asarray(params["input_gates"]["kernel"])
      + np.asarray(params["input_gates"]["bias"]), atol=1e-5)
  encoded = decoder.apply(variables, features, True, method=Decoder.encode)
  rng = np.random.default_rng(13)
  step = _jitted_step(decoder)
  for shape in ((BATCH,), (BATCH, 3)):  # [batch] and [batch, K] tokens
    carry, tokens = _random_step_inputs(rng, shape)
    plain = step(variables, encoded, carry, tokens)
    looked_up = step(variables, encoded, carry, tokens, word_gates=table)
    for a, b in zip(jax.tree.leaves(looked_up), jax.tree.leaves(plain)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _dot_operand_shapes(jaxpr, in_scan=False):
  """Yields (operand shapes, inside a scan body?) for every dot_general, nested jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield tuple(tuple(v.aval.shape) for v in eqn.invars), in_scan
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _dot_operand_shapes(sub, in_scan or eqn.primitive.name == "scan")


def test_features_projected_once_and_heavy_matmuls_outside_the_scan():
  decoder, variables, features, tokens = _cached_setup()
  jaxpr = jax.make_jaxpr(functools.partial(decoder.apply, deterministic=True))(
      variables, features, tokens).jaxpr
  dots = list(_dot_operand_shapes(jaxpr))
  assert any(in_scan for _, in_scan in dots), "expected a scan over time"
  feature_kernel, vocab_kernel, word_gate_kernel = (CHANNELS, ATTN), (EMBED, VOCAB), (EMBED, 4 * HIDDEN)
  uses = lambda kernel: [in_scan for shapes, in_scan in dots if kernel in shapes]
  assert uses(feature_kernel) == [False]  # once, before the scan
  assert uses(vocab_kernel) == [False]  # one vocabulary matmul for all T
  assert uses(word_gate_kernel) == [False]  # the embeddings' gate input, for all T at once
  # The scan body: one fused matmul of h and one of the context into the gates.
  assert (HIDDEN, 4 * HIDDEN + ATTN + 1) in {s for shapes, in_scan in dots if in_scan for s in shapes}

  encoded = decoder.apply(variables, features, method=Decoder.encode)
  carry = decoder.apply(variables, encoded, 2, method=Decoder.initial_carry)
  step_jaxpr = jax.make_jaxpr(functools.partial(decoder.apply, method=Decoder.step))(
      variables, encoded, carry, tokens[:, :2]).jaxpr
  step_dots = list(_dot_operand_shapes(step_jaxpr))
  assert not [s for s, _ in step_dots if feature_kernel in s]  # step never re-projects the features
  # ... and never tiles the features per beam.
  assert not [s for s, _ in step_dots if (BATCH, 2, POSITIONS, CHANNELS) in s]


def test_dropout_only_when_not_deterministic():
  decoder, variables, features, tokens = _cached_setup()
  apply = jax.jit(decoder.apply, static_argnames="deterministic")
  rngs = lambda seed: {"dropout": rng_key(seed)}
  fixed = apply(variables, features, tokens, deterministic=True)[0]
  np.testing.assert_array_equal(fixed, apply(variables, features, tokens, deterministic=True,
                                             rngs=rngs(1))[0])
  noisy_1 = apply(variables, features, tokens, deterministic=False, rngs=rngs(1))[0]
  noisy_2 = apply(variables, features, tokens, deterministic=False, rngs=rngs(2))[0]
  assert float(jnp.abs(noisy_1 - fixed).max()) > 1e-3
  assert float(jnp.abs(noisy_1 - noisy_2).max()) > 1e-3
  np.testing.assert_array_equal(noisy_1, apply(variables, features, tokens, deterministic=False,
                                               rngs=rngs(1))[0])
  no_dropout = make_decoder(dropout_rate=0.0)
  np.testing.assert_allclose(
      no_dropout.apply(variables, features, tokens, deterministic=False, rngs=rngs(1))[0], fixed,
      atol=1e-6)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(decoder):
  """jit(value_and_grad) of a loss over the logits and the attention (dropout on, a fixed key):
  (params, features, tokens) -> (loss, grads); one compilation per decoder across the tests."""
  def loss_fn(params, features, tokens):
    logits, attention = decoder.apply({"params": params}, features, tokens, deterministic=False,
                                      rngs={"dropout": rng_key(3)})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(attention[..., 0] ** 2)
  return jax.jit(jax.value_and_grad(loss_fn))


def test_gradients_finite_and_reach_every_parameter():
  decoder, variables, features, tokens = _cached_setup()
  _, grads = _loss_and_grads(decoder)(variables["params"], features, tokens)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(grad)), path
    assert float(jnp.abs(grad).max()) > 0, path


def test_bfloat16_close_to_float32():
  decoder, variables, features, tokens = _cached_setup()
  half = make_decoder(dtype=jnp.bfloat16)
  half_variables = jax.eval_shape(functools.partial(half.init, deterministic=True),
                                  rng_key(42), features, tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half_variables))
  logits, attention = jax.jit(functools.partial(half.apply, deterministic=True))(
      variables, features, tokens)
  ref_logits, ref_attention = jax.jit(functools.partial(decoder.apply, deterministic=True))(
      variables, features, tokens)
  assert logits.dtype == jnp.float32 and attention.dtype == jnp.float32
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
  scale = float(jnp.abs(ref_logits).max())
  assert float(jnp.abs(logits - ref_logits).max()) < 0.05 * scale + 0.02
  assert float(jnp.abs(attention - ref_attention).max()) < 0.02


def _forward_scan_residual_shapes(decoder, params, features, tokens):
  """Shapes of what the teacher-forced scan keeps for the backward pass (its stacked outputs)."""
  loss = lambda p: jnp.sum(decoder.apply({"params": p}, features, tokens, deterministic=True)[0])
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  forward_scan = next(eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan")
  return [tuple(v.aval.shape) for v in forward_scan.outvars]


def _assert_same_loss_and_grads(actual, expected):
  """(loss, grads) pairs equal to float32 rounding."""
  np.testing.assert_allclose(actual[0], expected[0], rtol=1e-6)
  for grad, expected_grad in zip(jax.tree.leaves(actual[1]), jax.tree.leaves(expected[1])):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_decoder_gradients_with_jaxs_tanh_and_ours_agree(monkeypatch):
  """The attention's `layers.tanh` changes what the backward pass keeps, not the loss or the
  gradients."""
  decoder, variables, features, tokens = _cached_setup()
  params = variables["params"]
  ours = _loss_and_grads(decoder)(params, features, tokens)
  monkeypatch.setitem(layers.ATTENTION_ACTIVATIONS, "tanh", jnp.tanh)
  _assert_same_loss_and_grads(ours, _loss_and_grads(make_decoder())(params, features, tokens))
  per_step_attention = (TIME, BATCH, 1, POSITIONS, ATTN)
  assert _forward_scan_residual_shapes(make_decoder(), params, features, tokens).count(
      per_step_attention) == 2  # jax's tanh: its output and 1 - it


def test_recomputed_attention_gives_the_same_loss_and_gradients():
  """recompute_attention: the same parameters, loss and gradients; nothing of the attention's size
  [batch, 1, P, A] per step is kept by the forward scan (the default keeps one: tanh's output)."""
  decoder, variables, features, tokens = _cached_setup()
  recomputed = make_decoder(recompute_attention=True)
  init = functools.partial(recomputed.init, deterministic=True)
  assert (jax.tree_util.tree_structure(jax.eval_shape(init, rng_key(42), features, tokens))
          == jax.tree_util.tree_structure(variables))
  params = variables["params"]
  _assert_same_loss_and_grads(_loss_and_grads(recomputed)(params, features, tokens),
                              _loss_and_grads(decoder)(params, features, tokens))
  per_step_attention = (TIME, BATCH, 1, POSITIONS, ATTN)
  assert _forward_scan_residual_shapes(decoder, params, features, tokens).count(per_step_attention) == 1
  assert per_step_attention not in _forward_scan_residual_shapes(recomputed, params, features, tokens)


def test_attention_is_recomputed_by_default_off_the_cpu_only(monkeypatch):
  """recompute_attention=None (configs/default.py's): kept on the CPU, recomputed on a GPU or TPU."""
  decoder, variables, features, tokens = _cached_setup()
  assert decoder.recompute_attention is None
  per_step_attention = (TIME, BATCH, 1, POSITIONS, ATTN)
  params = variables["params"]
  for backend, kept in (("cpu", 1), ("gpu", 0), ("tpu", 0)):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    shapes = _forward_scan_residual_shapes(decoder, params, features, tokens)
    assert shapes.count(per_step_attention) == kept, backend
  assert not make_decoder(recompute_attention=False).recomputes_attention()


def test_bfloat16_features_equal_rounded_features():
  """feature_dtype=bfloat16 with float32 compute: the same as float32 on bf16-rounded features
  (teacher forcing and its gradients, a beam step), the features kept in bf16."""
  decoder, variables, features, tokens = _cached_setup()
  narrow = make_decoder(feature_dtype=jnp.bfloat16)
  rounded = features.astype(jnp.bfloat16).astype(jnp.float32)
  params = variables["params"]
  _assert_same_loss_and_grads(_loss_and_grads(narrow)(params, features, tokens),
                              _loss_and_grads(decoder)(params, rounded, tokens))
  encoded = narrow.apply(variables, features, method=Decoder.encode)
  assert encoded.features.dtype == jnp.bfloat16 and encoded.projected_features.dtype == jnp.float32
  ref_encoded = decoder.apply(variables, rounded, method=Decoder.encode)
  carry, step_tokens = _random_step_inputs(np.random.default_rng(5), (BATCH, 3))
  for a, b in zip(jax.tree.leaves(_jitted_step(narrow)(variables, encoded, carry, step_tokens)),
                  jax.tree.leaves(_jitted_step(decoder)(variables, ref_encoded, carry, step_tokens))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padded_kernel_columns_give_the_same_values():
  """pad_columns_to=8: the same loss, gradients and beam step (every layer's product on a kernel
  padded with zero columns, cut back), the parameters unchanged; every Dense kernel the products read
  has a multiple of 8 columns (hidden_proj: 4H + A + 1 = 75 -> 80, the vocabulary: 17 -> 24)."""
  decoder, variables, features, tokens = _cached_setup()
  padded = make_decoder(pad_columns_to=8)
  params = variables["params"]
  _assert_same_loss_and_grads(_loss_and_grads(padded)(params, features, tokens),
                              _loss_and_grads(decoder)(params, features, tokens))
  encoded = decoder.apply(variables, features, method=Decoder.encode)
  carry, step_tokens = _random_step_inputs(np.random.default_rng(6), (BATCH, 3))
  for a, b in zip(jax.tree.leaves(_jitted_step(padded)(variables, encoded, carry, step_tokens)),
                  jax.tree.leaves(_jitted_step(decoder)(variables, encoded, carry, step_tokens))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  def kernel_columns(module):  # 8 images: more rows than the CPU multiplies one by one
    eight = (jnp.tile(features, (3, 1, 1, 1))[:8], jnp.tile(tokens, (3, 1))[:8])
    jaxpr = jax.make_jaxpr(functools.partial(module.apply, deterministic=True))(
        variables, *eight).jaxpr
    return {shapes[1][-1] for shapes, _ in _dot_operand_shapes(jaxpr) if len(shapes[1]) == 2}

  assert 4 * HIDDEN + ATTN + 1 in kernel_columns(decoder) and VOCAB in kernel_columns(decoder)
  # (w_a [A, 1], the attention score's vector, is no GEMM's kernel: not padded)
  assert {columns % 8 for columns in kernel_columns(padded) - {1}} == {0}
  with pytest.raises(ValueError, match="pad_columns_to"):
    make_decoder(pad_columns_to=0).init(rng_key(0), features, tokens, deterministic=True)


def test_rejects_bad_shapes_and_options():
  with pytest.raises(ValueError, match="features must be"):
    decoder_lib.flatten_features(jnp.zeros((2, 3)))
  features, tokens = make_inputs()
  with pytest.raises(ValueError, match="attention_activation"):
    make_decoder(attention_activation="gelu").init(rng_key(0), features, tokens,
                                                   deterministic=True)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _numpy_step(p, features, c, h, tokens):
  p = {name: {k: np.asarray(v, np.float64) for k, v in layer.items()} if isinstance(layer, dict)
       else np.asarray(layer, np.float64) for name, layer in p.items()}
  H = c.shape[-1]
  embedded = p["embedding"]["embedding"][tokens]
  projected_h = h @ p["hidden_proj"]["kernel"]
  A = p["feature_proj"]["kernel"].shape[1]
  query = projected_h[:, 4 * H:4 * H + A]
  projected_f = features @ p["feature_proj"]["kernel"] + p["feature_proj"]["bias"]     # [b, P, A]
  scores = np.tanh(projected_f + query[:, None]) @ p["attention_score"]["kernel"][:, 0]  # [b, P]
  alpha = np.exp(scores - scores.max(1, keepdims=True))
  alpha /= alpha.sum(1, keepdims=True)
  beta = _sigmoid(projected_h[:, 4 * H + A:] + p["gate_bias"])
  z = beta * np.einsum("bp,bpc->bc", alpha, features)
  gates = (embedded @ p["input_gates"]["kernel"] + p["input_gates"]["bias"] + projected_h[:, :4 * H]
           + z @ p["context_gates"]["kernel"])
  i, f, g, o = np.split(gates, 4, axis=-1)
  c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
  h = _sigmoid(o) * np.tanh(c)
  out = np.tanh(h @ p["hidden_out"]["kernel"] + p["hidden_out"]["bias"]
                + z @ p["context_out"]["kernel"] + embedded)
  return out @ p["logits_out"]["kernel"] + p["logits_out"]["bias"], c, h, alpha


def test_step_matches_the_equations_in_numpy():
  decoder, variables, features, _ = _cached_setup()
  encoded = decoder.apply(variables, features, method=Decoder.encode)
  carry, tokens = _random_step_inputs(np.random.default_rng(3), (BATCH,))
  logits, new_carry, attention = _jitted_step(decoder)(variables, encoded, carry, tokens)
  flat = np.asarray(features, np.float64).reshape(BATCH, POSITIONS, CHANNELS)
  ref_logits, ref_c, ref_h, ref_alpha = _numpy_step(variables["params"], flat,
                                                   np.asarray(carry.c, np.float64),
                                                   np.asarray(carry.h, np.float64), np.asarray(tokens))
  np.testing.assert_allclose(attention, ref_alpha, atol=1e-5)
  np.testing.assert_allclose(new_carry.c, ref_c, atol=1e-5)
  np.testing.assert_allclose(new_carry.h, ref_h, atol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_lstm_bias_starts_at_one_for_the_forget_gate_only():
  _, variables, _, _ = _cached_setup()
  bias = np.asarray(variables["params"]["input_gates"]["bias"])
  np.testing.assert_array_equal(bias.reshape(4, HIDDEN),
                                np.repeat([[0.0], [1.0], [0.0], [0.0]], HIDDEN, axis=1))


def _primitive_count(jaxpr, name):
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          count += _primitive_count(sub, name)
  return count


def test_teacher_forcing_draws_two_dropout_masks():
  """Dropout on h before L_h and on the deep output before W_o: two masks of random bits."""
  decoder, variables, features, tokens = _cached_setup()
  jaxpr = jax.make_jaxpr(functools.partial(decoder.apply, deterministic=False))(
      variables, features, tokens, rngs={"dropout": rng_key(0)}).jaxpr
  assert _primitive_count(jaxpr, "random_bits") == 2
