"""Session 29: does JAX keep a residual that equals a scan output as a buffer of its own? A 7-step
scan of a softmax whose output is also summed into the loss, differentiated; prints the buffers of
each compiled while loop (on the CPU), the forward loop first. The inputs are [7, 4, 1], so each
[7, 4, 16] buffer of the forward loop holds every step's weights: the output, or a residual.

    python3 docs/benchmarks/cpu/s29/residual_buffers.py > docs/benchmarks/cpu/s29/residual_buffers.txt
"""
import jax
import jax.numpy as jnp


POSITIONS = jnp.arange(16, dtype=jnp.float32)


def body(carry, x):  # carry, x: [4, 1]
  weights = jax.nn.softmax(carry * x * POSITIONS)  # [4, 16]: the scan's output, and softmax's residual
  return carry + weights.sum(-1, keepdims=True), weights


def loss(carry, xs):
  carry, weights = jax.lax.scan(body, carry, xs)
  return carry.sum() + (weights ** 2).sum()


text = jax.jit(jax.grad(loss)).lower(jnp.ones((4, 1)), jnp.ones((7, 4, 1))).compile().as_text()
for line in text.splitlines():
  if " while(" in line:
    buffers = line.split(" while(")[0].split("=", 1)[1].strip()
    print(f"while loop buffers: {buffers}; [7,4,16] buffers: {buffers.count('f32[7,4,16]')}")
