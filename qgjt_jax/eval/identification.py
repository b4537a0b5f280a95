"""Closed-set identification: rank-k accuracy (CMC) of probes vs a gallery.

As in the reference's DIR_FAR with FAR = 1 (TinyFace, SCface): the score is
the inner product of (unit) embeddings; probes without any mate in the
gallery are left out; a probe succeeds at rank k when a gallery entry of its
identity is among its k highest-scoring gallery entries. Equal scores are
resolved in the probe's favour (measure-zero for real-valued embeddings).
"""

from collections.abc import Sequence
import dataclasses

import numpy as np

from qgjt_jax.eval import thresholds

# False-positive identification rates whose thresholds open-set calibration
# stores (each resolved by at least 1 / FPIR non-mated searches).
FPIRS = (0.1, 0.05, 0.01, 1e-3, 1e-4)


def probe_ranks(
    probe_feats: np.ndarray,
    probe_labels: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    chunk_size: int = 256,
) -> np.ndarray:
  """1-based rank of the best-scoring mate of each probe (0: no mate).

  The rank is 1 + the number of gallery entries scoring strictly higher than
  the probe's best mate. Probes are processed in chunks so a gallery of
  150k+ distractors never needs the full (P, G) score matrix.
  """
  probe_feats = np.asarray(probe_feats, np.float32)
  gallery_feats = np.asarray(gallery_feats, np.float32)
  probe_labels = np.asarray(probe_labels)
  gallery_labels = np.asarray(gallery_labels)
  if probe_feats.shape[0] != probe_labels.shape[0]:
    raise ValueError(
        f"{len(probe_feats)} probe features but {len(probe_labels)} labels"
    )
  if gallery_feats.shape[0] != gallery_labels.shape[0]:
    raise ValueError(
        f"{len(gallery_feats)} gallery features but "
        f"{len(gallery_labels)} labels"
    )
  ranks = np.zeros(len(probe_feats), np.int64)
  for start in range(0, len(probe_feats), chunk_size):
    stop = start + chunk_size
    scores = probe_feats[start:stop] @ gallery_feats.T  # (c, G)
    mate = probe_labels[start:stop, None] == gallery_labels[None, :]
    has_mate = mate.any(axis=1)
    best_mate = np.where(mate, scores, -np.inf).max(axis=1)
    higher = (scores > best_mate[:, None]).sum(axis=1)
    ranks[start:stop] = np.where(has_mate, higher + 1, 0)
  return ranks


def rank_k_accuracy(
    probe_feats: np.ndarray,
    probe_labels: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray,
    ranks: Sequence[int] = (1, 5, 20),
) -> dict[int, float]:
  """{k: fraction of mated probes identified within the top k}."""
  r = probe_ranks(probe_feats, probe_labels, gallery_feats, gallery_labels)
  mated = r[r > 0]
  if not len(mated):
    raise ValueError("no probe has a mate in the gallery")
  return {int(k): float(np.mean(mated <= k)) for k in ranks}


def mean_templates(
    feats: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(per-person sums (P, D), unit templates (P, D)) of unit features, for
  labels 0..P-1: a person's template is the normalised mean of its
  images' features (what `identify` enrols)."""
  feats = np.asarray(feats, np.float64)
  sums = np.zeros((int(labels.max()) + 1, feats.shape[1]))
  np.add.at(sums, labels, feats)
  return sums, sums / np.maximum(
      np.linalg.norm(sums, axis=1, keepdims=True), 1e-12
  )


@dataclasses.dataclass(frozen=True)
class Searches:
  """A folder's photos as the non-mated searches of a gallery to come: unit
  embeddings (n, D) and each one's person (n,). An evaluation stores them
  beside its results, so identify can measure its threshold against the
  gallery it searches (`open_set_cut`)."""

  embeddings: np.ndarray
  people: np.ndarray


def open_set_cut(
    best: np.ndarray, people: np.ndarray, fpir: float, gallery_people: int
) -> dict | None:
  """The open-set row of `fpir` for one gallery: `best` (n,) is each stored
  search's best cosine in that gallery (its false-alarm score) and
  `people` (n,) whose photo it is. Cut as `open_set_calibration` cuts, the
  searching person the unit; None where the searches do not resolve the
  rate."""
  units = thresholds.units_of(people)
  cut = thresholds.cut_holding(best, fpir, units)
  if cut is None:
    return None
  return {
      "fpir": fpir,
      "cosine": cut["cosine"],
      "searches": int(len(best)),
      "false_alarms": cut["accepted"],
      "fpir_upper": cut["upper"],
      "design_effect": cut["design_effect"],
      "people": units.people,
      "gallery_people": int(gallery_people),
  }


def open_set_calibration(
    feats: np.ndarray,
    labels: np.ndarray,
    fpirs: Sequence[float] = FPIRS,
    chunk_size: int = 256,
) -> list[dict]:
  """Open-set thresholds of a folder of P people, each left out in turn.

  Every image is a non-mated search: its person is left out and the
  gallery holds the mean templates of the P - 1 others; its false-alarm
  score is its best score there. The threshold at each FPIR is cut as
  `thresholds.cut_holding` cuts a FAR's, with the searching person as the
  unit (a person's photos raise false alarms together): with at least
  MIN_PEOPLE people, the lowest whose one-sided 95% upper bound
  (`fpir_upper`) is at or below the FPIR; with fewer, the point estimate,
  and no bound. Every image of a person with two or more is also a mated
  search against all P templates, its own built from its person's other
  images: TPIR is the share whose mate ranks first, strictly above every
  other template, and reaches the threshold.
  `template_false_match_rate` is the share of single (non-mated image,
  template) comparisons at or above the threshold.
  """
  feats = np.asarray(feats, np.float64)
  labels = np.asarray(labels)
  sums, templates = mean_templates(feats, labels)
  people = len(templates)
  if people < 2:
    return []
  counts = np.bincount(labels, minlength=people)

  def chunks():  # (rows, scores against every other person's template)
    for start in range(0, len(feats), chunk_size):
      rows = np.arange(start, min(start + chunk_size, len(feats)))
      scores = feats[rows] @ templates.T
      scores[np.arange(len(rows)), labels[rows]] = -np.inf
      yield rows, scores

  non_mated = np.empty(len(feats))
  for rows, scores in chunks():
    non_mated[rows] = scores.max(axis=1)
  # Mated: the image against its person's template without it.
  rest = sums[labels] - feats
  mated = counts[labels] > 1
  mate = np.where(
      mated,
      np.sum(feats * rest, axis=1)
      / np.maximum(np.linalg.norm(rest, axis=1), 1e-12),
      -np.inf,
  )
  units = thresholds.units_of(labels)
  cuts = [
      (fpir, cut)
      for fpir in fpirs
      if (cut := thresholds.cut_holding(non_mated, fpir, units)) is not None
  ]
  if not cuts:  # too few searches to resolve any rate
    return []
  passing = np.zeros(len(cuts), np.int64)  # comparisons at or above each
  for _, scores in chunks():
    passing += [int(np.sum(scores >= cut["cosine"])) for _, cut in cuts]
  comparisons = len(feats) * (people - 1)
  rows_out = []
  for (fpir, cut), passed in zip(cuts, passing):
    hit = (mate > non_mated) & (mate >= cut["cosine"])
    rows_out.append(
        {
            "fpir": fpir,
            "cosine": cut["cosine"],
            "searches": int(len(feats)),
            "false_alarms": cut["accepted"],
            "fpir_upper": cut["upper"],
            "design_effect": cut["design_effect"],
            "people": people,
            "gallery_people": people - 1,
            "template_false_match_rate": float(passed / comparisons),
            "tpir": float(np.mean(hit[mated])) if mated.any() else None,
            "mated_searches": int(mated.sum()),
        }
    )
  return rows_out
