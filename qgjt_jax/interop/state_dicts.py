"""PyTorch IResNet state dicts <-> Flax `IResNet` variables.

The AdaFace/QGFace names follow `input_layer.{0,1,2}`,
`body.{i}.res_layer.{j}` / `body.{i}.shortcut_layer.{0,1}` /
`body.{i}.res_layer.se_block.fc{1,2}` and `output_layer.{0,3,4}`;
insightface's follow `conv1`, `bn1`, `prelu`, `layer{1-4}.{j}.{bn1, conv1,
bn2, prelu, conv2, bn3, downsample.{0,1}}`, `bn2`, `fc`, `features`. The
mapping walks the Flax variable tree of the matching `IResNet` (built
abstractly with `jax.eval_shape`), derives the PyTorch name and layout of
every leaf, and so reports missing, unexpected and mis-shaped tensors by name
instead of failing somewhere inside the model.

  state = weight_files.read_state_dict("adaface_ir101_ms1mv2.ckpt")
  num_layers, use_se = infer_architecture(state)
  variables = torch_state_dict_to_flax(state, num_layers=num_layers,
                                       use_se=use_se)
"""
from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, Callable, Mapping

import numpy as np

from qgjt_jax import errors
from qgjt_jax.models import iresnet

_ROOT_KEY = "input_layer.0.weight"
# insightface's stem conv, told from a unit's `layer1.0.conv1` by its
# neighbours.
_INSIGHTFACE_ROOT_KEY = "conv1.weight"
# Prefixes a backbone carries in the wild, most specific first: Lightning
# modules (QGFace `backbone.`, AdaFace `model.`) and DataParallel (`module.`).
_KNOWN_PREFIXES = ("", "backbone.", "model.", "module.", "model.module.",
                   "backbone.module.", "module.backbone.", "module.model.",
                   "model.net.", "net.")  # the last two: CVLFace's hub files

# Position of each named layer inside the reference's `res_layer` Sequential.
_RES_LAYER_INDEX = {
    False: {"bn1": 0, "conv1": 1, "bn2": 2, "prelu1": 3, "conv2": 4, "bn3": 5},
    True: {"bn1": 0, "conv1": 1, "bn2": 2, "prelu1": 3, "conv2": 4, "bn3": 5,
           "prelu2": 6, "conv3": 7, "bn4": 8},
}
# ... and inside the stem and head Sequentials (the head's dropout and
# flatten, 1 and 2, hold no weights).
_STEM_HEAD_INDEX = {
    "input_layer": {"conv": 0, "bn": 1, "prelu": 2},
    "output_layer": {"bn": 0, "fc": 3, "feature_bn": 4},
}
_LEAF_NAMES = {
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "negative_slope"): "weight",
    ("params", "kernel"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED = re.compile(r"(^head\.|\.num_batches_tracked$)")


# insightface module -> Flax module (the same modules, their names).
_INSIGHTFACE_FIXED = {
    ("input_layer", "conv"): "conv1", ("input_layer", "bn"): "bn1",
    ("input_layer", "prelu"): "prelu", ("output_layer", "bn"): "bn2",
    ("output_layer", "fc"): "fc", ("output_layer", "feature_bn"): "features",
}
_INSIGHTFACE_UNIT = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2",
                     "prelu1": "prelu", "conv2": "conv2", "bn3": "bn3",
                     "shortcut_conv": "downsample.0",
                     "shortcut_bn": "downsample.1"}


class StateDictMismatchError(errors.UserError, ValueError):
  """A state dict does not fit the requested architecture (names listed)."""


def detect_layout(state_dict: Mapping[str, Any]) -> tuple[str, str]:
  """(layout, prefix) of the backbone a state dict holds: "adaface" or
  "insightface", and the prefix in front of its names.

  Raises:
    StateDictMismatchError: when no key looks like an IResNet stem.
  """
  keys = set(state_dict)
  if any(k.endswith(_ROOT_KEY) for k in keys):
    return "adaface", backbone_prefix(state_dict)
  prefixes = sorted(
      k[:-len(_INSIGHTFACE_ROOT_KEY)] for k in keys
      if k.endswith(_INSIGHTFACE_ROOT_KEY) and
      f"{k[:-len(_INSIGHTFACE_ROOT_KEY)]}layer1.0.bn1.weight" in keys)
  known = [p for p in _KNOWN_PREFIXES if p in prefixes]
  if known or len(prefixes) == 1:
    return "insightface", (known or prefixes)[0]
  raise StateDictMismatchError(
      "no IResNet backbone found: neither AdaFace/QGFace names (a key ending "
      f"with {_ROOT_KEY!r}) nor insightface ones ('conv1.weight' beside "
      f"'layer1.0.bn1.weight'); first keys: {sorted(keys)[:5]}")


def backbone_prefix(state_dict: Mapping[str, Any]) -> str:
  """The prefix in front of the backbone's names ('' for a bare state dict).

  Raises:
    StateDictMismatchError: when no key looks like an IResNet stem.
  """
  candidates = [k[:-len(_ROOT_KEY)] for k in state_dict
                if k.endswith(_ROOT_KEY)]
  if not candidates:
    raise StateDictMismatchError(
        f"no IResNet backbone found: no key ends with {_ROOT_KEY!r} "
        f"(first keys: {sorted(state_dict)[:5]})")
  known = [p for p in _KNOWN_PREFIXES if p in candidates]
  if known:
    return known[0]
  if len(candidates) > 1:
    raise StateDictMismatchError(
        f"several backbones in the state dict: prefixes {sorted(candidates)}")
  return candidates[0]


def backbone_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The backbone's tensors under their bare names.

  Keys outside the backbone prefix (a Lightning module's head, momentum copy,
  queue buffers...), `head.*` and BatchNorm's `num_batches_tracked` counters
  are dropped.
  """
  _, prefix = detect_layout(state_dict)
  out = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    name = key[len(prefix):]
    if not _IGNORED.search(name):
      out[name] = value
  dropped = len(state_dict) - len(out)
  if dropped:
    logging.info("ignoring %d non-backbone entries (prefix %r)", dropped,
                 prefix)
  return out


def infer_architecture(state_dict: Mapping[str, Any]) -> tuple[int, bool]:
  """(num_layers, use_se) of the IResNet whose weights `state_dict` holds.

  The depth follows from the number of residual units (per stage for the
  insightface layout), SE from the presence of `se_block` tensors.
  """
  layout, _ = detect_layout(state_dict)
  names = backbone_state(state_dict)
  if layout == "insightface":
    per_stage = tuple(
        len({m[1] for k in names
             if (m := re.match(rf"layer{stage}\.(\d+)\.", k))})
        for stage in range(1, 5))
    by_units = {v: d for d, v in iresnet.INSIGHTFACE_STAGE_UNITS.items()}
    if per_stage not in by_units:
      raise StateDictMismatchError(
          f"cannot infer the depth: {per_stage} units per stage; insightface "
          f"depths have {sorted(by_units)}")
    return by_units[per_stage], False
  units = {int(m[1]) for k in names if (m := re.match(r"body\.(\d+)\.", k))}
  num_units = max(units) + 1 if units else 0
  by_units = {sum(v): depth for depth, v in iresnet.STAGE_UNITS.items()}
  if num_units not in by_units or len(units) != num_units:
    raise StateDictMismatchError(
        f"cannot infer the depth: {len(units)} residual units (max index "
        f"{num_units - 1}); known depths have {sorted(by_units)} units")
  use_se = any(".se_block." in k for k in names)
  return by_units[num_units], use_se


def _insightface_name(collection: str, path: tuple[str, ...],
                      num_layers: int) -> str:
  """insightface name of the Flax leaf `collection/path`."""
  *module, leaf = path
  module = tuple(module)
  if module in _INSIGHTFACE_FIXED:
    torch_module = _INSIGHTFACE_FIXED[module]
  else:
    unit = re.fullmatch(r"body_(\d+)", module[0])
    if unit is None or len(module) != 2 or module[1] not in _INSIGHTFACE_UNIT:
      raise KeyError(f"unmapped Flax module {'/'.join(module)}")
    index = int(unit[1])
    for stage, count in enumerate(iresnet.INSIGHTFACE_STAGE_UNITS[num_layers]):
      if index < count:
        break
      index -= count
    torch_module = f"layer{stage + 1}.{index}.{_INSIGHTFACE_UNIT[module[1]]}"
  return f"{torch_module}.{_LEAF_NAMES[(collection, leaf)]}"


def _torch_name(collection: str, path: tuple[str, ...], bottleneck: bool
                ) -> str:
  """PyTorch name of the Flax leaf `collection/path`."""
  *module, leaf = path
  module = tuple(module)
  if len(module) == 2 and module[1] in _STEM_HEAD_INDEX.get(module[0], ()):
    torch_module = f"{module[0]}.{_STEM_HEAD_INDEX[module[0]][module[1]]}"
  else:
    unit = re.fullmatch(r"body_(\d+)", module[0])
    if unit is None:
      raise KeyError(f"unmapped Flax module {'/'.join(module)}")
    base = f"body.{unit[1]}"
    rest = module[1:]
    if rest in (("shortcut_conv",), ("shortcut_bn",)):
      index = 0 if rest[0] == "shortcut_conv" else 1
      torch_module = f"{base}.shortcut_layer.{index}"
    elif len(rest) == 2 and rest[0] == "se":
      torch_module = f"{base}.res_layer.se_block.{rest[1]}"
    elif len(rest) == 1 and rest[0] in _RES_LAYER_INDEX[bottleneck]:
      torch_module = f"{base}.res_layer.{_RES_LAYER_INDEX[bottleneck][rest[0]]}"
    else:
      raise KeyError(f"unmapped Flax module {'/'.join(module)}")
  return f"{torch_module}.{_LEAF_NAMES[(collection, leaf)]}"


def _layout(collection: str, path: tuple[str, ...], flax_shape: tuple[int, ...],
            final_channels: int
            ) -> tuple[tuple[int, ...], Callable[[np.ndarray], np.ndarray],
                       Callable[[np.ndarray], np.ndarray]]:
  """(expected PyTorch shape, PyTorch -> Flax array transform, and back) of
  a leaf."""
  same = lambda a: a
  if collection != "params" or path[-1] != "kernel":
    return flax_shape, same, same
  if len(flax_shape) == 4:  # Conv: OIHW <-> HWIO.
    kh, kw, cin, cout = flax_shape
    return ((cout, cin, kh, kw), lambda a: a.transpose(2, 3, 1, 0),
            lambda a: a.transpose(3, 2, 0, 1))
  fan_in, fan_out = flax_shape
  if path[-2] == "fc":
    # Linear after the flatten: PyTorch rows index NCHW-flattened features
    # (c, h, w); ours index NHWC-flattened ones (h, w, c).
    side = math.isqrt(fan_in // final_channels)

    def to_flax(a):
      a = a.reshape(fan_out, final_channels, side, side)
      return a.transpose(2, 3, 1, 0).reshape(fan_in, fan_out)

    def to_torch(a):
      a = a.reshape(side, side, final_channels, fan_out)
      return a.transpose(3, 2, 0, 1).reshape(fan_out, fan_in)
    return (fan_out, fan_in), to_flax, to_torch
  # SE gate: a 1x1 conv on the pooled vector, a Dense here.
  return ((fan_out, fan_in, 1, 1), lambda a: a.reshape(fan_out, fan_in).T,
          lambda a: a.T.reshape(fan_out, fan_in, 1, 1))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
             ) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


@functools.lru_cache(maxsize=8)
def _expected_variables(num_layers: int, use_se: bool, embedding_size: int,
                        base_width: int, side: int, layout: str) -> dict:
  """Variable shapes of the IResNet whose head sees a side x side map."""
  model = iresnet.IResNet(num_layers=num_layers, use_se=use_se,
                          embedding_size=embedding_size, base_width=base_width,
                          layout=layout)
  # The stem keeps the resolution and the four stages halve it.
  return iresnet.init_shapes(model, image_size=(16 * side, 16 * side))


_MAX_SIDE = 64  # the head's map: 1024 px faces, far past any model's input
_MAX_WIDTH = 1024  # the stem's channels: 16 times the standard models'


def _sizes(stem, head, stem_name: str, head_name: str) -> tuple[int, int, int]:
  """(base width, embedding size, head inputs) read from the stem's
  (width, 3, 3, 3) kernel and the head's (embedding, inputs) weight, each
  checked before it sizes anything."""
  stem_shape, head_shape = np.shape(stem), np.shape(head)
  if len(stem_shape) != 4 or stem_shape[1:] != (3, 3, 3) or not (
      1 <= stem_shape[0] <= _MAX_WIDTH):
    raise StateDictMismatchError(
        f"{stem_name} has shape {stem_shape}, not (width, 3, 3, 3) with a "
        f"width from 1 to {_MAX_WIDTH}: not an IResNet stem")
  if len(head_shape) != 2 or min(head_shape) < 1:
    raise StateDictMismatchError(
        f"{head_name} has shape {head_shape}, not (embedding size, inputs)")
  return int(stem_shape[0]), int(head_shape[0]), int(head_shape[1])


def torch_state_dict_to_flax(state_dict: Mapping[str, np.ndarray], *,
                             num_layers: int, use_se: bool = False) -> dict:
  """Converts a PyTorch IResNet state dict to `IResNet` variables.

  Base width, embedding size and the final feature-map size are read from the
  tensors, so the same call serves the 64-wide 112x112 models and narrower
  ones; build the `IResNet` with the matching `base_width`/`embedding_size`.

  Args:
    state_dict: name -> array (numpy, or anything `np.asarray` accepts), in
      either layout (`detect_layout`). Names may carry a `backbone.`/
      `model.`/`module.` prefix; `head.*` and `num_batches_tracked` entries
      are ignored.
    num_layers: IResNet depth (see `infer_architecture`).
    use_se: whether the units have squeeze-excitation gates.

  Returns:
    {'params': ..., 'batch_stats': ...}: nested dicts of float32 numpy arrays
    with exactly the structure `IResNet(num_layers, use_se, layout=...)` has.

  Raises:
    StateDictMismatchError: listing missing, unexpected and mis-shaped
      tensors by name.
  """
  layout, _ = detect_layout(state_dict)
  names = backbone_state(state_dict)
  root, fc = ((_ROOT_KEY, "output_layer.3.weight") if layout == "adaface"
              else (_INSIGHTFACE_ROOT_KEY, "fc.weight"))
  if root not in names or fc not in names:
    raise StateDictMismatchError(
        f"missing stem or head tensors: need {root!r} and {fc!r} to size "
        "the model")
  base_width, embedding_size, fc_in = _sizes(names[root], names[fc], root, fc)
  specs = iresnet.unit_specs(num_layers, base_width, layout)
  final_channels = specs[-1].out_channels
  side = math.isqrt(max(fc_in // final_channels, 0))
  if not 1 <= side <= _MAX_SIDE or side * side * final_channels != fc_in:
    raise StateDictMismatchError(
        f"{fc} has {fc_in} inputs, not {final_channels} channels times a "
        f"square feature map of at most {_MAX_SIDE} x {_MAX_SIDE} (wrong "
        "depth or width?)")
  expected = _expected_variables(num_layers, use_se, embedding_size,
                                 base_width, side, layout)

  torch_name = _torch_namer(num_layers, layout)
  out: dict[str, dict] = {}
  missing, mismatched, used = [], [], set()
  for collection in ("params", "batch_stats"):
    for path, leaf in _flatten(expected[collection]).items():
      name = torch_name(collection, path)
      torch_shape, transform, _ = _layout(collection, path,
                                          tuple(leaf.shape), final_channels)
      if name not in names:
        missing.append(name)
        continue
      used.add(name)
      array = np.asarray(names[name])
      if array.shape != torch_shape:
        mismatched.append(f"{name}: got {array.shape}, want {torch_shape}")
        continue
      _set(out, (collection,) + path,
           np.ascontiguousarray(transform(array.astype(np.float32))))
  unexpected = sorted(set(names) - used)

  if missing or unexpected or mismatched:
    arch = (f"ir{'_se' if use_se else ''}{num_layers}" if layout == "adaface"
            else f"insightface r{num_layers}")
    problems = [f"state dict does not match {arch} "
                f"(base width {base_width}):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        problems.append(f"  {title} ({len(items)}): " + ", ".join(items))
    raise StateDictMismatchError("\n".join(problems))
  return out


def _torch_namer(num_layers: int, layout: str) -> Callable[..., str]:
  """(collection, Flax path) -> the PyTorch name, in the layout's names."""
  if layout == "adaface":
    return functools.partial(
        _torch_name, bottleneck=iresnet.uses_bottleneck(num_layers, layout))
  return functools.partial(_insightface_name, num_layers=num_layers)


def flax_to_torch_state_dict(variables: Mapping[str, Any], *,
                             num_layers: int, layout: str = "adaface"
                             ) -> dict[str, np.ndarray]:
  """The inverse of `torch_state_dict_to_flax`: `IResNet` variables as the
  PyTorch state dict of the layout's own IResNet code (AdaFace/QGFace
  `net.py`, or insightface's `iresnet.py`), float32, with a zero
  `num_batches_tracked` beside each BatchNorm so that a strict
  `load_state_dict` accepts it."""
  base_width = variables["params"]["input_layer"]["conv"]["kernel"].shape[-1]
  final_channels = iresnet.unit_specs(num_layers, base_width,
                                      layout)[-1].out_channels
  torch_name = _torch_namer(num_layers, layout)
  out = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in _flatten(variables[collection]).items():
      leaf = np.asarray(leaf, np.float32)
      _, _, to_torch = _layout(collection, path, leaf.shape, final_channels)
      name = torch_name(collection, path)
      out[name] = np.ascontiguousarray(to_torch(leaf))
      if name.endswith(".running_mean"):
        counter = name[:-len("running_mean")] + "num_batches_tracked"
        out[counter] = np.zeros((), np.int64)
  return dict(sorted(out.items()))
