"""Dotted config keys ("model.name") in configs and their JSON records."""
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
