"""The decoder's building blocks below the module: its dot_general, attention score and tanh.

    tanh                     jnp.tanh whose gradient keeps only its output (the attention's)
    lstm_cell                the LSTM's update from its gates, whose gradient keeps only the gates
                             and the previous cell state
    ATTENTION_ACTIVATIONS    the activations inside the additive attention, by config name
    cast_matrices(params)    a decoder's matrices cast once to the compute dtype (decoding)
    few_rows_dot_general     nn.Dense's dot_general: row by row for a few rows on the CPU, kernels
                             padded to aligned columns where asked
    AttentionScore           w_a . hidden, as nn.Dense(1)'s product or as a multiply and a sum
    Embed                    nn.Embed whose gradient is a one-hot product off the CPU, not a scatter

`flaxcap.decoder` builds the decoder from them; what each one saves is measured there and in
bench/ (BENCHMARKS.md).
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def tanh(x: Array) -> Array:
  """`jnp.tanh` whose gradient keeps only its output y for the backward pass.

  jax's rule for tanh, g (1 + y)(1 - y), makes autodiff keep two tensors of the input's size, y and
  1 - y; in the attention that is [batch, P, A] per step of the teacher-forced scan (1 GiB each at
  batch 128, fp32, the tutorial's sizes). Here the forward pass keeps y alone (which the attention
  score's product keeps anyway), and the backward pass computes g (1 - y)(1 + y) from it in float32.
  The same gradient (in bfloat16 computed in float32, then rounded). A custom VJP: reverse mode only
  (jax.jvp through the attention raises; a custom JVP could not keep y alone without the bf16
  cancellation of g - g y y, or a float32 copy of y).
  """
  return jnp.tanh(x)


def _tanh_forward(x: Array) -> tuple[Array, Array]:
  y = jnp.tanh(x)
  return y, y


def _tanh_backward(y: Array, cotangent: Array) -> tuple[Array]:
  y = y.astype(jnp.float32)
  # (1 - y)(1 + y) rather than 1 - y^2: 1 - y is exact for y in [1/2, 1], where 1 - y^2 cancels.
  return ((cotangent.astype(jnp.float32) * ((1.0 - y) * (1.0 + y))).astype(cotangent.dtype),)


tanh.defvjp(_tanh_forward, _tanh_backward)


@jax.custom_vjp
def lstm_cell(gates: Array, c: Array) -> tuple[Array, Array]:
  """The LSTM's new state from its gates' pre-activations: (c', h').

  Args:
    gates: [..., 4H] float32, the input, forget, cell-input and output gates' pre-activations
      (i, f, g, o), each [..., H].
    c: the cell state [..., H], float32.

  Returns:
    c' = sigmoid(f) c + sigmoid(i) tanh(g) and h' = sigmoid(o) tanh(c'), each [..., H] float32.

  Autodiff keeps each activation the backward pass reads, a tensor of [..., H] each (six in the
  teacher-forced scan, written by as many kernels a step on a GPU: bench/gpu_aot.py); this rule
  keeps the gates and c, and the backward pass recomputes the activations from them in the kernel
  that uses them. The same gradients up to rounding. Reverse mode only, as `tanh`.
  """
  in_gate, forget_gate, cell_input, out_gate = jnp.split(gates, 4, axis=-1)
  new_c = jax.nn.sigmoid(forget_gate) * c + jax.nn.sigmoid(in_gate) * jnp.tanh(cell_input)
  return new_c, jax.nn.sigmoid(out_gate) * jnp.tanh(new_c)


def _lstm_cell_forward(gates: Array, c: Array):
  return lstm_cell(gates, c), (gates, c)


def _lstm_cell_backward(residuals, cotangents):
  gates, c = residuals
  new_c_grad, new_h_grad = cotangents
  in_gate, forget_gate, cell_input, out_gate = jnp.split(gates, 4, axis=-1)
  i, f, o = jax.nn.sigmoid(in_gate), jax.nn.sigmoid(forget_gate), jax.nn.sigmoid(out_gate)
  g = jnp.tanh(cell_input)
  new_c = f * c + i * g
  tanh_c = jnp.tanh(new_c)
  new_c_grad = new_c_grad + new_h_grad * o * (1.0 - tanh_c) * (1.0 + tanh_c)
  gates_grad = jnp.concatenate([new_c_grad * g * i * (1.0 - i),
                                new_c_grad * c * f * (1.0 - f),
                                new_c_grad * i * (1.0 - g) * (1.0 + g),
                                new_h_grad * tanh_c * o * (1.0 - o)], axis=-1)
  return gates_grad.astype(gates.dtype), (new_c_grad * f).astype(c.dtype)


lstm_cell.defvjp(_lstm_cell_forward, _lstm_cell_backward)


ATTENTION_ACTIVATIONS = {"tanh": tanh, "relu": jax.nn.relu}


def cast_matrices(params, dtype):
  """The decoder's params with every matrix (the Dense kernels, the embedding) cast to `dtype`.

  Each layer casts its matrix to the compute dtype before using it, so casting once outside a
  decoding loop gives the same results; inside the loop XLA does not hoist the casts and converts
  the weights again at every step (three extra kernels a step on a GPU). Vectors (biases, the gate
  bias, which is used in float32) are left as they are.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return params
  return jax.tree_util.tree_map(lambda p: p.astype(dtype) if jnp.ndim(p) >= 2 else p, params)


# Up to this many rows, a CPU matmul runs as one matrix-vector product per row (measured crossover ~6-8).
MAX_ROWS_AS_VECTORS = 6


def few_rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                          column_multiple: int = 1):
  """`lax.dot_general` for `nn.Dense`; on the CPU, inputs [..., C] of at most `MAX_ROWS_AS_VECTORS`
  rows times a kernel [C, N] become one [C] x [C, N] product per row.

  XLA:CPU runs a GEMM of 2-6 rows by packing the whole kernel first; for the megabyte kernels of a
  decoding step that made a beam-3 step several times slower than its matrix-vector products (which
  stream the kernel once each). Same results up to float rounding (another summation order).

  `column_multiple` (`decoder.Decoder.pad_columns_to`): otherwise a kernel [C, N] gets zero columns up
  to a multiple of it and the product is cut back to N columns: the same values, in a GEMM whose rows are
  aligned (a bf16 row of 2,561 is not 16-byte aligned, which GPU GEMM kernels that load tiles by TMA
  require).
  """
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  rows = math.prod(lhs.shape[:-1])
  is_kernel_product = (not lhs_batch and rhs.ndim == 2 and tuple(rhs_contract) == (0,)
                       and tuple(lhs_contract) == (lhs.ndim - 1,))
  if not is_kernel_product or jax.default_backend() != "cpu" or not 1 < rows <= MAX_ROWS_AS_VECTORS:
    columns = rhs.shape[-1]
    padded = is_kernel_product and columns % column_multiple
    if padded:
      rhs = jnp.pad(rhs, ((0, 0), (0, -columns % column_multiple)))
    product = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                  preferred_element_type=preferred_element_type)
    return product[..., :columns] if padded else product
  vectors = lhs.reshape(rows, lhs.shape[-1])
  products = [jax.lax.dot_general(vectors[i], rhs, (((0,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=preferred_element_type) for i in range(rows)]
  return jnp.stack(products).reshape(*lhs.shape[:-1], rhs.shape[1])


class AttentionScore(nn.Module):
  """The additive attention's score w_a . hidden over the last axis, float32: [..., A] -> [...].

  The parameters of `nn.Dense(1, use_bias=False)` (a "kernel" [A, 1], the same initializer). With
  `by_sum` the product with the one column is a multiply and a sum: on a GPU, XLA ran the Dense's
  product as a GEMM over [batch * K * P, A] that needed the whole tanh(...) tensor written out first
  (64 MB a step at beam 5, batch 256), where the sum fuses into the activation. The products are
  exact in float32 (the kernel rounded to the compute dtype, as the Dense rounds it), so only the
  order of the float32 summation differs. `step` sums off the CPU (there the sum made a beam-3
  search of the shipped model ~1 ms slower, of ~39 ms); teacher forcing keeps the Dense's product:
  under autodiff the sum would save the activation in float32 for the backward pass, twice the bytes,
  unless the activation is recomputed there instead (`decoder.Decoder.recompute_attention`).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, by_sum: bool = False, weights: Array | None = None) -> Array:
    """`weights`: None, or the kernel's column [A] rounded to `dtype`, as float32, computed outside
    a loop (the sum then uses it as it is)."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (hidden.shape[-1], 1), jnp.float32)
    kernel = kernel.astype(self.dtype)
    if by_sum:
      weights = kernel[:, 0].astype(jnp.float32) if weights is None else weights
      return jnp.sum(hidden.astype(jnp.float32) * weights, axis=-1)
    return few_rows_dot_general(hidden.astype(self.dtype), kernel,
                                 (((hidden.ndim - 1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lookup_rows(table: Array, ids: Array, dtype) -> Array:
  """table [V, E] rows at ids [...], cast to dtype: [..., E]."""
  return jnp.take(table, ids, axis=0).astype(dtype)


def _lookup_rows_forward(table, ids, dtype):
  return _lookup_rows(table, ids, dtype), (table, ids)


def _lookup_rows_backward(dtype, residuals, cotangent):
  """The table's gradient as one_hot(ids)^T @ cotangent, float32 sums (ids out of range add nothing)."""
  del dtype
  table, ids = residuals
  rows = cotangent.reshape(-1, cotangent.shape[-1])  # [N, E]
  one_hot = jax.nn.one_hot(ids.reshape(-1), table.shape[0], dtype=rows.dtype)  # [N, V], exact
  # float32 at full precision (a GPU's default would round the cotangent to TF32).
  precision = jax.lax.Precision.HIGHEST if rows.dtype == jnp.float32 else None
  grad = jnp.einsum("nv,ne->ve", one_hot, rows, precision=precision,
                    preferred_element_type=jnp.float32)
  return grad.astype(table.dtype), None


_lookup_rows.defvjp(_lookup_rows_forward, _lookup_rows_backward)


class Embed(nn.Embed):
  """`nn.Embed` (the same parameter and values) whose gradient can be a one-hot product.

  nn.Embed's lookup is a gather, so its gradient is a scatter-add of every token's row into the
  table, in the compute dtype. On an H200 that scatter (10,752 rows of bfloat16 into 2,600, batch
  512 x 21 steps) took 2.2-2.3 ms of a ~21 ms decoder train step (bench/probe_gpu9.py's profile): the
  atomic adds of frequent tokens queue on the same rows. As one_hot(ids)^T @ cotangent it is one
  GEMM with float32 sums. On a CPU the scatter is the cheap one (the product is V x N x E
  multiply-adds).

  Attributes:
    one_hot_grad: None: the one-hot product off the CPU; True / False: always / never.
  """
  one_hot_grad: bool | None = None

  def __call__(self, inputs: Array) -> Array:
    """inputs [...] int -> [..., features] in `dtype` (the parameter's dtype if None)."""
    one_hot_grad = (jax.default_backend() != "cpu" if self.one_hot_grad is None
                    else self.one_hot_grad)
    if not one_hot_grad or self.num_embeddings == 1:
      return super().__call__(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    return _lookup_rows(self.embedding, inputs, self.dtype or self.embedding.dtype)
