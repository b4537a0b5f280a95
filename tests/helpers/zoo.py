"""Seeded weights by name, the same in the fixture script (which runs
arcface_torch's PyTorch code) and in the tests (which run ours), so a
fixture stores inputs and outputs only, never a network's weights.

A tensor is a function of its PyTorch name, its shape and the kind of
layer holding it: every value comes from a generator seeded with the
name's CRC-32, at scales that keep deep networks' activations finite.
"""

import pathlib
import zlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "zoo"
# The PyTorch backbones the fixtures hold, and their input size.
PARITY_MODELS = ("mbf", "mbf_large", "vit_t", "vit_s", "vit_b", "vit_l")
IMAGE_SIZE = 112


def tensor(name: str, shape, kind: str) -> np.ndarray:
  """The seeded value of one tensor (float32).

  kind: the layer's, as models.registry.KINDS names them.
  """
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  shape = tuple(int(d) for d in shape)
  leaf = name.rsplit(".", 1)[-1]
  if kind in ("batch_norm", "layer_norm"):
    value = {
        "weight": lambda: rng.uniform(0.5, 1.5, shape),
        "bias": lambda: rng.normal(0, 0.1, shape),
        "running_mean": lambda: rng.normal(0, 0.1, shape),
        "running_var": lambda: rng.uniform(0.5, 1.5, shape),
    }[leaf]()
  elif kind == "prelu":
    value = rng.uniform(0.0, 0.5, shape)
  elif kind == "param":
    value = rng.normal(0, 0.02, shape)
  elif leaf == "bias":
    value = rng.normal(0, 0.05, shape)
  else:  # conv, conv_as_linear, linear weights
    fan_in = int(np.prod(shape[1:]))
    value = rng.normal(0, np.sqrt(1.0 / fan_in), shape)
  return value.astype(np.float32)


def images(count: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
  """(count, 3, size, size) float32 NCHW RGB in [-1, 1]: what the PyTorch
  models take after insightface's (x - 127.5) / 127.5."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (count, 3, size, size))
  return ((pixels - 127.5) / 127.5).astype(np.float32)


def onnx_roles(model) -> dict[str, str]:
  """{initialiser name: the kind of layer it feeds} of an ONNX graph, for
  refilling a skeleton's float initialisers (`refill`)."""
  roles = {}
  for node in model.graph.node:
    inputs = list(node.input)
    if node.op_type == "Conv":
      roles[inputs[1]] = "conv"
      if len(inputs) > 2:
        roles[inputs[2]] = "conv_bias"
    elif node.op_type == "BatchNormalization":
      for leaf, name in zip(
          ("weight", "bias", "running_mean", "running_var"), inputs[1:5]
      ):
        roles[name] = f"batch_norm.{leaf}"
    elif node.op_type == "PRelu":
      roles[inputs[1]] = "prelu"
    elif node.op_type == "Gemm":
      roles[inputs[1]] = "linear"
      if len(inputs) > 2:
        roles[inputs[2]] = "linear_bias"
  return roles


def refill(model) -> None:
  """Gives every float initialiser of an ONNX skeleton (a graph whose float
  initialisers were emptied) its seeded value, in place."""
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top

  roles = onnx_roles(model)
  for init in model.graph.initializer:
    if init.data_type != 1:  # FLOAT; shapes and indices keep their data
      continue
    role = roles.get(init.name, "param")
    kind, _, leaf = role.partition(".")
    if kind.endswith("_bias"):
      kind, leaf = kind[: -len("_bias")], "bias"
    name = f"{init.name}.{leaf or 'weight'}"
    value = tensor(name, tuple(init.dims), kind)
    init.CopyFrom(numpy_helper.from_array(value, init.name))


def strip(model) -> None:
  """Empties every float initialiser, keeping its name, type and dims."""
  for init in model.graph.initializer:
    if init.data_type == 1:
      init.ClearField("raw_data")
      init.ClearField("float_data")
