"""Tests of the generated face-like dataset (qgjt_jax.data.synthetic)."""

import pickle

import cv2
import numpy as np
import pytest

from qgjt_jax.data import synthetic

IDS, PER, SIZE = 10, 6, 32


def _decode(data):
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def faces():
  """(images (N, S, S, 3) float32, labels) of a small generated set."""
  src = synthetic.SyntheticFaces(IDS, PER, SIZE, seed=0)
  images = np.stack([_decode(src[i]["image"]) for i in range(len(src))])
  labels = np.array([src[i]["label"] for i in range(len(src))])
  return images.astype(np.float32), labels


def _leave_one_out_nn_accuracy(features, labels):
  d = ((features[:, None] - features[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return float((labels[d.argmin(1)] == labels).mean())


def test_records_follow_the_source_contract():
  src = synthetic.SyntheticFaces(3, 4, SIZE, seed=0)
  assert len(src) == 12 and src.num_classes == 3 and isinstance(src.name, str)
  rec = src[5]
  assert set(rec) == {"image", "label"}
  assert isinstance(rec["image"], bytes)
  assert rec["label"].dtype == np.int32 and rec["label"] == 1
  img = _decode(rec["image"])
  assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
  with pytest.raises(IndexError):
    src[12]


def test_generation_is_deterministic_and_seeded():
  a = synthetic.SyntheticFaces(4, 3, SIZE, seed=0)
  b = synthetic.SyntheticFaces(4, 3, SIZE, seed=0, cache=True)
  c = synthetic.SyntheticFaces(4, 3, SIZE, seed=1)
  for i in (0, 7, 11):
    assert a[i]["image"] == b[i]["image"] == b[i]["image"]
    assert a[i]["image"] != c[i]["image"]
  clone = pickle.loads(pickle.dumps(b))
  assert clone[7]["image"] == a[7]["image"]


def test_image_size_is_honoured():
  src = synthetic.SyntheticFaces(2, 2, 112, seed=0)
  assert _decode(src[3]["image"]).shape == (112, 112, 3)


def test_identities_are_distinct():
  idents = [synthetic.make_identity(0, i) for i in range(20)]
  skins = np.array([p.skin for p in idents])
  geometry = np.array([p.face_axes + (p.eye_dx, p.eye_y) for p in idents])
  assert len({tuple(s) for s in skins}) == 20
  assert len({tuple(g) for g in geometry}) == 20


def test_heldout_identities_are_not_training_identities():
  train = [synthetic.make_identity(0, i) for i in range(50)]
  heldout = [synthetic.make_identity(0, i, heldout=True) for i in range(50)]
  train_keys = {(p.skin, p.face_axes, p.eye_dx) for p in train}
  assert not train_keys & {(p.skin, p.face_axes, p.eye_dx) for p in heldout}


def test_same_identity_images_vary(faces):
  images, labels = faces
  centre = images[:, 8:-8, 8:-8].reshape(len(images), -1)
  rms = np.sqrt(((centre[:, None] - centre[None]) ** 2).mean(-1))
  same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
  different = labels[:, None] != labels[None]
  # Photos of one person differ by tens of gray levels (pose, light, noise)...
  assert rms[same].mean() > 20
  # ...and are still closer than photos of two people.
  assert rms[same].mean() < rms[different].mean()


def test_identity_is_not_in_the_mean_colour(faces):
  images, labels = faces
  chance = 1 / IDS
  by_colour = _leave_one_out_nn_accuracy(images.mean((1, 2)), labels)
  assert by_colour < 3 * chance
  # The faces themselves carry the identity: raw centre pixels already find
  # the right person far more often than chance.
  centre = images[:, 8:-8, 8:-8].reshape(len(images), -1)
  assert _leave_one_out_nn_accuracy(centre, labels) > 3 * chance


def test_verification_sets():
  sets = synthetic.synthetic_verification_sets(6, 10, SIZE, seed=0)
  assert set(sets) == {"hq_hq", "hq_lq", "lq_lq"}
  hq, same = sets["hq_hq"]
  hq_lq, same2 = sets["hq_lq"]
  lq, same3 = sets["lq_lq"]
  for images in (hq, hq_lq, lq):
    assert images.shape == (20, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert same.dtype == bool and same.sum() == 5
  assert np.array_equal(same, same2) and np.array_equal(same, same3)
  # hq_lq pairs an HQ first image with an LQ second image.
  assert np.array_equal(hq_lq[0::2], hq[0::2])
  assert np.array_equal(hq_lq[1::2], lq[1::2])
  assert not np.array_equal(lq, hq)
  again = synthetic.synthetic_verification_sets(6, 10, SIZE, seed=0)
  assert np.array_equal(again["lq_lq"][0], lq)


def test_verification_pairs_are_not_trivial():
  images, same = synthetic.synthetic_verification_sets(8, 40, SIZE, seed=1)[
      "hq_hq"
  ]
  f = images.astype(np.float32)
  # No pair is the same picture twice.
  d = np.abs(f[0::2] - f[1::2]).mean(axis=(1, 2, 3))
  assert d.min() > 5
  # Mean colour does not tell positives from negatives: the two groups'
  # colour distances overlap.
  c = np.abs(f[0::2].mean((1, 2)) - f[1::2].mean((1, 2))).sum(-1)
  assert c[same].max() > np.median(c[~same])


def test_nuisance_scales_the_variation_within_an_identity():
  def centre_spread(nuisance):
    src = synthetic.SyntheticFaces(3, 5, SIZE, seed=0, nuisance=nuisance)
    x = (
        np.stack([_decode(src[i]["image"]) for i in range(15)])
        .astype(np.float32)[:, 10:-10, 10:-10]
        .reshape(3, 5, -1)
    )
    return float(np.abs(x - x.mean(1, keepdims=True)).mean())

  calm, default = centre_spread(0.0), centre_spread(1.0)
  assert calm < 0.5 * default
