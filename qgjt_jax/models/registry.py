"""The backbone registry: `config.model.name` -> the family that builds it.

A family is one module under models/ that declares, in one `Family`:
* its names and how to build each (its settings beyond the shared ones:
  embedding size, compute dtype, remat, input channel order);
* the PyTorch modules of its public code that hold weights, in the order
  that code's forward runs them, and where each one's weights live in the
  Flax variables (`TorchLayer`): import, safetensors export and ONNX import
  all read that one list;
* how to recognise its state dicts (the names and shapes alone).

Nothing outside models/ names a family: every other module asks the
registry (`family_of`, `build`, `recognise`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn

# What a TorchLayer's weights are, which fixes their PyTorch tensor names and
# layouts (interop/state_dicts.py maps each kind):
#   conv            Conv2d: weight (O, I/groups, kh, kw) [, bias]
#   conv_as_linear  a 1x1 Conv2d on a pooled vector (SE gates): a Dense here
#   linear          Linear: weight (O, I) [, bias]; `flatten` when its inputs
#                   are a (C, H, W) map flattened in PyTorch's NCHW order
#   batch_norm      BatchNorm1d/2d: [weight, bias,] running_mean, running_var
#   prelu           PReLU: weight (C,)
#   layer_norm      LayerNorm: weight, bias
#   param           a bare nn.Parameter, the same array on both sides
KINDS = (
    "conv",
    "conv_as_linear",
    "linear",
    "batch_norm",
    "prelu",
    "layer_norm",
    "param",
)


@dataclasses.dataclass(frozen=True)
class TorchLayer:
  """One PyTorch module holding weights, as its public code names it."""

  torch: str  # "layer1.0.conv1", "pos_embed"
  flax: tuple[str, ...]  # its Flax module path (a param: the leaf's path)
  kind: str  # one of KINDS
  flatten: Optional[tuple[int, int, int]] = None  # (C, H, W), see KINDS

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"{self.torch}: kind {self.kind!r} not in {KINDS}")


@dataclasses.dataclass(frozen=True)
class Recognised:
  """What a state dict's names and shapes say of its model."""

  name: str  # the canonical config.model.name
  embedding_size: int
  image_size: int
  settings: dict[str, Any]  # the family's own settings (config.model.KEY)


@dataclasses.dataclass(frozen=True)
class Family:
  """One backbone family (see the module doc)."""

  name: str
  module: type  # the Flax module class it builds
  # The canonical model names, and each name's canonical spelling (None:
  # not this family's name; aliases such as "ir_101" map to "ir100").
  names: Callable[[], list[str]]
  canonical: Callable[[str], Optional[str]]
  # (canonical name, *, embedding_size, dtype, remat, input_order,
  # **settings) -> the Flax module.
  build: Callable[..., nn.Module]
  # config.model keys the family reads beyond the shared ones, with their
  # defaults; those of them that change the variables' shapes (a workdir
  # records them with its model).
  settings: Mapping[str, Any]
  weight_settings: tuple[str, ...]
  # (module, image size) -> its TorchLayers, in the public code's forward
  # order.
  torch_layers: Callable[[nn.Module, int], list[TorchLayer]]
  # bare state-dict names -> shapes: a Recognised, or None (not this
  # family's); raises ValueError when it is but does not add up.
  recognise: Callable[[Mapping[str, tuple[int, ...]]], Optional[Recognised]]
  # Bare names that only this family's stem has (where a prefix ends).
  stem_keys: tuple[str, ...]
  # The channel order a name's published weights read.
  input_order: Callable[[str], str]
  # (module, image size) -> (the public PyTorch code whose state dict the
  # safetensors export writes, why that code cannot build this model or
  # None).
  public_code: Callable[[nn.Module, int], tuple[str, Optional[str]]]
  # One line describing a model, for convert's summary.
  describe: Callable[[nn.Module], str]
  # Whether ONNX import may match ONNX graphs against this family's layers.
  onnx_import: bool = False


_FAMILIES: dict[str, Family] = {}
SHARED_SETTINGS = ("name", "embedding_size", "dtype", "remat", "input_order")


def register(family: Family) -> Family:
  if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
    raise ValueError(f"backbone family {family.name!r} is already registered")
  clash = set(family.names()) & {
      n for f in _FAMILIES.values() if f.name != family.name for n in f.names()
  }
  if clash:
    raise ValueError(
        f"{family.name} names {sorted(clash)} belong to another family"
    )
  _FAMILIES[family.name] = family
  return family


def families() -> list[Family]:
  return list(_FAMILIES.values())


def backbone_names() -> list[str]:
  """Every canonical backbone name, family by family."""
  return [name for family in _FAMILIES.values() for name in family.names()]


def family_of(name: str) -> tuple[Family, str]:
  """(family, canonical name) of a backbone name (case-insensitive).

  Raises:
    ValueError: an unknown name, listing the valid ones.
  """
  key = str(name).strip().lower()
  for family in _FAMILIES.values():
    canonical = family.canonical(key)
    if canonical is not None:
      return family, canonical
  raise ValueError(
      f"unknown backbone {name!r}; valid names: "
      f"{', '.join(backbone_names())}"
  )


def family_of_module(module: nn.Module) -> Family:
  """The family of a built backbone."""
  for family in _FAMILIES.values():
    if isinstance(module, family.module):
      return family
  raise ValueError(f"{type(module).__name__} is no registered backbone")


def recorded_model_keys() -> tuple[str, ...]:
  """The dotted config keys that fix a model's variables: its name,
  embedding size and input size, and every family's weight settings."""
  own = sorted(
      {f"model.{k}" for f in _FAMILIES.values() for k in f.weight_settings}
  )
  return ("model.name", *own, "model.embedding_size", "data.image_size")


def family_settings(
    name: str, model_config: Mapping[str, Any]
) -> dict[str, Any]:
  """The family's own settings as `model_config` (config.model) sets them."""
  family, _ = family_of(name)
  return {
      key: model_config.get(key, default)
      for key, default in family.settings.items()
  }
