"""The attention LSTM decoder of "Show, Attend and Tell" (Xu et al., 2015), soft attention.

One decoding step, from the previous state `(c, h)` and the previous word `y`:

    e_p     = w_a . act(W_f f_p + W_ha h)        additive attention over the P grid locations
    alpha   = softmax_p(e)                        [batch, P], float32
    z       = beta(h) * sum_p alpha_p f_p         beta(h) = sigmoid(w_b . h + b): the gate (optional)
    (c, h)  = LSTM([E y; z], (c, h))
    logits  = W_o dropout(tanh(L_h dropout(h) + L_z z + E y))   the deep output (L_z: ctx2out, E y: prev2out)

The initial state is `c0, h0 = tanh(W_c mean_p f_p), tanh(W_h mean_p f_p)`.

How the work is laid out, so that a train step is a few large matmuls plus a lean recurrence:
  * `encode` projects the features into the attention space once per image; `step` and `__call__` take the
    result and never project the features again.
  * In `__call__` everything that does not depend on the recurrent state is hoisted out of the scan: the
    embedding lookup and the embedding's share of the LSTM gates for all T steps (one matmul), and the whole
    deep output with the vocabulary projection (one matmul over [batch * T]).  The scan body holds one
    fused matmul of h (LSTM gates | attention query | gate logit), the attention, and one matmul of the
    context into the LSTM gates.
  * `step` takes K beams per image as an extra axis and attends every beam against the image's single copy
    of the encoded features (an einsum with a beam axis), so beam search never tiles the feature grid.
  * On the CPU a matmul of a few rows (a step of one image's beams) runs as one matrix-vector product
    per row (`layers.few_rows_dot_general`): XLA:CPU packs the whole weight matrix for a small-row
    GEMM, which made a beam-3 step's [3, 512] x [512, 2561] products ~4x slower than three
    matrix-vector products.
  * In `step`, off the CPU, the attention score w_a . tanh(...) is a multiply and a sum
    (`layers.AttentionScore`), which fuses into the activation; teacher forcing keeps it a product
    with the [A, 1] kernel, and autodiff keeps tanh's output [batch, P, A] of every step for the
    backward pass (`layers.tanh`). With `recompute_attention` teacher forcing takes the sum too and
    keeps nothing of the attention's size: the backward pass recomputes the activation (under
    `nn.remat`, or by `attention_grad.recomputed_scores` with `score_vjp`).
  * The context enters the step only through linear layers (the LSTM's context gates and L_z), so
    `encode(..., project_context=True)` can push the grid through them once per image; a step then takes
    the attention-weighted sum of those projections, [P, 4H + E] per image, instead of multiplying each
    beam's context by the [C, 4H + E] weights. That pays when the search multiplies more context
    vectors than the grid has locations (beam x steps > P; `decoding.search` decides): it removes the
    largest matrices from every step (on a CPU, where small-row matmuls are slow, ~40% of a step).

Parameters are float32; `dtype` sets the compute dtype (e.g. bfloat16).  Attention logits, the softmax, the
LSTM cell state and the vocabulary logits are kept in float32.
"""

import functools
from typing import Any, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcap import attention_grad
from flaxcap import late_grads
from flaxcap import layers

Array = jax.Array


class Encoded(NamedTuple):
  """The per-image part of the decoder's work, computed once by `Decoder.encode`.

  Attributes:
    features: the feature grid, flattened and cast to the compute dtype, [batch, P, C].
    projected_features: the features in the attention space, W_f f + b, [batch, P, A].
    context_projections: None, or the features through the context's layers, [batch, P, 4H (+ E)]:
      the LSTM's context gates, then L_z when ctx2out (see `Decoder.encode`).
    score_weights: None, or w_a [A] rounded to the compute dtype, as float32: a decoding loop
      computes it once outside (`decoding`), so that no step's sum converts it again.
    hidden_kernel: None, or `Decoder.padded_hidden_kernel()`, which a decoding loop pads once outside
      (`decoding`): XLA does not hoist a pad out of a loop (it grows the array), so each step padded
      the kernel again.
  """
  features: Array
  projected_features: Array
  context_projections: Array | None = None
  score_weights: Array | None = None
  hidden_kernel: Array | None = None


class LSTMCarry(NamedTuple):
  """The recurrent state, each [batch, H], or [batch, beam, H] when decoding K beams: float32 (a
  search may keep h in the compute dtype, which each use of h casts it to: `decoding`)."""
  c: Array
  h: Array


def flatten_features(features: Array) -> Array:
  """[batch, h, w, C] (or already [batch, P, C]) -> [batch, P = h * w, C]."""
  if features.ndim == 4:
    return einops.rearrange(features, "b h w c -> b (h w) c")
  if features.ndim != 3:
    raise ValueError(f"features must be [batch, h, w, C] or [batch, P, C], got shape {features.shape}")
  return features


def _scores_by_sum(decoder: "Decoder", projected_features: Array, query: Array) -> Array:
  """`Decoder._scores` by multiply and sum (`nn.remat` lifts a function of the module)."""
  return decoder._scores(projected_features, query, True)  # pylint: disable=protected-access


# The scores with nothing kept for the backward pass but the inputs: the activation [batch, K, P, A]
# is recomputed there (prevent_cse=False: in a scan the forward and backward computations sit in
# different loops, which XLA cannot merge).
_recomputed_scores_by_sum = nn.remat(_scores_by_sum, prevent_cse=False)


def _lstm_bias_init(key, shape, dtype=jnp.float32):
  """Zero biases for the gates (i, f, g, o) except 1 for the forget gate."""
  del key
  hidden_dim = shape[0] // 4
  return jnp.zeros(shape, dtype).at[hidden_dim:2 * hidden_dim].set(1.0)


class Decoder(nn.Module):
  """Soft-attention LSTM decoder.

  Attributes:
    vocab_size: V, the number of token ids.
    embed_dim: E, the word embedding size; also the size of the deep output layer.
    hidden_dim: H, the LSTM size.
    attention_dim: A, the size of the additive attention's hidden layer.
    dropout_rate: dropout on h before the deep output and on the deep output before the vocabulary layer.
    gate: multiply the context by a sigmoid gate beta(h_{t-1}) (a scalar per image and step).
    prev2out: add the previous word's embedding E y_{t-1} to the deep output.
    ctx2out: add the projected context L_z z_t to the deep output.
    attention_activation: "tanh" (the paper) or "relu", applied inside the additive attention.
    dtype: compute dtype; parameters stay float32.
    unroll: how many time steps the teacher-forced scan unrolls per iteration.

  The options below change speed or memory only, the values up to rounding (figures: BENCHMARKS.md):
    recompute_attention: teacher forcing computes the attention score as a multiply and a sum under
      `nn.remat`, so that the backward pass recomputes each step's act(W_f f + W_ha h) [batch, P, A]
      instead of keeping it. None: off the CPU (on an H200 1.09-1.17x faster, half the memory).
    feature_dtype: None (the compute dtype), or the dtype the flattened grid is kept in: bfloat16
      under float32 compute rounds the features once and halves what each step's context reads.
    pad_columns_to: each layer's product on its kernel padded with zero columns to a multiple of
      this (`layers.few_rows_dot_general`; aligned GPU GEMMs: `hidden_proj` has 2,561). 1: off.
    one_hot_embedding_grad: the embedding's gradient as a one-hot product rather than a scatter-add
      (`layers.Embed`); None: off the CPU.
    fused_attention: a decoding `step`'s attention (scores, softmax, context) in one Pallas kernel
      per image (`attention_kernel.attend`; interpreted off the GPU). On an H100 a loss.
    score_kernel: a decoding `step`'s scores alone in a Pallas kernel
      (`attention_kernel.attention_scores`), softmax and context XLA's; over `fused_attention`.
      With `score_vjp`, teacher forcing's scores too, and their gradients (`attention_grad_kernel`).
    approx_tanh: those kernels' tanh by the GPU's `tanh.approx.f32` (relative error below 2^-10.9,
      under bfloat16's rounding; the exact tanh off the GPU).
    late_projected_grad: teacher forcing's gradient of the projected features in one pass after
      the backward scan instead of a running sum in every step (`late_grads`).
    late_weight_grad: the same for the kernels of `hidden_proj` and `context_gates`: one GEMM each
      over all steps from the scan's outputs; and the gate's bias, one sum (`late_grads`).
    score_vjp: the recomputed scores (`recompute_attention`) by `attention_grad.recomputed_scores`,
      whose backward pass takes every gradient from one recomputation, not written out.
  """
  vocab_size: int
  embed_dim: int = 512
  hidden_dim: int = 512
  attention_dim: int = 512
  dropout_rate: float = 0.5
  gate: bool = True
  prev2out: bool = True
  ctx2out: bool = True
  attention_activation: str = "tanh"
  dtype: Any = jnp.float32
  unroll: int = 1
  recompute_attention: bool | None = None
  feature_dtype: Any = None
  pad_columns_to: int = 1
  one_hot_embedding_grad: bool | None = None
  fused_attention: bool = False
  score_kernel: bool = False
  approx_tanh: bool = False
  late_projected_grad: bool = False
  late_weight_grad: bool = False
  score_vjp: bool = False

  def setup(self):
    if self.attention_activation not in layers.ATTENTION_ACTIVATIONS:
      raise ValueError(f"attention_activation must be one of {sorted(layers.ATTENTION_ACTIVATIONS)}, "
                       f"got {self.attention_activation!r}")
    if self.pad_columns_to < 1:
      raise ValueError(f"pad_columns_to must be >= 1, got {self.pad_columns_to}")
    dot = functools.partial(layers.few_rows_dot_general, column_multiple=self.pad_columns_to)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, dot_general=dot)
    # float32 results from low-precision inputs, where the result feeds a softmax.
    f32_dot = functools.partial(dot, preferred_element_type=jnp.float32)
    hid, att = self.hidden_dim, self.attention_dim
    self.embedding = layers.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                                  param_dtype=jnp.float32, one_hot_grad=self.one_hot_embedding_grad)
    self.feature_proj = dense(att, name="feature_proj")  # W_f: C -> A
    self.init_state = dense(2 * hid, name="init_state")  # mean feature -> [c0 | h0]
    self.input_gates = dense(4 * hid, bias_init=_lstm_bias_init, name="input_gates")  # E y -> gates
    # h_{t-1} -> [LSTM gates (4H) | attention query (A) | gate logit (1)], one matmul per step.
    self.hidden_proj = dense(4 * hid + att + int(self.gate), use_bias=False, name="hidden_proj")
    if self.gate:
      self.gate_bias = self.param("gate_bias", nn.initializers.zeros_init(), (1,), jnp.float32)
    self.context_gates = dense(4 * hid, use_bias=False, name="context_gates")  # z -> gates
    self.attention_score = layers.AttentionScore(dtype=self.dtype, name="attention_score")  # w_a
    self.hidden_out = dense(self.embed_dim, name="hidden_out")  # L_h
    if self.ctx2out:
      self.context_out = dense(self.embed_dim, use_bias=False, name="context_out")  # L_z
    self.logits_out = dense(self.vocab_size, dot_general=f32_dot, name="logits_out")  # W_o
    self.dropout = nn.Dropout(self.dropout_rate)

  def recomputes_attention(self) -> bool:
    """Whether teacher forcing recomputes the attention's activation (`recompute_attention`)."""
    if self.recompute_attention is None:
      return jax.default_backend() != "cpu"
    return bool(self.recompute_attention)

  # -- per image ---------------------------------------------------------------------------------------

  def encode(self, features: Array, project_context: bool = False) -> Encoded:
    """Projects the feature grid into the attention space, once per image.

    Args:
      features: [batch, P, C] or [batch, h, w, C].
      project_context: also push every grid location through the context's layers (the LSTM's
        context gates and L_z), so that `step` never multiplies a context vector by them; worth it
        when beam size x steps > P (module docstring). The results are the same up to rounding.

    Returns:
      `Encoded(features [batch, P, C] (in `feature_dtype`), projected_features [batch, P, A],
      context_projections [batch, P, 4H (+ E)] or None)`, in the compute dtype.
    """
    features = flatten_features(jnp.asarray(features)).astype(self.feature_dtype or self.dtype)
    context_projections = None
    if project_context:
      # The barrier keeps XLA from merging these products with feature_proj's (they share the
      # features) into one GEMM whose [batch, P, 4H (+ E)] columns it then copied out.
      context_features = jax.lax.optimization_barrier(features)
      context_projections = self.context_gates(context_features)
      if self.ctx2out:
        context_projections = jnp.concatenate(
            [context_projections, self.context_out(context_features)], -1)
    return Encoded(features=features, projected_features=self.feature_proj(features),
                   context_projections=context_projections)

  def initial_carry(self, encoded: Encoded, beam: int | None = None) -> LSTMCarry:
    """The initial LSTM state from the mean feature.

    Args:
      encoded: from `encode`.
      beam: None for one sequence per image; K to repeat the state for K beams.

    Returns:
      `LSTMCarry(c, h)`, float32, each [batch, H] (beam None) or [batch, K, H].
    """
    mean_feature = jnp.mean(encoded.features.astype(jnp.float32), axis=1)  # [batch, C]
    state = jnp.tanh(self.init_state(mean_feature.astype(self.dtype)).astype(jnp.float32))
    c, h = jnp.split(state, 2, axis=-1)
    if beam is not None:
      c, h = (jnp.broadcast_to(x[:, None, :], (x.shape[0], beam, x.shape[1])) for x in (c, h))
    return LSTMCarry(c=c, h=h)

  # -- the recurrence ----------------------------------------------------------------------------------

  def _scores(self, projected_features: Array, query: Array, by_sum: bool,
              score_weights: Array | None = None) -> Array:
    """The additive attention's scores w_a . act(projected_features + query), float32 [batch, K, P].

    projected_features [batch, P, A], query [batch, K, A]; `by_sum`: see `layers.AttentionScore`.
    """
    activation = layers.ATTENTION_ACTIVATIONS[self.attention_activation]
    hidden = activation(projected_features[:, None, :, :] + query[:, :, None, :])  # [b, K, P, A]
    return self.attention_score(hidden, by_sum, score_weights)

  def _attend(self, encoded: Encoded, query: Array, score_by_sum: bool = False,
              recompute_scores: bool = False, kernels: bool = False,
              score_offset: Array | None = None, projected_h: Array | None = None,
              gate: Array | None = None) -> tuple[Array, Array]:
    """Additive attention of each beam's query against its image's grid (the grid is not copied).

    Args:
      encoded: features [batch, P, C], projected_features [batch, P, A].
      query: the projected hidden state W_ha h, [batch, K, A].
      score_by_sum: the score as a multiply and a sum (`layers.AttentionScore`; for decoding steps).
      recompute_scores: the score by sum, its activation recomputed in the backward pass
        (`recompute_attention`).
      kernels: the Pallas kernels the decoder is configured for (decoding steps): all of it in
        `attention_kernel.attend` (`fused_attention`, where the values are in the compute dtype), or
        the scores in `attention_kernel.attention_scores` (`score_kernel`).
      score_offset: None, or [batch, K, P] float32 added to the scores (zeros from
        `attention_grad`, whose cotangent is the scores').
      projected_h: None, or the product of h that holds `query` in its columns 4H...: the score
        kernel reads the query there, where it would otherwise be sliced out (a copy) first.
      gate: None, or beta [batch, K, 1] float32, which scales the context: applied to the weights
        of the context's product (one kernel fewer a decoding step on a GPU than after it).

    Returns:
      context [batch, K, C] (compute dtype; times `gate`), or with `encoded.context_projections` the same weighted
      sum of those, [batch, K, 4H (+ E)]; attention weights [batch, K, P] (float32).
    """
    values = encoded.features if encoded.context_projections is None else encoded.context_projections
    kernel_scores = kernels and self.score_kernel
    if kernels and (kernel_scores or self.fused_attention and values.dtype == self.dtype):
      from flaxcap import attention_kernel  # pylint: disable=g-import-not-at-top  (Pallas: opt-in)
      score_weights = self.attention_score.variables["params"]["kernel"][:, 0]
      interpret = jax.default_backend() != "gpu"
      activation = attention_kernel.kernel_activation(
          self.attention_activation, approx_tanh=self.approx_tanh, interpret=interpret)
      if not kernel_scores:
        context, attention = attention_kernel.attend(encoded.projected_features, query,
                                                     score_weights, values, activation=activation,
                                                     interpret=interpret)
        if gate is not None:
          context = (gate * context.astype(jnp.float32)).astype(self.dtype)
        return context, attention
      query_offset = 0 if projected_h is None else 4 * self.hidden_dim
      scores = attention_kernel.attention_scores(
          encoded.projected_features, query if projected_h is None else projected_h, score_weights,
          activation=activation, interpret=interpret, query_offset=query_offset)
    elif recompute_scores and self.score_vjp and not self.is_initializing():
      scores = attention_grad.recomputed_scores(
          encoded.projected_features, query, self.attention_score.variables["params"]["kernel"][:, 0],
          self.attention_activation, self.score_kernel, self.approx_tanh)
    elif recompute_scores:
      scores = _recomputed_scores_by_sum(self, encoded.projected_features, query)
    else:
      scores = self._scores(encoded.projected_features, query, score_by_sum,
                            encoded.score_weights)  # [batch, K, P], float32
    if score_offset is not None:
      scores = scores + score_offset
    attention = jax.nn.softmax(scores, axis=-1)
    weights = (attention if gate is None else gate * attention).astype(self.dtype)
    if values.dtype == self.dtype:
      context = jnp.einsum("bkp,bpc->bkc", weights, values)
    else:  # narrower features (`feature_dtype`): read as they are, the product in the compute dtype
      context = jax.lax.dot_general(weights, values, (((2,), (1,)), ((0,), (0,))),
                                    preferred_element_type=self.dtype)
    return context, attention

  def _recur(self, encoded: Encoded, carry: LSTMCarry, word_gates: Array,
             score_by_sum: bool = False, recompute_scores: bool = False, kernels: bool = False,
             score_offset: Array | None = None, hidden_offset: Array | None = None):
    """One recurrent step on beam-shaped arrays.

    Args:
      encoded: from `encode`.
      carry: c, h each [batch, K, H], float32.
      word_gates: the embedding's share of the LSTM gates, bias included, [batch, K, 4H].
      score_by_sum, recompute_scores, kernels, score_offset: see `_attend`.
      hidden_offset: None, or [batch, K, 4H + A (+ 1)] in the compute dtype added to the product of h
        (zeros from `late_grads`, whose cotangent is the product's).

    Returns:
      (new carry, (h [batch, K, H], gated context z [batch, K, C] (or its projections [batch, K, 4H
      (+ E)] when `encoded` has them), attention [batch, K, P], the query [batch, K, A])).
    """
    hid, att = self.hidden_dim, self.attention_dim
    if encoded.hidden_kernel is None:
      product = self.hidden_proj(carry.h.astype(self.dtype))  # [batch, K, 4H + A (+ 1)]
    else:  # the same product on the kernel padded outside the loop (its columns cut back below)
      product = layers.few_rows_dot_general(carry.h.astype(self.dtype), encoded.hidden_kernel,
                                            (((carry.h.ndim - 1,), (0,)), ((), ())))
    projected_h = product[..., :4 * hid + att + int(self.gate)]
    if hidden_offset is not None:
      projected_h = product = projected_h + hidden_offset
    hidden_gates = projected_h[..., :4 * hid]
    query = projected_h[..., 4 * hid:4 * hid + att]
    beta = None
    if self.gate:  # [batch, K, 1]
      beta = jax.nn.sigmoid(projected_h[..., 4 * hid + att:].astype(jnp.float32) + self.gate_bias)
    context, attention = self._attend(encoded, query, score_by_sum, recompute_scores, kernels,
                                      score_offset, projected_h=product, gate=beta)
    context_gates = (self.context_gates(context) if encoded.context_projections is None
                     else context[..., :4 * hid])
    gates = (word_gates.astype(jnp.float32) + hidden_gates.astype(jnp.float32) +
             context_gates.astype(jnp.float32))
    c, h = layers.lstm_cell(gates, carry.c)
    return LSTMCarry(c=c, h=h), (h, context, attention, query)

  def _deep_output(self, h: Array, context: Array, embedded: Array, deterministic: bool,
                   context_projected: bool = False) -> Array:
    """logits = W_o dropout(tanh(L_h dropout(h) [+ L_z z] [+ E y])), float32, [..., V].

    `context_projected`: `context` holds [context gates | L_z z] (from `context_projections`).
    """
    out = self.hidden_out(self.dropout(h.astype(self.dtype), deterministic=deterministic))
    if self.ctx2out:
      out = out + (context[..., 4 * self.hidden_dim:] if context_projected else self.context_out(context))
    if self.prev2out:
      out = out + embedded
    out = self.dropout(jnp.tanh(out), deterministic=deterministic)
    return self.logits_out(out)

  def padded_hidden_kernel(self) -> Array:
    """`hidden_proj`'s kernel in the compute dtype with zero columns up to a multiple of
    `pad_columns_to`, as its product pads it (`layers.few_rows_dot_general`): [H, 4H + A (+ 1)
    rounded up]. For `Encoded.hidden_kernel`."""
    kernel = self.hidden_proj.variables["params"]["kernel"].astype(self.dtype)
    return jnp.pad(kernel, ((0, 0), (0, -kernel.shape[1] % self.pad_columns_to)))

  def word_gate_table(self) -> Array:
    """The embedding's share of the LSTM gates for every token, bias included: [V, 4H].

    Computed once per set of parameters (e.g. when a model is loaded), it turns the word's matmul in
    every decoding `step` into a row lookup (`step(..., word_gates=table)`); on a CPU the [4H x E]
    weights are a quarter of the bytes a step streams.
    """
    return self.input_gates(self.embedding.embedding.astype(self.dtype))

  def step(self, encoded: Encoded, carry: LSTMCarry, tokens: Array,
           deterministic: bool = True, word_gates: Array | None = None
           ) -> tuple[Array, LSTMCarry, Array]:
    """One decoding step for one or K sequences per image.

    Args:
      encoded: from `encode`, [batch, P, ...] (not repeated per beam).
      carry: from `initial_carry` or the previous step: each [batch, H], or [batch, K, H] for K beams.
      tokens: the previous token ids, [batch] or [batch, K].
      deterministic: disables dropout.
      word_gates: None, or `word_gate_table()` [V, 4H], looked up instead of multiplying (the same
        up to rounding).

    Returns:
      (logits [batch, (K,) V] float32, new carry, attention [batch, (K,) P] float32).
    """
    tokens = jnp.asarray(tokens)
    single = tokens.ndim == 1
    if single:
      tokens = tokens[:, None]
      carry = LSTMCarry(*(x[:, None, :] for x in carry))
    embedded = self.embedding(tokens)  # [batch, K, E]
    gates = self.input_gates(embedded) if word_gates is None else jnp.take(word_gates, tokens, axis=0)
    carry, (h, context, attention, _) = self._recur(encoded, carry, gates,
                                                    score_by_sum=jax.default_backend() != "cpu",
                                                    kernels=True)
    logits = self._deep_output(h, context, embedded, deterministic,
                               context_projected=encoded.context_projections is not None)
    if single:
      logits, attention = logits[:, 0], attention[:, 0]
      carry = LSTMCarry(*(x[:, 0] for x in carry))
    return logits, carry, attention

  # -- teacher forcing ---------------------------------------------------------------------------------

  def _teacher_forced_scan(self, carry: LSTMCarry, encoded: Encoded, word_gates: Array,
                           offsets: late_grads.StepOffsets = late_grads.StepOffsets()):
    """The recurrence over T steps: word_gates [batch, T, 4H] -> ((h [batch, T, H], context
    [batch, T, C], attention [batch, T, P]), queries [batch, T, A]). `offsets` (`late_grads`): each
    None or [batch, T, ...], added at step t to the scores and to the product of h."""
    def body(module, carry, encoded, step_inputs):  # [batch, 4H], StepOffsets of [batch, ...]
      word_gates_t, offsets_t = step_inputs
      score_offset_t, hidden_offset_t = (None if offset is None else offset[:, None]
                                         for offset in offsets_t)
      carry, (h, context, attention, query) = module._recur(
          encoded, carry, word_gates_t[:, None, :], recompute_scores=module.recomputes_attention(),
          score_offset=score_offset_t, hidden_offset=hidden_offset_t)
      return carry, (h[:, 0], context[:, 0], attention[:, 0], query[:, 0])

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(nn.broadcast, 1), out_axes=1, unroll=self.unroll)
    _, (hidden, context, attention, queries) = scan(self, carry, encoded, (word_gates, offsets))
    return (hidden, context, attention), queries

  def __call__(self, features: Array, input_tokens: Array, *,
               deterministic: bool) -> tuple[Array, Array]:
    """Teacher-forced decoding of whole captions with `nn.scan` over time.

    Args:
      features: [batch, P, C] or [batch, h, w, C].
      input_tokens: [batch, T], <bos> w1 ... (the caption shifted right).
      deterministic: disables dropout (pass False for training, with a "dropout" rng).

    Returns:
      logits [batch, T, V] float32 and attention weights [batch, T, P] float32.
    """
    encoded = self.encode(features)
    carry = self.initial_carry(encoded, beam=1)
    embedded = self.embedding(input_tokens)  # [batch, T, E]
    word_gates = self.input_gates(embedded)  # [batch, T, 4H]: one matmul for all steps

    if (self.late_projected_grad or self.late_weight_grad) and not self.is_initializing():
      decoder = self.clone(parent=None)
      apply_scan = lambda params, *inputs: decoder.apply({"params": params}, *inputs,
                                                         method=Decoder._teacher_forced_scan)
      hidden, context, attention = late_grads.scan_with_late_grads(
          apply_scan, self.variables["params"], carry, encoded, word_gates, dtype=self.dtype,
          activation=self.attention_activation, projected_features=self.late_projected_grad,
          weights=self.late_weight_grad, by_kernel=self.score_vjp and self.score_kernel,
          approx_tanh=self.approx_tanh)
    else:
      (hidden, context, attention), _ = self._teacher_forced_scan(carry, encoded, word_gates)
    logits = self._deep_output(hidden, context, embedded, deterministic)  # [batch, T, V]
    return logits, attention
