"""Face encoders, built by name (`build_backbone("ir50")`)."""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from qgjt_jax.models.iresnet import INSIGHTFACE_STAGE_UNITS
from qgjt_jax.models.iresnet import IResNet
from qgjt_jax.models.iresnet import normalize_images
from qgjt_jax.models.iresnet import STAGE_UNITS

__all__ = ["IResNet", "build_backbone", "backbone_names", "normalize_images"]

# AdaFace/QGFace: "ir50", "ir_se100"; also the reference spellings "ir_50",
# "ir_se_50" and "ir101" (AdaFace calls the 100-layer model IR_101).
# insightface arcface_torch: "r50", "r100" (their names).
_NAME = re.compile(r"^(?:(?P<insightface>r)|ir(?P<se>_se)?_?)(?P<depth>\d+)$")
_ALIASES = {101: 100}


def backbone_names() -> list[str]:
  """The canonical backbone names `build_backbone` accepts."""
  depths = sorted(STAGE_UNITS)
  return ([f"ir{d}" for d in depths] + [f"ir_se{d}" for d in depths] +
          [f"r{d}" for d in sorted(INSIGHTFACE_STAGE_UNITS)])


def build_backbone(name: str, dtype: Any = jnp.float32, **overrides
                   ) -> IResNet:
  """Returns the IResNet called `name` ("ir18" .. "ir200", "ir_se50",
  insightface's "r18" .. "r200").

  Args:
    name: backbone name, case-insensitive.
    dtype: compute dtype (parameters stay float32).
    **overrides: other `IResNet` fields (embedding_size, base_width,
      dropout_rate).

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  match = _NAME.match(name.strip().lower())
  depth = int(match["depth"]) if match else None
  insightface = bool(match and match["insightface"])
  if not insightface:
    depth = _ALIASES.get(depth, depth)
  table = INSIGHTFACE_STAGE_UNITS if insightface else STAGE_UNITS
  if depth not in table:
    raise ValueError(f"unknown backbone {name!r}; valid names: "
                     f"{', '.join(backbone_names())}")
  return IResNet(num_layers=depth, use_se=bool(match["se"]), dtype=dtype,
                 layout="insightface" if insightface else "adaface",
                 **overrides)
