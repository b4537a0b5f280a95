"""Building blocks every backbone family shares.

BatchNorm as PyTorch computes it, per-channel PReLU, the input
normalisation and channel order, and the shape-only helpers (parameter
counts, variable shapes without compute).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's kaiming_normal(fan_out, relu), which the face codes use for every
# conv and linear layer.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

BN_MOMENTUM = 0.9  # flax's momentum is 1 - PyTorch's (0.1).
BN_EPSILON = 1e-5
INPUT_ORDERS = ("BGR", "RGB")


def normalize_images(
    images_uint8: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
  """Maps uint8 pixels to [-1, 1] as (x/255 - 0.5)/0.5, in `dtype`.

  Meant to run on the device, so the host ships compact uint8 batches.
  """
  x = jnp.asarray(images_uint8).astype(jnp.float32)
  return (x * (2.0 / 255.0) - 1.0).astype(dtype)


def to_input_order(images: jax.Array, input_order: str) -> jax.Array:
  """BGR images (every caller's order) in the channel order the weights
  were trained on."""
  if input_order not in INPUT_ORDERS:
    raise ValueError(f"input_order={input_order!r}: 'BGR' or 'RGB'")
  # jnp.flip is one `rev`, which every exporter reads as a channel swap.
  return jnp.flip(images, axis=-1) if input_order == "RGB" else images


def unit_and_norm(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(z / |z|, |z|) in float32: the embedding and the quality signal."""
  z = z.astype(jnp.float32)
  norms = jnp.sqrt(jnp.sum(z * z, axis=-1))
  return z / norms[:, None], norms


# While set (`frozen_statistics`), every BatchNorm normalises with its
# running statistics and leaves them unchanged, in training too.
_FROZEN = contextvars.ContextVar("frozen_batch_norm", default=False)


@contextlib.contextmanager
def frozen_statistics(frozen: bool = True) -> Iterator[None]:
  """BatchNorms traced inside normalise with their running statistics and
  never update them, whatever `train` says (config.model.batch_norm
  "frozen": fine-tuning on a few hundred faces, where a batch's statistics
  are a poor estimate and the pretrained ones are what evaluation reads).
  A trace-time switch: it must surround the tracing of `model.apply`."""
  token = _FROZEN.set(bool(frozen))
  try:
    yield
  finally:
    _FROZEN.reset(token)


class BatchNorm(nn.Module):
  """BatchNorm as PyTorch computes it, over every axis but the last.

  Training normalises with the batch's biased variance (as flax does) but
  keeps the *unbiased* one, n / (n - 1) times larger, in the running
  average, as torch.nn.BatchNorm does; flax keeps the biased one. The
  running statistics are what evaluation normalises with, so with flax's
  rule every eval-mode feature norm (the quality indicator at test time)
  would drift from the reference's (by sqrt(16/15) for a batch of 16 at the
  last BatchNorm1d). Statistics are in float32 whatever the compute dtype.
  Variable names are flax's ('scale', 'bias'; 'mean', 'var').
  """

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  use_scale: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    running_mean = self.variable(
        "batch_stats", "mean", jnp.zeros, (features,), jnp.float32
    )
    running_var = self.variable(
        "batch_stats", "var", jnp.ones, (features,), jnp.float32
    )
    x32 = x.astype(jnp.float32)
    if self.use_running_average or _FROZEN.get():
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      # One pass (E[x], E[x^2]), as flax: the two reductions fuse into one
      # read of x, and under a data-parallel mesh into one all-reduce.
      mean = jnp.mean(x32, axis=axes)
      var = jnp.maximum(
          jnp.mean(jnp.square(x32), axis=axes) - jnp.square(mean), 0.0
      )
      if not self.is_initializing():
        count = x.size // features
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * unbiased
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param(
          "scale", nn.initializers.ones, (features,), jnp.float32
      )
    if self.use_bias:
      y = y + self.param(
          "bias", nn.initializers.zeros, (features,), jnp.float32
      )
    return y.astype(self.dtype)


def batch_norm(train: bool, dtype: Any, name: str, **kwargs) -> BatchNorm:
  return BatchNorm(
      use_running_average=not train, dtype=dtype, name=name, **kwargs
  )


class PReLU(nn.Module):
  """Per-channel PReLU (flax's own PReLU has a single scalar slope)."""

  param_dtype: Any = jnp.float32
  negative_slope_init: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param(
        "negative_slope",
        nn.initializers.constant(self.negative_slope_init),
        (x.shape[-1],),
        self.param_dtype,
    )
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    padding: int = 0,
    groups: int = 1,
    dtype: Any = jnp.float32,
    name: str,
    use_bias: bool = False,
) -> nn.Module:
  """A square PyTorch-style Conv2d without bias: symmetric zero padding,
  groups (`GroupedConv` when grouped)."""
  if groups > 1:
    if use_bias:
      raise ValueError("a grouped convolution here has no bias")
    return GroupedConv(
        features, kernel, stride, padding, groups, dtype, name=name
    )
  if kernel == 1 and padding == 0 and not use_bias:
    return PointwiseConv(features, stride, dtype, name=name)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=stride,
      padding=[(padding, padding)] * 2,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=kaiming_fan_out,
      name=name,
  )


class PointwiseConv(nn.Module):
  """A 1x1 Conv2d without bias as the matrix product it is (over the
  channels of every position, after subsampling for a stride): XLA's CPU
  backend runs it about 3 times faster than a 1x1 convolution, forward and
  backward, and accelerators see the same dot. Its kernel is nn.Conv's,
  (1, 1, in, out)."""

  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel",
        kaiming_fan_out,
        (1, 1, x.shape[-1], self.features),
        jnp.float32,
    )
    if self.stride > 1:
      x = jax.lax.slice(
          x, (0, 0, 0, 0), x.shape, (1, self.stride, self.stride, 1)
      )
    return jnp.einsum(
        "bhwc,cd->bhwd", x.astype(self.dtype), kernel[0, 0].astype(self.dtype)
    )


def _grouped_conv_native(x, kernel, stride, padding, groups):
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      [(padding, padding)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
  )


def _grouped_conv_by_shifts(x, kernel, stride, padding, groups):
  """The same convolution as a sum over the kernel's taps of shifted,
  strided slices times per-channel weights: elementwise work that XLA's
  CPU backend runs 7-18 times faster than its grouped convolution (forward
  and both gradients; measured on (64, 56, 56, 128) depthwise 3x3)."""
  kh, kw, per_group, out = kernel.shape
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  batch, height, width, channels = x.shape
  rows, cols = (height - kh) // stride + 1, (width - kw) // stride + 1
  x = x.reshape(batch, height, width, groups, per_group)
  w = kernel.reshape(kh, kw, per_group, groups, out // groups)
  total = 0
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(
          x,
          (0, i, j, 0, 0),
          (
              batch,
              i + (rows - 1) * stride + 1,
              j + (cols - 1) * stride + 1,
              groups,
              per_group,
          ),
          (1, stride, stride, 1, 1),
      )
      for c in range(per_group):
        total = total + tap[..., c, None] * w[i, j, c]
  return total.reshape(batch, rows, cols, out)


class GroupedConv(nn.Module):
  """A grouped (depthwise when groups == channels) Conv2d without bias.

  Its kernel is nn.Conv's, (k, k, in / groups, out). Compiled for CPU it
  runs as a sum of shifted slices (`_grouped_conv_by_shifts`), for every
  other platform as XLA's grouped convolution; `lax.platform_dependent`
  keeps both in one program, so an export for TPU or GPU, and the ONNX
  file, carry the convolution.
  """

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.groups or self.features % self.groups:
      raise ValueError(
          f"{channels} -> {self.features} channels do not split "
          f"into {self.groups} groups"
      )
    kernel = self.param(
        "kernel",
        kaiming_fan_out,
        (self.kernel, self.kernel, channels // self.groups, self.features),
        jnp.float32,
    ).astype(self.dtype)
    x = x.astype(self.dtype)
    args = (self.stride, self.padding, self.groups)
    return jax.lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x, k: _grouped_conv_by_shifts(x, k, *args),
        default=lambda x, k: _grouped_conv_native(x, k, *args),
    )


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter tree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def init_shapes(
    model: nn.Module,
    image_size: Sequence[int] = (112, 112),
    batch_size: int = 1,
) -> dict:
  """Variable shapes of `model` for images of `image_size`, without compute."""
  images = jax.ShapeDtypeStruct((batch_size, *image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images
  )


def halved(size: int, times: int) -> int:
  """The side after `times` stride-2 layers with padding k // 2 (k odd):
  each gives ceil(n / 2)."""
  for _ in range(times):
    size = -(-size // 2)
  return size
