"""The encoders' blocks: the CPU's depthwise convolution against XLA's grouped one and linen's, and
the adaptive average pool against a loop over torch's window rule."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcap import conv_blocks


@pytest.mark.parametrize("kernel_size, stride, size", [(3, 1, 9), (3, 2, 10), (5, 2, 11), (5, 1, 8)])
def test_depthwise_conv_cpu_path_matches_grouped_convolution(monkeypatch, kernel_size, stride, size):
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size + 3, 6)), jnp.float32)
  layer = conv_blocks.DepthwiseConv(kernel_size, stride)
  variables = layer.init(jax.random.key(0), inputs)
  assert variables["params"]["kernel"].shape == (kernel_size, kernel_size, 1, 6)
  shifted_sums = layer.apply(variables, inputs)
  monkeypatch.setattr(conv_blocks, "_grouped_convolution_is_fast", lambda: True)
  grouped = layer.apply(variables, inputs)
  reference = nn.Conv(6, (kernel_size, kernel_size), strides=stride, padding="SAME",
                      feature_group_count=6, use_bias=False).apply(variables, inputs)
  assert shifted_sums.shape == (2, -(-size // stride), -(-(size + 3) // stride), 6)
  np.testing.assert_allclose(shifted_sums, grouped, atol=1e-5)
  np.testing.assert_allclose(grouped, reference, atol=1e-6)


@pytest.mark.parametrize("size_in, size_out", [((7, 7), (7, 7)), ((14, 10), (7, 7)), ((5, 9), (3, 4))])
def test_adaptive_avg_pool_averages_torchs_windows(size_in, size_out):
  inputs = np.random.default_rng(1).normal(size=(2, *size_in, 3)).astype(np.float32)
  pooled = np.asarray(conv_blocks.adaptive_avg_pool(jnp.asarray(inputs), size_out))
  expected = np.zeros((2, *size_out, 3), np.float32)
  for row in range(size_out[0]):  # window [floor(i * in / out), ceil((i + 1) * in / out))
    top, bottom = row * size_in[0] // size_out[0], -(-(row + 1) * size_in[0] // size_out[0])
    for col in range(size_out[1]):
      left, right = col * size_in[1] // size_out[1], -(-(col + 1) * size_in[1] // size_out[1])
      expected[:, row, col] = inputs[:, top:bottom, left:right].mean(axis=(1, 2))
  np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
