"""Dotted config keys ("model.name") in configs and their JSON records."""

import math
from typing import Any

MISSING = object()


def lookup(tree: Any, dotted: str) -> Any:
  """`tree["a"]["b"]` for "a.b" in nested dicts or ConfigDicts; MISSING if
  a part is absent."""
  for key in dotted.split("."):
    try:
      tree = tree[key]
    except (KeyError, TypeError, AttributeError):
      return MISSING
  return tree


def is_number(value: Any) -> bool:
  """A finite int or float (not a bool, NaN or infinity)."""
  return (
      isinstance(value, (int, float))
      and not isinstance(value, bool)
      and (math.isfinite(value))
  )
