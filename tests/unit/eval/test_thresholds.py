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
  resolvable = [f for f in thresholds.FARS if impostors * f >= 1]
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
  emb[1::2][issame] = emb[0::2][issame] + rng.normal(0, 0.05, (issame.sum(),
                                                                16))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  metrics = verification.verification_metrics(emb, issame)
  assert metrics["best_threshold_cosine"] == pytest.approx(
      1 - metrics["best_threshold"] / 2)
  cosine = np.sum(emb[0::2] * emb[1::2], axis=1)
  want = thresholds.at_far(cosine[issame], cosine[~issame])
  assert [r["far"] for r in want] == [1e-2]
  for got, expected in zip(metrics["thresholds"], want, strict=True):
    assert got.keys() == expected.keys()
    for key in got:
      np.testing.assert_allclose(got[key], expected[key], rtol=1e-12)


def test_each_threshold_states_its_count_and_exact_interval():
  """The interval is Clopper-Pearson's, checked against scipy's own exact
  binomial interval, and covers the true rate as often as it says."""
  rng = np.random.default_rng(7)
  impostor = rng.normal(0.0, 0.2, 3000)
  for row in thresholds.at_far(rng.normal(0.5, 0.2, 100), impostor):
    k, n = row["accepted"], row["impostors"]
    assert k == np.sum(impostor >= row["cosine"]) and n == 3000
    exact = stats.binomtest(k, n).proportion_ci(confidence_level=0.95,
                                                method="exact")
    np.testing.assert_allclose(row["far_interval"], [exact.low, exact.high],
                               rtol=1e-9)
  assert thresholds.rate_interval(0, 100)[0] == 0.0
  assert thresholds.rate_interval(100, 100)[1] == 1.0
  # Coverage: 2,000 samples of 1,000 trials at a true rate of 0.004.
  counts = rng.binomial(1000, 0.004, 2000)
  covered = [lo <= 0.004 <= hi for lo, hi in
             (thresholds.rate_interval(int(k), 1000) for k in counts)]
  assert np.mean(covered) >= 0.95


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


def test_the_interval_over_people_resamples_people():
  """Against a plain loop over draws of people and over pairs; and when one
  person causes every false accept, draws without that person accept none,
  so the interval reaches 0 while the one over pairs does not."""
  rng = np.random.default_rng(11)
  labels = np.repeat(np.arange(9), 5)
  first, second = np.triu_indices(len(labels), 1)
  impostor = labels[first] != labels[second]
  p, q = labels[first][impostor], labels[second][impostor]
  scores = rng.normal(0, 0.2, len(p)) + 0.5 * ((p == 0) | (q == 0))
  genuine = rng.normal(0.6, 0.1, 50)
  rows = thresholds.at_far(genuine, scores, impostor_people=(p, q))
  draws = np.random.default_rng(0)
  for row in rows:
    rates = []
    for _ in range(500):
      counts = draws.multinomial(9, np.full(9, 1 / 9))
      weight = counts[p] * counts[q]
      rates.append(np.sum(weight * (scores >= row["cosine"])) /
                   np.sum(weight))
    draws = np.random.default_rng(0)  # each row sees the same draws
    np.testing.assert_allclose(row["far_interval_people"],
                               np.percentile(rates, [2.5, 97.5]), rtol=1e-9)
    assert row["far_interval"] == [
        min(row["far_interval_pairs"][0], row["far_interval_people"][0]),
        max(row["far_interval_pairs"][1], row["far_interval_people"][1])]
  culprit = rows[0]  # FAR 1e-2: its accepted pairs all involve person 0
  assert np.all(((p == 0) | (q == 0))[scores >= culprit["cosine"]])
  assert culprit["far_interval_people"][0] == 0.0
  assert culprit["far_interval_pairs"][0] > 0.0
