"""The error-versus-reject curve of a quality indicator."""
import numpy as np
import pytest

from qgjt_jax.eval import reject


def _pairs(informative: bool, seed=0):
  """1000 genuine and 1000 impostor pairs; genuine pairs of low planted
  quality score low (when `informative`)."""
  rng = np.random.default_rng(seed)
  quality = rng.uniform(0, 1, 2000)
  issame = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
  scores = np.where(issame, 0.05 + 0.5 * (quality if informative else
                                         rng.uniform(0, 1, 2000)),
                    rng.normal(0.0, 0.1, 2000))
  return scores, issame, quality


def test_the_curve_falls_when_quality_predicts_failure():
  out = reject.reject_curve(*_pairs(True))
  curve = np.array(out["reject_curve"])
  assert out["reject_far"] == 1e-3
  assert out["fnmr_reject_0"] > out["fnmr_reject_10"] > (
      out["fnmr_reject_20"]) > out["fnmr_reject_40"] >= 0
  assert np.all(np.diff(curve[:, 1]) <= 1e-12)  # never rises
  flat = reject.reject_curve(*_pairs(False))
  assert out["reject_auc"] < 0.7 * flat["reject_auc"]
  # Flat within sampling noise when quality says nothing.
  assert abs(flat["fnmr_reject_40"] - flat["fnmr_reject_0"]) < 0.05


def test_values_against_a_direct_count():
  scores, issame, quality = _pairs(True, seed=1)
  out = reject.reject_curve(scores, issame, quality)
  impostor = np.sort(scores[~issame])[::-1]
  threshold = np.nextafter(impostor[1], np.inf)  # FAR 1e-3 of 1000
  keep = quality >= np.sort(quality)[200]  # the worst 10% of 2000 dropped
  want = np.mean(scores[keep & issame] < threshold)
  assert out["fnmr_reject_10"] == pytest.approx(want)


def test_too_few_impostors_give_no_curve():
  assert reject.reject_curve(np.zeros(20), np.r_[np.ones(10, bool),
                                                 np.zeros(10, bool)],
                             np.zeros(20)) is None
