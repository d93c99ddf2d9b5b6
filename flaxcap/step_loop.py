"""The loop a search runs its steps in, stopping once it is over.

A search (`flaxcap.beam_search`) is `carry, outputs = lax.scan(step_fn, carry, arange(max_len))`
with `step_fn(carry, step) -> (carry, outputs of this step)`. Often its result is settled before
`max_len` steps: `is_over(carry, step)` says so, and the steps after it change nothing the search
returns. `run_steps` runs the steps in one of three loops, each giving the search the same result
(the loops that stop leave the carry as it was then, and zeros for the outputs of the steps they
skip, which a search must not read):

  None     the plain `lax.scan` of all `max_len` steps; `is_over` is not used.
  "cond"   the scan with a `lax.cond` per iteration that skips `step_fn` once over: still `max_len`
           iterations, each skipped one costing a branch; differentiable like the scan.
  "while"  a `lax.while_loop` that checks `is_over` before every `unroll` steps and writes each
           step's outputs into [max_len, ...] buffers of zeros: it iterates only over the steps
           taken, rounded up to a multiple of `unroll` (the extra steps after the search is over
           change nothing, and those past `max_len` in the last turn are masked). Not
           reverse-differentiable (a `lax.while_loop`).

Off the CPU, both checks are read by the host every iteration (XLA runs a data-dependent branch or
loop condition from the host), which may cost more than the steps saved. On an H200 (beam 5, captions
ending at 12 of 20 steps, bf16) the while loop still won: 3.02 against 4.62 ms at batch 256, 1.08
against 1.81 ms at batch 1, where "cond" gained little (5.45 against 7.52 ms at batch 256; 1.52
against 1.52 at batch 1). So `loop_for(None)` is "cond" on the CPU, "while" on a GPU, and no stop
elsewhere (not measured). `bench/beam_search.py --early_stop=off,cond,while` measures them.
"""

import jax
from jax import lax
import jax.numpy as jnp

STOP_LOOPS = ("cond", "while")


def loop_for(early_stop: bool | str | None) -> str | None:
  """The loop a search given `early_stop` runs here: None (all `max_len` steps), "cond" or "while".

  None means "cond" on the CPU, "while" on a GPU and False elsewhere; True means "cond".
  """
  if isinstance(early_stop, str):
    if early_stop not in STOP_LOOPS:
      raise ValueError(f"early_stop must be a bool, None or one of {STOP_LOOPS}; "
                       f"got {early_stop!r}.")
    return early_stop
  if early_stop is None:
    return {"cpu": "cond", "gpu": "while"}.get(jax.default_backend())
  return "cond" if early_stop else None


def run_steps(step_fn, is_over, carry, max_len: int, unroll: int, loop: str | None):
  """`lax.scan(step_fn, carry, arange(max_len), unroll=...)`, except that once `is_over(carry, step)`
  is true no further step is taken (with "while", up to `unroll` - 1 more): the carry stays and the
  outputs of the steps not taken are zeros. Returns (carry, outputs [max_len, ...], the number of
  steps taken, at most max_len).

  loop: None, the plain scan (`is_over` unused); "cond", the scan with a `lax.cond` per iteration
  that skips `step_fn` once over; "while", a `lax.while_loop` that checks `is_over` before every
  `unroll` steps and writes their outputs into [max_len, ...] buffers of zeros (so up to `unroll` - 1
  steps more than needed may run, each changing nothing that a search returns).
  """
  steps = jnp.arange(max_len, dtype=jnp.int32)
  unroll = min(unroll, max_len)
  if loop is None:
    carry, outputs = lax.scan(step_fn, carry, steps, unroll=unroll)
    return carry, outputs, jnp.int32(max_len)
  output_shapes = jax.eval_shape(step_fn, carry, steps[0])[1]
  if loop == "cond":
    def skip(counted, _):
      return counted, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), output_shapes)

    def take_step(counted, step):
      carry, taken = counted
      carry, step_outputs = step_fn(carry, step)
      return (carry, taken + 1), step_outputs

    def maybe_step(counted, step):
      return lax.cond(is_over(counted[0], step), skip, take_step, counted, step)

    (carry, taken), outputs = lax.scan(maybe_step, (carry, jnp.int32(0)), steps, unroll=unroll)
    return carry, outputs, taken

  # "while": the check every `unroll` steps. The steps run after the search is over change nothing
  # returned (module docstring); those past max_len, in the last turn, keep the carry and write
  # their outputs past the end of the buffers, which are cut to max_len.
  padded_len = -(-max_len // unroll) * unroll

  def go_on(loop_carry):
    step, carry, _ = loop_carry
    return (step < max_len) & jnp.logical_not(is_over(carry, step))

  def take_steps(loop_carry):
    step, carry, outputs = loop_carry
    for _ in range(unroll):
      new_carry, step_outputs = step_fn(carry, step)
      if padded_len > max_len:
        new_carry = jax.tree.map(lambda new, old, step=step: jnp.where(step < max_len, new, old),
                                 new_carry, carry)
      carry = new_carry
      outputs = jax.tree.map(
          lambda buffer, x, step=step: lax.dynamic_update_index_in_dim(buffer, x, step, 0),
          outputs, step_outputs)
      step = step + 1
    return step, carry, outputs

  outputs = jax.tree.map(lambda x: jnp.zeros((padded_len, *x.shape), x.dtype), output_shapes)
  taken, carry, outputs = lax.while_loop(go_on, take_steps, (jnp.int32(0), carry, outputs))
  return carry, jax.tree.map(lambda x: x[:max_len], outputs), jnp.minimum(taken, max_len)
