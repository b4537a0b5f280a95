r"""A workdir's model, out of JAX: ONNX (onnxruntime, TensorRT), StableHLO, or
the PyTorch weights of its IResNet (safetensors).

  python -m qgjt_jax.export --workdir=runs/ms1m --format=onnx \
      --out=model.onnx [--batch=dynamic|N] [--step=N]
  python -m qgjt_jax.export --workdir=runs/ms1m --format=stablehlo \
      --out=model.stablehlo
  python -m qgjt_jax.export --workdir=runs/ms1m --format=safetensors \
      --out=model.safetensors

The model is rebuilt from the workdir's own record (a training run's
config.json, or a converted model's converted_from.json) and its checkpoint
(default: the latest step). Both formats take the same input and give the
same outputs:

  images      (batch, S, S, 3) uint8, BGR (OpenCV's order), aligned faces;
              the normalisation (x / 255 - 0.5) / 0.5 is inside, and so is
              the channel swap of a model trained on RGB
  embeddings  (batch, D) float32, unit rows
  norms       (batch,) float32, the feature norms (the quality indicator)

The ONNX graph is written from the model's structure (IResNet, either
layout, SE and bottleneck units included) with the plain ONNX operators
(Conv, BatchNormalization, PRelu, MaxPool, Gemm...; opset 17), not traced
through a converter: jax2onnx, which can trace it, pins an older
orbax-checkpoint than this project uses. Its metadata says the input
convention. The StableHLO file is `jax.export`'s serialisation: it reloads
with `jax.export.deserialize(open(path, 'rb').read()).call(images)` without
this project's code; the conventions go to a .json beside it. Both carry
the cosine thresholds at each FAR of the workdir's latest evaluation
("qgjt_jax.thresholds"), so a deployment decides as `--mode=compare` does.

The safetensors file is a state dict in the names and layouts of the
model's own PyTorch code (AdaFace/QGFace `net.py` for ir* models,
insightface's `iresnet.py` for r* models): `model.load_state_dict(
safetensors.torch.load_file(path))` loads it, and `qgjt_jax.convert`
reads it back. Its metadata records the input size and channel order.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from qgjt_jax import errors
from qgjt_jax import outputs
from qgjt_jax.eval import thresholds

INPUT_CONVENTION = {
    "input": "images: (batch, size, size, 3) uint8, BGR channel order, "
             "aligned face crops; normalisation inside the model",
    "outputs": "embeddings: (batch, D) float32 unit rows; norms: (batch,) "
               "float32 feature norms (quality indicator)",
}
_OPSET = 17
FORMATS = ("onnx", "stablehlo", "safetensors")


def load_model(workdir: str, step: Optional[int] = None):
  """(IResNet, its variables as numpy, the settings, the step) of a workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  from qgjt_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgjt_jax import models  # pylint: disable=g-import-not-at-top
  from qgjt_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  settings = ckpt.recorded_model_settings(workdir)
  if not settings:
    raise errors.UserError(
        f"--workdir={workdir}: neither {ckpt.CONFIG_RECORD} nor "
        f"{ckpt.CONVERTED_RECORD} says which model it holds; name a "
        "training run's workdir or one written by qgjt_jax.convert")
  model = models.build_backbone(
      settings["model.name"], base_width=settings["model.base_width"],
      embedding_size=settings["model.embedding_size"], dropout_rate=0.0,
      input_order=settings.get("model.input_order", "BGR"))
  size = settings["data.image_size"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      dict(iresnet.init_shapes(model, (size, size))))
  variables, restored = ckpt.restore_model(f"{workdir}/checkpoints",
                                           abstract, step)
  variables = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
  return model, variables, settings, restored


def forward_fn(model, variables):
  """uint8 BGR images -> (unit embeddings, norms), the exported function."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qgjt_jax.models import normalize_images  # pylint: disable=g-import-not-at-top

  def forward(images):
    emb, norms = model.apply(variables, normalize_images(images), train=False)
    return emb.astype(jnp.float32), norms.astype(jnp.float32)
  return forward


# ---------------------------------------------------------------------------
# ONNX, written from the structure.


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


def onnx_model(model, variables: dict, image_size: int,
               batch: Optional[int] = None, metadata: Optional[dict] = None):
  """The onnx.ModelProto of an IResNet (see the module doc for its I/O)."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top
  from qgjt_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  params, stats = variables["params"], variables["batch_stats"]
  graph = _Graph()
  x = graph.op("Cast", ["images"], to=TensorProto.FLOAT)
  x = graph.op("Sub", [graph.op("Mul", [x, graph.const(
      np.float32(2.0 / 255.0), "scale_255")]), graph.const(np.float32(1.0),
                                                         "one")])
  x = graph.op("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC -> NCHW
  if model.input_order == "RGB":
    x = graph.op("Gather", [x, graph.const(np.array([2, 1, 0]), "bgr_rgb")],
                 axis=1)
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
  z = graph.batch_norm(z, head.get("feature_bn", {}),
                       head_stats["feature_bn"], "feature_bn")
  norm = graph.op("Sqrt", [graph.op("ReduceSum", [
      graph.op("Mul", [z, z]), graph.const(np.array([1]), "axis_1")],
                                     keepdims=1)])
  graph.nodes.append(helper.make_node("Div", [z, norm], ["embeddings"]))
  graph.nodes.append(helper.make_node(
      "Squeeze", [norm, graph.const(np.array([1]), "squeeze_1")], ["norms"]))
  dim = batch if batch else "batch"
  embedding_size = head["fc"]["kernel"].shape[1]
  onnx_graph = helper.make_graph(
      graph.nodes, "qgjt_jax_iresnet",
      [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                     [dim, image_size, image_size, 3])],
      [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT,
                                     [dim, embedding_size]),
       helper.make_tensor_value_info("norms", TensorProto.FLOAT, [dim])],
      initializer=graph.initializers)
  proto = helper.make_model(onnx_graph,
                            opset_imports=[helper.make_opsetid("", _OPSET)],
                            producer_name="qgjt_jax")
  for key, value in {**INPUT_CONVENTION, **(metadata or {})}.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, str(value)
  onnx.checker.check_model(proto)
  return proto


# ---------------------------------------------------------------------------
# StableHLO through jax.export.


def stablehlo_bytes(model, variables: dict, image_size: int,
                    batch: Optional[int] = None) -> bytes:
  """jax.export's serialisation of the forward pass (symbolic batch when
  `batch` is None)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shape = ((batch,) if batch else jax.export.symbolic_shape("batch")) + (
      image_size, image_size, 3)
  exported = jax.export.export(jax.jit(forward_fn(model, variables)))(
      jax.ShapeDtypeStruct(shape, jnp.uint8))
  return bytes(exported.serialize())


def export(workdir: str, fmt: str, out: str, *, batch: Optional[int] = None,
           step: Optional[int] = None, overwrite: bool = False
           ) -> dict[str, Any]:
  """Writes the workdir's model to `out`; returns what the file says.

  `out` (and for StableHLO `out`.json) is checked before the model is
  loaded and written whole or not at all; an existing one is refused
  unless `overwrite`.
  """
  if fmt not in FORMATS:
    raise errors.UserError(f"--format={fmt}: use {', '.join(FORMATS)}")
  targets = [out] + ([out + ".json"] if fmt == "stablehlo" else [])
  for target in targets:
    outputs.check_output(target, overwrite=overwrite)
  model, variables, settings, restored = load_model(workdir, step)
  image_size = settings["data.image_size"]
  metadata = {"qgjt_jax.model": settings["model.name"],
              "qgjt_jax.weights_input_order": settings.get(
                  "model.input_order", "BGR"),
              "qgjt_jax.image_size": image_size,
              "qgjt_jax.source": f"{os.path.abspath(workdir)} step {restored}",
              "qgjt_jax.batch": batch or "dynamic"}
  measured = thresholds.measured(workdir)
  if measured:
    metadata["qgjt_jax.thresholds"] = json.dumps(measured)
  if fmt == "safetensors":
    _write_safetensors(out, model, variables, metadata, overwrite)
  elif fmt == "onnx":
    proto = onnx_model(model, variables, image_size, batch, metadata)
    outputs.write(out, proto.SerializeToString(), overwrite=overwrite)
  else:
    data = stablehlo_bytes(model, variables, image_size, batch)
    sidecar = {**INPUT_CONVENTION, **metadata}
    if measured:
      sidecar["qgjt_jax.thresholds"] = measured
    outputs.write(out + ".json", json.dumps(sidecar, indent=2),
                  overwrite=overwrite)
    outputs.write(out, data, overwrite=overwrite)
  return metadata


def _write_safetensors(out: str, model, variables: dict, metadata: dict,
                       overwrite: bool) -> None:
  """The model as the PyTorch state dict its layout's IResNet code loads
  (AdaFace/QGFace `net.py` names, or insightface's for r* models)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from qgjt_jax import convert  # pylint: disable=g-import-not-at-top
  state = convert.flax_to_torch_state_dict(
      variables, num_layers=model.num_layers, layout=model.layout)
  text = {"format": "pt", "qgjt_jax.layout": model.layout,
          **{k: str(v) for k, v in metadata.items()}}
  outputs.write(out, safetensors.numpy.save(state, metadata=text),
                overwrite=overwrite)


def _parse(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m qgjt_jax.export",
      description="Writes a workdir's model as ONNX or serialized StableHLO.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True)
  parser.add_argument("--batch", default="dynamic",
                      help="'dynamic' or a fixed batch size")
  parser.add_argument("--step", type=int, default=None,
                      help="the checkpoint step (default: the latest)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out")
  parser.add_argument("--traceback", action="store_true",
                         help="show the traceback of an expected failure")
  args = parser.parse_args(argv)
  if args.batch != "dynamic" and not (args.batch.isdigit() and
                                      int(args.batch) > 0):
    parser.error(f"--batch={args.batch}: 'dynamic' or a positive size")
  return args


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = _parse(sys.argv[1:] if argv is None else argv)
  from qgjt_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  batch = None if args.batch == "dynamic" else int(args.batch)
  with errors.expected_failures(ckpt.CheckpointError,
                                verbose=args.traceback):
    metadata = export(args.workdir, args.format, args.out, batch=batch,
                      step=args.step, overwrite=args.overwrite)
  size = metadata["qgjt_jax.image_size"]
  if args.format == "safetensors":
    print(f"Wrote {args.out} (a PyTorch state dict in the names of "
          f"{metadata['qgjt_jax.model']}'s IResNet code, for {size} px "
          f"{metadata['qgjt_jax.weights_input_order']} input).", flush=True)
  else:
    print(f"Wrote {args.out} ({args.format}, batch "
          f"{metadata['qgjt_jax.batch']}, {size} px uint8 BGR in, unit "
          "embeddings and norms out).", flush=True)
  if "qgjt_jax.thresholds" not in metadata:
    print("No decision thresholds recorded: the workdir has no evaluation "
          "that measured them (run --mode=eval first).", flush=True)


if __name__ == "__main__":
  main()
