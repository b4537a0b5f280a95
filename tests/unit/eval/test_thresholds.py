"""Cosine thresholds at a false accept rate, with what they accepted."""

import math

import numpy as np
import pytest
from scipy import stats

from qgjt_jax.eval import thresholds
from qgjt_jax.eval import verification


@pytest.mark.parametrize("impostors", [99, 100, 1000, 25_000])
def test_each_threshold_accepts_at_most_its_share_and_no_less(impostors):
  rng = np.random.default_rng(impostors)
  impostor = np.round(rng.normal(0.0, 0.2, impostors), 3)  # with ties
  genuine = rng.normal(0.5, 0.2, 500)
  rows = thresholds.at_far(genuine, impostor)
  resolvable = [
      f for f in thresholds.FARS if impostors * f >= thresholds.PER_RATE
  ]
  assert [r["far"] for r in rows] == resolvable
  for row in rows:
    allowed = math.floor(row["far"] * impostors)
    accepted = np.sum(impostor >= row["cosine"])
    assert accepted <= allowed
    # Any lower threshold at an impostor score accepts too many.
    lower = impostor[impostor < row["cosine"]].max()
    assert np.sum(impostor >= lower) > allowed
    assert row["tar"] == pytest.approx(np.mean(genuine >= row["cosine"]))
    assert (row["impostors"], row["genuine"]) == (impostors, 500)
    assert row["accepted"] == accepted


def test_verification_reports_cosines_of_its_own_rule():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(2000, 16))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  issame = rng.random(1000) < 0.5
  emb[1::2][issame] = emb[0::2][issame] + rng.normal(
      0, 0.05, (issame.sum(), 16)
  )
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  metrics = verification.verification_metrics(emb, issame)
  assert metrics["best_threshold_cosine"] == pytest.approx(
      1 - metrics["best_threshold"] / 2
  )
  cosine = np.sum(emb[0::2] * emb[1::2], axis=1)
  want = thresholds.at_far(cosine[issame], cosine[~issame])
  assert [r["far"] for r in want] == [1e-2]
  for got, expected in zip(metrics["thresholds"], want, strict=True):
    assert got.keys() == expected.keys()
    for key in got:
      if expected[key] is None:
        assert got[key] is None, key
      else:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12)


def test_the_bound_of_independent_comparisons_is_clopper_pearsons():
  """One comparison per person: nothing is shared, the design effect is 1
  (but for the jackknife's n / (n - 1)), and the bound is the exact
  one-sided binomial one (scipy's), widened only by the skew correction:
  not at all with none accepted, 10% at 4 of 1,000, 1% at 37 of 5,000."""
  for k, n, wider in ((0, 300, 1e-9), (4, 1000, 0.11), (37, 5000, 0.015)):
    accepted = np.r_[np.ones(k), np.zeros(n - k)]
    bound, effect = thresholds.upper_bound(
        accepted, np.ones(n), np.arange(n)[:, None]
    )
    exact = (
        stats.binomtest(k, n, alternative="less")
        .proportion_ci(confidence_level=0.95, method="exact")
        .high
    )
    assert effect == pytest.approx(1.0, abs=n / (n - 1) - 1 + 1e-12)
    assert exact * (1 - 1e-9) <= bound <= exact * (1 + wider)


def _leave_each_out(scores, p, q, cosine):
  """The design effect by a plain loop: the rate without each person."""
  accepted = scores >= cosine
  rate = accepted.mean()
  people = np.unique(np.r_[p, q])
  rates = np.array([accepted[(p != i) & (q != i)].mean() for i in people])
  variance = (
      (len(people) - 1) / len(people) * np.sum((rates - rates.mean()) ** 2)
  )
  return max(1.0, variance / (rate * (1 - rate) / len(scores)))


def test_thresholds_over_people_are_the_lowest_whose_bound_holds():
  """Against a plain loop: the design effect is the jackknife's over
  people, the bound is at or below the FAR, and accepting the next
  impostor pair lifts it above; a person who looks like everyone widens
  it (a design effect well above 1)."""
  rng = np.random.default_rng(11)
  labels = np.repeat(np.arange(40), 5)
  first, second = np.triu_indices(len(labels), 1)
  impostor = labels[first] != labels[second]
  p, q = labels[first][impostor], labels[second][impostor]
  scores = rng.normal(0, 0.2, len(p)) + 0.4 * ((p < 2) | (q < 2))
  rows = thresholds.at_far(
      rng.normal(0.6, 0.1, 50), scores, impostor_people=(p, q)
  )
  assert [r["far"] for r in rows] == [1e-2, 1e-3]
  units = thresholds.units_of(p, q)
  unit, members = units.unit, units.members
  assert units.people == 40 and units.bounded
  descending = np.sort(scores)[::-1]
  for row in rows:
    accepted = int(np.sum(scores >= row["cosine"]))
    assert row["accepted"] == accepted and row["people"] == 40
    assert row["design_effect"] == pytest.approx(
        _leave_each_out(scores, p, q, row["cosine"]), rel=1e-9
    )
    assert row["design_effect"] > 2
    assert (
        row["accepted"] / row["impostors"] <= row["far_upper"] <= (row["far"])
    )
    if accepted < len(descending):  # one more pair accepted: too high
      lower = thresholds.cut_at(descending, accepted + 1)
      hits = np.bincount(unit, scores >= lower, len(members))
      bound, _ = thresholds.upper_bound(
          hits, np.bincount(unit, minlength=len(members)), members
      )
      assert bound > row["far"]


def test_too_few_people_state_a_point_estimate_without_a_bound():
  rng = np.random.default_rng(2)
  labels = np.repeat(np.arange(thresholds.MIN_PEOPLE - 1), 6)
  first, second = np.triu_indices(len(labels), 1)
  impostor = labels[first] != labels[second]
  scores = rng.normal(0, 0.2, impostor.sum())
  rows = thresholds.at_far(
      np.ones(3),
      scores,
      impostor_people=(labels[first][impostor], labels[second][impostor]),
  )
  alone = thresholds.at_far(np.ones(3), scores)
  assert [{**r, "people": None} for r in rows] == alone
  assert all(
      r["far_upper"] is None and r["people"] == len(set(labels)) for r in rows
  )


def test_roc_points_count_what_each_far_allows():
  rng = np.random.default_rng(3)
  genuine, impostor = rng.normal(0.5, 0.2, 400), rng.normal(0, 0.2, 5000)
  points = thresholds.roc_points(genuine, impostor)
  assert points[0][0] == pytest.approx(1 / 5000) and points[-1] == [1.0, 1.0]
  ordered = np.sort(impostor)[::-1]
  for far, tar in points[:-1]:
    cut = ordered[int(math.floor(far * 5000 + 1e-9))]
    assert np.sum(impostor > cut) <= far * 5000 + 1e-9
    assert tar == pytest.approx(np.mean(genuine > cut))
  assert np.all(np.diff([t for _, t in points]) >= 0)
