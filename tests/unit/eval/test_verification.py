"""10-fold verification accuracy against a loop-by-loop KFold oracle."""

import numpy as np
from PIL import Image
import pytest
from sklearn.model_selection import KFold

from qgjt_jax.eval import bin_sets
from qgjt_jax.eval import extract
from qgjt_jax.eval import verification

THRESHOLDS = np.arange(0, 4, 0.01)


def _pairs(num_pairs, dim=16, seed=0, noise=0.9):
  """Unit embeddings, rows 2i/2i+1 of the same identity when issame[i]."""
  rng = np.random.default_rng(seed)
  issame = rng.random(num_pairs) < 0.5
  first = rng.normal(size=(num_pairs, dim))
  other = rng.normal(size=(num_pairs, dim))
  second = np.where(issame[:, None], first + noise * other, other)
  emb = np.empty((2 * num_pairs, dim))
  emb[0::2], emb[1::2] = first, second
  return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


def _oracle(emb, issame, nfolds):
  """The protocol written as plain loops over sklearn's folds."""
  dist = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
  accs, thresholds = [], []
  for train, test in KFold(n_splits=nfolds, shuffle=False).split(dist):
    best_acc, best_t = -1.0, None
    for t in THRESHOLDS:
      acc = np.mean((dist[train] < t) == issame[train])
      if acc > best_acc:  # strictly greater: the first best threshold wins
        best_acc, best_t = acc, t
    thresholds.append(best_t)
    accs.append(np.mean((dist[test] < best_t) == issame[test]))
  return np.array(accs), np.array(thresholds)


@pytest.mark.parametrize(
    'num_pairs,nfolds,noise', [(103, 10, 0.9), (60, 10, 1.5), (37, 5, 0.6)]
)
def test_matches_kfold_oracle(num_pairs, nfolds, noise):
  emb, issame = _pairs(num_pairs, noise=noise, seed=num_pairs)
  got = verification.verification_metrics(emb, issame, nfolds=nfolds)
  accs, thresholds = _oracle(emb, issame, nfolds)
  np.testing.assert_allclose(got['fold_accuracies'], accs)
  np.testing.assert_allclose(got['fold_thresholds'], thresholds)
  assert got['accuracy_mean'] == pytest.approx(accs.mean())
  assert got['accuracy_std'] == pytest.approx(accs.std())
  assert got['best_threshold'] == pytest.approx(thresholds.mean())
  assert got['num_pairs'] == num_pairs
  assert 0.5 < got['accuracy_mean'] < 1.0  # neither trivial nor perfect


def test_fold_bounds_are_sklearn_kfold():
  for num, nfolds in [(103, 10), (6000, 10), (12, 10), (10, 10)]:
    want = [
        (t[0], t[-1] + 1)
        for _, t in KFold(n_splits=nfolds).split(np.arange(num))
    ]
    assert verification.fold_bounds(num, nfolds) == want


def test_perfect_separation_and_input_errors():
  emb, issame = _pairs(50, noise=0.0)
  assert verification.verification_metrics(emb, issame)['accuracy_mean'] == 1
  with pytest.raises(ValueError, match='issame'):
    verification.verification_metrics(emb, issame[:-1])
  with pytest.raises(ValueError, match=r'\(2P, D\)'):
    verification.verification_metrics(emb[:-1], issame)


def test_low_resolution_degrades_only_the_first_image_of_each_pair():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
  before = images.copy()
  out = verification.degrade_first_of_pairs(images, 12)
  np.testing.assert_array_equal(images, before)  # input left untouched
  np.testing.assert_array_equal(out[1::2], images[1::2])
  for i in (0, 2, 4):
    small = Image.fromarray(images[i]).resize((12, 12), Image.BILINEAR)
    want = np.asarray(small.resize((112, 112), Image.BILINEAR))
    np.testing.assert_array_equal(out[i], want)
  assert not np.array_equal(out[0], images[0])


def _pixel_model(batch_size):
  """A fixed projection of 8x8 average-pooled pixels."""
  proj = np.random.default_rng(0).normal(size=(8 * 8 * 3, 32))
  seen = []

  def embed_fn(images):
    assert len(images) == batch_size
    seen.append(images.copy())
    pooled = images.reshape(len(images), 8, 14, 8, 14, 3).mean(axis=(2, 4))
    v = pooled.reshape(len(images), -1) @ proj
    n = np.linalg.norm(v, axis=1)
    return v / n[:, None], n

  return embed_fn, seen


def test_evaluate_bin_on_the_lfw_fixture(insightface_rec_dir):
  path = insightface_rec_dir / 'lfw.bin'
  embed_fn, seen = _pixel_model(16)
  got = verification.evaluate_bin(embed_fn, path, batch_size=16, progress=False)
  assert got['num_pairs'] == 40 and got['low_res'] is None
  assert len(got['fold_accuracies']) == 10
  assert 0.0 <= got['accuracy_mean'] <= 1.0 and got['mean_norm'] > 0
  assert sum(len(b) for b in seen) == 2 * 80  # 80 images and their mirrors

  # The same numbers from the pieces, composed by hand.
  encoded, issame = bin_sets.load_bin(path)
  images = bin_sets.decode_bin_images(encoded)
  embed_fn2, _ = _pixel_model(16)
  feats = extract.extract_embeddings(
      embed_fn2, images, batch_size=16, fusion='pre_norm_add', progress=False
  )
  want = verification.verification_metrics(feats, issame)
  assert got['fold_accuracies'] == want['fold_accuracies']

  embed_fn3, seen3 = _pixel_model(16)
  low = verification.evaluate_bin(
      embed_fn3, path, batch_size=16, low_res=8, progress=False
  )
  assert low['low_res'] == 8
  first_batch = seen3[0]  # images 0..15, unflipped
  np.testing.assert_array_equal(first_batch[1::2], images[1:16:2])
  np.testing.assert_array_equal(
      first_batch[0::2],
      verification.degrade_first_of_pairs(images[:16], 8)[0::2],
  )
