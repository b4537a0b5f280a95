"""PyTorch state dicts <-> Flax variables, for every backbone family.

A family lists the PyTorch modules that hold its weights
(`models.registry.TorchLayer`: the PyTorch name, the Flax module path and
the kind of layer); the kind fixes the tensors and their layouts, so one
mapping serves every family, both ways, and reports missing, unexpected
and mis-shaped tensors by name instead of failing somewhere inside the
model.

  found = find_backbone(weight_files.read_state_dict("model.pth"))
  module = models.build_backbone(found.recognised.name, ...)
  variables = to_flax(found.tensors, module, found.recognised.image_size)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable, Mapping

import numpy as np

from qgjt_jax import errors
from qgjt_jax import models
from qgjt_jax.models import registry

# Prefixes a backbone carries in the wild, most specific first: Lightning
# modules (QGFace `backbone.`, AdaFace `model.`) and DataParallel (`module.`).
_KNOWN_PREFIXES = (
    "",
    "backbone.",
    "model.",
    "module.",
    "model.module.",
    "backbone.module.",
    "module.backbone.",
    "module.model.",
    "model.net.",
    "net.",
)  # the last two: CVLFace's hub files
# An AdaFace checkpoint's margin head, and BatchNorm's step counters.
_IGNORED = re.compile(r"(^head\.|\.num_batches_tracked$)")


class StateDictMismatchError(errors.UserError, ValueError):
  """A state dict does not fit the requested architecture (names listed)."""


@dataclasses.dataclass(frozen=True)
class Found:
  """The backbone a state dict holds."""

  family: registry.Family
  prefix: str
  tensors: dict[str, Any]  # its tensors under their bare names
  recognised: registry.Recognised


def _candidate_prefixes(keys: set[str]) -> list[tuple[str, registry.Family]]:
  """(prefix, family) wherever a key ends in a family's stem name, the
  known prefixes first."""
  found = set()
  for family in models.families():
    for stem in family.stem_keys:
      for key in keys:
        if key.endswith(stem):
          prefix = key[: -len(stem)]
          if not prefix or prefix.endswith("."):
            found.add((prefix, family.name))
  rank = lambda p: (
      _KNOWN_PREFIXES.index(p)
      if p in _KNOWN_PREFIXES
      else len(_KNOWN_PREFIXES),
      p,
  )
  by_name = {f.name: f for f in models.families()}
  return [
      (p, by_name[f])
      for p, f in sorted(found, key=lambda x: (rank(x[0]), x[1]))
  ]


def find_backbone(state_dict: Mapping[str, Any]) -> Found:
  """The backbone in a state dict: its family, the prefix in front of its
  names and what its names and shapes say of the model.

  Keys outside the prefix (a Lightning module's head, momentum copy, queue
  buffers...), `head.*` and BatchNorm's `num_batches_tracked` counters are
  dropped.

  Raises:
    StateDictMismatchError: no family recognises the tensors (or one does
      but they do not add up), or several backbones sit under different
      prefixes.
  """
  keys = set(state_dict)
  hits, problems = [], []
  for prefix, family in _candidate_prefixes(keys):
    tensors = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and not _IGNORED.search(k[len(prefix) :])
    }
    try:
      recognised = family.recognise(
          {k: tuple(np.shape(v)) for k, v in tensors.items()}
      )
    except ValueError as e:
      problems.append(
          f"{family.name} names under {prefix or 'no prefix'!r}: {e}"
      )
      continue
    if recognised is not None:
      hits.append(Found(family, prefix, tensors, recognised))
      if prefix in _KNOWN_PREFIXES:
        break
  known = [h for h in hits if h.prefix in _KNOWN_PREFIXES]
  if known or len(hits) == 1:
    found = (known or hits)[0]
    dropped = len(state_dict) - len(found.tensors)
    if dropped:
      logging.info(
          "ignoring %d non-backbone entries (prefix %r)", dropped, found.prefix
      )
    return found
  if hits:
    raise StateDictMismatchError(
        "several backbones in the state dict: prefixes "
        f"{sorted(h.prefix for h in hits)}"
    )
  if problems:
    raise StateDictMismatchError(problems[0])
  stems = sorted({s for f in models.families() for s in f.stem_keys})
  raise StateDictMismatchError(
      f"no backbone found: no key ends with a known stem ({', '.join(stems)})"
      f"; first keys: {sorted(keys)[:5]}"
  )


# ---------------------------------------------------------------------------
# The tensors of each kind of layer.

Transform = Callable[[np.ndarray], np.ndarray]
_SAME: Transform = lambda a: a


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One PyTorch tensor and the Flax leaf it is."""

  torch: str
  collection: str
  path: tuple[str, ...]
  torch_shape: tuple[int, ...]
  to_flax: Transform
  to_torch: Transform


def _conv(shape):
  kh, kw, cin, cout = shape
  return (
      (cout, cin, kh, kw),
      lambda a: a.transpose(2, 3, 1, 0),
      lambda a: a.transpose(3, 2, 0, 1),
  )


def _linear(shape, flatten):
  fan_in, fan_out = shape
  if flatten is None:
    return (fan_out, fan_in), lambda a: a.T, lambda a: a.T
  # PyTorch's rows index NCHW-flattened features (c, h, w); ours the NHWC
  # flatten (h, w, c).
  c, h, w = flatten

  def to_flax(a):
    return (
        a.reshape(fan_out, c, h, w)
        .transpose(2, 3, 1, 0)
        .reshape(fan_in, fan_out)
    )

  def to_torch(a):
    return (
        a.reshape(h, w, c, fan_out)
        .transpose(3, 2, 0, 1)
        .reshape(fan_out, fan_in)
    )

  return (fan_out, fan_in), to_flax, to_torch


def _conv_as_linear(shape):
  fan_in, fan_out = shape
  return (
      (fan_out, fan_in, 1, 1),
      lambda a: a.reshape(fan_out, fan_in).T,
      lambda a: a.T.reshape(fan_out, fan_in, 1, 1),
  )


# kind -> (torch suffix, collection, Flax leaf, layout or None) of each
# tensor; a tensor whose Flax leaf the module lacks (a conv without bias,
# AdaFace's plain final BatchNorm) is not expected.
_TENSORS = {
    "conv": (
        ("weight", "params", "kernel", _conv),
        ("bias", "params", "bias", None),
    ),
    "conv_as_linear": (("weight", "params", "kernel", _conv_as_linear),),
    "linear": (
        ("weight", "params", "kernel", _linear),
        ("bias", "params", "bias", None),
    ),
    "batch_norm": (
        ("weight", "params", "scale", None),
        ("bias", "params", "bias", None),
        ("running_mean", "batch_stats", "mean", None),
        ("running_var", "batch_stats", "var", None),
    ),
    "prelu": (("weight", "params", "negative_slope", None),),
    "layer_norm": (
        ("weight", "params", "scale", None),
        ("bias", "params", "bias", None),
    ),
}


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def tensors_of(
    layer: registry.TorchLayer, shapes: Mapping[str, Any]
) -> list[Tensor]:
  """The PyTorch tensors of one layer, given the module's variable shapes."""
  if layer.kind == "param":
    leaf = _leaf(shapes["params"], layer.flax)
    if leaf is None:
      raise KeyError(f"no Flax parameter {'/'.join(layer.flax)}")
    return [
        Tensor(
            layer.torch, "params", layer.flax, tuple(leaf.shape), _SAME, _SAME
        )
    ]
  out = []
  for suffix, collection, name, layout in _TENSORS[layer.kind]:
    path = layer.flax + (name,)
    leaf = _leaf(shapes.get(collection, {}), path)
    if leaf is None:
      continue
    shape = tuple(leaf.shape)
    if layout is None:
      torch_shape, to_flax, to_torch = shape, _SAME, _SAME
    elif layout is _linear:
      torch_shape, to_flax, to_torch = _linear(shape, layer.flatten)
    else:
      torch_shape, to_flax, to_torch = layout(shape)
    out.append(
        Tensor(
            f"{layer.torch}.{suffix}",
            collection,
            path,
            torch_shape,
            to_flax,
            to_torch,
        )
    )
  if not out:
    raise KeyError(f"no Flax variables at {'/'.join(layer.flax)}")
  return out


@functools.lru_cache(maxsize=8)
def _variable_shapes(module, image_size: int) -> dict:
  return models.init_shapes(module, (image_size, image_size))


def expected_tensors(module, image_size: int) -> list[Tensor]:
  """Every PyTorch tensor of the module's family code, in forward order."""
  family = models.family_of_module(module)
  shapes = _variable_shapes(module, image_size)
  return [
      t
      for layer in family.torch_layers(module, image_size)
      for t in tensors_of(layer, shapes)
  ]


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_flax(tensors: Mapping[str, Any], module, image_size: int) -> dict:
  """{'params', 'batch_stats'} of `module` from a state dict under its
  bare names (`find_backbone`), float32 numpy.

  Raises:
    StateDictMismatchError: listing missing, unexpected and mis-shaped
      tensors by name.
  """
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  missing, mismatched, used = [], [], set()
  for t in expected_tensors(module, image_size):
    if t.torch not in tensors:
      missing.append(t.torch)
      continue
    used.add(t.torch)
    array = np.asarray(tensors[t.torch])
    if array.shape != t.torch_shape:
      mismatched.append(f"{t.torch}: got {array.shape}, want {t.torch_shape}")
      continue
    _set(
        out[t.collection],
        t.path,
        np.ascontiguousarray(t.to_flax(array.astype(np.float32))),
    )
  unexpected = sorted(
      set(tensors) - used - {k for k in tensors if _IGNORED.search(k)}
  )
  if missing or unexpected or mismatched:
    family = models.family_of_module(module)
    problems = [f"state dict does not match {family.describe(module)}:"]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", mismatched),
    ):
      if items:
        problems.append(f"  {title} ({len(items)}): " + ", ".join(items))
    raise StateDictMismatchError("\n".join(problems))
  return out


def to_torch(
    variables: Mapping[str, Any], module, image_size: int
) -> dict[str, np.ndarray]:
  """The inverse of `to_flax`: the state dict of the family's own PyTorch
  code, float32, with a zero `num_batches_tracked` beside each BatchNorm so
  that a strict `load_state_dict` accepts it."""
  out = {}
  for t in expected_tensors(module, image_size):
    leaf = np.asarray(_leaf(variables[t.collection], t.path), np.float32)
    out[t.torch] = np.ascontiguousarray(t.to_torch(leaf))
    if t.torch.endswith(".running_mean"):
      counter = t.torch[: -len("running_mean")] + "num_batches_tracked"
      out[counter] = np.zeros((), np.int64)
  return dict(sorted(out.items()))
