"""An IResNet as an ONNX graph, written from its structure.

Plain ONNX operators (Conv, BatchNormalization, PRelu, MaxPool, Gemm,
Slice...; opset 17), either IResNet layout, SE and bottleneck units
included; not traced through a converter (jax2onnx, which can trace it, pins
an older orbax-checkpoint than this project uses). Each face and its mirror
image go through the network and are fused as `inference.model.
fused_forward` fuses them. Two layouts of inputs and outputs:

  "qgjt"         images (batch, S, S, 3) uint8 BGR -> embeddings (batch, D)
                 unit rows, norms (batch,)
  "insightface"  input.1 (batch, 3, S, S) float32 RGB, (x - 127.5) / 127.5
                 -> embedding (batch, D), the unit embedding times the norm
                 (what insightface's recognition models take and give)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

_OPSET = 17

class _Graph:
  """Nodes and initializers of an ONNX graph under construction."""

  def __init__(self):
    from onnx import helper  # pylint: disable=g-import-not-at-top
    self._helper = helper
    self.nodes, self.initializers, self._count = [], [], 0

  def const(self, array: np.ndarray, name: str) -> str:
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
    return name

  def op(self, op_type: str, inputs: Sequence[str], **attributes) -> str:
    self._count += 1
    output = f"{op_type.lower()}_{self._count}"
    self.nodes.append(self._helper.make_node(op_type, list(inputs), [output],
                                             **attributes))
    return output

  def conv(self, x: str, kernel: np.ndarray, name: str, stride: int = 1
           ) -> str:
    """Flax HWIO kernel, 'same'-style padding k // 2, no bias."""
    k = kernel.shape[0]
    weight = self.const(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)),
                        f"{name}.weight")
    return self.op("Conv", [x, weight], kernel_shape=[k, k],
                   strides=[stride, stride], pads=[k // 2] * 4)

  def batch_norm(self, x: str, params: dict, stats: dict, name: str) -> str:
    features = stats["mean"].shape[0]
    scale = params.get("scale", np.ones(features, np.float32))
    bias = params.get("bias", np.zeros(features, np.float32))
    names = [self.const(a.astype(np.float32), f"{name}.{n}") for n, a in (
        ("scale", scale), ("bias", bias), ("mean", stats["mean"]),
        ("var", stats["var"]))]
    return self.op("BatchNormalization", [x, *names], epsilon=1e-5)

  def prelu(self, x: str, slope: np.ndarray, name: str) -> str:
    return self.op("PRelu", [x, self.const(slope.reshape(-1, 1, 1),
                                            f"{name}.slope")])


def _unit(graph: _Graph, x: str, spec, params, stats, name: str,
          bottleneck: bool, project_strided: bool) -> str:
  """One residual unit (iresnet.ResidualUnit) in ONNX."""
  s = spec.stride
  if spec.in_channels == spec.out_channels and not (project_strided and
                                                    s > 1):
    shortcut = (graph.op("MaxPool", [x], kernel_shape=[1, 1], strides=[s, s])
                if s > 1 else x)
  else:
    shortcut = graph.batch_norm(
        graph.conv(x, params["shortcut_conv"]["kernel"], f"{name}.sc", s),
        params["shortcut_bn"], stats["shortcut_bn"], f"{name}.sc_bn")
  bn = lambda y, n: graph.batch_norm(y, params[n], stats[n], f"{name}.{n}")
  conv = lambda y, n, stride=1: graph.conv(y, params[n]["kernel"],
                                           f"{name}.{n}", stride)
  prelu = lambda y, n: graph.prelu(y, params[n]["negative_slope"],
                                   f"{name}.{n}")
  y = bn(x, "bn1")
  if bottleneck:
    y = prelu(bn(conv(y, "conv1"), "bn2"), "prelu1")
    y = prelu(bn(conv(y, "conv2"), "bn3"), "prelu2")
    y = bn(conv(y, "conv3", s), "bn4")
  else:
    y = prelu(bn(conv(y, "conv1"), "bn2"), "prelu1")
    y = bn(conv(y, "conv2", s), "bn3")
  if "se" in params:
    se = params["se"]
    gate = graph.op("Flatten", [graph.op("GlobalAveragePool", [y])])
    gate = graph.op("Gemm", [gate, graph.const(se["fc1"]["kernel"],
                                               f"{name}.se1")])
    gate = graph.op("Relu", [gate])
    gate = graph.op("Gemm", [gate, graph.const(se["fc2"]["kernel"],
                                               f"{name}.se2")])
    gate = graph.op("Unsqueeze", [graph.op("Sigmoid", [gate]),
                                  graph.const(np.array([2, 3]),
                                              f"{name}.se_axes")])
    y = graph.op("Mul", [y, gate])
  return graph.op("Add", [y, shortcut])


def _network(graph: _Graph, x: str, model, variables: dict) -> str:
  """The IResNet on NCHW input in [-1, 1] and the weights' channel order:
  the features before normalisation, (batch, D)."""
  from qgjt_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  params, stats = variables["params"], variables["batch_stats"]
  stem, stem_stats = params["input_layer"], stats["input_layer"]
  x = graph.conv(x, stem["conv"]["kernel"], "stem")
  x = graph.batch_norm(x, stem["bn"], stem_stats["bn"], "stem_bn")
  x = graph.prelu(x, stem["prelu"]["negative_slope"], "stem")
  bottleneck = iresnet.uses_bottleneck(model.num_layers, model.layout)
  specs = iresnet.unit_specs(model.num_layers, model.base_width, model.layout)
  for i, spec in enumerate(specs):
    x = _unit(graph, x, spec, params[f"body_{i}"], stats[f"body_{i}"],
              f"body_{i}", bottleneck, model.layout == "insightface")
  head, head_stats = params["output_layer"], stats["output_layer"]
  x = graph.batch_norm(x, head["bn"], head_stats["bn"], "head_bn")
  x = graph.op("Flatten", [x])  # NCHW order, as PyTorch's
  # Our Dense rows follow the NHWC flatten; ONNX's Flatten is NCHW. The
  # map's side comes from the model (four stride-2 convs: ceil(size / 16)
  # for 40 px is 3), read off the Dense kernel's rows.
  channels = specs[-1].out_channels
  side = math.isqrt(head["fc"]["kernel"].shape[0] // channels)
  kernel = head["fc"]["kernel"].reshape(side, side, channels, -1).transpose(
      2, 0, 1, 3).reshape(channels * side * side, -1)
  z = graph.op("Gemm", [x, graph.const(kernel, "fc.kernel"),
                        graph.const(head["fc"]["bias"], "fc.bias")])
  return graph.batch_norm(z, head.get("feature_bn", {}),
                          head_stats["feature_bn"], "feature_bn")


def _fused(graph: _Graph, x: str, model, variables: dict
           ) -> tuple[str, str]:
  """(fused features, mean norm (batch, 1)) of NCHW faces and their mirror
  images, as `inference.model.fused_forward` computes them."""
  mirrored = graph.op("Slice", [x, graph.const(np.array([-1]), "flip_start"),
                                graph.const(np.array([-(2**63 - 1)]),
                                            "flip_end"),
                                graph.const(np.array([3]), "flip_axis"),
                                graph.const(np.array([-1]), "flip_step")])
  z = _network(graph, graph.op("Concat", [x, mirrored], axis=0), model,
               variables)
  first, second = (f"{z}_view{k}" for k in (1, 2))
  graph.nodes.append(graph._helper.make_node("Split", [z], [first, second],
                                             axis=0))
  axis = graph.const(np.array([1]), "axis_1")

  def norm(v):
    return graph.op("Sqrt", [graph.op("ReduceSum", [graph.op("Mul", [v, v]),
                                                    axis], keepdims=1)])
  mean_norm = graph.op("Mul", [graph.op("Add", [norm(first), norm(second)]),
                               graph.const(np.float32(0.5), "half")])
  return graph.op("Add", [first, second]), mean_norm


def _to_model_order(graph: _Graph, x: str, model, given: str) -> str:
  """NCHW faces in channel order `given` to the order the weights read."""
  if model.input_order == given:
    return x
  return graph.op("Gather", [x, graph.const(np.array([2, 1, 0]),
                                            "swap_channels")], axis=1)


def onnx_model(model, variables: dict, image_size: int,
               batch: Optional[int] = None, metadata: Optional[dict] = None,
               layout: str = "qgjt"):
  """The onnx.ModelProto of an IResNet, flip-fused (see the module doc for
  the inputs and outputs of each layout), with `metadata` as its
  metadata_props."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top
  graph = _Graph()
  dim = batch if batch else "batch"
  embedding_size = variables["params"]["output_layer"]["fc"]["kernel"].shape[1]
  if layout == "insightface":
    # Already (x - 127.5) / 127.5, RGB, NCHW: what insightface feeds.
    name = "input.1"
    x = _to_model_order(graph, name, model, "RGB")
    inputs = [helper.make_tensor_value_info(
        name, TensorProto.FLOAT, [dim, 3, image_size, image_size])]
  else:
    x = graph.op("Cast", ["images"], to=TensorProto.FLOAT)
    x = graph.op("Sub", [graph.op("Mul", [x, graph.const(
        np.float32(2.0 / 255.0), "scale_255")]), graph.const(np.float32(1.0),
                                                           "one")])
    x = graph.op("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC -> NCHW
    x = _to_model_order(graph, x, model, "BGR")
    inputs = [helper.make_tensor_value_info(
        "images", TensorProto.UINT8, [dim, image_size, image_size, 3])]
  fused, mean_norm = _fused(graph, x, model, variables)
  length = graph.op("Sqrt", [graph.op("ReduceSum", [
      graph.op("Mul", [fused, fused]), graph.const(np.array([1]), "axis")],
                                      keepdims=1)])
  unit = graph.op("Div", [fused, length])
  if layout == "insightface":
    # One output, as insightface's recognition models have: the feature,
    # whose direction is the embedding and whose length is the norm.
    graph.nodes.append(helper.make_node("Mul", [unit, mean_norm],
                                        ["embedding"]))
    outputs = [helper.make_tensor_value_info(
        "embedding", TensorProto.FLOAT, [dim, embedding_size])]
  else:
    graph.nodes.append(helper.make_node("Identity", [unit], ["embeddings"]))
    graph.nodes.append(helper.make_node(
        "Squeeze", [mean_norm, graph.const(np.array([1]), "squeeze_1")],
        ["norms"]))
    outputs = [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT,
                                             [dim, embedding_size]),
               helper.make_tensor_value_info("norms", TensorProto.FLOAT,
                                             [dim])]
  onnx_graph = helper.make_graph(graph.nodes, "qgjt_jax_iresnet", inputs,
                                 outputs, initializer=graph.initializers)
  proto = helper.make_model(onnx_graph,
                            opset_imports=[helper.make_opsetid("", _OPSET)],
                            producer_name="qgjt_jax")
  for key, value in (metadata or {}).items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, str(value)
  onnx.checker.check_model(proto)
  return proto
