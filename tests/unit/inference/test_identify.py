"""Gallery templates and the blocked top-5 search, against brute force."""

import csv
import io

import numpy as np
import pytest

from qgjt_jax import errors
from qgjt_jax.files import folders
from qgjt_jax.inference import identify


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_templates_are_weighted_means_brought_to_unit_length():
  rng = np.random.default_rng(0)
  emb = _unit(rng.normal(size=(7, 6)))
  owners = ["b", "a", "b", "c", "a", "a", "b"]
  weights = rng.uniform(0.1, 1, 7)
  names, feats = identify.templates(emb, weights, owners)
  assert names == ["a", "b", "c"]
  for name, feat in zip(names, feats):
    rows = [i for i, o in enumerate(owners) if o == name]
    want = (emb[rows] * weights[rows, None]).sum(axis=0)
    np.testing.assert_allclose(feat, want / np.linalg.norm(want), atol=1e-6)


@pytest.mark.parametrize("people", [3, 50])
def test_blocked_search_is_the_brute_force_ranking(people, monkeypatch):
  monkeypatch.setattr(identify, "_SCORES_PER_BLOCK", 64)  # many blocks
  rng = np.random.default_rng(people)
  gallery = _unit(rng.normal(size=(people, 8))).astype(np.float32)
  probes = _unit(rng.normal(size=(23, 8))).astype(np.float32)
  scores, indices = identify.search(probes, gallery)
  full = probes @ gallery.T
  k = min(5, people)
  assert scores.shape == indices.shape == (23, k)
  np.testing.assert_array_equal(indices, np.argsort(-full, axis=1)[:, :k])
  np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :k], atol=1e-6)


def test_the_csv_says_unknown_below_the_threshold():
  scores = np.array([[0.9, 0.2], [0.4, 0.3]])
  indices = np.array([[1, 0], [0, 1]])
  rows = list(
      csv.DictReader(
          io.StringIO(
              identify._csv(
                  ["p1.jpg", "p2.jpg"], ["ann", "bob"], scores, indices, 0.5
              )
          )
      )
  )
  assert [
      (r["probe"], r["decision"], r["identity1"], r["identity2"]) for r in rows
  ] == [("p1.jpg", "bob", "bob", "ann"), ("p2.jpg", "unknown", "ann", "bob")]


def test_a_gallery_photo_outside_a_person_folder_is_named(tmp_path):
  (tmp_path / "ann").mkdir()
  (tmp_path / "ann" / "1.jpg").write_bytes(b"x")
  (tmp_path / "stray.jpg").write_bytes(b"x")
  with pytest.raises(errors.UserError, match="stray.jpg is not in a person"):
    folders.read(str(tmp_path), "--gallery")
  (tmp_path / "stray.jpg").unlink()
  people = folders.read(str(tmp_path), "--gallery")
  assert people.names == ["ann"] and people.paths == [
      tmp_path / "ann" / "1.jpg"
  ]
