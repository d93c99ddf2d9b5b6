"""flaxcap/attention_grad.py: the projected features' gradient summed over the steps, and the
recomputed scores' written-out backward pass, give autodiff's gradients (the scan that uses the
first: tests/test_late_grads.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import attention_grad
from test_decoder import _cached_setup, _loss_and_grads, _assert_same_loss_and_grads, make_decoder


def test_projected_features_grad_equals_autodiff_of_the_scores():
  """Against jax.grad of sum_t ds_t . scores(pf, q_t) with the scores written out, float32."""
  rng = np.random.default_rng(0)
  batch, steps, positions, attention_dim = 2, 4, 6, 5
  projected = jnp.asarray(rng.normal(size=(batch, positions, attention_dim)), jnp.float32)
  queries = jnp.asarray(rng.normal(size=(batch, steps, attention_dim)), jnp.float32)
  score_grads = jnp.asarray(rng.normal(size=(batch, steps, positions)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(attention_dim,)), jnp.float32)
  for activation, function in (("tanh", jnp.tanh), ("relu", jax.nn.relu)):
    def weighted_scores(projected, function=function):
      scores = jnp.einsum("btpa,a->btp", function(projected[:, None] + queries[:, :, None]), kernel)
      return jnp.sum(scores * score_grads)
    expected = jax.grad(weighted_scores)(projected)
    actual = attention_grad.projected_features_grad(projected, queries, score_grads, kernel,
                                                    activation)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="tanh or relu"):
    attention_grad.projected_features_grad(projected, queries, score_grads, kernel, "gelu")


def _plain_scores(projected, query, kernel, function):
  """w . act(pf + q) as the decoder's XLA path computes it (float32 sums), [batch, K, P]."""
  hidden = function(projected[:, None] + query[:, :, None])
  return jnp.sum(hidden.astype(jnp.float32) * kernel.astype(hidden.dtype).astype(jnp.float32), -1)


@pytest.mark.parametrize("activation,function", [("tanh", jnp.tanh), ("relu", jax.nn.relu)])
@pytest.mark.parametrize("beams,by_kernel", [(1, False), (3, False), (1, True)])
def test_recomputed_scores_and_their_gradients_equal_autodiffs(activation, function, beams,
                                                              by_kernel):
  """float32, random inputs and cotangents: the scores (also by the Pallas score kernel,
  interpreted), and the gradients of pf, q and w_a, against jax.grad of the plain function."""
  rng = np.random.default_rng(beams)
  batch, positions, attention_dim = 2, 7, 5
  projected = jnp.asarray(rng.normal(size=(batch, positions, attention_dim)), jnp.float32)
  query = jnp.asarray(rng.normal(size=(batch, beams, attention_dim)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(attention_dim,)), jnp.float32)
  cotangents = jnp.asarray(rng.normal(size=(batch, beams, positions)), jnp.float32)
  scores = functools.partial(attention_grad.recomputed_scores, activation=activation,
                             by_kernel=by_kernel)
  actual = scores(projected, query, kernel)
  np.testing.assert_allclose(actual, _plain_scores(projected, query, kernel, function), rtol=1e-5,
                             atol=1e-6)
  grads = jax.grad(lambda *args: jnp.sum(scores(*args) * cotangents),
                   argnums=(0, 1, 2))(projected, query, kernel)
  expected = jax.grad(lambda *args: jnp.sum(_plain_scores(*args, function) * cotangents),
                      argnums=(0, 1, 2))(projected, query, kernel)
  for name, grad, expected_grad in zip(("features", "query", "kernel"), grads, expected):
    assert grad.shape == expected_grad.shape and grad.dtype == expected_grad.dtype, name
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6, err_msg=name)


def test_recomputed_scores_in_bfloat16_stay_as_close_to_float32():
  """bf16 inputs: the written-out backward pass is no further from the float32 gradients than
  autodiff of the same bf16 function (`layers.tanh` inside, as the decoder has it)."""
  rng = np.random.default_rng(7)
  arrays = [rng.normal(size=shape) for shape in ((4, 12, 16), (4, 1, 16), (16,))]
  cotangents = jnp.asarray(rng.normal(size=(4, 1, 12)), jnp.float32)
  f32 = [jnp.asarray(a, jnp.float32) for a in arrays]
  bf16 = [x.astype(jnp.bfloat16) for x in f32[:2]] + [f32[2]]
  loss = lambda scores: jnp.sum(scores * cotangents)
  reference = jax.grad(lambda *a: loss(_plain_scores(*a, jnp.tanh)), argnums=(0, 1, 2))(*f32)
  autodiff = jax.grad(lambda *a: loss(_plain_scores(*a, attention_grad.layers.tanh)),
                      argnums=(0, 1, 2))(*bf16)
  written_out = jax.grad(lambda *a: loss(attention_grad.recomputed_scores(*a, "tanh")),
                         argnums=(0, 1, 2))(*bf16)
  for name, ours, theirs, exact in zip(("features", "query", "kernel"), written_out, autodiff,
                                       reference):
    assert ours.dtype == theirs.dtype, name
    error = lambda g: float(jnp.max(jnp.abs(g.astype(jnp.float32) - exact)) / jnp.max(jnp.abs(exact)))
    assert error(ours) < 0.02 and error(ours) <= 1.5 * error(theirs) + 1e-3, (name, error(ours),
                                                                              error(theirs))


@pytest.mark.parametrize("options", [{}, {"late_projected_grad": True},
                                     {"attention_activation": "relu"},
                                     {"late_projected_grad": True, "score_kernel": True}])
def test_score_vjp_gives_the_same_loss_and_gradients(options):
  """A decoder whose recomputed scores take `recomputed_scores`' backward pass, against the same
  decoder's autodiff of the remat (float32)."""
  activation = options.get("attention_activation", "tanh")
  _, variables, features, tokens = _cached_setup(attention_activation=activation)
  params = variables["params"]
  remat = make_decoder(recompute_attention=True, **options)
  written_out = make_decoder(recompute_attention=True, score_vjp=True, **options)
  _assert_same_loss_and_grads(_loss_and_grads(written_out)(params, features, tokens),
                              _loss_and_grads(remat)(params, features, tokens))
