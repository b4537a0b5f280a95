"""One global batch of the train step: two views of each face.

The pipeline, the benchmark and the tests all build it with `make_batch`,
so its keys and types are written down here once.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np


class Batch(TypedDict):
  image_h: Any  # (B, S, S, 3) uint8 BGR: the clean view (H)
  image_l: Any  # (B, S, S, 3) uint8 BGR: the degraded view (L)
  label: Any  # (B,) int32 identity
  degrade_h: Any  # (B,) float32 downscale factor of H (1.0)
  degrade_l: Any  # (B,) float32 downscale factor r of L, in (0, 1]


def make_batch(
    image_h, image_l, label, degrade_h=None, degrade_l=None
) -> Batch:
  """A batch (or one example: scalars for label and factors). The factors
  default to 1.0, an undegraded view."""
  one = lambda like: np.ones(np.shape(like), np.float32)
  return Batch(
      image_h=image_h,
      image_l=image_l,
      label=label,
      degrade_h=one(label) if degrade_h is None else degrade_h,
      degrade_l=one(label) if degrade_l is None else degrade_l,
  )
