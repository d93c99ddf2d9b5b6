"""Teacher forcing's attention gradients: the projected features' summed over the steps, and the
recomputed scores' backward pass.

Autodiff of the teacher-forced scan adds every step's gradient of the projected features
pf = W_f f + b, [batch, P, A], into a running sum that each step of the backward scan reads and
writes: at the tutorial's sizes (batch 512, bf16) 206 MB a step, 4.3 GB of the 25.9 GB a train
step's attention moves (`bench/roofline.py`). That gradient is

    d pf[b, p, a] = sum_t ds_t[b, p] w_a act'(pf[b, p, a] + q_t[b, a])

with ds_t the cotangents of step t's attention scores, q_t its queries and w_a the score's kernel:
the steps meet only through arrays of [batch, T, P] and [batch, T, A]. `projected_features_grad`
takes that sum once, after the backward scan (`late_grads.scan_with_late_grads`, which hands out
ds_t), reading the projected features once and writing their gradient once. The same gradient up to
rounding: the sum over steps is float32, where the scan adds in the compute dtype.

`recomputed_scores` is the other half: a step's scores whose backward pass recomputes the
activation and takes every gradient from it in one pass over [batch, K, P, A] (the score kernel's
and the query's are both sums over P), where autodiff of the same function under `nn.remat` wrote
the recomputed activation out in float32 and read it back (compiled for an H100,
bench/gpu_aot.py).

    scores = recomputed_scores(projected_features, query, score_kernel, "tanh")   # [batch, K, P]
"""

import functools

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
