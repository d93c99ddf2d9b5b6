"""The convolutional blocks of the encoders (`flaxcap.encoders`), as linen modules on NHWC arrays.

`DepthwiseConv` and `MBConvBlock` (EfficientNet-Lite), `Bottleneck` (torchvision's ResNet v1.5) and
`adaptive_avg_pool` (VGG16's). A block's BatchNorm layers use running statistics when called with
`use_running_average=True`, else the batch's, reduced over `batch_norm_axis` when it is set.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def batch_norm_layer(use_running_average: bool, *, momentum: float, epsilon: float, dtype: Any,
                     axis_name: str | None):
  """nn.BatchNorm with these settings, to be called with a layer name: running statistics, or the
  batch's (reduced over the devices of `axis_name` when it is set). Every encoder BatchNorm is one."""
  return functools.partial(nn.BatchNorm, use_running_average=use_running_average, momentum=momentum,
                           epsilon=epsilon, dtype=dtype, axis_name=axis_name)


def _grouped_convolution_is_fast() -> bool:
  """XLA:CPU runs grouped (depthwise) convolutions several times slower than shifted sums."""
  return jax.default_backend() != "cpu"


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution, TF "same" padding, no bias; kernel [k, k, 1, channels] as nn.Conv.

  On accelerators it is one grouped convolution; on CPU, where XLA's grouped convolutions are slow,
  the sum over the k * k taps of strided input slices times per-channel weights (accumulated in
  float32), which computes the same thing 3-4x faster there.
  """
  kernel_size: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """[batch, h, w, c] -> [batch, ceil(h / stride), ceil(w / stride), c]."""
    size, stride, channels = self.kernel_size, self.stride, inputs.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (size, size, 1, channels),
                        jnp.float32)
    if _grouped_convolution_is_fast():
      return jax.lax.conv_general_dilated(
          inputs.astype(self.dtype), kernel.astype(self.dtype), (stride, stride), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    out_height, out_width = -(-inputs.shape[1] // stride), -(-inputs.shape[2] // stride)
    pads = [max((out - 1) * stride + size - n, 0)
            for out, n in ((out_height, inputs.shape[1]), (out_width, inputs.shape[2]))]
    padded = jnp.pad(inputs, ((0, 0),) + tuple((p // 2, p - p // 2) for p in pads) + ((0, 0),))
    total = jnp.zeros((inputs.shape[0], out_height, out_width, channels), jnp.float32)
    for row in range(size):
      for col in range(size):
        taps = padded[:, row:row + stride * (out_height - 1) + 1:stride,
                      col:col + stride * (out_width - 1) + 1:stride]
        total = total + taps.astype(jnp.float32) * kernel[row, col, 0]
    return total.astype(self.dtype)


class MBConvBlock(nn.Module):
  """EfficientNet-Lite inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project (no SE)."""
  expand_ratio: int
  kernel_size: int
  stride: int
  out_channels: int
  dtype: Any = jnp.float32
  batch_norm_axis: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, use_running_average: bool) -> jax.Array:
    """[batch, h, w, in] -> [batch, ceil(h / stride), ceil(w / stride), out_channels]."""
    # Flax's "SAME" padding is TF's: pad_total = max((ceil(n/s) - 1) * s + k - n, 0), the smaller
    # half first, which is what the reference's Conv2d{Static,Dynamic}SamePadding compute.
    batch_norm = batch_norm_layer(use_running_average, momentum=0.99, epsilon=1e-3,
                                  dtype=self.dtype, axis_name=self.batch_norm_axis)
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=self.dtype)
    in_channels = inputs.shape[-1]
    hidden = inputs
    if self.expand_ratio != 1:
      hidden = conv(in_channels * self.expand_ratio, (1, 1), name="expand_conv")(hidden)
      hidden = jax.nn.relu6(batch_norm(name="expand_bn")(hidden))
    hidden = DepthwiseConv(self.kernel_size, self.stride, dtype=self.dtype,
                           name="depthwise_conv")(hidden)
    hidden = jax.nn.relu6(batch_norm(name="depthwise_bn")(hidden))
    hidden = conv(self.out_channels, (1, 1), name="project_conv")(hidden)
    hidden = batch_norm(name="project_bn")(hidden)
    if self.stride == 1 and in_channels == self.out_channels:
      hidden = hidden + inputs
    return hidden


class Bottleneck(nn.Module):
  """torchvision's ResNet bottleneck (v1.5: the stride sits on the 3x3 conv)."""
  width: int
  stride: int
  dtype: Any = jnp.float32
  batch_norm_axis: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, use_running_average: bool) -> jax.Array:
    """[batch, h, w, in] -> [batch, ceil(h / stride), ceil(w / stride), 4 * width]."""
    conv = functools.partial(nn.Conv, use_bias=False, padding="VALID", dtype=self.dtype)
    batch_norm = batch_norm_layer(use_running_average, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                                  axis_name=self.batch_norm_axis)
    out_channels = 4 * self.width
    hidden = nn.relu(batch_norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(inputs)))
    hidden = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)),
                  name="conv2")(hidden)
    hidden = nn.relu(batch_norm(name="bn2")(hidden))
    hidden = batch_norm(name="bn3")(conv(out_channels, (1, 1), name="conv3")(hidden))
    shortcut = inputs
    if self.stride != 1 or inputs.shape[-1] != out_channels:
      shortcut = conv(out_channels, (1, 1), strides=self.stride, name="downsample_conv")(inputs)
      shortcut = batch_norm(name="downsample_bn")(shortcut)
    return nn.relu(hidden + shortcut)


def adaptive_avg_pool(inputs: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """torch's `AdaptiveAvgPool2d` on NHWC: [batch, h, w, c] -> [batch, *output_size, c]."""
  def pooling_matrix(size_in, size_out):
    matrix = np.zeros((size_out, size_in), np.float32)
    for index in range(size_out):
      start, end = index * size_in // size_out, -(-(index + 1) * size_in // size_out)
      matrix[index, start:end] = 1.0 / (end - start)
    return jnp.asarray(matrix, inputs.dtype)
  rows = pooling_matrix(inputs.shape[1], output_size[0])
  cols = pooling_matrix(inputs.shape[2], output_size[1])
  return jnp.einsum("oh,bhwc,pw->bopc", rows, inputs, cols)
