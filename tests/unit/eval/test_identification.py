"""Rank-k identification, TinyFace and SCface: brute-force oracles and readers
on small trees in the public layouts."""

import numpy as np
import pytest

from qgjt_jax.eval import identification
from qgjt_jax.eval import thresholds
from qgjt_jax.eval import scface
from qgjt_jax.eval import tinyface
from tests.helpers.eval_trees import (
    SIZE,
    embed_fn,
    scface_tree,
    stored_feature,
    tinyface_tree,
)

BATCH = 4


def brute_force_rank_k(probe, probe_labels, gallery, gallery_labels, ks):
  """Sort every probe's gallery by score; hit when a mate is in the top k."""
  scores = probe @ gallery.T
  hits = {k: [] for k in ks}
  for i, label in enumerate(probe_labels):
    if not np.any(gallery_labels == label):
      continue  # closed set: probes without a mate do not count
    order = np.argsort(-scores[i], kind='stable')
    for k in ks:
      hits[k].append(np.any(gallery_labels[order[:k]] == label))
  return {k: float(np.mean(v)) for k, v in hits.items()}


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_rank_k_matches_brute_force():
  rng = np.random.default_rng(0)
  gallery_labels = np.r_[np.arange(40), np.arange(10), np.full(200, -100)]
  centres = rng.normal(size=(60, 24))
  gallery = _unit(
      np.where(gallery_labels[:, None] >= 0, centres[gallery_labels % 60], 0)
      + 0.8 * rng.normal(size=(len(gallery_labels), 24))
  )
  probe_labels = rng.integers(0, 50, 300)  # ids 40..49 have no mate
  probe = _unit(centres[probe_labels] + 0.8 * rng.normal(size=(300, 24)))
  ks = (1, 2, 5, 20)
  got = identification.rank_k_accuracy(
      probe, probe_labels, gallery, gallery_labels, ks
  )
  want = brute_force_rank_k(probe, probe_labels, gallery, gallery_labels, ks)
  assert got == pytest.approx(want)
  assert 0.1 < got[1] < got[20] < 1.0  # a non-trivial case
  ranks = identification.probe_ranks(
      probe, probe_labels, gallery, gallery_labels, chunk_size=7
  )
  assert np.all((ranks == 0) == (probe_labels >= 40))


def test_rank_k_without_any_mate_is_an_error():
  with pytest.raises(ValueError, match='no probe has a mate'):
    identification.rank_k_accuracy(np.eye(2), [1, 2], np.eye(2), [3, 4])


# ---- Readers: tiny JPEGs whose 2x2 quadrant colours carry a 12-d feature.


# ---- TinyFace


def _tinyface_oracle(probes, matches, distractors, ks=(1, 5, 20)):
  label = lambda name: int(name.split('_')[0])
  p = np.stack([stored_feature(f) for f in probes.values()])
  g = np.stack(
      [stored_feature(f) for f in [*matches.values(), *distractors.values()]]
  )
  gl = np.r_[[label(n) for n in matches], np.full(len(distractors), -100)]
  pl = np.array([label(n) for n in probes])
  return brute_force_rank_k(p, pl, g, gl, ks)


def test_tinyface_public_layout(tmp_path):
  rng = np.random.default_rng(1)
  design = tinyface_tree(tmp_path / 'tinyface' / 'Testing_Set', rng)
  got = tinyface.evaluate_tinyface(
      embed_fn,
      tmp_path,
      batch_size=BATCH,
      flip=False,
      image_size=SIZE,
      progress=False,
  )
  want = _tinyface_oracle(*design)
  assert got['rank1'] == pytest.approx(want[1])
  assert got['rank5'] == pytest.approx(want[5])
  assert got['rank20'] == pytest.approx(want[20])
  assert got['rank1'] < 1.0  # at least the probe copied into the distractors
  assert (
      got['num_probes'],
      got['num_gallery_match'],
      got['num_distractors'],
  ) == (13, 6, 13)

  layout = tinyface.tinyface_layout(tmp_path / 'tinyface')  # root one level in
  assert sorted(set(layout.probe_labels)) == [1, 2, 3, 4, 5, 6, 9]
  assert np.sum(layout.gallery_labels == -100) == 13


def test_tinyface_reads_aligned_copies(tmp_path):
  rng = np.random.default_rng(2)
  # Raw protocol files hold one design, the aligned copies another.
  tinyface_tree(tmp_path / 'Testing_Set', rng)
  design = tinyface_tree(tmp_path / 'aligned', np.random.default_rng(3))
  got = tinyface.evaluate_tinyface(
      embed_fn,
      tmp_path,
      batch_size=BATCH,
      aligned_dir='aligned',
      flip=False,
      image_size=SIZE,
      progress=False,
  )
  want = _tinyface_oracle(*design)
  assert got['rank1'] == pytest.approx(want[1])
  assert got['rank5'] == pytest.approx(want[5])


def test_tinyface_missing_parts_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='Testing_Set'):
    tinyface.tinyface_layout(tmp_path)
  rng = np.random.default_rng(4)
  tinyface_tree(tmp_path / 'Testing_Set', rng)
  for p in (tmp_path / 'Testing_Set' / 'Gallery_Distractor').iterdir():
    p.unlink()
  (tmp_path / 'Testing_Set' / 'Gallery_Distractor').rmdir()
  with pytest.raises(FileNotFoundError, match='Gallery_Distractor'):
    tinyface.tinyface_layout(tmp_path)

  other = tmp_path / 'b'
  tinyface_tree(other / 'Testing_Set', rng)
  tinyface_tree(other / 'aligned', rng)
  (other / 'aligned' / 'Probe' / '2_1.jpg').unlink()
  with pytest.raises(FileNotFoundError, match='2_1.jpg has no aligned copy'):
    tinyface.tinyface_layout(other, aligned_dir='aligned')


# ---- SCface


def _scface_oracle(gallery, probes):
  label = lambda name: int(name.split('_')[0])
  g = np.stack([stored_feature(f) for f in gallery.values()])
  gl = np.array([label(n) for n in gallery])
  out = {}
  for d, files in probes.items():
    p = np.stack([stored_feature(f) for f in files.values()])
    pl = np.array([label(n) for n in files])
    out[d] = brute_force_rank_k(p, pl, g, gl, (1,))[1]
  return out


@pytest.mark.parametrize('with_listing', [True, False])
def test_scface_layouts(tmp_path, with_listing):
  rng = np.random.default_rng(5)
  gallery, probes = scface_tree(tmp_path / 'aligned', rng)
  if with_listing:
    # The reference's all.txt: name, then landmarks, tab-separated. Leave one
    # probe out of the list: it must then not be used.
    names = [p.stem for p in sorted((tmp_path / 'aligned').iterdir())]
    names.remove('002_cam1_1')
    del probes[1]['002_cam1_1']
    (tmp_path / 'all.txt').write_text(
        ''.join(f'{n}\t1.0\t2.0\n' for n in names)
    )
  got = scface.evaluate_scface(
      embed_fn,
      tmp_path,
      aligned_dir='aligned',
      batch_size=BATCH,
      flip=False,
      image_size=SIZE,
      progress=False,
  )
  want = _scface_oracle(gallery, probes)
  for d in (1, 2, 3):
    assert got[f'rank1_d{d}'] == pytest.approx(want[d]), d
    assert got[f'num_probes_d{d}'] == len(probes[d])  # cameras 6-8 left out
  assert got['num_gallery'] == 6
  assert got['rank1_d1'] < got['rank1_d3']


def test_scface_missing_parts_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='aligned'):
    scface.scface_layout(tmp_path, 'aligned')
  rng = np.random.default_rng(6)
  scface_tree(tmp_path / 'aligned', rng)
  (tmp_path / 'all.txt').write_text(
      '001_frontal\t0\n005_cam3_2\t0\n099_cam1_1\t0\n'
  )
  with pytest.raises(FileNotFoundError, match='099_cam1_1.jpg does not exist'):
    scface.scface_layout(tmp_path, 'aligned')


def _brute_force_open_set(feats, labels, fpir):
  """Each person left out in turn, galleries and mated templates built
  from scratch for every search."""
  people = sorted(set(labels))
  template = lambda rows: (
      feats[rows].sum(0) / np.linalg.norm(feats[rows].sum(0))
  )
  non_mated, mated_hit_scores = [], []
  for i, person in enumerate(labels):
    others = [
        template(np.flatnonzero(labels == q)) for q in people if q != person
    ]
    best_other = max(float(feats[i] @ t) for t in others)
    non_mated.append(best_other)
    own = np.flatnonzero((labels == person) & (np.arange(len(labels)) != i))
    if len(own):
      mate = float(feats[i] @ template(own))
      mated_hit_scores.append(mate if mate > best_other else -np.inf)
  non_mated = np.array(non_mated)
  allowed = int(np.floor(fpir * len(non_mated)))
  ordered = np.sort(non_mated)[::-1]
  cosine = np.nextafter(ordered[allowed], np.inf)
  pairs = [
      float(feats[i] @ template(np.flatnonzero(labels == q)))
      for i, person in enumerate(labels)
      for q in people
      if q != person
  ]
  return (
      cosine,
      int(np.sum(non_mated >= cosine)),
      float(np.mean(np.array(mated_hit_scores) >= cosine)),
      float(np.mean(np.array(pairs) >= cosine)),
  )


def test_open_set_calibration_against_brute_force():
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(12, 16))
  labels = np.repeat(np.arange(12), rng.integers(1, 9, 12))
  feats = centres[labels] + rng.normal(0, 0.9, (len(labels), 16))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  rows = identification.open_set_calibration(feats, labels, chunk_size=7)
  assert [r['fpir'] for r in rows] == [
      f for f in identification.FPIRS if len(labels) * f >= thresholds.PER_RATE
  ]
  for row in rows:
    # 12 people: a point estimate, with no bound.
    assert row['fpir_upper'] is None and row['people'] == 12
    cosine, alarms, tpir, match_rate = _brute_force_open_set(
        feats, labels, row['fpir']
    )
    assert row['cosine'] == pytest.approx(cosine, abs=1e-12)
    assert row['false_alarms'] == alarms <= row['fpir'] * len(labels)
    assert row['searches'] == len(labels) and row['gallery_people'] == 11
    assert row['tpir'] == pytest.approx(tpir)
    assert row['template_false_match_rate'] == pytest.approx(match_rate)
    assert row['mated_searches'] == int(np.sum(np.bincount(labels)[labels] > 1))


def test_open_set_calibration_too_small_for_any_rate():
  """3 people of 3 photos: 9 searches resolve no FPIR of the grid (was a
  numpy casting error when a calibration was that small)."""
  feats = np.random.default_rng(0).normal(size=(9, 8))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  assert max(identification.FPIRS) * 9 < thresholds.PER_RATE
  assert (
      identification.open_set_calibration(feats, np.repeat(np.arange(3), 3))
      == []
  )
