"""insightface's ONNX recognisers in: the weights of an ONNX graph as the
state dict of a registered backbone, without running anything from the file.

insightface ships its recognisers (buffalo_l/s/sc, antelopev2) as ONNX
files exported from PyTorch: BatchNorms that follow a convolution are
folded into it (a Conv with a bias and numbered initialisers), the others
kept as BatchNormalization nodes; PReLU slopes as (C, 1, 1) initialisers;
the head a Gemm. This reader:

1. reads the file as any file from others (a regular file, its size
   bounded, no external data, every initialiser's declared size checked
   against its bytes and the limits) and parses the protobuf only;
2. takes the graph's weighted nodes in their order (Conv, BatchNormalization,
   PRelu, Gemm, MatMul with its bias Add) and refuses any operator outside
   the few that such graphs use, and any float initialiser that no weighted
   node consumes;
3. matches that sequence against each registered backbone's PyTorch layers
   in forward order (`models.registry.TorchLayer`), a folded Conv standing
   for a conv and the BatchNorm after it (the BatchNorm becomes the identity
   plus the folded bias), and so recognises the family and the model;
4. checks every convolution's strides, padding, groups and dilation against
   the model's own.

The result is a state dict in the family's PyTorch names, which
`convert.convert_state_dict` turns into Flax variables as it does a .pth.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
import numpy as np

from qgjt_jax import errors
from qgjt_jax import models
from qgjt_jax.files import limits
from qgjt_jax.files import regular
from qgjt_jax.interop import jaxprs
from qgjt_jax.models import layers as layers_lib


class OnnxImportError(errors.UserError, ValueError):
  """An ONNX file that cannot be read as a recogniser (names it)."""


# Operators of insightface's convolutional recognisers that hold no weights
# (SE gates add the pooling, Relu, Sigmoid and Mul).
_STRUCTURAL = {
    "Add",
    "Flatten",
    "Reshape",
    "Identity",
    "Dropout",
    "Relu",
    "Sigmoid",
    "GlobalAveragePool",
    "Mul",
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Concat",
}


def _unsqueeze(values, attrs):
  axes = attrs["axes"] if "axes" in attrs else values[1].tolist()
  out = values[0]
  for axis in sorted(int(a) % (out.ndim + len(axes)) for a in axes):
    out = np.expand_dims(out, axis)
  return out


# Shape-only operators folded when every input is a constant.
_FOLDED = {
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda v, a: np.squeeze(
        v[0], tuple(a["axes"] if "axes" in a else v[1].tolist()) or None
    ),
    "Reshape": lambda v, a: v[0].reshape(v[1].tolist()),
    "Identity": lambda v, a: v[0],
}
_WEIGHTED = {"Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul"}
# TensorProto data types this reader takes, with their numpy types.
_DTYPES = {
    1: np.float32,
    10: np.float16,
    11: np.float64,
    7: np.int64,
    6: np.int32,
}


@dataclasses.dataclass
class OnnxLayer:
  """A weighted node: its kind (as TorchLayer kinds), tensors and node."""

  kind: str  # conv | batch_norm | prelu | linear
  tensors: dict[str, np.ndarray]
  node: str
  attributes: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OnnxWeights:
  """What an ONNX recogniser holds, as a state dict of a registered model."""

  state_dict: dict[str, np.ndarray]
  name: str
  image_size: Optional[int]
  conv_attributes: dict[str, dict]  # torch conv name -> its ONNX attributes
  metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def read_model(path: str):
  """The onnx.ModelProto of a file, parsed only (see the module doc).

  Raises:
    OnnxImportError / limits.LimitError: naming the file.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from google.protobuf import message  # pylint: disable=g-import-not-at-top

  regular.require_regular(path)
  size = os.path.getsize(path)
  limit = limits.current().max_tensor_bytes
  if size > min(limit, 2**31 - 1):  # protobuf's own bound is 2 GiB
    raise limits.exceeded(path, "an ONNX file of", size, "max_tensor_bytes")
  with open(path, "rb") as f:
    data = f.read(size + 1)
  model = onnx.ModelProto()
  try:
    model.ParseFromString(data)
  except (message.DecodeError, RuntimeError, ValueError) as e:
    raise OnnxImportError(f"{path} is not an ONNX model ({e})") from None
  if not model.graph.node:
    raise OnnxImportError(f"{path} holds no ONNX graph")
  return model


def _array(tensor, where: str) -> np.ndarray:
  """A TensorProto's values, after checking what it declares."""
  if tensor.data_location == 1:  # EXTERNAL
    raise OnnxImportError(
        f"{where}: initialiser {tensor.name!r} keeps its "
        "data in another file, which this reader does not "
        "open: save the model with its weights inside"
    )
  if tensor.data_type not in _DTYPES:
    raise OnnxImportError(
        f"{where}: initialiser {tensor.name!r} has ONNX "
        f"data type {tensor.data_type}, not a float or "
        "integer type this reader takes"
    )
  dims = tuple(int(d) for d in tensor.dims)
  if any(d < 0 for d in dims) or len(dims) > 8:
    raise OnnxImportError(
        f"{where}: initialiser {tensor.name!r} declares dims {dims}"
    )
  dtype = np.dtype(_DTYPES[tensor.data_type])
  count = math.prod(dims)
  if count * dtype.itemsize > limits.current().max_tensor_bytes:
    raise limits.exceeded(
        f"{where}: {tensor.name}",
        "an initialiser of",
        count * dtype.itemsize,
        "max_tensor_bytes",
    )
  if tensor.raw_data:
    held = len(tensor.raw_data)
    if held != count * dtype.itemsize:
      raise OnnxImportError(
          f"{where}: initialiser {tensor.name!r} declares {dims} "
          f"({count * dtype.itemsize:,} bytes) but holds {held:,}: the file "
          "is damaged"
      )
    return np.frombuffer(tensor.raw_data, dtype).reshape(dims).copy()
  field = {
      1: tensor.float_data,
      10: tensor.int32_data,
      11: tensor.double_data,
      7: tensor.int64_data,
      6: tensor.int32_data,
  }[tensor.data_type]
  if len(field) != count:
    raise OnnxImportError(
        f"{where}: initialiser {tensor.name!r} declares "
        f"{count:,} values but holds {len(field):,}"
    )
  values = np.asarray(field)
  if tensor.data_type == 10:  # float16 kept as its bits in int32_data
    values = values.astype(np.uint16).view(np.float16)
  return values.astype(dtype).reshape(dims)


@dataclasses.dataclass(frozen=True)
class OwnExport:
  """An ONNX file this project's export wrote: the model's settings and its
  variables, each initialiser under its leaf's path (`onnx_export.
  weight_name`)."""

  settings: dict[str, Any]  # {config key: value}
  weights: dict[str, np.ndarray]  # "params/conv1/kernel" -> array
  metadata: dict[str, str]


# More than any model's settings take; bounds what is parsed.
_MAX_SETTINGS_CHARS = 1 << 16


def own_export(model, path: str) -> Optional[OwnExport]:
  """The settings and weights of a file `qgjt_jax.export` wrote (its
  producer, and its settings in the metadata), read as any file's; None
  for other producers' files.

  Raises:
    OnnxImportError: settings that are no record of ours (naming the file).
  """
  import json  # pylint: disable=g-import-not-at-top
  from qgjt_jax.interop import carried  # pylint: disable=g-import-not-at-top

  metadata = {p.key: p.value for p in model.metadata_props}
  text = metadata.get(carried.MODEL_SETTINGS_KEY)
  if model.producer_name != "qgjt_jax" or text is None:
    return None
  try:
    settings = json.loads(text) if len(text) <= _MAX_SETTINGS_CHARS else None
  except (ValueError, RecursionError):
    settings = None
  if not isinstance(settings, dict) or not all(
      isinstance(v, (str, int, float, bool)) for v in settings.values()
  ):
    raise OnnxImportError(
        f"{path}: {carried.MODEL_SETTINGS_KEY} is not the "
        "record of model settings this project writes"
    )
  if model.graph.sparse_initializer:
    raise OnnxImportError(f"{path}: sparse initialisers are not taken")
  weights = {
      t.name: _array(t, path)
      for t in model.graph.initializer
      if t.name.split("/")[0] in ("params", "batch_stats")
  }
  return OwnExport(settings, weights, metadata)


def _attributes(node) -> dict[str, Any]:
  from onnx import helper  # pylint: disable=g-import-not-at-top

  return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def weighted_layers(model, where: str) -> list[OnnxLayer]:
  """The graph's weighted nodes in order (see the module doc)."""
  graph = model.graph
  constants = {t.name: t for t in graph.initializer}
  for node in graph.node:
    if node.op_type == "Constant":
      value = _attributes(node).get("value")
      if value is None:
        raise OnnxImportError(
            f"{where}: Constant node {node.name!r} holds no tensor value"
        )
      value.name = node.output[0]
      constants[node.output[0]] = value
  if graph.sparse_initializer:
    raise OnnxImportError(f"{where}: sparse initialisers are not taken")
  arrays = {name: _array(t, where) for name, t in constants.items()}
  sources = {name: {name} for name in arrays}  # the initialisers behind each
  used: set[str] = set()
  out: list[OnnxLayer] = []

  def weight(node, index: int) -> np.ndarray:
    name = node.input[index]
    if name not in arrays:
      raise OnnxImportError(
          f"{where}: {node.op_type} node {node.name!r} "
          f"takes its input {index} ({name!r}) from the "
          "graph, not from an initialiser"
      )
    used.update(sources[name])
    return arrays[name].astype(np.float32)

  producer = {}
  for node in graph.node:
    op, attrs = node.op_type, _attributes(node)
    name = node.name or node.output[0]
    if (
        op in _FOLDED
        and node.input
        and all(i in arrays for i in node.input if i)
    ):
      # Shape-only work on initialisers (an exporter's Unsqueeze of a
      # PReLU slope): done here, the result a constant like the others.
      arrays[node.output[0]] = _FOLDED[op](
          [arrays[i] for i in node.input if i], attrs
      )
      sources[node.output[0]] = set().union(
          *(sources[i] for i in node.input if i)
      )
      continue
    if op == "Conv":
      if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise OnnxImportError(f"{where}: Conv {name!r} uses auto_pad")
      tensors = {"weight": weight(node, 1)}
      if len(node.input) > 2 and node.input[2]:
        tensors["bias"] = weight(node, 2)
      out.append(OnnxLayer("conv", tensors, name, attrs))
    elif op == "BatchNormalization":
      scale, bias, mean, var = (weight(node, i) for i in range(1, 5))
      # Our BatchNorms use PyTorch's epsilon: another one is folded into
      # the variance, which gives the same numbers.
      var = (
          var
          + np.float32(attrs.get("epsilon", 1e-5))
          - np.float32(layers_lib.BN_EPSILON)
      )
      out.append(
          OnnxLayer(
              "batch_norm",
              {
                  "weight": scale,
                  "bias": bias,
                  "running_mean": mean,
                  "running_var": var,
              },
              name,
          )
      )
    elif op == "PRelu":
      out.append(
          OnnxLayer("prelu", {"weight": weight(node, 1).reshape(-1)}, name)
      )
    elif op == "Gemm":
      if (
          attrs.get("transA", 0)
          or attrs.get("alpha", 1.0) != 1.0
          or (attrs.get("beta", 1.0) != 1.0)
      ):
        raise OnnxImportError(
            f"{where}: Gemm {name!r} scales or transposes "
            "its input; only x W^T + b is taken"
        )
      w = weight(node, 1)
      tensors = {"weight": w if attrs.get("transB", 0) else w.T}
      if len(node.input) > 2 and node.input[2]:
        tensors["bias"] = weight(node, 2)
      out.append(OnnxLayer("linear", tensors, name))
    elif op == "MatMul":
      out.append(OnnxLayer("linear", {"weight": weight(node, 1).T}, name))
    elif op == "Add" and any(i in arrays for i in node.input):
      source = producer.get(next(i for i in node.input if i not in arrays))
      if (
          source is None
          or source.kind != "linear"
          or "bias" in (source.tensors)
      ):
        raise OnnxImportError(
            f"{where}: Add {name!r} adds a constant to "
            "something other than a MatMul's output"
        )
      source.tensors["bias"] = weight(
          node, [i in arrays for i in node.input].index(True)
      )
    elif op not in _STRUCTURAL:
      raise OnnxImportError(
          f"{where}: operator {op} (node {name!r}) is not part of the "
          "graphs this reader takes (insightface's convolutional "
          "recognisers exported from PyTorch)"
      )
    if op in _WEIGHTED:
      for output in node.output:
        producer[output] = out[-1]
  floats = sorted(
      n
      for n in constants
      if n not in used and arrays[n].dtype.kind == "f" and arrays[n].size > 1
  )
  if floats:
    raise OnnxImportError(
        f"{where}: {len(floats)} weight tensor(s) feed no Conv, "
        f"BatchNormalization, PRelu or Gemm ({', '.join(floats[:3])}): the "
        "graph computes something this reader would not reproduce"
    )
  return out


def _match(
    family,
    name: str,
    found: list[OnnxLayer],
    image_size: int,
    embedding_size: int,
) -> Optional[tuple[dict, dict]]:
  """(state dict, conv attributes by torch name) when the weighted nodes
  are `name`'s PyTorch layers in order; None otherwise."""
  module = family.build(
      name,
      embedding_size=embedding_size,
      dtype=jnp.float32,
      remat=False,
      input_order=family.input_order(name),
  )
  declared = family.torch_layers(module, image_size)
  state, attrs, j, folded = {}, {}, 0, None
  for layer in declared:
    if layer.kind == "batch_norm" and folded is not None:
      # The BatchNorm folded into the conv before it: the identity plus the
      # conv's bias (var + eps = 1).
      channels = len(folded)
      state.update(
          {
              f"{layer.torch}.weight": np.ones(channels, np.float32),
              f"{layer.torch}.bias": folded,
              f"{layer.torch}.running_mean": np.zeros(channels, np.float32),
              f"{layer.torch}.running_var": np.full(
                  channels, 1 - layers_lib.BN_EPSILON, np.float32
              ),
          }
      )
      folded = None
      continue
    if folded is not None or j >= len(found):
      return None
    node = found[j]
    j += 1
    kind = "conv" if layer.kind == "conv_as_linear" else layer.kind
    if node.kind != kind:
      return None
    tensors = dict(node.tensors)
    if layer.kind == "conv":
      attrs[layer.torch] = node.attributes
      folded = tensors.pop("bias", None)
    state.update({f"{layer.torch}.{k}": v for k, v in tensors.items()})
  if j != len(found) or folded is not None:
    return None
  return state, attrs


def _input_size(model) -> Optional[int]:
  """The square input size the graph declares, if it declares one."""
  inputs = [
      i
      for i in model.graph.input
      if i.name not in {t.name for t in model.graph.initializer}
  ]
  if len(inputs) != 1:
    return None
  dims = inputs[0].type.tensor_type.shape.dim
  if (
      len(dims) == 4
      and dims[2].dim_value
      and dims[2].dim_value == (dims[3].dim_value)
      and dims[1].dim_value == 3
  ):
    return int(dims[2].dim_value)
  return None


def read_onnx(path: str, model=None) -> OnnxWeights:
  """The weights of an ONNX recogniser (`model`, the file's ModelProto
  when already read) as a registered model's state dict.

  Raises:
    OnnxImportError: the file is no ONNX model, uses what this reader does
      not take, or matches no registered backbone (each naming the file).
  """
  model = read_model(path) if model is None else model
  found = weighted_layers(model, path)
  size = _input_size(model)
  heads = [layer for layer in found if layer.kind == "linear"]
  if not found or not heads or found[0].kind != "conv":
    raise OnnxImportError(
        f"{path}: the graph does not start with a Conv "
        "and end in a linear head: not a recogniser"
    )
  # The sizes only decide the shapes, which the conversion checks; the
  # order and kinds of the layers decide the model.
  embedding_size = int(
      found[-1].tensors["running_mean"].shape[0]
      if found[-1].kind == "batch_norm"
      else heads[-1].tensors["weight"].shape[0]
  )
  for family in models.families():
    if not family.onnx_import:
      continue
    for name in family.names():
      matched = _match(family, name, found, size or 112, embedding_size)
      if matched is not None:
        return OnnxWeights(
            matched[0],
            name,
            size,
            matched[1],
            {p.key: p.value for p in model.metadata_props},
        )
  kinds = [layer.kind for layer in found]
  names = [n for f in models.families() if f.onnx_import for n in f.names()]
  raise OnnxImportError(
      f"{path}: its {len(found)} weighted layers ({kinds.count('conv')} "
      f"convolutions, {kinds.count('batch_norm')} BatchNorms, "
      f"{kinds.count('prelu')} PReLUs, {kinds.count('linear')} linear) are "
      f"none of these backbones' in order: {', '.join(names)}"
  )


_UNARY = (
    "convert_element_type",
    "slice",
    "squeeze",
    "reshape",
    "transpose",
    "copy",
    "copy_p",
)


def model_convolutions(
    module, variables: Any, image_size: int
) -> dict[tuple[str, ...], dict]:
  """{Flax module path of a conv's kernel: the strides, padding, groups and
  dilation the model computes with}, read from the jaxpr of its forward
  pass (a 1x1 conv written as a matrix product has padding 0, one group and
  the stride of the slice before it)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  keys = [tuple(getattr(k, "key", k) for k in p) for p, _ in leaves]
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  flat = jaxprs.flatten(
      jax.make_jaxpr(lambda v, x: module.apply(v, x, train=False))(
          jax.tree.map(
              lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables
          ),
          images,
      )
  )
  leaf_of = {var: keys[i] for i, var in enumerate(flat.invars[: len(keys)])}
  producer = {out: eq for eq in flat.equations for out in eq.outvars}

  def source(var):
    """The variable leaf `var` is read from through unary ops, or None."""
    for _ in range(16):
      if isinstance(var, jcore.Literal):
        return None
      if var in leaf_of:
        return leaf_of[var]
      eq = producer.get(var)
      if eq is None or eq.primitive not in _UNARY:
        return None
      var = eq.invars[0]
    return None

  found = {}
  for eq in flat.equations:
    leaf = source(eq.invars[1]) if len(eq.invars) > 1 else None
    if leaf is None or leaf[-1] != "kernel":
      continue
    if eq.primitive == "conv_general_dilated":
      p = eq.params
      found[leaf[1:-1]] = {
          "strides": list(p["window_strides"]),
          "pads": [lo for lo, _ in p["padding"]]
          + [hi for _, hi in p["padding"]],
          "group": p["feature_group_count"],
          "dilations": list(p["rhs_dilation"]),
      }
    elif eq.primitive == "dot_general":
      before = producer.get(eq.invars[0])
      stride = (
          list(before.params["strides"][1:3])
          if before is not None
          and before.primitive == "slice"
          and before.params["strides"]
          else [1, 1]
      )
      found[leaf[1:-1]] = {
          "strides": stride,
          "pads": [0, 0, 0, 0],
          "group": 1,
          "dilations": [1, 1],
      }
  return found


def check_conv_attributes(
    path: str, weights: OnnxWeights, module, variables: Any, image_size: int
) -> None:
  """Each ONNX Conv's strides, padding, groups and dilation are the ones
  the model computes with (the weights alone do not show them).

  Raises:
    OnnxImportError: naming the first conv that differs.
  """
  family = models.family_of_module(module)
  torch_of = {
      layer.flax: layer.torch
      for layer in family.torch_layers(module, image_size)
  }
  computed = {
      torch_of.get(k): v
      for k, v in model_convolutions(module, variables, image_size).items()
  }
  for torch, onnx_attrs in weights.conv_attributes.items():
    want = computed.get(torch)
    if want is None:
      raise OnnxImportError(
          f"{path}: could not tell how {weights.name} "
          f"computes {torch}, so the file's settings were "
          "not checked"
      )
    have = {
        "strides": list(onnx_attrs.get("strides", [1, 1])),
        "pads": list(onnx_attrs.get("pads", [0, 0, 0, 0])),
        "group": int(onnx_attrs.get("group", 1)),
        "dilations": list(onnx_attrs.get("dilations", [1, 1])),
    }
    if have != want:
      raise OnnxImportError(
          f"{path}: the convolution of {torch} computes with {have}, but "
          f"{weights.name}'s with {want}: not that model"
      )
