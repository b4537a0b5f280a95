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
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qgjt_jax.models import layers
from qgjt_jax.models import registry

# PyTorch's `initialize_weights` uses kaiming_normal(fan_out, relu) for every
# conv and linear layer (including the SE convs: it runs after their own init).
_kaiming_fan_out = layers.kaiming_fan_out
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


def stage_units(
    num_layers: int, layout: str = "adaface"
) -> tuple[int, int, int, int]:
  table = INSIGHTFACE_STAGE_UNITS if layout == "insightface" else STAGE_UNITS
  if layout not in LAYOUTS or num_layers not in table:
    raise ValueError(
        f"no {layout} IResNet of depth {num_layers}; depths: "
        f"{sorted(table)}"
    )
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


def unit_specs(
    num_layers: int, base_width: int = 64, layout: str = "adaface"
) -> list[UnitSpec]:
  """The residual units of an IResNet, in order (the reference's `body`)."""
  units = stage_units(num_layers, layout)
  expansion = 4 if uses_bottleneck(num_layers, layout) else 1
  specs = []
  in_channels = base_width
  for stage, num_units in enumerate(units):
    out_channels = base_width * expansion * 2**stage
    # Every stage halves the resolution in its first unit.
    specs.append(UnitSpec(in_channels, out_channels, 2))
    specs.extend(
        UnitSpec(out_channels, out_channels, 1) for _ in range(num_units - 1)
    )
    in_channels = out_channels
  return specs


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
    s = nn.Dense(
        hidden,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_kaiming_fan_out,
        name="fc1",
    )(s)
    s = nn.relu(s)
    s = nn.Dense(
        channels,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_kaiming_fan_out,
        name="fc2",
    )(s)
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
        features,
        (kernel, kernel),
        strides=stride,
        padding=[(kernel // 2, kernel // 2)] * 2,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_kaiming_fan_out,
        name=name,
    )
    norm = lambda name: layers.batch_norm(train, self.dtype, name)
    s = self.stride

    if x.shape[-1] == self.out_channels and not (
        self.project_strided_shortcut and s > 1
    ):
      # MaxPool2d(kernel 1, stride s) is plain subsampling (one strided
      # slice, whatever the batch size).
      shortcut = (
          jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, s, s, 1)) if s > 1 else x
      )
    else:
      shortcut = conv(self.out_channels, 1, s, "shortcut_conv")(x)
      shortcut = norm("shortcut_bn")(shortcut)

    y = norm("bn1")(x)
    if self.bottleneck:
      inner = self.out_channels // 4
      y = conv(inner, 1, 1, "conv1")(y)
      y = norm("bn2")(y)
      y = layers.PReLU(name="prelu1")(y)
      y = conv(inner, 3, 1, "conv2")(y)
      y = norm("bn3")(y)
      y = layers.PReLU(name="prelu2")(y)
      y = conv(self.out_channels, 1, s, "conv3")(y)
      y = norm("bn4")(y)
    else:
      y = conv(self.out_channels, 3, 1, "conv1")(y)
      y = norm("bn2")(y)
      y = layers.PReLU(name="prelu1")(y)
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
    x = nn.Conv(
        self.features,
        (3, 3),
        padding=[(1, 1), (1, 1)],
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_kaiming_fan_out,
        name="conv",
    )(x)
    x = layers.batch_norm(train, self.dtype, "bn")(x)
    return layers.PReLU(name="prelu")(x)


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
    x = layers.batch_norm(train, self.dtype, "bn")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # NHWC flatten; `convert.py` reorders PyTorch's NCHW-flattened rows, so
    # no transpose is needed here.
    x = x.reshape(x.shape[0], -1)
    z = nn.Dense(
        self.embedding_size,
        dtype=self.dtype,
        kernel_init=_kaiming_fan_out,
        name="fc",
    )(x)
    return layers.BatchNorm(
        use_running_average=not train,
        dtype=jnp.float32,
        use_scale=self.affine_features,
        use_bias=self.affine_features,
        name="feature_bn",
    )(z.astype(jnp.float32))


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
  def __call__(
      self, images: jax.Array, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Encodes a batch of faces.

    Args:
      images: normalised float images, NHWC (N, H, W, 3), BGR; any H, W
        (112x112 in the real setting, which ends at 7x7 before the head).
      train: batch statistics and dropout when True, running averages else.

    Returns:
      (unit embeddings (N, D) float32, norms (N,) float32).
    """
    x = layers.to_input_order(images.astype(self.dtype), self.input_order)
    x = InputLayer(self.base_width, dtype=self.dtype, name="input_layer")(
        x, train
    )
    bottleneck = uses_bottleneck(self.num_layers, self.layout)
    insightface = self.layout == "insightface"
    # `train` (argument 2, after self and x) selects Python branches.
    unit = (
        nn.remat(ResidualUnit, static_argnums=(2,))
        if self.remat
        else ResidualUnit
    )
    for i, spec in enumerate(
        unit_specs(self.num_layers, self.base_width, self.layout)
    ):
      x = unit(
          spec.out_channels,
          spec.stride,
          bottleneck=bottleneck,
          use_se=self.use_se,
          dtype=self.dtype,
          project_strided_shortcut=insightface,
          name=f"body_{i}",
      )(x, train)
    z = OutputLayer(
        self.embedding_size,
        self.dropout_rate,
        dtype=self.dtype,
        affine_features=insightface,
        name="output_layer",
    )(x, train)
    # The norm is the quality signal the losses read: float32, like z.
    return layers.unit_and_norm(z)


# ---------------------------------------------------------------------------
# The family: names, PyTorch names, recognition.

# AdaFace/QGFace: "ir50", "ir_se100"; also the reference spellings "ir_50",
# "ir_se_50" and "ir101" (AdaFace calls the 100-layer model IR_101).
# insightface arcface_torch: "r50", "r100" (their names).
_NAME = re.compile(r"^(?:(?P<insightface>r)|ir(?P<se>_se)?_?)(?P<depth>\d+)$")
_ALIASES = {101: 100}


def names() -> list[str]:
  depths = sorted(STAGE_UNITS)
  return (
      [f"ir{d}" for d in depths]
      + [f"ir_se{d}" for d in depths]
      + [f"r{d}" for d in sorted(INSIGHTFACE_STAGE_UNITS)]
  )


def _parse(name: str) -> Optional[tuple[str, int, bool]]:
  """(layout, depth, use_se) of a name, or None."""
  match = _NAME.match(name)
  if not match:
    return None
  depth, insightface = int(match["depth"]), bool(match["insightface"])
  if not insightface:
    depth = _ALIASES.get(depth, depth)
  table = INSIGHTFACE_STAGE_UNITS if insightface else STAGE_UNITS
  if depth not in table:
    return None
  return ("insightface" if insightface else "adaface"), depth, bool(match["se"])


def _name(layout: str, depth: int, use_se: bool) -> str:
  return (
      f"r{depth}"
      if layout == "insightface"
      else f"ir{'_se' if use_se else ''}{depth}"
  )


def canonical(name: str) -> Optional[str]:
  parsed = _parse(name)
  return _name(*parsed) if parsed else None


def build(name: str, **fields) -> IResNet:
  """The IResNet called `name` ("ir18" .. "ir200", "ir_se50", insightface's
  "r18" .. "r200"); `fields` are IResNet's other fields."""
  layout, depth, use_se = _parse(name)
  return IResNet(num_layers=depth, use_se=use_se, layout=layout, **fields)


def head_side(image_size: int) -> int:
  """The side of the map the head sees: the stem keeps the resolution and
  the four stages halve it."""
  return layers.halved(image_size, 4)


def torch_layers(model: IResNet, image_size: int) -> list[registry.TorchLayer]:
  """The weights of AdaFace's `net.py` or insightface's `iresnet.py`, in
  their forward order (AdaFace runs a unit's shortcut first, insightface
  after the residual branch)."""
  layer = registry.TorchLayer
  insightface = model.layout == "insightface"
  bottleneck = uses_bottleneck(model.num_layers, model.layout)
  specs = unit_specs(model.num_layers, model.base_width, model.layout)
  stem = (
      ("conv1", "bn1", "prelu")
      if insightface
      else tuple(f"input_layer.{i}" for i in range(3))
  )
  out = [
      layer(t, ("input_layer", f), k)
      for t, f, k in zip(
          stem, ("conv", "bn", "prelu"), ("conv", "batch_norm", "prelu")
      )
  ]
  branch = ["bn1", "conv1", "bn2", "prelu1", "conv2", "bn3"] + (
      ["prelu2", "conv3", "bn4"] if bottleneck else []
  )
  kind = lambda f: (
      "conv"
      if f.startswith("conv")
      else "prelu"
      if f.startswith("prelu")
      else "batch_norm"
  )
  stage_of = [
      s
      for s, n in enumerate(stage_units(model.num_layers, model.layout))
      for _ in range(n)
  ]
  for i, spec in enumerate(specs):
    if insightface:
      base = f"layer{stage_of[i] + 1}.{i - stage_of.index(stage_of[i])}"
      names_ = {
          "bn1": "bn1",
          "conv1": "conv1",
          "bn2": "bn2",
          "prelu1": "prelu",
          "conv2": "conv2",
          "bn3": "bn3",
      }
      res = [
          layer(f"{base}.{names_[f]}", (f"body_{i}", f), kind(f))
          for f in branch
      ]
      short = [
          layer(f"{base}.downsample.{j}", (f"body_{i}", f), k)
          for j, (f, k) in enumerate(
              (("shortcut_conv", "conv"), ("shortcut_bn", "batch_norm"))
          )
      ]
    else:
      base = f"body.{i}"
      res = [
          layer(f"{base}.res_layer.{j}", (f"body_{i}", f), kind(f))
          for j, f in enumerate(branch)
      ]
      if model.use_se:
        res += [
            layer(
                f"{base}.res_layer.se_block.{f}",
                (f"body_{i}", "se", f),
                "conv_as_linear",
            )
            for f in ("fc1", "fc2")
        ]
      short = [
          layer(f"{base}.shortcut_layer.{j}", (f"body_{i}", f), k)
          for j, (f, k) in enumerate(
              (("shortcut_conv", "conv"), ("shortcut_bn", "batch_norm"))
          )
      ]
    projected = spec.in_channels != spec.out_channels or (
        insightface and spec.stride > 1
    )
    short = short if projected else []
    out += res + short if insightface else short + res
  side = head_side(image_size)
  head = (
      ("bn2", "fc", "features")
      if insightface
      else tuple(f"output_layer.{i}" for i in (0, 3, 4))
  )
  out += [
      layer(head[0], ("output_layer", "bn"), "batch_norm"),
      layer(
          head[1],
          ("output_layer", "fc"),
          "linear",
          flatten=(specs[-1].out_channels, side, side),
      ),
      layer(head[2], ("output_layer", "feature_bn"), "batch_norm"),
  ]
  return out


_MAX_SIDE = 64  # the head's map: 1024 px faces, far past any model's input
_MAX_WIDTH = 1024  # the stem's channels: 16 times the standard models'


def recognise(
    shapes: Mapping[str, tuple[int, ...]],
) -> Optional[registry.Recognised]:
  """Depth from the number of residual units (per stage for insightface's
  layout), SE from `se_block` tensors, widths and the input size from the
  stem's and the head's shapes."""
  if "input_layer.0.weight" in shapes:
    layout, stem = "adaface", "input_layer.0.weight"
    fc = "output_layer.3.weight"
  elif "conv1.weight" in shapes and "layer1.0.bn1.weight" in shapes:
    layout, stem, fc = "insightface", "conv1.weight", "fc.weight"
  else:
    return None
  if fc not in shapes:
    raise ValueError(f"missing the head's {fc!r}, which sizes the model")
  stem_shape, fc_shape = tuple(shapes[stem]), tuple(shapes[fc])
  if (
      len(stem_shape) != 4
      or stem_shape[1:] != (3, 3, 3)
      or not (1 <= stem_shape[0] <= _MAX_WIDTH)
  ):
    raise ValueError(
        f"{stem} has shape {stem_shape}, not (width, 3, 3, 3) "
        f"with a width from 1 to {_MAX_WIDTH}: not an IResNet "
        "stem"
    )
  if len(fc_shape) != 2 or min(fc_shape) < 1:
    raise ValueError(f"{fc} has shape {fc_shape}, not (embedding size, inputs)")
  if layout == "insightface":
    per_stage = tuple(
        len({m[1] for k in shapes if (m := re.match(rf"layer{s}\.(\d+)\.", k))})
        for s in range(1, 5)
    )
    by_units = {v: d for d, v in INSIGHTFACE_STAGE_UNITS.items()}
    if per_stage not in by_units:
      raise ValueError(
          f"cannot infer the depth: {per_stage} units per "
          f"stage; insightface depths have {sorted(by_units)}"
      )
    depth, use_se = by_units[per_stage], False
  else:
    units = {int(m[1]) for k in shapes if (m := re.match(r"body\.(\d+)\.", k))}
    num_units = max(units) + 1 if units else 0
    by_count = {sum(v): d for d, v in STAGE_UNITS.items()}
    if num_units not in by_count or len(units) != num_units:
      raise ValueError(
          f"cannot infer the depth: {len(units)} residual units "
          f"(max index {num_units - 1}); known depths have "
          f"{sorted(by_count)} units"
      )
    depth, use_se = by_count[num_units], any(".se_block." in k for k in shapes)
  width, (embedding_size, fc_in) = stem_shape[0], fc_shape
  channels = unit_specs(depth, width, layout)[-1].out_channels
  side = math.isqrt(max(fc_in // channels, 0))
  if not 1 <= side <= _MAX_SIDE or side * side * channels != fc_in:
    raise ValueError(
        f"{fc} has {fc_in} inputs, not {channels} channels "
        f"times a square feature map of at most {_MAX_SIDE} x "
        f"{_MAX_SIDE} (wrong depth or width?)"
    )
  return registry.Recognised(
      _name(layout, depth, use_se),
      embedding_size,
      16 * side,
      {"base_width": width},
  )


def describe(model: IResNet) -> str:
  return (
      f"IResNet-{model.num_layers} ({'with' if model.use_se else 'no'} "
      f"SE, base width {model.base_width}, {model.layout} layout)"
  )


# The public PyTorch code whose state dict each layout is written in, and
# what that code can build.
_PUBLIC_CODE = {
    "adaface": (
        "AdaFace/QGFace net.py",
        dict(base_width=64, image_size=112, embedding_size=512),
    ),
    "insightface": (
        "insightface's arcface_torch iresnet.py",
        dict(base_width=64, image_size=112),
    ),
}


def public_code(model: IResNet, image_size: int) -> tuple[str, Optional[str]]:
  code, builds = _PUBLIC_CODE[model.layout]
  have = dict(
      base_width=model.base_width,
      image_size=image_size,
      embedding_size=model.embedding_size,
  )
  differ = [
      f"{k.replace('_', ' ')} {have[k]} (it builds {v})"
      for k, v in builds.items()
      if have[k] != v
  ]
  return code, "; ".join(differ) or None


FAMILY = registry.register(
    registry.Family(
        module=IResNet,
        name="iresnet",
        names=names,
        canonical=canonical,
        build=build,
        settings={"base_width": 64, "dropout_rate": 0.4},
        weight_settings=("base_width",),
        torch_layers=torch_layers,
        recognise=recognise,
        stem_keys=("input_layer.0.weight", "conv1.weight"),
        # AdaFace/QGFace models read BGR, insightface's RGB.
        input_order=lambda name: "RGB" if name.startswith("r") else "BGR",
        public_code=public_code,
        describe=describe,
        onnx_import=True,
    )
)
