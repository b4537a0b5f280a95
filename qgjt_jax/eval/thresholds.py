"""Decision thresholds that hold: the cosine at which a false accept rate is
bounded, over people.

Every verification evaluation (the `.bin` sets, the synthetic pairs, own
folders and pairs files, IJB) stores, for each FAR of `FARS` that its
impostor pairs can resolve (at least `PER_RATE` / FAR of them), a row:

  "thresholds": [{"far": 0.001, "cosine": 0.3215, "tar": 0.9412,
                  "genuine": 3000, "impostors": 177000, "accepted": 73,
                  "far_upper": 0.00097, "design_effect": 3.1,
                  "people": 60}, ...]

Where the people of each pair are known (folders of people) and there are
at least `MIN_PEOPLE` of them, `cosine` is the lowest threshold whose
one-sided 95% upper bound of the FAR (`far_upper`) is at or below the
target: "FAR <= 1e-3 at 95% confidence", with the measured `accepted` /
`impostors` beside it. The bound (`upper_bound`) treats people, not
pairs, as the unit drawn: pairs that share a person are not independent
(a look-alike raises all of their pairs at once), so the variance of the
measured rate is taken from leaving each person out in turn (the
jackknife), its ratio to the binomial variance is the design effect, and
the bound is the exact binomial (Clopper-Pearson) one of the effective
count of pairs (Schuckers' design-effect correction), read at a confidence
moved by the skew the people show (`_adjusted`). Fewer people, or
pairs of unknown people (`.bin` sets, pairs files), state no bound:
`cosine` is then the point estimate (at most floor(FAR n) impostors
accepted) and `far_upper` is None, which decisions say.

Measured by simulation (docs/DECISIONS.md; tests/unit/eval/test_coverage.py
keeps it so), with person effects as strong as ORL's under insightface's
w600k_mbf (design effect about 23 at FAR 1e-2 over 30 people): calibrated on
30 to 60 people, the true FAR at the chosen threshold was at or below the
target in 92.5-97.5% of 400 draws; on 20-25 people in 93.5-94.8%, hence
MIN_PEOPLE. A pair is "same person" when its cosine is >= the threshold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

FARS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
CONFIDENCE = 0.95
# People below which no bound is stated (where simulated coverage reached
# 95%, see module), and comparisons needed per 1 / rate: with none accepted, n
# comparisons bound a rate at -ln(0.05) / n, about 3 / n.
MIN_PEOPLE = 30
PER_RATE = 3


def _stats():
  """scipy.stats, imported when a bound is first computed: it costs most
  of a second, and every command imports this module (config_checks)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  return stats


def upper_bound(
    accepted: np.ndarray,
    totals: np.ndarray,
    members: np.ndarray,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
  """(one-sided upper bound, design effect) of the rate sum(accepted) /
  sum(totals) over units of people (see module).

  Each unit (a pair of people, or one searching person) has `members`
  (U, m) person indices (distinct within a unit), `totals` (U,)
  comparisons and `accepted` (U,) of them accepted.
  """
  accepted = np.asarray(accepted, np.float64)
  totals = np.asarray(totals, np.float64)
  members = np.asarray(members, np.int64).reshape(len(totals), -1)
  hits, count = float(accepted.sum()), float(totals.sum())
  rate = hits / count
  design_effect = 1.0
  if 0 < rate < 1:
    # The rate with each person's comparisons left out (the jackknife;
    # for pairs of people it errs on the wide side, which the skew of rare
    # look-alikes needs: see the module's measurements).
    people = int(members.max()) + 1
    mine_hits = sum(np.bincount(m, accepted, people) for m in members.T)
    mine = sum(np.bincount(m, totals, people) for m in members.T)
    present = (mine > 0) & (mine < count)
    if present.sum() > 1:
      left_out = (hits - mine_hits[present]) / (count - mine[present])
      n = present.sum()
      variance = (n - 1) / n * np.sum((left_out - left_out.mean()) ** 2)
      design_effect = max(1.0, variance / (rate * (1 - rate) / count))
      confidence = _adjusted(confidence, left_out)
  effective = count / design_effect
  k = rate * effective
  bound = (
      1.0
      if k >= effective
      else float(_stats().beta.ppf(confidence, k + 1, effective - k))
  )
  return bound, float(design_effect)


@dataclasses.dataclass(frozen=True)
class Units:
  """What a bound over people resamples: the unit of each comparison (a
  pair of people, or a searching person), the (U, m) people of each unit,
  and how many people there are."""

  unit: np.ndarray
  members: np.ndarray
  people: int

  @property
  def bounded(self) -> bool:
    return self.people >= MIN_PEOPLE


def _adjusted(confidence: float, left_out: np.ndarray) -> float:
  """The confidence at which to read the bound, given the rates with each
  of n people left out: moved by the skew those show (Efron's acceleration,
  a = sum(d^3) / (6 sum(d^2)^1.5) with d the jackknife deviations, as BCa
  uses it: a few people who raise many comparisons make the rate's
  distribution skewed to the right), then taken at Student's t with n - 1
  degrees of freedom, since the variance is estimated from n people."""
  deviations = left_out.mean() - left_out
  spread = np.sum(deviations**2)
  skew = np.sum(deviations**3) / (6 * spread**1.5) if spread > 0 else 0
  stats = _stats()
  z = stats.norm.ppf(confidence)
  z = z / (1 - skew * z) if skew * z < 1 else np.inf
  return float(
      stats.norm.cdf(stats.t.ppf(stats.norm.cdf(z), len(left_out) - 1))
  )


def units_of(first: np.ndarray, second: Optional[np.ndarray] = None) -> Units:
  """The pair of people of each impostor pair (order ignored), or with
  `second` None the searching person of each search."""
  first = np.asarray(first, np.int64).reshape(-1)
  if second is None:
    people, unit = np.unique(first, return_inverse=True)
    return Units(unit.reshape(-1), people[:, None], len(people))
  second = np.asarray(second, np.int64).reshape(-1)
  low, high = np.minimum(first, second), np.maximum(first, second)
  size = int(high.max()) + 1
  pairs, unit = np.unique(low * size + high, return_inverse=True)
  members = np.stack([pairs // size, pairs % size], 1)
  return Units(unit.reshape(-1), members, len(np.unique(members)))


def cut_at(descending: np.ndarray, count: int) -> float:
  """The lowest threshold that accepts at most `count` of the scores
  sorted in decreasing order: the next float above the first score that
  must be refused (so its ties are refused too)."""
  return float(np.nextafter(descending[count], np.inf))


def cut_holding(
    scores: np.ndarray, rate: float, units: Optional[Units] = None
) -> Optional[dict]:
  """The threshold of one rate over comparisons `scores`: {"cosine",
  "accepted", "upper", "design_effect"}, None where fewer than PER_RATE /
  rate comparisons resolve it.

  Over `units` of MIN_PEOPLE people or more: the lowest threshold at a
  score whose `upper_bound` is at or below `rate`, found by bisection over
  the count accepted (the bound grows with it). Otherwise: the point
  estimate, at most floor(rate n) accepted, and no bound.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(scores) * rate < PER_RATE:
    return None
  descending = np.sort(scores)[::-1]
  most = int(math.floor(rate * len(scores)))
  if units is None or not units.bounded:
    cosine = cut_at(descending, most)
    return {
        "cosine": cosine,
        "accepted": int(np.sum(scores >= cosine)),
        "upper": None,
        "design_effect": None,
    }
  count_of = len(units.members)
  totals = np.bincount(units.unit, minlength=count_of)

  def bounded(count):
    cosine = cut_at(descending, count)
    hits = np.bincount(units.unit, scores >= cosine, count_of)
    bound, effect = upper_bound(hits, totals, units.members)
    return {
        "cosine": cosine,
        "accepted": int(hits.sum()),
        "upper": bound,
        "design_effect": effect,
    }

  low, high, best = 0, most, bounded(0)
  while low < high:  # the largest count whose bound holds
    middle = (low + high + 1) // 2
    found = bounded(middle)
    if found["upper"] <= rate:
      low, best = middle, found
    else:
      high = middle - 1
  return best if best["upper"] <= rate else None


def at_far(
    genuine: np.ndarray,
    impostor: np.ndarray,
    fars=FARS,
    impostor_people: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict]:
  """The threshold of each FAR the impostors resolve (see module);
  `impostor_people`, the person index of each impostor pair's two faces,
  bounds it over people where they are at least MIN_PEOPLE."""
  genuine = np.asarray(genuine, np.float64).reshape(-1)
  scores = np.asarray(impostor, np.float64).reshape(-1)
  units = (
      units_of(*impostor_people)
      if impostor_people is not None and len(scores)
      else None
  )
  out = []
  for far in fars:
    cut = cut_holding(scores, far, units) if len(genuine) else None
    if cut is None:
      continue
    out.append(
        {
            "far": far,
            "cosine": cut["cosine"],
            "tar": float(np.mean(genuine >= cut["cosine"])),
            "genuine": int(len(genuine)),
            "impostors": int(len(scores)),
            "accepted": cut["accepted"],
            "far_upper": cut["upper"],
            "design_effect": cut["design_effect"],
            "people": units.people if units else None,
        }
    )
  return out


def from_labels(
    labels: np.ndarray,
    scores: np.ndarray,
    people: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict]:
  """`at_far` of scores labelled same (true) and different (false); with
  `people`, the person index of each pair's two faces."""
  labels = np.asarray(labels).reshape(-1).astype(bool)
  scores = np.asarray(scores, np.float64).reshape(-1)
  return at_far(
      scores[labels],
      scores[~labels],
      impostor_people=None
      if (people is None)
      else tuple(np.asarray(p)[~labels] for p in people),
  )


def roc_points(
    genuine: np.ndarray, impostor: np.ndarray, per_decade: int = 10
) -> list[list[float]]:
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
