"""A JAX function as an ONNX graph, translated from its own jaxpr.

The export traces the function that embeds (`inference.model.fused_forward`
and its insightface-layout twin) with the weights as an argument, and writes
one ONNX node per primitive (`jaxprs.flatten` inlines the calls and picks
the accelerators' branch of `platform_dependent`): no second description of
any network exists, so every registered backbone exports, and the file
computes what `--mode=embed` computes. Each weight is an initialiser named
by its variable's path, as it is (so `convert` reads the very variables
back, `onnx_import.own_export`); what depends on weights alone (their
transposes, a BatchNorm's scale) stays in the graph for the runtime's
constant folding. Equations whose inputs are all other constants (iotas,
shapes) are evaluated here and stored as initialisers.

The batch may stay symbolic: the function is traced with a symbolic batch
(jax.export's shape polymorphism) and every size that depends on it is
computed in the graph from the input's shape.

Opset 17; a primitive this translation does not know is named in the
error, with the function it came from.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
import numpy as np

from qgjt_jax import errors
from qgjt_jax.interop import jaxprs

OPSET = 17
_INT64_MAX = 2**63 - 1


class OnnxExportError(errors.UserError):
  """A function this translation cannot write as ONNX (names why)."""


def _onnx_type(dtype) -> int:
  from onnx import helper  # pylint: disable=g-import-not-at-top

  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Graph:
  """The ONNX graph under construction, and what each jaxpr value is."""

  def __init__(self, input_name: str, batch_symbol):
    from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top

    self.helper, self.numpy_helper = helper, numpy_helper
    self.nodes, self.initializers = [], []
    self.values: dict[Any, Any] = {}  # Var -> np.ndarray | ONNX name
    self._count = 0
    self.input_name = input_name
    self.batch_symbol = batch_symbol  # the input's symbolic first size
    self._batch: dict[int, str] = {}

  def fresh(self, stem: str) -> str:
    self._count += 1
    return f"{stem}_{self._count}"

  def const(self, array, stem: str = "const") -> str:
    name = self.fresh(stem)
    self.initializers.append(
        self.numpy_helper.from_array(
            np.ascontiguousarray(np.asarray(array)), name
        )
    )
    return name

  def named_const(self, array, name: str) -> str:
    """An initialiser under its own name (a weight: not folded here)."""
    self.initializers.append(
        self.numpy_helper.from_array(
            np.ascontiguousarray(np.asarray(array)), name
        )
    )
    return name

  def op(
      self, op_type: str, inputs: Sequence[str], outputs: int = 1, **attributes
  ) -> Any:
    names = [self.fresh(op_type.lower()) for _ in range(outputs)]
    self.nodes.append(
        self.helper.make_node(op_type, list(inputs), names, **attributes)
    )
    return names[0] if outputs == 1 else names

  def name(self, value) -> str:
    """The ONNX name of a value (a constant becomes an initialiser)."""
    return self.const(value) if isinstance(value, np.ndarray) else value

  # --- sizes that may depend on the symbolic batch.

  def dim(self, d) -> str:
    """A 1-element int64 tensor holding the size d (an int, or a multiple
    of the input's batch)."""
    if isinstance(d, (int, np.integer)):
      return self.const(np.array([int(d)], np.int64), "dim")
    factor = self._batch_factor(d)
    if factor not in self._batch:
      if 1 not in self._batch:
        shape = self.op("Shape", [self.input_name])
        self._batch[1] = self.op(
            "Slice",
            [
                shape,
                self.const(np.array([0], np.int64)),
                self.const(np.array([1], np.int64)),
            ],
        )
      self._batch[factor] = (
          self._batch[1]
          if factor == 1
          else self.op(
              "Mul", [self._batch[1], self.const(np.array([factor], np.int64))]
          )
      )
    return self._batch[factor]

  def _batch_factor(self, d) -> int:
    """k where the symbolic size d is k times the batch."""
    for k in range(1, 65):
      if self.batch_symbol is not None and d == k * self.batch_symbol:
        return k
    raise OnnxExportError(f"a size {d} that is no multiple of the batch")

  def shape(self, dims: Sequence[Any]) -> str:
    if all(isinstance(d, (int, np.integer)) for d in dims):
      return self.const(np.array([int(d) for d in dims], np.int64), "shape")
    return self.op("Concat", [self.dim(d) for d in dims], axis=0)


# --- primitives -------------------------------------------------------------

_ELEMENTWISE = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "pow": "Pow",
    "neg": "Neg",
    "sqrt": "Sqrt",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "abs": "Abs",
    "sign": "Sign",
    "erf": "Erf",
    "ge": "GreaterOrEqual",
    "gt": "Greater",
    "le": "LessOrEqual",
    "lt": "Less",
    "eq": "Equal",
    "and": "And",
    "or": "Or",
    "not": "Not",
    "floor": "Floor",
    "ceil": "Ceil",
    "copy": "Identity",
    "copy_p": "Identity",
    "stop_gradient": "Identity",
}


def _translate(
    g: _Graph,
    eq: jaxprs.Equation,
    ins: list[Any],
    in_avals: list[Any],
    out_avals: list[Any],
) -> list[str]:
  """The ONNX names of `eq`'s outputs (nodes appended to g)."""
  p, name = eq.params, eq.primitive
  x = [g.name(v) for v in ins]
  if name in _ELEMENTWISE:
    return [g.op(_ELEMENTWISE[name], x)]
  if name == "ne":
    return [g.op("Not", [g.op("Equal", x)])]
  if name == "rsqrt":
    return [g.op("Reciprocal", [g.op("Sqrt", x)])]
  if name == "square":
    return [g.op("Mul", [x[0], x[0]])]
  if name == "integer_pow":
    y = p["y"]
    if y == 2:
      return [g.op("Mul", [x[0], x[0]])]
    exponent = np.asarray(y, np.dtype(in_avals[0].dtype))
    return [g.op("Pow", [x[0], g.const(exponent)])]
  if name == "convert_element_type":
    return [g.op("Cast", x, to=_onnx_type(p["new_dtype"]))]
  if name == "select_n":
    if len(x) != 3:
      raise OnnxExportError("select_n of more than two cases")
    condition = x[0]
    if np.dtype(in_avals[0].dtype) != np.bool_:
      condition = g.op("Cast", [condition], to=_onnx_type(np.bool_))
    return [g.op("Where", [condition, x[2], x[1]])]
  if name == "clamp":
    return [g.op("Max", [g.op("Min", [x[1], x[2]]), x[0]])]
  if name == "reshape":
    return [g.op("Reshape", [x[0], g.shape(p["new_sizes"])])]
  if name == "broadcast_in_dim":
    shape, dims = p["shape"], p["broadcast_dimensions"]
    ranked = [1] * len(shape)
    for axis, d in zip(dims, in_avals[0].shape):
      ranked[axis] = d
    y = (
        g.op("Reshape", [x[0], g.shape(ranked)])
        if len(ranked) != len(in_avals[0].shape)
        else x[0]
    )
    return [g.op("Expand", [y, g.shape(shape)])]
  if name == "transpose":
    return [g.op("Transpose", x, perm=list(p["permutation"]))]
  if name == "squeeze":
    return [
        g.op("Squeeze", [x[0], g.const(np.array(p["dimensions"], np.int64))])
    ]
  if name == "expand_dims":
    return [
        g.op("Unsqueeze", [x[0], g.const(np.array(p["dimensions"], np.int64))])
    ]
  if name == "rev":
    axes = list(p["dimensions"])
    return [
        g.op(
            "Slice",
            [
                x[0],
                g.const(np.full(len(axes), -1, np.int64)),
                g.const(np.full(len(axes), -_INT64_MAX, np.int64)),
                g.const(np.array(axes, np.int64)),
                g.const(np.full(len(axes), -1, np.int64)),
            ],
        )
    ]
  if name == "concatenate":
    return [g.op("Concat", x, axis=int(p["dimension"]))]
  if name == "split":
    sizes = [g.dim(s) for s in p["sizes"]]
    return g.op(
        "Split",
        [x[0], g.op("Concat", sizes, axis=0)],
        outputs=len(sizes),
        axis=int(p["axis"]),
    )
  if name == "slice":
    return [_slice(g, x[0], in_avals[0].shape, p)]
  if name == "pad":
    return [_pad(g, x, p["padding_config"])]
  if name in ("reduce_sum", "reduce_max", "reduce_min"):
    axes = np.array(p["axes"], np.int64)
    op = {
        "reduce_sum": "ReduceSum",
        "reduce_max": "ReduceMax",
        "reduce_min": "ReduceMin",
    }[name]
    if op == "ReduceSum":  # axes an input from opset 13, the others 18
      return [g.op(op, [x[0], g.const(axes)], keepdims=0)]
    return [g.op(op, [x[0]], axes=axes.tolist(), keepdims=0)]
  if name == "dot_general":
    return [_dot_general(g, x, in_avals, p["dimension_numbers"])]
  if name == "conv_general_dilated":
    return [_conv(g, x, p)]
  if name == "dim_as_value":
    return [
        g.op(
            "Squeeze",
            [
                g.op(
                    "Cast", [g.dim(p["dim"])], to=_onnx_type(out_avals[0].dtype)
                )
            ],
        )
    ]
  raise OnnxExportError(f"the primitive {name!r} has no ONNX translation here")


def _slice(g: _Graph, x: str, shape, p) -> str:
  starts, limits = p["start_indices"], p["limit_indices"]
  strides = p["strides"] or (1,) * len(starts)
  axes = [
      a
      for a in range(len(starts))
      if not (
          starts[a] == 0
          and strides[a] == 1
          and (limits[a] is shape[a] or limits[a] == shape[a])
      )
  ]
  if not axes:
    return g.op("Identity", [x])
  return g.op(
      "Slice",
      [
          x,
          g.op("Concat", [g.dim(starts[a]) for a in axes], axis=0),
          g.op("Concat", [g.dim(limits[a]) for a in axes], axis=0),
          g.const(np.array(axes, np.int64)),
          g.const(np.array([strides[a] for a in axes], np.int64)),
      ],
  )


def _pad(g: _Graph, x: list[str], config) -> str:
  if any(interior for _, _, interior in config):
    raise OnnxExportError("pad with interior padding")
  pads = np.array(
      [lo for lo, _, _ in config] + [hi for _, hi, _ in config], np.int64
  )
  return g.op("Pad", [x[0], g.const(pads), x[1]], mode="constant")


def _dot_general(g: _Graph, x: list[str], avals, dimension_numbers) -> str:
  (lc, rc), (lb, rb) = dimension_numbers
  lhs_rank, rhs_rank = len(avals[0].shape), len(avals[1].shape)
  if (
      not lb
      and not rb
      and tuple(lc) == (lhs_rank - 1,)
      and tuple(rc) == (0,)
      and rhs_rank == 2
  ):
    return g.op("MatMul", x)
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  lhs = [next(letters) for _ in range(lhs_rank)]
  rhs = [None] * rhs_rank
  for a, b in zip(lc, rc):
    rhs[b] = lhs[a]
  for a, b in zip(lb, rb):
    rhs[b] = lhs[a]
  rhs = [r or next(letters) for r in rhs]
  out = (
      [lhs[a] for a in lb]
      + [lhs[a] for a in range(lhs_rank) if a not in lc and a not in lb]
      + [rhs[b] for b in range(rhs_rank) if b not in rc and b not in rb]
  )
  equation = f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
  return g.op("Einsum", x, equation=equation)


def _conv(g: _Graph, x: list[str], p) -> str:
  numbers = p["dimension_numbers"]
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise OnnxExportError("a transposed or batch-grouped convolution")
  lhs = g.op("Transpose", [x[0]], perm=list(numbers.lhs_spec))
  rhs = g.op("Transpose", [x[1]], perm=list(numbers.rhs_spec))
  padding = p["padding"]
  y = g.op(
      "Conv",
      [lhs, rhs],
      strides=list(p["window_strides"]),
      pads=[lo for lo, _ in padding] + [hi for _, hi in padding],
      dilations=list(p["rhs_dilation"]),
      group=int(p["feature_group_count"]),
  )
  # The output is (batch, feature, spatial...); out_spec places those.
  inverse = np.argsort(numbers.out_spec).tolist()
  return g.op("Transpose", [y], perm=inverse)


# --- the program ------------------------------------------------------------


def _evaluate(eq: jaxprs.Equation, values: list[np.ndarray]) -> list[Any]:
  """An equation of constants, run here."""
  out = eq.bind.bind(*[jnp.asarray(v) for v in values], **eq.params)
  out = out if eq.bind.multiple_results else [out]
  return [np.asarray(o) for o in out]


def weight_name(path) -> str:
  """The initialiser name of a variable leaf: its path, '/'-joined
  ("params/conv1/kernel"), which `onnx_import.own_export` reads back."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def onnx_model(
    function: Callable,
    example: jax.ShapeDtypeStruct,
    *,
    input_name: str,
    output_names: Sequence[str],
    batch: Optional[int],
    weights: Any,
    metadata: Optional[dict] = None,
    graph_name: str = "qgjt_jax",
):
  """The onnx.ModelProto of `function(x, weights)` on inputs x like
  `example` (its first axis the batch: `batch`, or symbolic when None),
  with `metadata` as its metadata_props. Each leaf of `weights` is an
  initialiser named by `weight_name`, as it is: the graph computes from
  it (what depends on weights alone, a BatchNorm's scale, say, is left to
  the runtime's constant folding), so the file holds the very variables.

  Raises:
    OnnxExportError: a primitive without a translation.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top

  symbol = jax.export.symbolic_shape("batch")[0] if batch is None else None
  spec = jax.ShapeDtypeStruct(
      (symbol if batch is None else batch, *example.shape[1:]), example.dtype
  )
  leaves, _ = jax.tree_util.tree_flatten_with_path(weights)
  flat = jaxprs.flatten(jax.make_jaxpr(function)(spec, weights))
  g = _Graph(input_name, symbol)
  invar, *weight_vars = flat.invars
  g.values[invar] = input_name
  for var, (path, leaf) in zip(weight_vars, leaves):
    g.values[var] = g.named_const(leaf, weight_name(path))
  for var, value in zip(flat.constvars, flat.consts):
    g.values[var] = np.asarray(value)

  def value_of(a):
    if isinstance(a, jcore.Literal):
      return np.asarray(a.val, np.dtype(a.aval.dtype))
    return g.values[a]

  for eq in flat.equations:
    ins = [value_of(a) for a in eq.invars]
    if all(isinstance(v, np.ndarray) for v in ins):
      results = _evaluate(eq, ins)
    else:
      results = _translate(
          g, eq, ins, [a.aval for a in eq.invars], [v.aval for v in eq.outvars]
      )
    for var, result in zip(eq.outvars, results):
      g.values[var] = result
  dim = batch if batch else "batch"
  outputs = []
  for name, var in zip(output_names, flat.outvars):
    g.nodes.append(
        helper.make_node("Identity", [g.name(value_of(var))], [name])
    )
    shape = [
        int(d) if isinstance(d, (int, np.integer)) else dim
        for d in var.aval.shape
    ]
    outputs.append(
        helper.make_tensor_value_info(name, _onnx_type(var.aval.dtype), shape)
    )
  inputs = [
      helper.make_tensor_value_info(
          input_name, _onnx_type(example.dtype), [dim, *example.shape[1:]]
      )
  ]
  graph = helper.make_graph(
      g.nodes, graph_name, inputs, outputs, initializer=g.initializers
  )
  proto = helper.make_model(
      graph,
      opset_imports=[helper.make_opsetid("", OPSET)],
      producer_name="qgjt_jax",
  )
  for key, value in (metadata or {}).items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, str(value)
  onnx.checker.check_model(proto)
  return proto
