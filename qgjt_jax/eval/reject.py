"""Does the quality indicator know which pairs will fail? Error-versus-reject.

The feature norm is QGFace's quality indicator; if it is worth anything,
dropping the pairs it rates worst must lower the error on the rest. For a
verification set: the threshold is fixed at a false accept rate on every
pair; a pair's quality is the smaller feature norm of its two faces; the
lowest-quality x% of the pairs are rejected and the false non-match rate
(genuine pairs below the threshold) is measured on the pairs left, for x
from 0 to 40% (Grother and Tabassi's error-versus-reject curve). A falling
curve means the norm knows; a flat one, that it does not.

Reported per set: `reject_far` (the FAR the threshold holds: 1e-3 where
the impostors resolve it, else the smallest that they do), `fnmr_reject_0`,
`_10`, `_20`, `_40` (FNMR in %-rejected steps), `reject_auc` (the mean FNMR
over x in [0, 40%], the area under the curve divided by its width; lower
is better) and the whole curve (`reject_curve`: [x, FNMR] rows).
"""
from __future__ import annotations

import numpy as np

from qgjt_jax.eval import thresholds

FRACTIONS = np.round(np.arange(0, 41) / 100.0, 2)  # 0, 1, ..., 40 %
REPORTED = (0, 10, 20, 40)
PREFERRED_FAR = 1e-3


def reject_curve(scores: np.ndarray, issame: np.ndarray,
                 pair_quality: np.ndarray) -> dict | None:
  """The metrics above from cosine `scores`, same/different flags and pair
  qualities; None when the impostors resolve no FAR of thresholds.FARS or
  there are no genuine pairs."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  issame = np.asarray(issame, bool).reshape(-1)
  quality = np.asarray(pair_quality, np.float64).reshape(-1)
  rows = thresholds.at_far(scores[issame], scores[~issame])
  if not rows:
    return None
  row = next((r for r in rows if r["far"] == PREFERRED_FAR), rows[0])
  # Lowest quality first; ties broken by position, so the order is fixed.
  order = np.lexsort((np.arange(len(quality)), quality))
  fnmr = []
  for fraction in FRACTIONS:
    kept = order[int(round(fraction * len(order))):]
    genuine = scores[kept][issame[kept]]
    fnmr.append(float(np.mean(genuine < row["cosine"])) if len(genuine)
                else 0.0)
  fnmr = np.asarray(fnmr)
  area = float(np.sum((fnmr[1:] + fnmr[:-1]) / 2 * np.diff(FRACTIONS)) /
               FRACTIONS[-1])
  out = {"reject_far": row["far"], "reject_auc": area,
         "reject_curve": [[float(x), float(y)]
                          for x, y in zip(FRACTIONS, fnmr)]}
  for percent in REPORTED:
    out[f"fnmr_reject_{percent}"] = float(fnmr[percent])
  return out
