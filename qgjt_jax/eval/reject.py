"""Does the quality indicator know which comparisons will fail?

The feature norm is QGFace's quality indicator; if it is worth anything,
setting aside the comparisons it rates worst must lower the error on the
rest. A comparison's quality is the smaller norm of its two faces, the
lowest first. The literature measures this two ways, and the numbers of one
are not comparable with the other, so each is computed under its own name:

`edc_*`: the Error-versus-Discard Characteristic (Grother and Tabassi;
  Schlett et al., "Considerations on the evaluation of biometric quality
  assessment algorithms", and their reference code, dasec
  quality-assessment-evaluation `edc.py`). Genuine comparisons only. The
  threshold is fixed once, at the score below which `STARTING_ERROR` of the
  genuine comparisons fall (their `np.quantile`); discarding walks up the
  pair qualities, all comparisons of one quality value at once, and the
  error is the share of the remaining genuine comparisons below the
  threshold. `edc_pauc` is the stepwise area under that curve up to
  `PAUC_LIMIT` discarded, less the area under the theoretical best (the
  curve that removes one error per discarded comparison): 0 is a perfect
  indicator, lower is better.

`erc_*`: the error-versus-reject curve as CR-FIQA's `ERC/erc.py` draws it
  (MagFace's `eval_quality.py` cuts its threshold at an impostor order
  statistic instead: another convention, not computed here). All
  comparisons, genuine and impostor; at each unconsidered share 0, 5, ...,
  95 % the threshold is recomputed on the comparisons kept, at the score
  whose FMR is nearest `ERC_FMR`, and the FNMR is read there. Ties in
  quality are cut in a seeded shuffle (`quality_order`): the reference
  sorts without regard to ties, and the set's own order (genuine pairs
  listed first, say) would favour one kind of comparison.
  `erc_auc` is the trapezoid area under that curve over 0 to 95 %, as
  `sklearn.metrics.auc` gives it. Where few comparisons are left the
  impostors cannot resolve `ERC_FMR`; the reference reports the nearest
  FMR anyway, and so does our curve, naming in `erc_unresolved_from` the
  first share from which that happens. Where even the whole set cannot
  (fewer than 1 / `ERC_FMR` impostors), `erc_auc` is None: no point of the
  curve stands at the FMR it is named for.
"""

from __future__ import annotations

import numpy as np

STARTING_ERROR = 0.05  # the reference code's default
PAUC_LIMIT = 0.20  # the discard share the EDC papers report pAUC to
ERC_FMR = 1e-3
TIE_SEED = 0  # the ERC's order within tied qualities (`quality_order`)
ERC_SHARES = np.arange(0, 0.98, 0.05)  # 0, 5, ..., 95 %, as the reference
# Where the EDC curve is sampled for plots and summaries (the pAUC is exact).
CURVE_SHARES = np.round(np.arange(0, 41) / 100.0, 2)
REPORTED = (0, 10, 20, 40)

EDC_CONVENTION = (
    f"EDC: genuine comparisons, pair quality = lower norm, "
    f"threshold fixed at starting FNMR {STARTING_ERROR}, tied "
    f"qualities discarded together, pAUC to "
    f"{PAUC_LIMIT:.0%} less the theoretical best"
)
ERC_CONVENTION = (
    f"ERC: all comparisons, pair quality = lower norm, "
    f"threshold recomputed at FMR {ERC_FMR:.0e} on the "
    f"comparisons kept, AUC over 0-95% unconsidered"
)


def edc(
    genuine_scores: np.ndarray,
    genuine_quality: np.ndarray,
    starting_error: float = STARTING_ERROR,
    pauc_limit: float = PAUC_LIMIT,
) -> dict | None:
  """The EDC of genuine comparisons (see the module doc); None without any.

  Returns {"discard": (K,), "fnmr": (K,)} (the curve's steps, a last point
  at 100 % discarded added as the reference does), "threshold",
  "starting_error" (the FNMR it gives at 0 %) and "pauc".
  """
  scores = np.asarray(genuine_scores, np.float64).reshape(-1)
  quality = np.asarray(genuine_quality, np.float64).reshape(-1)
  if not len(scores):
    return None
  threshold = float(np.quantile(scores, starting_error))
  order = np.argsort(quality, kind="stable")
  quality, errors = quality[order], scores[order] < threshold
  remaining_errors = np.cumsum(errors[::-1])[::-1]
  # A quality threshold discards every comparison of one quality at once.
  discarded = np.r_[0, np.flatnonzero(quality[1:] != quality[:-1]) + 1]
  count = len(scores)
  discard = discarded / count
  fnmr = remaining_errors[discarded] / (count - discarded)
  if discard[-1] != 1:
    discard, fnmr = np.r_[discard, 1.0], np.r_[fnmr, 0.0]
  return {
      "discard": discard,
      "fnmr": fnmr,
      "threshold": threshold,
      "starting_error": float(fnmr[0]),
      "pauc": _stepwise_area(discard, fnmr, pauc_limit)
      - _theoretical_best_area(float(fnmr[0]), pauc_limit),
  }


def _stepwise_area(
    discard: np.ndarray, fnmr: np.ndarray, limit: float
) -> float:
  """Area under the step curve (each value held until the next step) from
  0 to `limit`."""
  right = np.minimum(np.r_[discard[1:], np.inf], limit)
  widths = np.maximum(right - discard, 0.0)
  return float(np.sum(fnmr * widths))


def _theoretical_best_area(start: float, limit: float) -> float:
  """Area under max(0, start - x) from 0 to `limit`."""
  return start**2 / 2 - max(0.0, start - limit) ** 2 / 2


def erc(
    scores: np.ndarray,
    issame: np.ndarray,
    pair_quality: np.ndarray,
    fmr: float = ERC_FMR,
) -> dict | None:
  """The recomputed-threshold ERC (see the module doc); None without both
  genuine and impostor comparisons.

  Returns {"shares": (20,), "fnmr": (20,), "auc",
  "unresolved_from": the first share whose kept impostors are fewer than
  1 / fmr, or None}.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  issame = np.asarray(issame, bool).reshape(-1)
  quality = np.asarray(pair_quality, np.float64).reshape(-1)
  if issame.all() or not issame.any():
    return None
  order = quality_order(quality)
  fnmr, unresolved_from = [], None
  for share in ERC_SHARES:
    kept = order[int(share * len(order)) :]
    genuine, impostor = scores[kept][issame[kept]], scores[kept][~issame[kept]]
    if unresolved_from is None and len(impostor) * fmr < 1:
      unresolved_from = float(share)
    if not len(genuine) or not len(impostor):
      break  # the reference divides by zero here; the curve ends instead
    threshold = _nearest_fmr_threshold(genuine, impostor, fmr)
    # As the reference: an impostor at the threshold is a false match, a
    # genuine comparison at it a false non-match.
    fnmr.append(float(np.mean(genuine <= threshold)))
  shares = ERC_SHARES[: len(fnmr)]
  auc = float(
      np.sum(
          np.diff(shares) * (np.asarray(fnmr[1:]) + np.asarray(fnmr[:-1])) / 2
      )
  )
  return {
      "shares": shares,
      "fnmr": np.asarray(fnmr),
      "auc": auc,
      "unresolved_from": unresolved_from,
  }


def quality_order(quality: np.ndarray, seed: int = TIE_SEED) -> np.ndarray:
  """Indices by ascending quality, ties in a seeded shuffle (the same on
  every run): a tied block is cut without regard to the set's order."""
  shuffled = np.random.default_rng(seed).permutation(len(quality))
  return shuffled[np.argsort(quality[shuffled], kind="stable")]


def _nearest_fmr_threshold(
    genuine: np.ndarray, impostor: np.ndarray, fmr: float
) -> float:
  """The score, among all the comparisons' distinct scores, whose FMR
  (impostors at or above it) is nearest `fmr`; the lowest such score
  among equally near ones, as the reference's first argmin."""
  candidates = np.unique(np.r_[genuine, impostor])  # ascending
  at_or_above = len(impostor) - np.searchsorted(
      np.sort(impostor), candidates, side="left"
  )
  return float(candidates[np.argmin(np.abs(at_or_above / len(impostor) - fmr))])


def reject_metrics(
    scores: np.ndarray, issame: np.ndarray, pair_quality: np.ndarray
) -> dict:
  """Both conventions as evaluation results, each named by its
  `*_convention` line; {} when a set has no genuine comparisons."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  issame = np.asarray(issame, bool).reshape(-1)
  quality = np.asarray(pair_quality, np.float64).reshape(-1)
  out = {}
  curve = edc(scores[issame], quality[issame])
  if curve is not None:
    steps = np.searchsorted(curve["discard"], CURVE_SHARES, side="right") - 1
    sampled = curve["fnmr"][steps]
    out.update(
        edc_convention=EDC_CONVENTION,
        edc_starting_error=curve["starting_error"],
        edc_threshold=curve["threshold"],
        edc_pauc=curve["pauc"],
        edc_genuine=int(issame.sum()),
        edc_curve=[[float(x), float(y)] for x, y in zip(CURVE_SHARES, sampled)],
    )
    for percent in REPORTED:
      out[f"edc_fnmr_discard_{percent}"] = float(sampled[percent])
  curve = erc(scores, issame, quality)
  if curve is not None:
    unresolved = curve["unresolved_from"]
    out.update(
        erc_convention=ERC_CONVENTION,
        erc_auc=None if unresolved == 0.0 else curve["auc"],
        erc_impostors=int((~issame).sum()),
        erc_unresolved_from=unresolved,
        erc_curve=[
            [float(x), float(y)] for x, y in zip(curve["shares"], curve["fnmr"])
        ],
    )
  return out
