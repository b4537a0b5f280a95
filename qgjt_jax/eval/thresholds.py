"""Decision thresholds that mean something: the cosine at a false accept rate.

Every verification evaluation (the `.bin` sets, the synthetic pairs, own
folders and pairs files, IJB) stores, for each FAR of `FARS` that its
impostor count can resolve (at least 1 / FAR impostor pairs), the cosine
threshold that accepts at most that share of its impostors, what it
accepted, and how sure that is:

  "thresholds": [{"far": 0.001, "cosine": 0.3215, "tar": 0.9412,
                  "genuine": 3000, "impostors": 15658, "accepted": 15,
                  "far_interval": [0.00054, 0.00158], ...}, ...]

`accepted` of `impostors` is the FAR measured at the threshold (never above
the target). `far_interval_pairs` is the exact (Clopper-Pearson) 95%
interval of the true FAR given that count, as if every pair were drawn
independently; where the people of each pair are known (folders of people),
`far_interval_people` is the percentile bootstrap over people (people drawn
with replacement, each pair counted once for every draw of both its
people), which is what varies when the same threshold meets other people;
`far_interval` spans both. With few accepted impostors, or few people, it is
wide: that is the honest statement. The evaluation adds what the scores were,
on which faces and at which step (the set's `provenance`);
`inference/decisions.py` chooses among them for compare, identify and the
exports. A pair is "same person" when its cosine is >= the threshold.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

FARS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
CONFIDENCE = 0.95
_ROUNDS = 500  # bootstrap draws of people


def rate_interval(k: int, n: int, confidence: float = CONFIDENCE
                  ) -> list[float]:
  """Clopper-Pearson interval of a rate seen k times in n trials."""
  alpha = 1.0 - confidence
  low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
  high = 1.0 if k >= n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
  return [low, high]


def people_intervals(members: np.ndarray, totals: np.ndarray,
                     accepted: np.ndarray, num_people: int,
                     confidence: float = CONFIDENCE, rounds: int = _ROUNDS,
                     seed: int = 0) -> np.ndarray:
  """(L, 2) percentile-bootstrap intervals over people of L rates.

  Each unit (a pair of people, or one person) has `members` (U, m) person
  indices, `totals` (U,) comparisons and `accepted` (U, L) of them counted
  at each of L thresholds. A draw takes `num_people` people with
  replacement; a unit weighs the product of its members' draw counts.
  """
  rng = np.random.default_rng(seed)
  accepted = np.asarray(accepted, np.float64)
  totals = np.asarray(totals, np.float64)
  some = np.flatnonzero(accepted.any(axis=1))
  rates = np.full((rounds, accepted.shape[1]), np.nan)
  for r in range(rounds):
    drawn = rng.multinomial(num_people, np.full(num_people, 1 / num_people))
    weights = np.prod(drawn[members].astype(np.float64), axis=1)
    denominator = weights @ totals
    if denominator:
      rates[r] = weights[some] @ accepted[some] / denominator
  tail = 50 * (1 - confidence)
  return np.nanpercentile(rates, [tail, 100 - tail], axis=0).T


def cut_at(descending: np.ndarray, rate: float) -> float:
  """The lowest threshold that accepts at most floor(rate n) of n scores
  sorted in decreasing order: the next float above the first score that
  must be refused (so its ties are refused too)."""
  return float(np.nextafter(descending[int(math.floor(rate * len(
      descending)))], np.inf))


def at_far(genuine: np.ndarray, impostor: np.ndarray, fars=FARS,
           impostor_people: tuple[np.ndarray, np.ndarray] | None = None
           ) -> list[dict[str, float]]:
  """The threshold of each FAR the impostors resolve (see module).

  With the n impostor scores in decreasing order s_1 >= s_2 >= ..., at
  most k = floor(FAR n) may be accepted: the threshold is the next float
  above s_(k+1), so a tie at s_(k+1) is rejected too and the measured FAR
  never exceeds the target. `impostor_people`, the person index of each
  impostor pair's two faces, adds the interval over people.
  """
  genuine = np.asarray(genuine, np.float64).reshape(-1)
  scores = np.asarray(impostor, np.float64).reshape(-1)
  impostor = np.sort(scores)[::-1]
  out = []
  for far in fars:
    if len(impostor) * far < 1 or not len(genuine):
      continue
    cosine = cut_at(impostor, far)
    accepted = int(np.sum(impostor >= cosine))
    interval = rate_interval(accepted, len(impostor))
    out.append({"far": far, "cosine": cosine,
                "tar": float(np.mean(genuine >= cosine)),
                "genuine": int(len(genuine)), "impostors": int(len(impostor)),
                "accepted": accepted, "far_interval": interval,
                "far_interval_pairs": interval})
  if impostor_people is not None and out:
    _widen_by_people(out, scores, impostor_people)
  return out


def _widen_by_people(rows: list[dict], scores: np.ndarray,
                     people: tuple[np.ndarray, np.ndarray]) -> None:
  """Adds each row's interval over people and widens its far_interval."""
  first, second = (np.asarray(p, np.int64) for p in people)
  low, high = np.minimum(first, second), np.maximum(first, second)
  num_people = int(high.max()) + 1
  pair, unit = np.unique(low * num_people + high, return_inverse=True)
  unit = unit.reshape(-1)
  totals = np.bincount(unit, minlength=len(pair))
  accepted = np.stack([np.bincount(unit, weights=scores >= r["cosine"],
                                   minlength=len(pair)) for r in rows], 1)
  members = np.stack([pair // num_people, pair % num_people], 1)
  for row, (lo, hi) in zip(rows, people_intervals(members, totals, accepted,
                                                  num_people)):
    row["far_interval_people"] = [float(lo), float(hi)]
    row["far_interval"] = [min(row["far_interval"][0], float(lo)),
                           max(row["far_interval"][1], float(hi))]


def from_labels(labels: np.ndarray, scores: np.ndarray,
                people: tuple[np.ndarray, np.ndarray] | None = None
                ) -> list[dict]:
  """`at_far` of scores labelled same (true) and different (false); with
  `people`, the person index of each pair's two faces."""
  labels = np.asarray(labels).reshape(-1).astype(bool)
  scores = np.asarray(scores, np.float64).reshape(-1)
  return at_far(scores[labels], scores[~labels], impostor_people=None if (
      people is None) else tuple(np.asarray(p)[~labels] for p in people))


def roc_points(genuine: np.ndarray, impostor: np.ndarray,
               per_decade: int = 10) -> list[list[float]]:
  """A compact ROC for results and plots: [FAR, TAR] at log-spaced FARs
  from 1/impostors to 1 (per_decade points a decade), TAR being the share
  of genuine scores above the impostor score that FAR allows."""
  genuine = np.sort(np.asarray(genuine, np.float64).reshape(-1))
  impostor = np.sort(np.asarray(impostor, np.float64).reshape(-1))[::-1]
  if not len(genuine) or not len(impostor):
    return []
  lowest = math.log10(1.0 / len(impostor))
  points = []
  for far in np.logspace(lowest, 0, max(2, int(-lowest * per_decade) + 1)):
    accepted = int(math.floor(far * len(impostor) + 1e-9))
    cut = impostor[accepted] if accepted < len(impostor) else -np.inf
    tar = 1.0 - np.searchsorted(genuine, cut, side="right") / len(genuine)
    points.append([float(far), float(tar)])
  return points
