"""IResNet face encoder (the "IR" backbones of ArcFace/AdaFace/QGFace).

Two layouts of the same pre-activation ResNet:
* "adaface": AdaFace/QGFace `net.py` (IR-18 .. IR-200, optional SE). A
  stage's first unit subsamples its shortcut when the width is kept; the
  final BatchNorm1d has neither scale nor offset; BGR input.
* "insightface": insightface arcface_torch `iresnet.py` (r18 .. r200). Every
  stride-2 unit has a conv1x1 + BN shortcut; the final BatchNorm1d has a
  scale (fixed to 1 there) and an offset; r200 is 6/26/60/6 basic units;
  their models were trained on RGB input (`input_order`).
Module names follow the PyTorch modules so that `qgjt_jax.convert` maps
either state dict one to one. Everything runs in
NHWC, the layout XLA prefers on TPU and GPU. The only place where the PyTorch
NCHW layout leaks into the math is the flatten before the final Linear; we
flatten in NHWC order and let the weight converter permute the Linear rows
instead, so the forward pass pays nothing for compatibility.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's `initialize_weights` uses kaiming_normal(fan_out, relu) for every
# conv and linear layer (including the SE convs: it runs after their own init).
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_BN_MOMENTUM = 0.9  # flax's momentum is 1 - PyTorch's (0.1).
_BN_EPSILON = 1e-5
_SE_REDUCTION = 16

# Units per stage. Depths up to 100 use the two-conv basic unit, deeper ones
# the 1x1-3x3-1x1 bottleneck unit with four times wider outputs.
STAGE_UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


# insightface arcface_torch: basic units only; the same counts up to 100,
# its own at 200 (and no 152).
INSIGHTFACE_STAGE_UNITS: dict[int, tuple[int, int, int, int]] = {
    **{depth: STAGE_UNITS[depth] for depth in (18, 34, 50, 100)},
    200: (6, 26, 60, 6),
}
LAYOUTS = ("adaface", "insightface")


def stage_units(num_layers: int, layout: str = "adaface"
                ) -> tuple[int, int, int, int]:
  table = INSIGHTFACE_STAGE_UNITS if layout == "insightface" else STAGE_UNITS
  if layout not in LAYOUTS or num_layers not in table:
    raise ValueError(f"no {layout} IResNet of depth {num_layers}; depths: "
                     f"{sorted(table)}")
  return table[num_layers]


def uses_bottleneck(num_layers: int, layout: str = "adaface") -> bool:
  """Whether a depth is built from bottleneck units (as in the reference)."""
  return layout == "adaface" and num_layers >= 152


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """One residual unit: input/output channels and the stride it applies."""
  in_channels: int
  out_channels: int
  stride: int


def unit_specs(num_layers: int, base_width: int = 64,
               layout: str = "adaface") -> list[UnitSpec]:
  """The residual units of an IResNet, in order (the reference's `body`)."""
  units = stage_units(num_layers, layout)
  expansion = 4 if uses_bottleneck(num_layers, layout) else 1
  specs = []
  in_channels = base_width
  for stage, num_units in enumerate(units):
    out_channels = base_width * expansion * 2**stage
    # Every stage halves the resolution in its first unit.
    specs.append(UnitSpec(in_channels, out_channels, 2))
    specs.extend(UnitSpec(out_channels, out_channels, 1)
                 for _ in range(num_units - 1))
    in_channels = out_channels
  return specs


def normalize_images(images_uint8: jax.Array, dtype: Any = jnp.float32
                     ) -> jax.Array:
  """Maps uint8 pixels to [-1, 1] as (x/255 - 0.5)/0.5, in `dtype`.

  Meant to run on the device, so the host ships compact uint8 batches.
  """
  x = jnp.asarray(images_uint8).astype(jnp.float32)
  return (x * (2.0 / 255.0) - 1.0).astype(dtype)


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
  momentum: float = _BN_MOMENTUM
  epsilon: float = _BN_EPSILON
  dtype: Any = jnp.float32
  use_scale: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros,
                                 (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,),
                                jnp.float32)
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      # One pass (E[x], E[x^2]), as flax: the two reductions fuse into one
      # read of x, and under a data-parallel mesh into one all-reduce.
      mean = jnp.mean(x32, axis=axes)
      var = jnp.maximum(jnp.mean(jnp.square(x32), axis=axes) -
                        jnp.square(mean), 0.0)
      if not self.is_initializing():
        count = x.size // features
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * unbiased
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (features,),
                         jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (features,),
                         jnp.float32)
    return y.astype(self.dtype)


def _batch_norm(train: bool, dtype: Any, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


class PReLU(nn.Module):
  """Per-channel PReLU (flax's own PReLU has a single scalar slope)."""
  param_dtype: Any = jnp.float32
  negative_slope_init: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("negative_slope",
                       nn.initializers.constant(self.negative_slope_init),
                       (x.shape[-1],), self.param_dtype)
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation gate: global pool, 1x1 down, ReLU, 1x1 up, sigmoid.

  The 1x1 convs act on a pooled (N, C) vector, so they are Dense layers here.
  """
  reduction: int = _SE_REDUCTION
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    # Real widths (>= 64) divide exactly; the floor of 1 only keeps very
    # narrow demo models buildable.
    hidden = max(1, channels // self.reduction)
    s = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(self.dtype)
    s = nn.Dense(hidden, use_bias=False, dtype=self.dtype,
                 kernel_init=_kaiming_fan_out, name="fc1")(s)
    s = nn.relu(s)
    s = nn.Dense(channels, use_bias=False, dtype=self.dtype,
                 kernel_init=_kaiming_fan_out, name="fc2")(s)
    return x * nn.sigmoid(s)[:, None, None, :]


class ResidualUnit(nn.Module):
  """Pre-activation IR unit: BN first, PReLU inside, no activation after add.

  Basic unit:      BN, conv3x3, BN, PReLU, conv3x3/stride, BN [, SE]
  Bottleneck unit: BN, conv1x1, BN, PReLU, conv3x3, BN, PReLU,
                   conv1x1/stride, BN [, SE]   (inner width = out/4)
  Shortcut: identity subsampled by the stride when the width is kept,
  else conv1x1/stride + BN.
  """
  out_channels: int
  stride: int
  bottleneck: bool = False
  use_se: bool = False
  dtype: Any = jnp.float32
  # insightface: a strided unit projects its shortcut even at equal width.
  project_strided_shortcut: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda features, kernel, stride, name: nn.Conv(
        features, (kernel, kernel), strides=stride,
        padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False,
        dtype=self.dtype, kernel_init=_kaiming_fan_out, name=name)
    norm = lambda name: _batch_norm(train, self.dtype, name)
    s = self.stride

    if x.shape[-1] == self.out_channels and not (
        self.project_strided_shortcut and s > 1):
      # MaxPool2d(kernel 1, stride s) is plain subsampling.
      shortcut = x[:, ::s, ::s, :] if s > 1 else x
    else:
      shortcut = conv(self.out_channels, 1, s, "shortcut_conv")(x)
      shortcut = norm("shortcut_bn")(shortcut)

    y = norm("bn1")(x)
    if self.bottleneck:
      inner = self.out_channels // 4
      y = conv(inner, 1, 1, "conv1")(y)
      y = norm("bn2")(y)
      y = PReLU(name="prelu1")(y)
      y = conv(inner, 3, 1, "conv2")(y)
      y = norm("bn3")(y)
      y = PReLU(name="prelu2")(y)
      y = conv(self.out_channels, 1, s, "conv3")(y)
      y = norm("bn4")(y)
    else:
      y = conv(self.out_channels, 3, 1, "conv1")(y)
      y = norm("bn2")(y)
      y = PReLU(name="prelu1")(y)
      y = conv(self.out_channels, 3, s, "conv2")(y)
      y = norm("bn3")(y)
    if self.use_se:
      y = SqueezeExcite(dtype=self.dtype, name="se")(y)
    return y + shortcut


class InputLayer(nn.Module):
  """Stem: conv3x3 (stride 1), BN, PReLU."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (3, 3), padding=[(1, 1), (1, 1)],
                use_bias=False, dtype=self.dtype, kernel_init=_kaiming_fan_out,
                name="conv")(x)
    x = _batch_norm(train, self.dtype, "bn")(x)
    return PReLU(name="prelu")(x)


class OutputLayer(nn.Module):
  """Head: BN2d, dropout, flatten, Linear, BN1d (without scale and offset;
  with both in the insightface layout).

  Returns the float32 feature z; BN1d runs in float32 whatever the compute
  dtype, since z's norm is the quality signal.
  """
  embedding_size: int
  dropout_rate: float
  dtype: Any = jnp.float32
  affine_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _batch_norm(train, self.dtype, "bn")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # NHWC flatten; `convert.py` reorders PyTorch's NCHW-flattened rows, so
    # no transpose is needed here.
    x = x.reshape(x.shape[0], -1)
    z = nn.Dense(self.embedding_size, dtype=self.dtype,
                 kernel_init=_kaiming_fan_out, name="fc")(x)
    return BatchNorm(use_running_average=not train, dtype=jnp.float32,
                     use_scale=self.affine_features,
                     use_bias=self.affine_features,
                     name="feature_bn")(z.astype(jnp.float32))


class IResNet(nn.Module):
  """IResNet-{18,34,50,100,152,200} with optional SE, returning (e, |z|).

  Attributes:
    num_layers: depth, one of `STAGE_UNITS`.
    use_se: add a squeeze-excitation gate at the end of every residual branch.
    embedding_size: size D of the embedding.
    base_width: stem width; stages are base_width*(1,2,4,8) wide (times 4 for
      the bottleneck depths 152/200). 64 is the published architecture;
      smaller widths only serve CPU demos and tests.
    dropout_rate: dropout before the final Linear (active when train=True,
      drawing from the 'dropout' rng).
    dtype: compute dtype of the convolutions (bfloat16 on accelerators).
      Parameters stay float32; the embedding head and the norm run in float32.
    remat: recompute each residual unit's activations in the backward pass
      instead of keeping them (jax.checkpoint per unit): the activation
      memory of a deep model drops to about one unit's plus the unit
      inputs, for one more forward pass of compute. Same parameters, same
      numbers.
    layout: "adaface" or "insightface" (see the module doc).
    input_order: "BGR" or "RGB", the channel order the weights were trained
      on. Callers always pass BGR (the data pipeline's and OpenCV's order);
      an "RGB" model swaps the channels first.
  """
  num_layers: int
  use_se: bool = False
  embedding_size: int = 512
  base_width: int = 64
  dropout_rate: float = 0.4
  dtype: Any = jnp.float32
  remat: bool = False
  layout: str = "adaface"
  input_order: str = "BGR"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    """Encodes a batch of faces.

    Args:
      images: normalised float images, NHWC (N, H, W, 3), BGR; any H, W
        (112x112 in the real setting, which ends at 7x7 before the head).
      train: batch statistics and dropout when True, running averages else.

    Returns:
      (unit embeddings (N, D) float32, norms (N,) float32).
    """
    if self.input_order not in ("BGR", "RGB"):
      raise ValueError(f"input_order={self.input_order!r}: 'BGR' or 'RGB'")
    x = images.astype(self.dtype)
    if self.input_order == "RGB":
      x = x[..., ::-1]
    x = InputLayer(self.base_width, dtype=self.dtype, name="input_layer")(
        x, train)
    bottleneck = uses_bottleneck(self.num_layers, self.layout)
    insightface = self.layout == "insightface"
    # `train` (argument 2, after self and x) selects Python branches.
    unit = (nn.remat(ResidualUnit, static_argnums=(2,)) if self.remat
            else ResidualUnit)
    for i, spec in enumerate(unit_specs(self.num_layers, self.base_width,
                                        self.layout)):
      x = unit(spec.out_channels, spec.stride, bottleneck=bottleneck,
               use_se=self.use_se, dtype=self.dtype,
               project_strided_shortcut=insightface, name=f"body_{i}")(
                   x, train)
    z = OutputLayer(self.embedding_size, self.dropout_rate, dtype=self.dtype,
                    affine_features=insightface, name="output_layer")(x, train)
    # The norm is the quality signal the losses read: float32, like z.
    norms = jnp.sqrt(jnp.sum(z * z, axis=-1))
    return z / norms[:, None], norms


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter tree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def init_shapes(model: IResNet, image_size: Sequence[int] = (112, 112),
                batch_size: int = 1) -> dict:
  """Variable shapes of `model` for images of `image_size`, without compute."""
  images = jax.ShapeDtypeStruct((batch_size, *image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
