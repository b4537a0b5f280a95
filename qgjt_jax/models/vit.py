"""The face ViTs of insightface's arcface_torch `backbones/vit.py`.

`vit_t`, `vit_s`, `vit_b` and `vit_l` with the settings `get_model` gives
them (`vit_l` is its `vit_l_dp005_mask_005`): 9 x 9 patches (12 x 12 of
them at 112 px), a learned position embedding and no class token, pre-norm
blocks of attention without qkv bias and a ReLU6 MLP of 4x width, a final
LayerNorm, then the feature head over every token: Linear(N*D -> D, no
bias), BatchNorm1d, Linear(D -> embedding, no bias), BatchNorm1d (eps 2e-5).

Training behaves as theirs: stochastic depth rising linearly to
`drop_path_rate` over the blocks, and the random masking of `mask_ratio`
of the tokens (each sample keeps a random subset through the blocks; the
dropped places are filled with the learned mask token after the final
norm). Both draw from the 'dropout' rng. Module names follow the PyTorch
ones (`blocks_3` for `blocks.3`). Inputs: BGR normalised to [-1, 1];
insightface's weights read RGB (`input_order`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qgjt_jax.models import layers
from qgjt_jax.models import registry

PATCH = 9
_FEATURE_EPSILON = 2e-5
_LN_EPSILON = 1e-5  # torch.nn.LayerNorm's (flax's default is 1e-6)


@dataclasses.dataclass(frozen=True)
class Variant:
  embed_dim: int
  depth: int
  num_heads: int
  drop_path_rate: float
  mask_ratio: float


VARIANTS = {
    "vit_t": Variant(256, 12, 8, 0.1, 0.1),
    "vit_s": Variant(512, 12, 8, 0.1, 0.1),
    "vit_b": Variant(512, 24, 8, 0.1, 0.1),
    "vit_l": Variant(768, 24, 8, 0.05, 0.05),
}
_MLP_RATIO = 4
_trunc_normal = nn.initializers.truncated_normal(0.02)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch's LayerNorm.
  return nn.LayerNorm(
      epsilon=_LN_EPSILON, use_fast_variance=False, dtype=dtype, name=name
  )


def _dense(
    features: int, dtype: Any, name: str, use_bias: bool = True
) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=_trunc_normal,
      name=name,
  )


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = _dense(3 * dim, self.dtype, "qkv", use_bias=False)(x)
    # Their reshape (B, N, 3, heads, head_dim): q, k, v are the thirds.
    q, k, v = (
        t.reshape(batch, tokens, self.num_heads, head_dim).astype(jnp.float32)
        for t in jnp.split(qkv, 3, axis=-1)
    )
    # Scores and softmax in float32, as theirs.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim)
    return _dense(dim, self.dtype, "proj")(out.astype(self.dtype))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = jax.nn.relu6(_dense(self.hidden, self.dtype, "fc1")(x))
    return _dense(dim, self.dtype, "fc2")(x)


def _drop_path(
    module: nn.Module, x: jax.Array, rate: float, train: bool
) -> jax.Array:
  """Stochastic depth: each sample's branch is dropped with `rate`, the
  kept ones scaled by 1 / (1 - rate) (timm's DropPath)."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(
      module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
  )
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  num_heads: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = Attention(self.num_heads, self.dtype, name="attn")(
        _layer_norm(self.dtype, "norm1")(x)
    )
    x = x + _drop_path(self, y, self.drop_path, train)
    y = Mlp(_MLP_RATIO * x.shape[-1], self.dtype, name="mlp")(
        _layer_norm(self.dtype, "norm2")(x)
    )
    return x + _drop_path(self, y, self.drop_path, train)


def _random_masking(
    rng: jax.Array, x: jax.Array, ratio: float
) -> tuple[jax.Array, jax.Array]:
  """(the kept tokens of each sample, the order that puts them back):
  a per-sample random permutation, its first L (1 - ratio) places kept."""
  batch, length, _ = x.shape
  keep = int(length * (1 - ratio))
  shuffle = jnp.argsort(jax.random.uniform(rng, (batch, length)), axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  kept = jnp.take_along_axis(x, shuffle[:, :keep, None], axis=1)
  return kept, restore


class VisionTransformer(nn.Module):
  """A face ViT returning (unit embeddings, norms) (see the module doc)."""

  variant: str = "vit_t"
  embedding_size: int = 512
  dtype: Any = jnp.float32
  remat: bool = False
  input_order: str = "RGB"

  @nn.compact
  def __call__(
      self, images: jax.Array, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    spec = VARIANTS[self.variant]
    dim = spec.embed_dim
    x = layers.to_input_order(images.astype(self.dtype), self.input_order)
    x = nn.Conv(
        dim,
        (PATCH, PATCH),
        strides=PATCH,
        padding="VALID",
        dtype=self.dtype,
        name="patch_embed",
    )(x)
    batch, rows, cols, _ = x.shape
    tokens = rows * cols
    x = x.reshape(batch, tokens, dim)  # the patches in raster order
    x = x + self.param(
        "pos_embed", _trunc_normal, (1, tokens, dim), jnp.float32
    ).astype(self.dtype)
    mask_token = self.param(
        "mask_token", nn.initializers.normal(0.02), (1, 1, dim), jnp.float32
    )
    masked = train and spec.mask_ratio > 0
    if masked:
      x, restore = _random_masking(self.make_rng("dropout"), x, spec.mask_ratio)
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = (
        [spec.drop_path_rate * i / (spec.depth - 1) for i in range(spec.depth)]
        if spec.depth > 1
        else [0.0]
    )
    for i, rate in enumerate(rates):
      x = block(spec.num_heads, rate, self.dtype, name=f"blocks_{i}")(x, train)
    x = _layer_norm(jnp.float32, "norm")(x.astype(jnp.float32))
    if masked:
      fill = jnp.broadcast_to(mask_token, (batch, tokens - x.shape[1], dim))
      x = jnp.take_along_axis(
          jnp.concatenate([x, fill], axis=1), restore[:, :, None], axis=1
      )
    x = x.reshape(batch, tokens * dim).astype(self.dtype)
    z = _dense(dim, self.dtype, "feature_0", use_bias=False)(x)
    z = layers.BatchNorm(
        use_running_average=not train,
        dtype=jnp.float32,
        epsilon=_FEATURE_EPSILON,
        name="feature_1",
    )(z.astype(jnp.float32))
    z = _dense(self.embedding_size, jnp.float32, "feature_2", use_bias=False)(z)
    z = layers.BatchNorm(
        use_running_average=not train,
        dtype=jnp.float32,
        epsilon=_FEATURE_EPSILON,
        name="feature_3",
    )(z)
    return layers.unit_and_norm(z)


# ---------------------------------------------------------------------------
# The family.


def build(name: str, **fields) -> VisionTransformer:
  return VisionTransformer(variant=name, **fields)


def torch_layers(
    model: VisionTransformer, image_size: int
) -> list[registry.TorchLayer]:
  layer = registry.TorchLayer
  out = [
      layer("patch_embed.proj", ("patch_embed",), "conv"),
      layer("pos_embed", ("pos_embed",), "param"),
  ]
  for i in range(VARIANTS[model.variant].depth):
    t, f = f"blocks.{i}", f"blocks_{i}"
    out += [
        layer(f"{t}.norm1", (f, "norm1"), "layer_norm"),
        layer(f"{t}.attn.qkv", (f, "attn", "qkv"), "linear"),
        layer(f"{t}.attn.proj", (f, "attn", "proj"), "linear"),
        layer(f"{t}.norm2", (f, "norm2"), "layer_norm"),
        layer(f"{t}.mlp.fc1", (f, "mlp", "fc1"), "linear"),
        layer(f"{t}.mlp.fc2", (f, "mlp", "fc2"), "linear"),
    ]
  out += [layer("norm", ("norm",), "layer_norm")]
  out += [
      layer(f"feature.{i}", (f"feature_{i}",), kind)
      for i, kind in enumerate(("linear", "batch_norm", "linear", "batch_norm"))
  ]
  # Used by the masking only, after the blocks.
  out.append(layer("mask_token", ("mask_token",), "param"))
  return out


def recognise(
    shapes: Mapping[str, tuple[int, ...]],
) -> Optional[registry.Recognised]:
  """The variant from the width and the number of blocks, the input size
  from the number of patches."""
  if "patch_embed.proj.weight" not in shapes or "pos_embed" not in shapes:
    return None
  proj, pos = tuple(shapes["patch_embed.proj.weight"]), tuple(
      shapes["pos_embed"]
  )
  head = tuple(shapes.get("feature.2.weight", ()))
  if (
      len(proj) != 4
      or proj[1:] != (3, PATCH, PATCH)
      or len(pos) != 3
      or (pos[0] != 1)
      or len(head) != 2
  ):
    raise ValueError(
        f"patch_embed.proj.weight {proj}, pos_embed {pos} and "
        f"feature.2.weight {head} are not a face ViT's "
        f"(3-channel {PATCH} x {PATCH} patches)"
    )
  depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
  found = [
      n
      for n, v in VARIANTS.items()
      if (v.embed_dim, v.depth) == (proj[0], depth)
  ]
  if not found:
    raise ValueError(
        f"a ViT of width {proj[0]} and {depth} blocks is none "
        f"of {sorted(VARIANTS)}"
    )
  side = math.isqrt(pos[1])
  if side * side != pos[1] or not 1 <= side <= 64:
    raise ValueError(
        f"pos_embed holds {pos[1]} tokens, not a square grid of patches"
    )
  # 12 x 12 patches cover 108 px; their models take 112 px faces.
  size = 112 if PATCH * side <= 112 < PATCH * (side + 1) else PATCH * side
  return registry.Recognised(found[0], head[0], size, {})


def public_code(
    model: VisionTransformer, image_size: int
) -> tuple[str, Optional[str]]:
  code = "insightface's arcface_torch vit.py"
  return code, (
      None
      if image_size == 112
      else f"image size {image_size} (it builds 112 px)"
  )


FAMILY = registry.register(
    registry.Family(
        module=VisionTransformer,
        name="vit",
        names=lambda: list(VARIANTS),
        canonical=lambda name: name if name in VARIANTS else None,
        build=build,
        settings={},
        weight_settings=(),
        torch_layers=torch_layers,
        recognise=recognise,
        stem_keys=("patch_embed.proj.weight",),
        input_order=lambda name: "RGB",
        public_code=public_code,
        describe=lambda m: (
            f"ViT {m.variant} (width "
            f"{VARIANTS[m.variant].embed_dim}, "
            f"{VARIANTS[m.variant].depth} blocks, "
            f"{VARIANTS[m.variant].num_heads} heads, "
            f"{PATCH} px patches)"
        ),
    )
)
