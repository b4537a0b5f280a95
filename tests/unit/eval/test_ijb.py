"""IJB-B/C 1:1: ROC and TAR@FAR against scikit-learn, template pooling against
the per-template loops of the insightface script, alignment, and the reader on
a small tree in the insightface layout."""

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc_curve

from qgjt_jax.align import five_points
from qgjt_jax.eval import ijb
from tests.helpers.eval_trees import embed_fn, ijb_tree, quadrant_features

BATCH = 4


def _scores_with_ties(rng, n, decimals=2):
  labels = rng.random(n) < 0.3
  scores = np.round(
      np.where(labels, 0.5, 0.0) + rng.normal(0, 0.3, n), decimals
  )
  return labels.astype(int), scores


@pytest.mark.parametrize('n,decimals', [(50, 1), (2000, 2), (20000, 4)])
def test_roc_curve_is_sklearns(n, decimals):
  labels, scores = _scores_with_ties(np.random.default_rng(n), n, decimals)
  fpr, tpr, thresholds = ijb.roc_curve(labels, scores)
  want_fpr, want_tpr, want_thr = sk_roc_curve(labels, scores)
  np.testing.assert_allclose(fpr, want_fpr)
  np.testing.assert_allclose(tpr, want_tpr)
  np.testing.assert_allclose(thresholds[1:], want_thr[1:])
  assert np.isinf(thresholds[0])


def _insightface_tar(labels, scores, targets):
  """roc_curve, flip, then the first nearest FPR (the 1:1 table rule)."""
  fpr, tpr, _ = sk_roc_curve(labels, scores)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  out = {}
  for target in targets:
    _, index = min(zip(abs(fpr - target), range(len(fpr))))
    out[target] = tpr[index]
  return out


@pytest.mark.parametrize('n,decimals', [(300, 1), (20000, 3), (50000, 6)])
def test_tar_at_far_matches_the_insightface_table(n, decimals):
  labels, scores = _scores_with_ties(np.random.default_rng(n + 1), n, decimals)
  targets = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3)
  got = ijb.tar_at_far(labels, scores, targets)
  want = _insightface_tar(labels, scores, targets)
  assert got == pytest.approx(want)
  assert len(set(got.values())) > 2  # not a degenerate curve


def _loop_template_features(feats, templates, medias):
  """Per template: mean of each media's images, summed, then normalised."""
  out = {}
  for t in np.unique(templates):
    in_t = templates == t
    media_means = [
        feats[in_t & (medias == m)].mean(axis=0)
        for m in np.unique(medias[in_t])
    ]
    v = np.sum(media_means, axis=0)
    out[t] = v / np.linalg.norm(v)
  return out


def test_template_pooling_and_pair_scores_match_loops():
  rng = np.random.default_rng(0)
  n = 500
  templates = rng.choice([3, 8, 11, 40, 41, 77, 1000], n)
  medias = rng.integers(0, 6, n) + 10 * (rng.random(n) < 0.5)
  # A media id may appear under several templates (as in IJB).
  feats = rng.normal(size=(n, 9))
  unique, pooled = ijb.template_features(feats, templates, medias)
  want = _loop_template_features(feats, templates, medias)
  np.testing.assert_array_equal(unique, sorted(want))
  for i, t in enumerate(unique):
    np.testing.assert_allclose(pooled[i], want[t], rtol=1e-6, atol=1e-12)

  pairs = rng.choice(unique, (333, 2))
  scores = ijb.pair_scores(unique, pooled, pairs, block_size=2)
  np.testing.assert_allclose(
      scores, [want[a] @ want[b] for a, b in pairs], rtol=1e-5, atol=1e-6
  )
  with pytest.raises(ValueError, match='template ids without images'):
    ijb.pair_scores(unique, pooled, np.array([[3, 5]]))


def _umeyama(src, dst):
  """Umeyama's closed form (rotation, scale, shift), via an SVD."""
  mu_s, mu_d = src.mean(0), dst.mean(0)
  s, d = src - mu_s, dst - mu_d
  u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
  sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
  rotation = u @ sign @ vt
  scale = np.trace(np.diag(sigma) @ sign) / (s**2).sum(1).mean()
  matrix = np.zeros((2, 3))
  matrix[:, :2] = scale * rotation
  matrix[:, 2] = mu_d - scale * rotation @ mu_s
  return matrix


def test_similarity_transform():
  rng = np.random.default_rng(0)
  angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
  rot = scale * np.array(
      [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
  )
  src = rng.uniform(0, 100, (5, 2))
  got = five_points.similarity_transform(src, src @ rot.T + shift)
  np.testing.assert_allclose(got, np.c_[rot, shift], atol=1e-9)
  for _ in range(5):  # noisy landmarks: least squares == Umeyama
    src = rng.uniform(0, 150, (5, 2))
    dst = five_points.TEMPLATE_112 + rng.normal(0, 4, (5, 2))
    np.testing.assert_allclose(
        five_points.similarity_transform(src, dst),
        _umeyama(src, dst),
        atol=1e-8,
    )


def test_align_face_puts_landmarks_on_the_template():
  landmarks = five_points.TEMPLATE_112 * 1.4 + np.array([20.0, 9.0])
  image = np.zeros((200, 200, 3), np.uint8)
  for k, (x, y) in enumerate(landmarks):
    cv2.circle(
        image, (int(round(x)), int(round(y))), 4, (40 * k + 50, 255, 0), -1
    )
  aligned = five_points.align_face(image, landmarks)
  assert aligned.shape == (112, 112, 3)
  for k, (x, y) in enumerate(five_points.TEMPLATE_112):
    pixel = aligned[int(round(y)), int(round(x))]
    assert abs(int(pixel[0]) - (40 * k + 50)) <= 6 and pixel[1] > 200, k


# ---- The reader on a small tree in the insightface layout.


def _oracle(rows, pairs, use_detector_score):
  """Aligned by the exact 2x scaling, flip-summed pre-norm features, the
  template loops, cosine, the insightface TAR table."""
  feats = []
  for path, _, _, score in rows:
    aligned = cv2.warpAffine(
        cv2.imread(str(path)), np.array([[2.0, 0, 0], [0, 2.0, 0]]), (112, 112)
    )
    both = np.stack([aligned, aligned[:, ::-1]])
    f = quadrant_features(both).sum(0)  # n1 e1 + n2 e2
    feats.append(f * score if use_detector_score else f)
  feats = np.array(feats)
  pooled = _loop_template_features(
      feats, np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
  )
  scores = [pooled[a] @ pooled[b] for a, b, _ in pairs]
  return _insightface_tar([l for *_, l in pairs], scores, ijb.FAR_TARGETS)


@pytest.mark.parametrize('use_detector_score', [False, True])
def test_evaluate_ijb_on_the_insightface_layout(tmp_path, use_detector_score):
  rows, pairs = ijb_tree(tmp_path)
  got = ijb.evaluate_ijb(
      embed_fn,
      tmp_path,
      subset='IJBC',
      batch_size=BATCH,
      use_detector_score=use_detector_score,
      progress=False,
  )
  want = _oracle(rows, pairs, use_detector_score)
  for far, tar in want.items():
    assert got[ijb.far_key(far)] == pytest.approx(tar), far
  assert got['num_templates'] == 8 and got['num_pairs'] == 28
  assert 0 < got['tar@far=1e-01'] < 1  # neither trivial nor perfect
  assert got['detector_score_weighting'] is use_detector_score
  assert set(got['identification_conventions']) == {
      '1n_insightface_',
      '1n_nist_',
  }
  assert got['1n_nist_G1_mated_searches'] == 2  # subjects 0 and 1
  assert got['1n_nist_G2_non_mated_searches'] == 2


def test_ijb_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='IJBB'):
    ijb.ijb_layout(tmp_path, 'IJBB')
  ijb_tree(tmp_path)
  meta = tmp_path / 'IJBC' / 'meta'
  pair_file = meta / 'ijbc_template_pair_label.txt'
  saved = pair_file.read_text()
  pair_file.unlink()
  with pytest.raises(FileNotFoundError, match='ijbc_template_pair_label.txt'):
    ijb.ijb_layout(tmp_path, 'IJBC')
  pair_file.write_text(saved)

  tid_mid = meta / 'ijbc_face_tid_mid.txt'
  lines = tid_mid.read_text().splitlines()
  tid_mid.write_text('\n'.join([lines[1], lines[0]] + lines[2:]) + '\n')
  with pytest.raises(ValueError, match='line 1'):
    ijb.ijb_layout(tmp_path, 'IJBC')
  tid_mid.write_text('\n'.join(lines[:-1]) + '\n')
  with pytest.raises(ValueError, match='lists'):
    ijb.ijb_layout(tmp_path, 'IJBC')
  with pytest.raises(ValueError, match='subset'):
    ijb.ijb_layout(tmp_path, 'IJBA')


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_both_tar_rules_against_their_transcriptions(seed):
  """insightface reads scikit-learn's ROC flipped, the authors' in-training
  path unflipped; each takes min((|fpr - far|, index)). Scores rounded to
  make many points share an FPR."""
  rng = np.random.default_rng(seed)
  labels = np.r_[np.ones(300), np.zeros(20000)]
  scores = np.round(
      np.r_[rng.normal(0.5, 0.2, 300), rng.normal(0, 0.15, 20000)], 2
  )
  fpr, tpr, _ = sk_roc_curve(labels, scores)

  def pick(f, t, far):
    _, index = min(zip(np.abs(f - far), range(len(f))))
    return float(t[index])

  fars = (1e-4, 1e-3, 1e-2, 1e-1)
  insightface = ijb.tar_at_far(labels, scores, fars)
  authors = ijb.tar_at_far(labels, scores, fars, rule='authors')
  for far in fars:
    assert insightface[far] == pick(fpr[::-1], tpr[::-1], far)
    assert authors[far] == pick(fpr, tpr, far)
    assert authors[far] <= insightface[far]
  if seed == 0:  # these scores tie where it matters: the rules differ
    assert any(authors[f] < insightface[f] for f in fars)


def _their_identification(probe_feats, gallery_feats, mask):
  """insightface's ijb_1n.py `evaluation`, transcribed: top-k by argsort,
  TPIR at FPIR from the ceil(P f)-th largest non-mate similarity."""
  import heapq
  import math

  similarity = np.dot(probe_feats, gallery_feats.T)
  top_inds = np.argsort(-similarity)
  query_num = probe_feats.shape[0]
  out = {}
  for k in (1, 5, 10):
    out[f'1n_rank{k}'] = (
        sum(mask[i] in top_inds[i, 0:k] for i in range(query_num)) / query_num
    )
  fars = [0.01, 0.1]
  required_topk = [math.ceil(query_num * x) for x in fars]
  top_sims = similarity.copy()
  pos_sims = []
  for i in range(query_num):
    pos_sims.append(top_sims[i, mask[i]])
    top_sims[i, mask[i]] = -2.0
  neg_sims = heapq.nlargest(
      max(required_topk), top_sims[np.where(top_sims > -2.0)]
  )
  for far, pos in zip(fars, required_topk):
    out[f'1n_tpir@fpir={far:.0e}'] = (
        np.sum(np.array(pos_sims) > neg_sims[pos - 1]) / query_num
    )
  return out


@pytest.mark.parametrize('seed', [0, 1])
def test_1n_identification_against_their_code(tmp_path, seed):
  ijb_tree(tmp_path)
  layout = ijb.ijb_layout(tmp_path, 'IJBC')
  files = ijb.identification_files(tmp_path, 'IJBC')
  feats = np.random.default_rng(seed).normal(size=(len(layout.templates), 12))
  got = ijb.identification_metrics(
      feats, layout.templates, layout.medias, files
  )
  unique, template_feats = ijb.template_features(
      feats, layout.templates, layout.medias
  )
  row = {t: i for i, t in enumerate(unique)}
  gallery = template_feats[[row[t] for t in (1, 11, 21, 31)]]
  probes = template_feats[[row[t] for t in (2, 12, 22, 32)]]
  want = _their_identification(probes, gallery, [0, 1, 2, 3])
  assert got['num_probes'] == 4 and got['num_gallery'] == 4
  for key, value in want.items():
    key = key.replace('1n_', '1n_insightface_')
    assert got[key] == pytest.approx(value), key


@pytest.mark.parametrize('block', [7, 4096])
def test_1n_insightface_in_probe_blocks_against_their_code(monkeypatch, block):
  """90 probes of 40 gallery subjects, scored 7 at a time (and at once):
  the ranks and the largest non-mate similarities that the thresholds read
  are those of the whole matrix."""
  monkeypatch.setattr(ijb, 'PROBE_BLOCK', block)
  rng = np.random.default_rng(3)
  gallery = rng.normal(size=(40, 8))
  mask = rng.integers(0, 40, 90)
  probes = gallery[mask] + rng.normal(0, 1.5, (90, 8))
  got = ijb.insightface_identification(gallery, np.arange(40), probes, mask)
  want = _their_identification(probes, gallery, mask)
  assert 0 < want['1n_rank1'] < 1
  for key, value in want.items():
    assert got[key.replace('1n_', '1n_insightface_')] == pytest.approx(
        value
    ), key


def _nist_by_definition(probes, probe_ids, gallery, gallery_ids, fpir):
  """NIST's open-set search read off its definition, one search at a time:
  (rank-1 share of mated searches, TPIR, false alarms) at the loosest
  threshold among the scores that keeps false alarms <= floor(fpir N)."""
  mated_hits, best_non_mated = [], []
  for feat, subject in zip(probes, probe_ids):
    scores = gallery @ feat
    if subject in gallery_ids:
      mate = max(s for s, i in zip(scores, gallery_ids) if i == subject)
      others = [s for s, i in zip(scores, gallery_ids) if i != subject]
      mated_hits.append(mate if all(mate > o for o in others) else None)
    else:
      best_non_mated.append(max(scores))
  allowed = int(np.floor(fpir * len(best_non_mated)))
  # Accepting a score s can only start just above another search's best.
  candidates = {np.nextafter(b, np.inf) for b in best_non_mated} | {-np.inf}
  threshold = min(
      c for c in candidates if sum(b >= c for b in best_non_mated) <= allowed
  )
  tpir = np.mean([h is not None and h >= threshold for h in mated_hits])
  rank1 = np.mean([h is not None for h in mated_hits])
  return rank1, tpir, sum(b >= threshold for b in best_non_mated)


@pytest.mark.parametrize('seed, block', [(0, 4096), (1, 7)])
def test_nist_identification_against_its_definition(monkeypatch, seed, block):
  """Two gallery sets of 30 subjects each, 200 probes of 80 subjects (20
  in neither set); features in halves, so scores are exact and tie. Once
  with the probes scored 7 at a time."""
  monkeypatch.setattr(ijb, 'PROBE_BLOCK', block)
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(80, 6))
  probe_ids = rng.integers(0, 80, 200)
  probes = np.round(2 * (centres[probe_ids] + rng.normal(0, 0.8, (200, 6))))
  probes /= 2
  galleries = []
  for name, ids in (('G1', np.arange(30)), ('G2', np.arange(30, 60))):
    galleries.append(
        (
            name,
            np.round(2 * (centres[ids] + rng.normal(0, 0.5, (30, 6)))) / 2,
            ids,
        )
    )
  got = ijb.nist_identification(galleries, probes, probe_ids)
  for name, gallery, ids in galleries:
    for fpir in ijb.TPIR_FPIRS:
      rank1, tpir, alarms = _nist_by_definition(
          probes, probe_ids, gallery, ids, fpir
      )
      key = f'1n_nist_{name}_'
      assert got[f'{key}rank1'] == pytest.approx(rank1)
      assert got[f'{key}tpir@fpir={fpir:.0e}'] == pytest.approx(tpir)
      searches = got[f'{key}non_mated_searches']
      assert got[f'{key}fpir_measured@fpir={fpir:.0e}'] == pytest.approx(
          alarms / searches
      )
  assert got['1n_nist_tpir@fpir=1e-01'] == pytest.approx(
      np.mean(
          [got['1n_nist_G1_tpir@fpir=1e-01'], got['1n_nist_G2_tpir@fpir=1e-01']]
      )
  )
  # The mean is there exactly when both sets resolve the rate.
  resolved = [
      got[f'1n_nist_{n}_non_mated_searches'] * 0.01 >= 1 for n in ('G1', 'G2')
  ]
  assert ('1n_nist_tpir@fpir=1e-02' in got) == all(resolved)
