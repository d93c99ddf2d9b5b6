"""Teacher forcing's gradients of loop-invariant inputs, summed once after the backward scan.

Autodiff of the teacher-forced scan adds each step's share of the gradient of an input that every step
reads (a weight, the projected features) into a running sum that each step of the backward scan reads
and writes. Two kinds are taken late here, each a sum over steps of products of arrays the steps
hand out:

    d pf  = sum_t ds_t w_a act'(pf + q_t)    the projected features pf = W_f f + b [batch, P, A]
                                             (`late_projected_grad`; ds_t: the scores' cotangent,
                                             `attention_grad.projected_features_grad`)
    d W_h = sum_t h_{t-1}^T dp_t              `hidden_proj` [H, 4H + A (+ 1)] (`late_weight_grad`;
                                             dp_t: the cotangent of the product p_t = W_h h_{t-1})
    d W_c = sum_t z_t^T dp_t[:, :4H]          `context_gates` [C, 4H]: z_t, the gated context, adds its
                                             product to the same LSTM gates, so its cotangent is
                                             dp_t's gate columns
    d b_g = sum_t sum_b dp_t[:, 4H + A]       the gate's bias [1], which adds to the gate's logit, the
                                             product's last column (a reduction and an add a step)

At the tutorial's sizes the running sums move 206 MB a backward step for pf (batch 512, bf16), and
48-73 MB for the two weights at any batch (float32 [2048, 2048] and [512, 2561]: the GEMM, then the
sum; compiled for an H100, bench/gpu_aot.py). `scan_with_late_grads` runs the scan with those inputs
held constant and a zero offset added to each step's scores and to its product p_t, so the backward
scan keeps no running sum and hands out ds_t and dp_t as the offsets' cotangents; its custom VJP then
takes each sum above once: one reduction over the steps that reads pf once and writes its gradient
once, and one GEMM over batch x T rows a weight (from the scan's own outputs h and z). The same
gradients up to rounding: the late sums are float32, where bf16 autodiff rounds each step's share.

    outputs = scan_with_late_grads(apply_scan, params, carry, encoded, word_gates, dtype=dtype,
                                   activation="tanh", projected_features=True, weights=True)
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from flaxcap import attention_grad

Array = jax.Array

# The layers whose kernels `weights=True` takes late: the product of h_{t-1} (its columns: the LSTM's
# gates, then the attention's query and the gate logit) and the context's product into the gates.
HIDDEN_KERNEL = ("hidden_proj", "kernel")
CONTEXT_KERNEL = ("context_gates", "kernel")
# Their paths, and the projected features', among the leaves of (params, carry, encoded, word_gates).
_HIDDEN, _CONTEXT = (0,) + HIDDEN_KERNEL, (0,) + CONTEXT_KERNEL
_GATE_BIAS = (0, "gate_bias")  # present where the decoder has the gate
_PROJECTED = (2, "projected_features")


class StepOffsets(NamedTuple):
  """Zeros the teacher-forced scan adds inside each step, whose cotangents are the per-step gradients.

  scores: None or [batch, T, P] float32, added to step t's attention scores.
  hidden: None or [batch, T, N] in the compute dtype, added to step t's product W_h h_{t-1} (N: its
    columns).
  """
  scores: Array | None = None
  hidden: Array | None = None


def _is_primal(leaf) -> bool:
  return isinstance(leaf, jax.custom_derivatives.CustomVJPPrimal)


def _key_names(path) -> tuple:
  return tuple(getattr(key, "key", getattr(key, "name", getattr(key, "idx", None))) for key in path)


def scan_with_late_grads(apply_scan: Callable[..., Any], params: Any, carry: Any, encoded: Any,
                         word_gates: Array, *, dtype: Any, activation: str,
                         projected_features: bool = True, weights: bool = False,
                         by_kernel: bool = False, approx_tanh: bool = False) -> Any:
  """`apply_scan`'s outputs, with the chosen loop invariants' gradients taken after the backward scan.

  Args:
    apply_scan: (params, carry, encoded, word_gates, offsets) -> ((h [batch, T, H], z [batch, T, C],
      attention [batch, T, P]), queries [batch, T, A]), pure: the teacher-forced scan, which must add
      `offsets` (`StepOffsets`, each field None or [batch, T, ...]) at step t, and return the queries
      q_t beside its outputs; h_t the LSTM's output, z_t the context as `context_gates` multiplies it.
    params: the decoder's parameters (`params["attention_score"]["kernel"]`: w_a [A, 1];
      `HIDDEN_KERNEL`, `CONTEXT_KERNEL`).
    carry: the initial `LSTMCarry`, each [batch, 1, H]; encoded, word_gates: the scan's other inputs
      ([batch, T, 4H] word gates).
    dtype: the compute dtype; activation: "tanh" or "relu".
    projected_features: take `encoded.projected_features`' gradient late.
    weights: take the gradients of `HIDDEN_KERNEL`, `CONTEXT_KERNEL` and the gate's bias late.
    by_kernel: the projected features' sum by `attention_grad_kernel.projected_features_grad` (a
      Pallas kernel; interpreted off the GPU), its tanh by `tanh.approx.f32` with `approx_tanh`.

  Returns:
    `apply_scan`'s outputs; under autodiff the same gradients as the plain scan up to rounding.
    Only the inputs being differentiated get a gradient (a train step on cached features does not
    differentiate the features, so their [batch, P, C] gradient is not summed either).
  """
  late_paths = {path for path, chosen in ((_PROJECTED, projected_features),
                                          (_HIDDEN, weights),
                                          (_CONTEXT, weights),
                                          (_GATE_BIAS, weights)) if chosen}

  def zero_offsets(params, encoded, word_gates, late):
    batch, steps = word_gates.shape[:2]
    scores = hidden = None
    if _PROJECTED in late:
      scores = jnp.zeros((batch, steps, encoded.projected_features.shape[1]), jnp.float32)
    if late & {_HIDDEN, _CONTEXT, _GATE_BIAS}:
      columns = params[HIDDEN_KERNEL[0]][HIDDEN_KERNEL[1]].shape[-1]
      hidden = jnp.zeros((batch, steps, columns), dtype)
    return StepOffsets(scores=scores, hidden=hidden)

  structure = {}  # set while tracing `forward`: the inputs' tree, what is perturbed, what is late

  @jax.custom_vjp
  def run(params, carry, encoded, word_gates):
    return apply_scan(params, carry, encoded, word_gates,
                      zero_offsets(params, encoded, word_gates, late_paths))[0]

  def forward(params, carry, encoded, word_gates):  # leaves: CustomVJPPrimal (symbolic_zeros)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        (params, carry, encoded, word_gates), is_leaf=_is_primal)
    paths = [_key_names(path) for path, _ in paths_and_leaves]
    values = [leaf.value for _, leaf in paths_and_leaves]
    perturbed = [bool(leaf.perturbed) for _, leaf in paths_and_leaves]
    late = {path for path, p in zip(paths, perturbed) if p and path in late_paths}
    # Differentiated by the scan: the perturbed inputs that are not taken late.
    scanned = [p and path not in late for path, p in zip(paths, perturbed)]
    structure.update(treedef=treedef, paths=paths, perturbed=perturbed, scanned=scanned, late=late,
                     dtypes=[value.dtype for value in values],
                     shapes={path: value.shape for path, value in zip(paths, values)})

    def scan_of_scanned(scanned_values, offsets):
      given = iter(scanned_values)
      inputs = [next(given) if s else value for value, s in zip(values, scanned)]
      return apply_scan(*jax.tree_util.tree_unflatten(treedef, inputs), offsets)

    params, carry, encoded, word_gates = jax.tree_util.tree_unflatten(treedef, values)
    outputs, vjp_fn, queries = jax.vjp(
        scan_of_scanned, [v for v, s in zip(values, scanned) if s],
        zero_offsets(params, encoded, word_gates, late), has_aux=True)
    score_kernel = params["attention_score"]["kernel"][:, 0].astype(dtype)
    hidden, context, _ = outputs
    previous_hidden = None
    if _HIDDEN in late:  # h_{t-1} as the product reads it
      previous_hidden = jnp.concatenate([carry.h, hidden[:, :-1]], axis=1).astype(dtype)
    return outputs, (vjp_fn, queries, encoded.projected_features, score_kernel, previous_hidden,
                     context)

  def backward(residuals, output_grads):
    vjp_fn, queries, projected, score_kernel, previous_hidden, context = residuals
    late = structure["late"]
    output_grads = jax.tree.map(
        lambda g: jnp.zeros(g.shape, g.dtype) if isinstance(g, jax.custom_derivatives.SymbolicZero)
        else g, output_grads, is_leaf=lambda g: isinstance(g, jax.custom_derivatives.SymbolicZero))
    scanned_grads, offset_grads = vjp_fn(output_grads)
    late_grads = {}
    if _PROJECTED in late:
      if by_kernel:
        from flaxcap import attention_grad_kernel  # pylint: disable=g-import-not-at-top
        late_grads[_PROJECTED] = attention_grad_kernel.projected_features_grad(
            projected, queries, offset_grads.scores, score_kernel, activation=activation,
            approx_tanh=approx_tanh, interpret=jax.default_backend() != "gpu")
      else:
        late_grads[_PROJECTED] = attention_grad.projected_features_grad(
            projected, queries, offset_grads.scores, score_kernel, activation)
    for path, inputs in ((_HIDDEN, previous_hidden), (_CONTEXT, context)):
      if path in late:  # [in, columns]: the kernel's columns lead the product's
        columns = structure["shapes"][path][-1]
        late_grads[path] = jnp.einsum("bti,btn->in", inputs, offset_grads.hidden[..., :columns],
                                      preferred_element_type=jnp.float32)
    if _GATE_BIAS in late:  # the logit's column: the last of the product's (unpadded) columns
      late_grads[_GATE_BIAS] = jnp.sum(offset_grads.hidden[..., -1:], axis=(0, 1),
                                       dtype=jnp.float32)
    given = iter(scanned_grads)
    grads = []
    for path, perturbed, scanned, leaf_dtype in zip(structure["paths"], structure["perturbed"],
                                                    structure["scanned"], structure["dtypes"]):
      if scanned:
        grads.append(next(given))
      elif perturbed:  # taken late
        grads.append(late_grads[path].astype(leaf_dtype))
      else:
        grads.append(None)
    return tuple(jax.tree_util.tree_unflatten(structure["treedef"], grads))

  run.defvjp(forward, backward, symbolic_zeros=True)
  return run(params, carry, encoded, word_gates)
