"""EDC and ERC of a quality indicator, each against a transcription of its
reference code on scores and qualities with ties."""

import math

import numpy as np
import pytest

from qgjt_jax.eval import reject


def _comparisons(seed: int, informative: bool = True, levels: int = 40):
  """600 genuine and 1400 impostor comparisons. Qualities and scores are
  rounded to a few levels, so both have many ties; genuine comparisons of
  low quality score low when `informative`."""
  rng = np.random.default_rng(seed)
  issame = rng.permutation(np.r_[np.ones(600, bool), np.zeros(1400, bool)])
  quality = np.round(rng.uniform(0, 1, issame.size) * levels) / levels
  genuine = 0.1 + 0.6 * (
      quality if informative else rng.uniform(0, 1, issame.size)
  )
  scores = np.where(
      issame,
      genuine + rng.normal(0, 0.05, issame.size),
      rng.normal(0.0, 0.12, issame.size),
  )
  return np.round(scores, 2), issame, quality


# Transcription of dasec quality-assessment-evaluation edc.py (compute_edc
# with starting_error, FNMR error type, pair quality min; compute_edc_pauc;
# compute_edc_area_under_theoretical_best), on genuine comparisons.
def _reference_edc(scores, quality, starting_error, limit):
  order = np.argsort(quality)
  quality, scores = quality[order], scores[order]
  threshold = np.quantile(scores, starting_error)
  counts = np.less(scores, threshold).astype(np.uint32)
  counts = np.flipud(np.cumsum(np.flipud(counts)))
  discard_counts = np.concatenate(
      ([0], np.where(quality[:-1] != quality[1:])[0] + 1)
  )
  errors = counts[discard_counts] / (len(scores) - discard_counts)
  discards = discard_counts / len(scores)
  if discards[-1] != 1:
    discards = np.concatenate((discards, [1]))
    errors = np.concatenate((errors, [0]))
  pauc = 0
  for i in range(len(discards)):
    if i == len(discards) - 1 or discards[i + 1] >= limit:
      pauc += errors[i] * (limit - discards[i])
      break
    pauc += errors[i] * (discards[i + 1] - discards[i])
  best = errors[0] ** 2 / 2
  if limit < errors[0]:
    best -= (errors[0] - limit) ** 2 / 2
  return discards, errors, pauc - best


# Transcription of CR-FIQA ERC/erc.py getFNMRFixedTH with ERC/roc.py
# (calculate_roc on dissimilarity scores, get_fmr_op), for one FMR.
# Its quality sort leaves ties in no stated order; both use ours
# (`reject.quality_order`, tested on its own below).
def _reference_erc(scores, issame, quality, fmr):
  dist = np.arccos(np.clip(scores, -1, 1)) / math.pi
  order = reject.quality_order(quality)
  shares = np.arange(0, 0.98, 0.05)
  fnmrs = []
  for share in shares:
    kept = order[int(share * len(order)) :]
    pos = np.sort(dist[kept][issame[kept] == 1])
    neg = np.sort(dist[kept][issame[kept] == 0])
    g, i = pos * -1, neg * -1
    stacked = sorted(
        list(zip(g, [1] * len(g))) + list(zip(i, [0] * len(i))),
        key=lambda row: row[0],
    )
    stacked = np.array(stacked)
    cumul = np.cumsum(stacked[:, 1])
    thrs, u_indices = np.unique(stacked[:, 0], return_index=True)
    fnm = cumul[u_indices] - stacked[u_indices][:, 1]
    fm = len(i) - (u_indices - fnm)
    index = np.argmin(abs(fm / len(i) - fmr))
    threshold = thrs[index] * -1
    fnmrs.append(1 - len([d for d in pos if d < threshold]) / len(pos))
  return shares, np.array(fnmrs), np.trapezoid(fnmrs, shares)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edc_matches_the_reference_code(seed):
  scores, issame, quality = _comparisons(seed)
  got = reject.edc(scores[issame], quality[issame])
  discards, errors, pauc = _reference_edc(
      scores[issame], quality[issame], reject.STARTING_ERROR, reject.PAUC_LIMIT
  )
  assert len(np.unique(quality[issame])) < issame.sum() / 5  # ties
  np.testing.assert_allclose(got["discard"], discards)
  np.testing.assert_allclose(got["fnmr"], errors)
  assert got["pauc"] == pytest.approx(pauc, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_erc_matches_the_reference_code(seed):
  scores, issame, quality = _comparisons(seed)
  got = reject.erc(scores, issame, quality, fmr=1e-2)
  shares, fnmrs, auc = _reference_erc(scores, issame, quality, 1e-2)
  np.testing.assert_allclose(got["shares"], shares)
  np.testing.assert_allclose(got["fnmr"], fnmrs, atol=1e-12)
  assert got["auc"] == pytest.approx(auc, abs=1e-12)
  # 1400 impostors resolve 1e-2 until fewer than 100 remain.
  kept_impostors = [
      np.sum(~issame[reject.quality_order(quality)][int(s * issame.size) :])
      for s in shares
  ]
  first = next(s for s, n in zip(shares, kept_impostors) if n < 100)
  assert got["unresolved_from"] == pytest.approx(first)


def test_the_conventions_disagree_and_results_name_theirs():
  """The two are different numbers of one indicator; the results carry
  both, each with its convention, and an informative norm beats a blind
  one under each."""
  good = reject.reject_metrics(*_comparisons(3))
  blind = reject.reject_metrics(*_comparisons(3, informative=False))
  assert good["edc_convention"].startswith("EDC: genuine comparisons")
  assert good["erc_convention"].startswith("ERC: all comparisons")
  assert good["edc_pauc"] < blind["edc_pauc"]
  assert good["erc_auc"] < blind["erc_auc"]
  assert good["edc_fnmr_discard_0"] == pytest.approx(good["edc_starting_error"])
  assert good["edc_fnmr_discard_0"] > good["edc_fnmr_discard_20"]
  assert good["edc_genuine"] == 600


def test_erc_auc_is_withheld_where_the_set_cannot_resolve_its_fmr():
  """Fewer impostors than 1 / ERC_FMR: the curve is kept (the reference
  draws it) but no area is stated for an FMR no point reached."""
  scores, issame, quality = _comparisons(3)
  impostors = np.flatnonzero(~issame)
  for count, withheld in ((999, True), (1000, False)):
    keep = np.concatenate([np.flatnonzero(issame), impostors[:count]])
    out = reject.reject_metrics(scores[keep], issame[keep], quality[keep])
    assert out["erc_impostors"] == count
    assert (out["erc_auc"] is None) == withheld, count
    assert (out["erc_unresolved_from"] == 0.0) == withheld
    assert len(out["erc_curve"]) == len(reject.ERC_SHARES)


def test_edc_discards_a_tied_quality_as_one_block():
  """Four comparisons, the first three of one quality: discarding the
  lowest quality takes all three at once, whatever their order."""
  scores = np.array([0.1, 0.9, 0.9, 0.9])
  quality = np.array([1.0, 1.0, 1.0, 2.0])
  out = reject.edc(scores, quality, starting_error=0.25)
  np.testing.assert_allclose(out["discard"], [0, 0.75, 1.0])
  np.testing.assert_allclose(out["fnmr"], [0.25, 0.0, 0.0])


def test_no_genuine_or_no_impostor_comparisons_give_no_curve():
  assert (
      reject.reject_metrics(np.zeros(5), np.zeros(5, bool), np.zeros(5)) == {}
  )
  assert reject.erc(np.zeros(5), np.ones(5, bool), np.zeros(5)) is None


def test_erc_ties_are_cut_without_favouring_the_sets_order():
  """One quality for all: genuine pairs listed first must not be the ones
  set aside first (they were, with a stable sort)."""
  quality = np.ones(2000)
  issame = np.arange(2000) < 1000
  order = reject.quality_order(quality)
  first = issame[order[:200]].mean()
  assert 0.4 < first < 0.6
  np.testing.assert_array_equal(order, reject.quality_order(quality))
  assert sorted(order) == list(range(2000))
  ranked = reject.quality_order(np.array([3.0, 1.0, 2.0, 1.0]))
  assert set(ranked[:2]) == {1, 3} and list(ranked[2:]) == [2, 0]
