"""Teacher forcing's gradient of the projected features, summed once after the backward scan.

Autodiff of the teacher-forced scan adds every step's gradient of the projected features
pf = W_f f + b, [batch, P, A], into a running sum that each step of the backward scan reads and
writes: at the tutorial's sizes (batch 512, bf16) 206 MB a step, 4.3 GB of the 25.9 GB a train
step's attention moves (`bench/roofline.py`). That gradient is

    d pf[b, p, a] = sum_t ds_t[b, p] w_a act'(pf[b, p, a] + q_t[b, a])

with ds_t the cotangents of step t's attention scores, q_t its queries and w_a the score's kernel:
the steps meet only through arrays of [batch, T, P] and [batch, T, A]. `scan_with_late_projected_grad`
runs the scan with the projected features under `stop_gradient` and a zero offset added to each
step's scores, so the backward scan keeps no running sum and hands out ds_t as the offsets'
cotangent; its custom VJP then takes the sum above as one reduction over the steps, which reads the
projected features once and writes their gradient once. The same gradient up to rounding: the sum
over steps is float32, where the scan adds in the compute dtype.

    outputs = scan_with_late_projected_grad(apply_scan, params, carry, encoded, word_gates,
                                            dtype=dtype, activation="tanh")

`recomputed_scores` is the other half: a step's scores whose backward pass recomputes the
activation and takes every gradient from it in one pass over [batch, K, P, A] (the score kernel's
and the query's are both sums over P), where autodiff of the same function under `nn.remat` wrote
the recomputed activation out in float32 and read it back (compiled for an H100,
bench/gpu_aot.py).

    scores = recomputed_scores(projected_features, query, score_kernel, "tanh")   # [batch, K, P]
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flaxcap import layers

Array = jax.Array


def projected_features_grad(projected_features: Array, queries: Array, score_grads: Array,
                            score_kernel: Array, activation: str) -> Array:
  """The gradient of the projected features, summed over the steps.

  Args:
    projected_features: pf [batch, P, A], the compute dtype.
    queries: q_t [batch, T, A], the same dtype.
    score_grads: ds_t [batch, T, P], float32.
    score_kernel: w_a [A], the compute dtype (as the score's product rounds it).
    activation: "tanh" or "relu" (`Decoder.attention_activation`).

  Returns:
    d pf [batch, P, A] in the compute dtype. As the forward pass: the sum inside the activation in
    the compute dtype; the activation's gradient in float32 from its rounded output, as
    `layers.tanh`; the steps summed in float32.
  """
  summed = projected_features[:, None] + queries[:, :, None]  # [batch, T, P, A]
  _, summed_grads = _activation_and_grads(summed, score_grads, score_kernel, activation)
  return jnp.sum(summed_grads, axis=1).astype(projected_features.dtype)


def _activation_and_grads(summed: Array, score_grads: Array, score_kernel: Array, activation: str
                          ) -> tuple[Array, Array]:
  """act(summed) and the scores' gradient with respect to `summed`, float32 [..., P, A] each.

  summed: pf + q in the compute dtype, [..., P, A]; score_grads: float32 [..., P]; score_kernel: w_a
  [A] in the compute dtype. Rounded as autodiff of the score rounds them: the activation's cotangent
  in the compute dtype, its slope in float32 from the rounded output (`layers.tanh`).
  """
  activated, slopes = activation_and_slopes(summed, activation)
  return activated, hidden_grads(score_grads[..., None], score_kernel, summed.dtype) * slopes


def activation_and_slopes(summed: Array, activation: str, activate=None) -> tuple[Array, Array]:
  """act(summed) rounded to summed's dtype, and act's slope there, both float32.

  activation: "tanh" or "relu"; `activate`: the function computing it (float32 in and out; by
  default jnp's), e.g. a kernel's `tanh.approx.f32`. The slope of tanh from its rounded output.
  """
  if activation not in ("tanh", "relu"):
    raise ValueError(f"activation must be tanh or relu, got {activation!r}")
  activate = activate or (jnp.tanh if activation == "tanh" else jax.nn.relu)
  activated = activate(summed.astype(jnp.float32)).astype(summed.dtype).astype(jnp.float32)
  if activation == "tanh":
    return activated, (1.0 - activated) * (1.0 + activated)
  return activated, (summed > 0).astype(jnp.float32)


def hidden_grads(score_grads: Array, score_kernel: Array, dtype) -> Array:
  """The activation's cotangent ds * w_a (score_grads broadcast against score_kernel [A]), rounded
  to the compute dtype as autodiff of the score rounds it; float32."""
  return (score_grads * score_kernel.astype(jnp.float32)).astype(dtype).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def recomputed_scores(projected_features: Array, query: Array, score_kernel: Array,
                      activation: str, by_kernel: bool = False, approx_tanh: bool = False) -> Array:
  """The additive attention's scores w_a . act(pf + q), float32 [batch, K, P], as
  `Decoder._scores(..., by_sum=True)`, keeping only the inputs for the backward pass.

  Args:
    projected_features: pf [batch, P, A], the compute dtype.
    query: q [batch, K, A], the same dtype.
    score_kernel: w_a [A] (the parameter's dtype; rounded to the compute dtype as the score's
      product rounds it).
    activation: a name in `layers.ATTENTION_ACTIVATIONS`.
    by_kernel: the forward pass by `attention_kernel.attention_scores` and the query's and the
      kernel's gradients by `attention_grad_kernel.score_grads` (Pallas kernels; interpreted off the
      GPU), with `approx_tanh` their tanh by the GPU's `tanh.approx.f32`
      (`attention_kernel.kernel_activation`).

  The backward pass recomputes act(pf + q) and takes from it, in float32 sums over P, the kernel's
  gradient (sum of ds * act) and the query's (sum of d(pf + q)), and the projected features'
  (summed over K); XLA can fuse the two sums over P into one pass over the recomputed activation,
  which nothing writes out. The same gradients as autodiff up to rounding (the sums in float32).
  """
  if by_kernel:
    from flaxcap import attention_kernel  # pylint: disable=g-import-not-at-top  (Pallas: opt-in)
    interpret = jax.default_backend() != "gpu"
    return attention_kernel.attention_scores(
        projected_features, query, score_kernel, interpret=interpret,
        activation=attention_kernel.kernel_activation(activation, approx_tanh=approx_tanh,
                                                      interpret=interpret))
  hidden = layers.ATTENTION_ACTIVATIONS[activation](
      projected_features[:, None, :, :] + query[:, :, None, :])  # [batch, K, P, A]
  weights = score_kernel.astype(projected_features.dtype).astype(jnp.float32)
  return jnp.sum(hidden.astype(jnp.float32) * weights, axis=-1)


def _recomputed_scores_forward(projected_features, query, score_kernel, activation, by_kernel,
                               approx_tanh):
  scores = recomputed_scores(projected_features, query, score_kernel, activation, by_kernel,
                             approx_tanh)
  return scores, (projected_features, query, score_kernel)


def _recomputed_scores_backward(activation, by_kernel, approx_tanh, residuals, score_grads):
  projected_features, query, score_kernel = residuals
  dtype = projected_features.dtype
  score_kernel_c = score_kernel.astype(dtype)

  def activation_and_grads(projected_features, query):
    summed = projected_features[:, None, :, :] + query[:, :, None, :]  # [batch, K, P, A]
    return _activation_and_grads(summed, score_grads, score_kernel_c, activation)

  def projected_features_grads(summed_grads):  # not computed where unused (under stop_gradient)
    return jnp.sum(summed_grads.astype(dtype), axis=1)  # as autodiff: rounded, then over K

  if by_kernel:  # both sums from one recomputation, in one pass (attention_grad_kernel)
    from flaxcap import attention_grad_kernel  # pylint: disable=g-import-not-at-top  (Pallas: opt-in)
    query_grads, kernel_grads = attention_grad_kernel.score_grads(
        projected_features, query, score_grads, score_kernel, activation=activation,
        approx_tanh=approx_tanh, interpret=jax.default_backend() != "gpu")
    kernel_grads = jnp.sum(kernel_grads, axis=0).astype(dtype).astype(score_kernel.dtype)
    summed_grads = activation_and_grads(projected_features, query)[1]
    return projected_features_grads(summed_grads), query_grads.astype(query.dtype), kernel_grads

  # Each gradient recomputes the activation itself: XLA does not fuse an expensive producer (tanh)
  # into two consumers, so one shared activation would be written out in float32 and read back
  # (2 x 205 MB a step at batch 512). The barriers keep CSE from merging the two recomputations and
  # the kernel's sum over (batch, K) from merging with its sum over P, so that both are sums over P
  # of the same shape, which XLA can fuse into one pass.
  activated, _ = activation_and_grads(projected_features, query)
  kernel_grads = jax.lax.optimization_barrier(jnp.sum(score_grads[..., None] * activated, axis=2))
  kernel_grads = jnp.sum(kernel_grads, axis=(0, 1)).astype(dtype).astype(score_kernel.dtype)
  _, summed_grads = activation_and_grads(*jax.lax.optimization_barrier((projected_features, query)))
  query_grads = jnp.sum(summed_grads, axis=2).astype(query.dtype)
  return projected_features_grads(summed_grads), query_grads, kernel_grads


recomputed_scores.defvjp(_recomputed_scores_forward, _recomputed_scores_backward)


def scan_with_late_projected_grad(apply_scan: Callable[..., Any], params: Any, carry: Any,
                                  encoded: Any, word_gates: Array, *, dtype: Any,
                                  activation: str, by_kernel: bool = False,
                                  approx_tanh: bool = False) -> Any:
  """`apply_scan`'s outputs, with the projected features' gradient taken after the backward scan.

  Args:
    apply_scan: (params, carry, encoded, word_gates, score_offsets) -> (outputs, queries), pure: the
      teacher-forced scan, which must add score_offsets [batch, T, P] (float32) to step t's scores,
      read `encoded.projected_features` under `stop_gradient`, and return the queries q_t
      [batch, T, A] beside its outputs.
    params: the decoder's parameters (`params["attention_score"]["kernel"]`: w_a [A, 1]).
    carry, encoded, word_gates: the scan's other inputs ([batch, T, 4H] word gates).
    dtype: the compute dtype; activation: "tanh" or "relu".
    by_kernel: the sum over steps by `attention_grad_kernel.projected_features_grad` (a Pallas kernel;
      interpreted off the GPU), its tanh by `tanh.approx.f32` with `approx_tanh`.

  Returns:
    `apply_scan`'s outputs; under autodiff the same gradients as the plain scan up to rounding.
    Only the inputs being differentiated get a gradient from the scan (the features of cached
    features are not, so their [batch, P, C] gradient is not summed either).
  """
  def zero_offsets(encoded, word_gates):
    batch, steps = word_gates.shape[:2]
    return jnp.zeros((batch, steps, encoded.projected_features.shape[1]), jnp.float32)

  structure = {}  # set while tracing `forward`: the inputs' tree and which leaves are perturbed

  @jax.custom_vjp
  def run(params, carry, encoded, word_gates):
    return apply_scan(params, carry, encoded, word_gates, zero_offsets(encoded, word_gates))[0]

  def forward(params, carry, encoded, word_gates):  # leaves: CustomVJPPrimal (symbolic_zeros)
    is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)
    leaves, treedef = jax.tree_util.tree_flatten((params, carry, encoded, word_gates),
                                                 is_leaf=is_primal)
    values = [leaf.value for leaf in leaves]
    perturbed = [bool(leaf.perturbed) for leaf in leaves]
    structure.update(treedef=treedef, perturbed=perturbed)

    def scan_of_perturbed(perturbed_values, score_offsets):
      given = iter(perturbed_values)
      inputs = [next(given) if p else value for value, p in zip(values, perturbed)]
      return apply_scan(*jax.tree_util.tree_unflatten(treedef, inputs), score_offsets)

    params, carry, encoded, word_gates = jax.tree_util.tree_unflatten(treedef, values)
    outputs, vjp_fn, queries = jax.vjp(
        scan_of_perturbed, [v for v, p in zip(values, perturbed) if p],
        zero_offsets(encoded, word_gates), has_aux=True)
    score_kernel = params["attention_score"]["kernel"][:, 0].astype(dtype)
    return outputs, (vjp_fn, queries, encoded.projected_features, score_kernel)

  def backward(residuals, output_grads):
    vjp_fn, queries, projected_features, score_kernel = residuals
    treedef, perturbed = structure["treedef"], structure["perturbed"]
    output_grads = jax.tree.map(
        lambda g: jnp.zeros(g.shape, g.dtype) if isinstance(g, jax.custom_derivatives.SymbolicZero)
        else g, output_grads, is_leaf=lambda g: isinstance(g, jax.custom_derivatives.SymbolicZero))
    perturbed_grads, score_grads = vjp_fn(output_grads)
    given = iter(perturbed_grads)
    grads = [next(given) if p else None for p in perturbed]
    params_grads, carry_grads, encoded_grads, word_gate_grads = jax.tree_util.tree_unflatten(
        treedef, grads)
    if encoded_grads.projected_features is not None:
      if by_kernel:
        from flaxcap import attention_grad_kernel  # pylint: disable=g-import-not-at-top
        late_grads = attention_grad_kernel.projected_features_grad(
            projected_features, queries, score_grads, score_kernel, activation=activation,
            approx_tanh=approx_tanh, interpret=jax.default_backend() != "gpu")
      else:
        late_grads = projected_features_grad(projected_features, queries, score_grads,
                                             score_kernel, activation)
      encoded_grads = encoded_grads._replace(
          projected_features=encoded_grads.projected_features + late_grads)
    return params_grads, carry_grads, encoded_grads, word_gate_grads

  run.defvjp(forward, backward, symbolic_zeros=True)
  return run(params, carry, encoded, word_gates)
