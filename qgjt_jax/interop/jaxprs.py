"""A traced JAX function as one flat list of equations.

What the ONNX export translates and the ONNX import checks against: the
jaxpr of the very function that embeds, with every call (jit, custom
derivatives, remat) inlined and every `lax.platform_dependent` choice
resolved for a platform other than the CPU (the program an accelerator or
another runtime runs; `models.layers.GroupedConv`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.extend import core as jcore

# Primitives that only call a jaxpr held in a parameter.
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Equation:
  """One primitive application: its inputs (Vars of the outer program or
  Literals) and outputs, as in a jaxpr."""

  primitive: str
  params: dict[str, Any]
  invars: tuple[Any, ...]
  outvars: tuple[Any, ...]
  bind: Any  # the jax primitive, to evaluate it on constants


def _jaxpr_of(value) -> tuple[Any, list[Any]]:
  """(jaxpr, consts) of a ClosedJaxpr or a bare Jaxpr parameter."""
  if hasattr(value, "jaxpr") and hasattr(value, "consts"):
    return value.jaxpr, list(value.consts)
  return value, []


@dataclasses.dataclass(frozen=True)
class Flat:
  """A ClosedJaxpr with its calls inlined."""

  invars: list[Any]
  constvars: list[Any]
  consts: list[Any]
  equations: list[Equation]
  outvars: list[Any]


def flatten(closed) -> Flat:
  """The ClosedJaxpr `closed` with its calls inlined (see the module doc).
  The equations read the outer program's variables, or the inner results
  they stand for."""
  jaxpr = closed.jaxpr
  consts = list(closed.consts)
  constvars = list(jaxpr.constvars)
  equations: list[Equation] = []
  platform_of: dict[Any, tuple] = {}

  def walk(inner, env: dict) -> None:
    def atom(a):
      return a if isinstance(a, jcore.Literal) else env.get(a, a)

    for eqn in inner.eqns:
      name = eqn.primitive.name
      ins = tuple(atom(a) for a in eqn.invars)
      if name == "platform_index":
        platform_of[eqn.outvars[0]] = eqn.params["platforms"]
        continue
      if name == "cond" and ins and ins[0] in platform_of:
        # platform_dependent: the branch for platforms other than the CPU
        # (the one named None, the default), else the first one that is
        # not the CPU's.
        platforms = platform_of[ins[0]]
        chosen = next((i for i, p in enumerate(platforms) if p is None), None)
        if chosen is None:
          chosen = next(i for i, p in enumerate(platforms) if "cpu" not in p)
        _inline(eqn.params["branches"][chosen], ins[1:], eqn.outvars, env)
        continue
      if name in _CALLS and _CALLS[name] in eqn.params:
        _inline(eqn.params[_CALLS[name]], ins, eqn.outvars, env)
        continue
      equations.append(
          Equation(
              name, dict(eqn.params), ins, tuple(eqn.outvars), eqn.primitive
          )
      )

  def _inline(sub, ins, outs, env) -> None:
    sub_jaxpr, sub_consts = _jaxpr_of(sub)
    inner = dict(zip(sub_jaxpr.invars, ins))
    for var, value in zip(sub_jaxpr.constvars, sub_consts):
      constvars.append(var)
      consts.append(value)
    walk(sub_jaxpr, inner)
    for out, result in zip(outs, sub_jaxpr.outvars):
      env[out] = (
          result
          if isinstance(result, jcore.Literal)
          else inner.get(result, result)
      )

  env: dict = {}
  walk(jaxpr, env)
  outvars = [
      v if isinstance(v, jcore.Literal) else env.get(v, v)
      for v in jaxpr.outvars
  ]
  return Flat(list(jaxpr.invars), constvars, consts, equations, outvars)
