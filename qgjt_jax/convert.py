r"""Imports PyTorch IResNet weights into Flax: AdaFace/QGFace `net.py`
models and insightface arcface_torch backbones (`backbone.pth` of their model
zoo).

Command line: turn a pretrained checkpoint into an orbax checkpoint of this
project (step 0, the `model` item that `--mode=eval` and fine-tuning read):

  python -m qgjt_jax.convert --src=adaface_ir101_ms1mv2.ckpt \
      --workdir=runs/adaface_ir101 [--arch=auto|ir50|ir_se50|...] \
      [--overwrite]

`--src` is a Lightning `.ckpt`, a `.pth`/`.pt` state dict, a
`.safetensors` file (CVLFace's hub models, or `export --format=safetensors`,
whose recorded input size and channel order are used) or an `.npz` of
name -> array, all read without torch (`torch_files`) and without running
anything from the file. The architecture, base width,
embedding size and input size are read from the tensors (`--arch` names the
depth instead); the program prints them and the parameter count, and records
them in WORKDIR/converted_from.json, from which every command that uses the
model (`--mode=eval`, embed, compare, identify, export, `qgjt_jax.load_model`)
rebuilds it. It refuses to replace an existing WORKDIR/checkpoints unless
`--overwrite`.

The AdaFace/QGFace names follow `input_layer.{0,1,2}`,
`body.{i}.res_layer.{j}` / `body.{i}.shortcut_layer.{0,1}` /
`body.{i}.res_layer.se_block.fc{1,2}` and `output_layer.{0,3,4}`;
insightface's follow `conv1`, `bn1`, `prelu`, `layer{1-4}.{j}.{bn1, conv1,
bn2, prelu, conv2, bn3, downsample.{0,1}}`, `bn2`, `fc`, `features`. Their
models take RGB input where AdaFace's take BGR: the converted workdir records
`model.input_order`, which evaluation and fine-tuning follow. The
converter walks the Flax variable tree of the matching `IResNet` (built
abstractly with `jax.eval_shape`), derives the PyTorch name and layout of every
leaf, and so reports missing, unexpected and mis-shaped tensors by name instead
of failing somewhere inside the model.

Typical use from Python:

  state = load_torch_checkpoint("adaface_ir101_ms1mv2.ckpt")
  num_layers, use_se = infer_architecture(state)
  variables = torch_state_dict_to_flax(state, num_layers=num_layers,
                                       use_se=use_se)
  model = IResNet(num_layers, use_se)
  embeddings, norms = model.apply(variables, images, train=False)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shlex
from typing import Any, Callable, Mapping

from absl import app
from absl import flags
from etils import epath
import numpy as np

from qgjt_jax import checkpoint
from qgjt_jax import errors
from qgjt_jax import limits
from qgjt_jax import models
from qgjt_jax import outputs
from qgjt_jax import records
from qgjt_jax import torch_files
from qgjt_jax import workdir_lock
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
_FIXED_MODULES = {
    ("input_layer", "conv"): "input_layer.0",
    ("input_layer", "bn"): "input_layer.1",
    ("input_layer", "prelu"): "input_layer.2",
    ("output_layer", "bn"): "output_layer.0",
    ("output_layer", "fc"): "output_layer.3",
    ("output_layer", "feature_bn"): "output_layer.4",
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


class StateDictMismatchError(ValueError):
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
  if module in _FIXED_MODULES:
    torch_module = _FIXED_MODULES[module]
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
  base_width = np.shape(names[root])[0]
  embedding_size, fc_in = np.shape(names[fc])
  specs = iresnet.unit_specs(num_layers, base_width, layout)
  final_channels = specs[-1].out_channels
  side = math.isqrt(max(fc_in // final_channels, 0))
  if side < 1 or side * side * final_channels != fc_in:
    raise StateDictMismatchError(
        f"{fc} has {fc_in} inputs, not {final_channels} channels times a "
        f"square feature map (wrong depth or width?)")
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


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict as name -> numpy array, without torch.

  `.npz` files hold name -> array; `.ckpt` (PyTorch Lightning: the weights
  sit under 'state_dict') and `.pth`/`.pt` (a state dict, or a dict holding
  one under 'state_dict') are read by `torch_files`, which rebuilds tensors
  only and never runs code from the file.

  Returns:
    name -> array; floating tensors become float32 numpy arrays.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file cannot be read as a state dict (the message names
      it, and what stands where tensors should).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return read_safetensors(path)[0]
  if not path.endswith(".npz"):
    return torch_files.state_dict(path)
  try:
    _check_npz(path)
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (limits.LimitError, torch_files.TorchFileError):
    raise
  except Exception as e:  # zipfile, zlib and numpy format errors alike
    raise torch_files.TorchFileError(
        f"cannot read {path} as an .npz of name -> array "
        f"({type(e).__name__}: {e})") from e


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray],
                                         dict[str, str]]:
  """(name -> array, the header's metadata) of a .safetensors file.

  The format is a JSON header and raw tensor bytes, so nothing in it runs;
  the safetensors package checks the header against the file (offsets in
  bounds, no overlaps), and each tensor's size is checked against
  max_tensor_bytes before it is read.
  """
  import safetensors  # pylint: disable=g-import-not-at-top
  limit = limits.current().max_tensor_bytes
  try:
    with safetensors.safe_open(path, framework="np") as f:
      metadata = dict(f.metadata() or {})
      tensors = {}
      for name in f.keys():
        piece = f.get_slice(name)
        dtype = piece.get_dtype()
        if dtype not in _SAFETENSORS_DTYPES:
          raise torch_files.TorchFileError(
              f"{path}: {name} holds {dtype} values, which this reader "
              "does not take: save the weights as float32 (or F16/F64)")
        size = math.prod(piece.get_shape()) * _SAFETENSORS_DTYPES[dtype]
        if size > limit:
          raise limits.exceeded(f"{path}: {name}", "a tensor of", size,
                                "max_tensor_bytes")
        tensors[name] = f.get_tensor(name)
  except (limits.LimitError, torch_files.TorchFileError):
    raise
  except Exception as e:  # the package's own errors: a damaged header
    raise torch_files.TorchFileError(
        f"cannot read {path} as safetensors ({_first_line(e)})") from e
  return tensors, metadata


_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "I64": 8, "I32": 4,
                       "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _check_npz(path: str) -> None:
  """Every array of an .npz holds the bytes its header declares, within the
  limits: numpy allocates the declared shape before reading the data."""
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      torch_files.check_member(info, path)
      with archive.open(info) as member:
        read_header = (np.lib.format.read_array_header_1_0 if
                       np.lib.format.read_magic(member) == (1, 0) else
                       np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
      declared = math.prod(shape) * dtype.itemsize
      if declared > info.file_size:
        raise torch_files.TorchFileError(
            f"{path}: {info.filename} declares an array of {shape} "
            f"{dtype} ({declared:,} bytes) but holds {info.file_size:,}: "
            "the file is damaged")


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


# --- Command line: a pretrained checkpoint -> this project's orbax layout.


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
  """Converted backbone variables and the settings that rebuild the model."""
  variables: dict
  num_layers: int
  use_se: bool
  base_width: int
  embedding_size: int
  image_size: int
  layout: str = "adaface"
  input_order: str = "BGR"

  @property
  def name(self) -> str:
    """The canonical `config.model.name` ("ir100", "ir_se50", "r50", ...)."""
    if self.layout == "insightface":
      return f"r{self.num_layers}"
    return f"ir{'_se' if self.use_se else ''}{self.num_layers}"

  @property
  def num_params(self) -> int:
    return iresnet.count_params(self.variables["params"])

  def config_overrides(self) -> dict[str, Any]:
    """config key -> the value a config needs to build this very model."""
    return {"model.name": self.name,
            "model.base_width": self.base_width,
            "model.embedding_size": self.embedding_size,
            "model.input_order": self.input_order,
            "data.image_size": self.image_size}


# The channel order each layout's published models were trained on.
DEFAULT_INPUT_ORDER = {"adaface": "BGR", "insightface": "RGB"}


def parse_arch(name: str) -> tuple[str, int, bool]:
  """(layout, num_layers, use_se) of a backbone name ("ir101", "r50")."""
  model = models.build_backbone(name)
  return model.layout, model.num_layers, model.use_se


def convert_state_dict(state_dict: Mapping[str, Any], arch: str = "auto",
                       input_order: str = "auto",
                       image_size: int | None = None) -> ConvertedModel:
  """Converts a state dict for the named (or, with "auto", inferred) IResNet.

  `input_order` "auto" takes the layout's convention (AdaFace/QGFace models
  read BGR, insightface's RGB). The input size is 16 times the side of the
  head's feature map unless `image_size` (a file's own record) says which
  of the sizes that map fits.

  Raises:
    StateDictMismatchError: the tensors do not fit (names listed); with an
      explicit `arch` the message also says what the file looks like.
    ValueError: an unknown `arch` or `input_order`.
  """
  found, _ = detect_layout(state_dict)
  _check_finite(backbone_state(state_dict))
  if arch == "auto":
    layout = found
    num_layers, use_se = infer_architecture(state_dict)
  else:
    layout, num_layers, use_se = parse_arch(arch)
  if input_order == "auto":
    input_order = DEFAULT_INPUT_ORDER[layout]
  if input_order not in ("BGR", "RGB"):
    raise ValueError(f"input order {input_order!r}: use BGR, RGB or auto")
  try:
    if layout != found:
      raise StateDictMismatchError(
          f"{arch} is an {layout}-layout backbone; the state dict has "
          f"{found} names")
    variables = torch_state_dict_to_flax(state_dict, num_layers=num_layers,
                                         use_se=use_se)
  except StateDictMismatchError as e:
    if arch == "auto":
      raise
    try:
      depth, se = infer_architecture(state_dict)
      name = (f"r{depth}" if found == "insightface" else
              f"ir{'_se' if se else ''}{depth}")
      hint = f"\nthe tensors look like {name}"
    except StateDictMismatchError:
      hint = ""
    raise StateDictMismatchError(f"{e}{hint}") from e
  params = variables["params"]
  base_width = params["input_layer"]["conv"]["kernel"].shape[-1]
  fc_in, embedding_size = params["output_layer"]["fc"]["kernel"].shape
  final_channels = iresnet.unit_specs(num_layers, base_width,
                                      layout)[-1].out_channels
  # Four stride-2 stages: a side x side map before the head means input
  # images of 16 * side pixels (112 -> 7 for the published models).
  side = math.isqrt(fc_in // final_channels)
  if image_size is not None and -(-image_size // 16) != side:
    raise StateDictMismatchError(
        f"the file records {image_size} px images, but its head sees a "
        f"{side} x {side} map, which {16 * side} px images give")
  return ConvertedModel(variables=variables, num_layers=num_layers,
                        use_se=use_se, base_width=int(base_width),
                        embedding_size=int(embedding_size),
                        image_size=image_size or 16 * side, layout=layout,
                        input_order=input_order)


def _check_finite(tensors: Mapping[str, Any]) -> None:
  """Weights with NaN or infinities make every embedding NaN: refused."""
  bad = [name for name, value in tensors.items()
         if isinstance(value, np.ndarray) and value.dtype.kind == "f" and
         not np.isfinite(value).all()]
  if bad:
    raise StateDictMismatchError(
        f"{len(bad)} backbone tensor(s) hold NaN or infinite values "
        f"({', '.join(sorted(bad)[:3])}{', ...' if len(bad) > 3 else ''}): "
        "the weights are damaged or come from a diverged run")


# What a workdir holds about its model: replaced together by --overwrite,
# so no record of the old model (a training run's config.json, its
# evaluations) is left to describe the new one.
_MODEL_RECORDS = (records.CONFIG_RECORD, records.CONVERTED_RECORD, "eval")


def check_writable(workdir: str, overwrite: bool = False) -> None:
  """Refuses a workdir that holds a model (unless asked to replace it).

  Raises:
    FileExistsError: naming the folder and what is in it.
  """
  directory = epath.Path(checkpoint.checkpoints_dir(workdir))
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory} exists and is not a folder")
  entries = sorted(p.name for p in directory.iterdir()
                   ) if directory.exists() else []
  records = [name for name in _MODEL_RECORDS
             if (epath.Path(workdir) / name).exists()]
  if (entries or records) and not overwrite:
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    what = (f"{directory} already holds checkpoints ({shown})" if entries
            else f"{workdir} already holds a run's {', '.join(records)}")
    raise FileExistsError(
        f"{what}; choose another --workdir, or pass --overwrite to delete "
        "that model (checkpoints, records, evaluations) and write the "
        "converted one instead")


def write_checkpoint(workdir: str, converted: ConvertedModel, *,
                     source: str = "", overwrite: bool = False) -> str:
  """Writes WORKDIR/checkpoints/0 holding the `model` item; returns the folder.

  Also records the source file and the config overrides in
  WORKDIR/converted_from.json, so they can be found again later.

  Raises:
    FileExistsError: the checkpoint folder is not empty and not `overwrite`.
  """
  check_writable(workdir, overwrite)
  root = epath.Path(workdir)
  directory = epath.Path(checkpoint.checkpoints_dir(workdir))
  # Written beside, then swapped in: an interrupted conversion leaves the
  # old model whole (and a step left beside step 0 would be "the latest").
  staging = root / ".checkpoints.converting"
  if staging.exists():
    staging.rmtree()
  checkpoint.save_model_only(str(staging), converted.variables, step=0)
  record = {"source": os.path.abspath(source) if source else "",
            "architecture": converted.name, "layout": converted.layout,
            "input_order": converted.input_order,
            "num_layers": converted.num_layers, "use_se": converted.use_se,
            "base_width": converted.base_width,
            "embedding_size": converted.embedding_size,
            "image_size": converted.image_size,
            "num_params": converted.num_params,
            "config_overrides": converted.config_overrides()}
  for name in _MODEL_RECORDS:
    old = root / name
    if old.is_dir():
      old.rmtree()
    elif old.exists():
      old.unlink()
  if directory.exists():
    directory.rmtree()
  staging.rename(directory)
  outputs.write(str(root / records.CONVERTED_RECORD),
                json.dumps(record, indent=2) + "\n", overwrite=True)
  return str(directory)


def summary(src: str, workdir: str, converted: ConvertedModel) -> str:
  """What the program prints after a conversion."""
  se = "with" if converted.use_se else "no"
  size = converted.image_size
  return "\n".join([
      f"Converted {src}",
      f"  architecture    {converted.name} ({converted.num_layers} layers, "
      f"{se} SE)",
      f"  base width      {converted.base_width}",
      f"  embedding size  {converted.embedding_size}",
      f"  input           {converted.input_order} ({converted.layout} "
      "layout)",
      f"  input size      {size} x {size}",
      f"  parameters      {converted.num_params:,}",
      f"Wrote the model (step 0) to {checkpoint.checkpoints_dir(workdir)}; "
      f"{records.CONVERTED_RECORD} beside it says which model it is, so "
      "every command that uses it needs only --workdir. Evaluate it with",
      f"  python -m qgjt_jax.main --workdir={shlex.quote(workdir)} "
      "--mode=eval \\",
      "      --config.eval.bin_sets=\"('/data/lfw.bin', '/data/agedb_30.bin')\"",
      "(or eval.tinyface_root, scface_root, ijb_root, folders).",
  ])


def _define_flags() -> None:
  flags.DEFINE_string("src", None, "The PyTorch checkpoint: .ckpt "
                      "(Lightning), .pth/.pt (state dict; AdaFace/QGFace or "
                      "insightface arcface_torch), .safetensors (CVLFace, "
                      "or this project's export) or .npz.")
  flags.DEFINE_string("workdir", None, "Work directory to create; the model "
                      "goes to WORKDIR/checkpoints (step 0).")
  flags.DEFINE_string("arch", "auto", "auto (read from the tensors) or a "
                      "backbone name: " + ", ".join(models.backbone_names()))
  flags.DEFINE_enum("input_order", "auto", ["auto", "BGR", "RGB"],
                    "The channel order the weights were trained on: auto "
                    "(AdaFace/QGFace BGR, insightface RGB) or as given.")
  flags.DEFINE_bool("overwrite", False, "Delete an existing "
                    "WORKDIR/checkpoints and write the converted model.")
  flags.DEFINE_bool("force_lock", False, "Take the workdir's lock even when "
                    "its note says another run holds it.")
  limits.define_flags()
  errors.define_traceback_flag()
  flags.mark_flags_as_required(["src", "workdir"])


def _read_source(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The state dict of --src, and what a file exported by this project
  records about its model (input size and channel order)."""
  if not path.endswith(".safetensors") or not os.path.isfile(path):
    return load_torch_checkpoint(path), {}
  state, metadata = read_safetensors(path)
  recorded = {}
  if metadata.get(IMAGE_SIZE_KEY, "").isdigit():
    recorded["image_size"] = int(metadata[IMAGE_SIZE_KEY])
  if metadata.get(INPUT_ORDER_KEY) in ("BGR", "RGB"):
    recorded["input_order"] = metadata[INPUT_ORDER_KEY]
  return state, recorded


# What `export --format=safetensors` records in the file's metadata.
IMAGE_SIZE_KEY = "qgjt_jax.image_size"
INPUT_ORDER_KEY = "qgjt_jax.weights_input_order"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  errors.setup_absl_logging()
  verbose = errors.absl_traceback_asked()
  cfg = flags.FLAGS
  with errors.expected_failures(StateDictMismatchError,
                                torch_files.TorchFileError, verbose=verbose):
    # Before the (slow) read: a bad name or a workdir in use fails at once.
    if cfg.arch != "auto":
      try:
        parse_arch(cfg.arch)
      except ValueError as e:
        raise errors.UserError(f"--arch={cfg.arch}: {e}") from None
    check_writable(cfg.workdir, cfg.overwrite)
    limits.configure_from_flags()
    state, recorded = _read_source(cfg.src)
    try:
      converted = convert_state_dict(
          state, cfg.arch,
          recorded.get("input_order", "auto") if cfg.input_order == "auto"
          else cfg.input_order, recorded.get("image_size"))
    except StateDictMismatchError as e:
      raise StateDictMismatchError(f"{cfg.src}: {e}") from e
    lock = workdir_lock.acquire(cfg.workdir, force=cfg.force_lock)
    try:
      write_checkpoint(cfg.workdir, converted, source=cfg.src,
                       overwrite=cfg.overwrite)
    finally:
      if lock is not None:
        lock.release()
  print(summary(cfg.src, cfg.workdir, converted), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
