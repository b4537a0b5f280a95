"""MobileFaceNet, as insightface's arcface_torch `backbones/mobilefacenet.py`
builds it, and the head of insightface's released buffalo_s recogniser.

* "mbf": `get_mbf` (blocks 1/4/6/2, width scale 2), the GDC head: a 7x7
  depthwise conv over the last map (BN, no PReLU), a Linear without bias to
  the embedding, BatchNorm1d.
* "mbf_large": `get_mbf_large` (blocks 2/8/12/4, width scale 4).
* "mbf_buffalo": the body of "mbf" with the head of the MobileFaceNet that
  insightface ships as `w600k_mbf.onnx` in its buffalo_s and buffalo_sc
  packs (WebFace600K): after `conv_sep`, a 1x1 conv to 64 channels with BN
  and PReLU, the 64 x 7 x 7 map flattened, a Linear with bias to the
  embedding (`fc`), BatchNorm1d (`features`). No public PyTorch code
  builds it: `fc` and `features` are the names in that file, the 64-channel
  layer's (`conv_reduce`) are ours.

Units: ConvBlock = conv, BN, PReLU; LinearBlock = conv, BN; DepthWise =
1x1 ConvBlock to `groups` channels, a grouped 3x3 ConvBlock (stride 2 when
it subsamples), a 1x1 LinearBlock, plus the input when residual. Module
names follow the PyTorch ones (`layers_2` for `layers.2`). NHWC; the
flatten before `fc` is in NHWC order and the converter permutes the rows,
as in IResNet. Inputs: BGR normalised to [-1, 1]; insightface's weights
read RGB (`input_order`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qgjt_jax.models import layers
from qgjt_jax.models import registry


@dataclasses.dataclass(frozen=True)
class Variant:
  blocks: tuple[int, int, int, int]
  scale: int
  head: str  # "gdc" | "flatten"


VARIANTS = {
    "mbf": Variant((1, 4, 6, 2), 2, "gdc"),
    "mbf_large": Variant((2, 8, 12, 4), 4, "gdc"),
    "mbf_buffalo": Variant((1, 4, 6, 2), 2, "flatten"),
}
_REDUCED = 64  # the buffalo head's channels before the flatten


@dataclasses.dataclass(frozen=True)
class Block:
  """One PyTorch module of the body: a ConvBlock, a DepthWise, or a
  Residual of `count` DepthWise units."""

  kind: str  # "conv" | "depthwise" | "residual"
  out: int
  stride: int = 1
  groups: int = 1
  count: int = 1


def body(variant: Variant) -> list[Block]:
  """`self.layers` of arcface_torch's MobileFaceNet, in order."""
  s = variant.scale
  first = (
      Block("conv", 64 * s, 1, 64)
      if variant.blocks[0] == 1
      else Block("residual", 64 * s, 1, 128, variant.blocks[0])
  )
  return [
      Block("conv", 64 * s, 2),
      first,
      Block("depthwise", 64 * s, 2, 128),
      Block("residual", 64 * s, 1, 128, variant.blocks[1]),
      Block("depthwise", 128 * s, 2, 256),
      Block("residual", 128 * s, 1, 256, variant.blocks[2]),
      Block("depthwise", 128 * s, 2, 512),
      Block("residual", 128 * s, 1, 256, variant.blocks[3]),
  ]


class ConvBN(nn.Module):
  """ConvBlock (with PReLU) or LinearBlock (without): Sequential(conv, bn
  [, prelu]) as `layers_0`, `layers_1`, `layers_2`."""

  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  prelu: bool = True
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.conv(
        self.features,
        self.kernel,
        self.stride,
        padding=self.padding,
        groups=self.groups,
        dtype=self.dtype,
        name="layers_0",
    )(x)
    x = layers.batch_norm(train, self.dtype, "layers_1")(x)
    return layers.PReLU(name="layers_2")(x) if self.prelu else x


class DepthWise(nn.Module):
  features: int
  stride: int
  groups: int
  residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ConvBN(self.groups, dtype=self.dtype, name="layers_0")(x, train)
    y = ConvBN(
        self.groups,
        3,
        self.stride,
        self.groups,
        padding=1,
        dtype=self.dtype,
        name="layers_1",
    )(y, train)
    y = ConvBN(self.features, prelu=False, dtype=self.dtype, name="layers_2")(
        y, train
    )
    return x + y if self.residual else y


class Residual(nn.Module):
  features: int
  count: int
  groups: int
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    unit = nn.remat(DepthWise, static_argnums=(2,)) if self.remat else DepthWise
    for j in range(self.count):
      x = unit(
          self.features,
          1,
          self.groups,
          residual=True,
          dtype=self.dtype,
          name=f"layers_{j}",
      )(x, train)
    return x


class MobileFaceNet(nn.Module):
  """MobileFaceNet returning (unit embeddings, norms) (see the module doc).

  Attributes:
    variant: a key of VARIANTS.
    embedding_size: D.
    dtype: compute dtype; parameters, the head's BatchNorm1d and the norm
      stay float32.
    remat: recompute each DepthWise unit's activations in the backward pass.
    input_order: the channel order the weights were trained on.
  """

  variant: str = "mbf"
  embedding_size: int = 512
  dtype: Any = jnp.float32
  remat: bool = False
  input_order: str = "RGB"

  @nn.compact
  def __call__(
      self, images: jax.Array, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    spec = VARIANTS[self.variant]
    x = layers.to_input_order(images.astype(self.dtype), self.input_order)
    for i, block in enumerate(body(spec)):
      name = f"layers_{i}"
      if block.kind == "conv":
        x = ConvBN(
            block.out,
            3,
            block.stride,
            block.groups,
            padding=1,
            dtype=self.dtype,
            name=name,
        )(x, train)
      elif block.kind == "depthwise":
        unit = (
            nn.remat(DepthWise, static_argnums=(2,))
            if self.remat
            else DepthWise
        )
        x = unit(
            block.out, block.stride, block.groups, dtype=self.dtype, name=name
        )(x, train)
      else:
        x = Residual(
            block.out,
            block.count,
            block.groups,
            dtype=self.dtype,
            remat=self.remat,
            name=name,
        )(x, train)
    x = ConvBN(512, dtype=self.dtype, name="conv_sep")(x, train)
    if spec.head == "gdc":
      z = GDC(self.embedding_size, dtype=self.dtype, name="features")(x, train)
    else:
      x = ConvBN(_REDUCED, dtype=self.dtype, name="conv_reduce")(x, train)
      # NHWC flatten; the converter permutes PyTorch's NCHW rows.
      x = x.reshape(x.shape[0], -1)
      z = nn.Dense(
          self.embedding_size,
          dtype=self.dtype,
          kernel_init=layers.kaiming_fan_out,
          name="fc",
      )(x)
      z = layers.BatchNorm(
          use_running_average=not train, dtype=jnp.float32, name="features"
      )(z.astype(jnp.float32))
    return layers.unit_and_norm(z)


class GDC(nn.Module):
  """Global depthwise conv over the whole map (LinearBlock `layers_0`), a
  Linear without bias (`layers_2`), BatchNorm1d (`layers_3`), in float32
  from the Linear on."""

  embedding_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels, side = x.shape[-1], x.shape[1]
    x = ConvBN(
        channels,
        side,
        groups=channels,
        prelu=False,
        dtype=self.dtype,
        name="layers_0",
    )(x, train)
    x = x.reshape(x.shape[0], -1)
    z = nn.Dense(
        self.embedding_size,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=layers.kaiming_fan_out,
        name="layers_2",
    )(x)
    return layers.BatchNorm(
        use_running_average=not train, dtype=jnp.float32, name="layers_3"
    )(z.astype(jnp.float32))


# ---------------------------------------------------------------------------
# The family.


def canonical(name: str) -> Optional[str]:
  return name if name in VARIANTS else None


def build(name: str, **fields) -> MobileFaceNet:
  return MobileFaceNet(variant=name, **fields)


def head_side(image_size: int) -> int:
  """Four stride-2 layers: 112 px ends at 7 x 7."""
  return layers.halved(image_size, 4)


def _conv_bn(
    torch: str, flax: tuple[str, ...], prelu: bool = True
) -> list[registry.TorchLayer]:
  layer = registry.TorchLayer
  out = [
      layer(f"{torch}.layers.0", flax + ("layers_0",), "conv"),
      layer(f"{torch}.layers.1", flax + ("layers_1",), "batch_norm"),
  ]
  if prelu:
    out.append(layer(f"{torch}.layers.2", flax + ("layers_2",), "prelu"))
  return out


def _depthwise(torch: str, flax: tuple[str, ...]) -> list[registry.TorchLayer]:
  return (
      _conv_bn(f"{torch}.layers.0", flax + ("layers_0",))
      + _conv_bn(f"{torch}.layers.1", flax + ("layers_1",))
      + _conv_bn(f"{torch}.layers.2", flax + ("layers_2",), prelu=False)
  )


def torch_layers(
    model: MobileFaceNet, image_size: int
) -> list[registry.TorchLayer]:
  spec = VARIANTS[model.variant]
  out = []
  for i, block in enumerate(body(spec)):
    torch, flax = f"layers.{i}", (f"layers_{i}",)
    if block.kind == "conv":
      out += _conv_bn(torch, flax)
    elif block.kind == "depthwise":
      out += _depthwise(torch, flax)
    else:
      for j in range(block.count):
        out += _depthwise(f"{torch}.layers.{j}", flax + (f"layers_{j}",))
  out += _conv_bn("conv_sep", ("conv_sep",))
  layer = registry.TorchLayer
  if spec.head == "gdc":
    out += _conv_bn("features.layers.0", ("features", "layers_0"), prelu=False)
    out += [
        layer("features.layers.2", ("features", "layers_2"), "linear"),
        layer("features.layers.3", ("features", "layers_3"), "batch_norm"),
    ]
  else:
    side = head_side(image_size)
    out += _conv_bn("conv_reduce", ("conv_reduce",))
    out += [
        layer("fc", ("fc",), "linear", flatten=(_REDUCED, side, side)),
        layer("features", ("features",), "batch_norm"),
    ]
  return out


def recognise(
    shapes: Mapping[str, tuple[int, ...]],
) -> Optional[registry.Recognised]:
  """The variant from the body's widths and unit counts, the head from its
  names; the input size from the map the head sees."""
  if (
      "layers.0.layers.0.weight" not in shapes
      or "conv_sep.layers.0.weight" not in shapes
  ):
    return None
  stem = tuple(shapes["layers.0.layers.0.weight"])
  if len(stem) != 4 or stem[1:] != (3, 3, 3):
    raise ValueError(
        f"layers.0.layers.0.weight has shape {stem}, not "
        "(width, 3, 3, 3): not a MobileFaceNet stem"
    )
  head = "gdc" if "features.layers.2.weight" in shapes else "flatten"
  # A Residual's units are layers.{i}.layers.{j}.layers.{k}.layers.0.
  counts = []
  for i in (1, 3, 5, 7):
    units = {
        k.split(".")[3]
        for k in shapes
        if k.startswith(f"layers.{i}.layers.") and k.count(".layers.") == 3
    }
    counts.append(len(units) if units else 1)
  found = [
      name
      for name, v in VARIANTS.items()
      if v.head == head
      and v.blocks == tuple(counts)
      and 64 * v.scale == stem[0]
  ]
  if not found:
    raise ValueError(
        f"a MobileFaceNet of width {stem[0]} with "
        f"{tuple(counts)} units per stage and a {head} head is "
        f"none of {sorted(VARIANTS)}"
    )
  if head == "gdc":
    kernel = tuple(shapes.get("features.layers.0.layers.0.weight", ()))
    linear = tuple(shapes.get("features.layers.2.weight", ()))
    if len(kernel) != 4 or kernel[2] != kernel[3] or len(linear) != 2:
      raise ValueError(
          f"the GDC head's shapes {kernel} and {linear} are not "
          "a depthwise square kernel and a Linear"
      )
    side, embedding_size = kernel[2], linear[0]
  else:
    fc = tuple(shapes.get("fc.weight", ()))
    if len(fc) != 2 or fc[1] % _REDUCED:
      raise ValueError(
          f"fc.weight has shape {fc}, not (embedding size, "
          f"{_REDUCED} x side x side)"
      )
    side = int(round((fc[1] // _REDUCED) ** 0.5))
    if side * side * _REDUCED != fc[1]:
      raise ValueError(
          f"fc.weight's {fc[1]} inputs are not {_REDUCED} "
          "channels of a square map"
      )
    embedding_size = fc[0]
  if not 1 <= side <= 64:
    raise ValueError(f"the head sees a {side} x {side} map, past any face size")
  return registry.Recognised(found[0], embedding_size, 16 * side, {})


def public_code(
    model: MobileFaceNet, image_size: int
) -> tuple[str, Optional[str]]:
  if VARIANTS[model.variant].head == "flatten":
    return (
        "no public PyTorch code (the buffalo_s head)",
        "no public code builds this head",
    )
  code = "insightface's arcface_torch mobilefacenet.py"
  # Its GDC kernel is fixed at 7 x 7: 112 px faces.
  return code, (
      None
      if head_side(image_size) == 7
      else f"image size {image_size} (its GDC kernel needs 112 px)"
  )


FAMILY = registry.register(
    registry.Family(
        module=MobileFaceNet,
        name="mobilefacenet",
        names=lambda: list(VARIANTS),
        canonical=canonical,
        build=build,
        settings={},
        weight_settings=(),
        torch_layers=torch_layers,
        recognise=recognise,
        stem_keys=("layers.0.layers.0.weight",),
        input_order=lambda name: "RGB",
        public_code=public_code,
        describe=lambda m: (
            f"MobileFaceNet {m.variant} (blocks "
            f"{VARIANTS[m.variant].blocks}, width scale "
            f"{VARIANTS[m.variant].scale}, "
            f"{VARIANTS[m.variant].head} head)"
        ),
        onnx_import=True,
    )
)
