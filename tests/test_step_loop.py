"""flaxcap.step_loop: the three loops against a plain Python loop of the same steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import step_loop

MAX_LEN = 7


def step_fn(carry, step):
  """A toy search step: a total that grows every step and a vector, both in the carry."""
  total, vector = carry
  outputs = {"y": total * 10.0 + step, "w": vector}
  return (total + step + 1.0, vector * 2.0 + step), outputs


def reference(total, steps):
  """The carry after `steps` steps and the outputs of all MAX_LEN steps, in Python (numpy)."""
  carry = (np.float32(total), np.array([1.0, -2.0, 0.5], np.float32))
  outputs = []
  for step in range(MAX_LEN):
    new_carry, out = jax.tree.map(np.asarray, step_fn(carry, np.float32(step)))
    outputs.append(out)
    if step < steps:
      carry = new_carry
  return carry, outputs


def expected_steps(loop, unroll, threshold, total=0.0):
  """Steps each loop takes when the search is over once the total reaches `threshold`."""
  if loop is None:
    return MAX_LEN
  checked = [step for step in range(MAX_LEN) if loop == "cond" or step % unroll == 0]
  for step in checked:
    if reference(total, step)[0][0] >= threshold:
      return step
  return MAX_LEN if loop == "cond" else min(MAX_LEN, math.ceil(MAX_LEN / unroll) * unroll)


@pytest.mark.parametrize("loop", [None, "cond", "while"])
@pytest.mark.parametrize("unroll", [1, 3, 5])
def test_run_steps_takes_the_steps_until_over_and_zeros_after(loop, unroll):
  stopped = 0
  for threshold in (0.5, 4.0, 9.0, 14.0, 1e9):  # over after 1, 3, 4, 5 steps; never
    run = jax.jit(lambda carry, threshold=threshold: step_loop.run_steps(
        step_fn, lambda carry, step: carry[0] >= threshold, carry, MAX_LEN, unroll, loop))
    carry, outputs, steps = run((jnp.float32(0.0), jnp.array([1.0, -2.0, 0.5], jnp.float32)))
    want_steps = expected_steps(loop, unroll, threshold)
    want_carry, want_outputs = reference(0.0, want_steps)
    assert int(steps) == want_steps
    np.testing.assert_allclose(carry[0], want_carry[0])
    np.testing.assert_allclose(carry[1], want_carry[1])
    for step in range(MAX_LEN):
      for name in ("y", "w"):
        want = want_outputs[step][name] if step < want_steps else np.zeros_like(
            want_outputs[step][name])
        np.testing.assert_allclose(np.asarray(outputs[name][step]), want, err_msg=f"{name}@{step}")
    stopped += want_steps < MAX_LEN
  assert stopped or loop is None


def test_cond_loop_is_differentiable_like_the_scan():
  def final_total(start, loop):
    (total, _), _, _ = step_loop.run_steps(step_fn, lambda carry, step: carry[0] >= 9.0,
                                           (start, jnp.zeros(3)), MAX_LEN, 1, loop)
    return total

  totals = set()
  for loop in (None, "cond"):
    total = final_total(jnp.float32(0.5), loop)  # 28.5 after all 7 steps, 10.5 after 4
    totals.add(float(total))
    squared_grad = jax.grad(lambda start, loop=loop: final_total(start, loop) ** 2)
    np.testing.assert_allclose(squared_grad(jnp.float32(0.5)), 2 * total, rtol=1e-6)
  assert len(totals) == 2  # the cond loop stopped early


def test_loop_for_values(monkeypatch):
  assert step_loop.loop_for(True) == step_loop.loop_for("cond") == "cond"
  assert step_loop.loop_for(False) is None and step_loop.loop_for("while") == "while"
  assert step_loop.loop_for(None) == ("cond" if jax.default_backend() == "cpu" else None)
  for backend, loop in (("cpu", "cond"), ("gpu", "while"), ("tpu", None)):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert step_loop.loop_for(None) == loop, backend
    assert step_loop.loop_for(False) is None
  with pytest.raises(ValueError, match="early_stop must be"):
    step_loop.loop_for("sometimes")
