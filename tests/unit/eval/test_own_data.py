"""Evaluation on a user's own folders and pairs files, against independent
computations (scikit-learn's ROC, a brute-force rank)."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from qgjt_jax.eval import own_data
from qgjt_jax.files import folders
from tests.helpers import eval_trees


def _folder(root, people=6, per_person=4, seed=0):
  rng = np.random.default_rng(seed)
  for p in range(people):
    centre = eval_trees.feature(rng)
    for i in range(per_person if p else 1):  # one person has one image
      eval_trees.write_jpeg(
          root / f"person{p}" / f"{i}.jpg",
          eval_trees.feature(rng, centre, noise=25.0),
      )
  return root


def _tar(labels, scores, far):
  """scikit-learn's ROC, the nearest point to `far`, largest TPR on ties."""
  fpr, tpr, _ = roc_curve(labels, scores)
  gap = np.abs(fpr - far)
  return float(tpr[gap == gap.min()].max())


def test_a_folder_scores_as_brute_force(tmp_path):
  root = _folder(tmp_path / "people")
  got = own_data.evaluate_folder(
      eval_trees.embed_fn,
      str(root),
      batch_size=8,
      image_size=eval_trees.SIZE,
      fusion=None,
      progress=False,
  )[""]
  people = folders.read(root, "config.eval.folders", min_people=2)
  paths, labels = people.paths, people.labels
  feats = np.stack([eval_trees.stored_feature(p) for p in paths])
  pairs = list(itertools.combinations(range(len(paths)), 2))
  same = np.array([labels[a] == labels[b] for a, b in pairs])
  scores = np.array([feats[a] @ feats[b] for a, b in pairs])
  assert got["genuine_pairs"] == same.sum() == 5 * 6
  assert got["impostor_pairs"] == (~same).sum()
  assert got["tar@far=1e-01"] == pytest.approx(
      _tar(same, scores, 0.1), abs=1e-12
  )
  ranks = _ranks_by_definition(feats, labels)
  assert len(ranks) == 20  # the single-image person is no probe
  assert got["rank1"] == pytest.approx(np.mean(np.array(ranks) <= 1))
  assert got["rank5"] == pytest.approx(np.mean(np.array(ranks) <= 5))
  assert 0 <= got["accuracy_mean"] <= 1 and got["num_people"] == 6
  assert got["duplicate_files"] == {
      "groups": 0,
      "across_people": 0,
      "examples": [],
  }


def test_low_resolution_scores_the_shrunk_first_face_of_each_pair(tmp_path):
  """folder@8px: every pair (i < j) scores image i shrunk to 8 px and
  enlarged back against image j as it is."""
  from qgjt_jax.eval import verification  # pylint: disable=g-import-not-at-top
  from qgjt_jax.files import images  # pylint: disable=g-import-not-at-top

  root = _folder(tmp_path / "people", people=6, per_person=5)
  got = own_data.evaluate_folder(
      eval_trees.embed_fn,
      str(root),
      batch_size=8,
      image_size=eval_trees.SIZE,
      fusion=None,
      progress=False,
      low_res=(8,),
  )
  assert sorted(got) == ["", "@8px"]
  low = got["@8px"]
  people = folders.read(root, "config.eval.folders", min_people=2)
  crops = [images.read_image(p, eval_trees.SIZE) for p in people.paths]
  clean, clean_norms = eval_trees.embed_fn(np.stack(crops))
  shrunk, shrunk_norms = eval_trees.embed_fn(
      np.stack([verification.shrink(c, 8) for c in crops])
  )
  pairs = list(itertools.combinations(range(len(crops)), 2))
  same = np.array([people.labels[a] == people.labels[b] for a, b in pairs])
  scores = np.array([shrunk[a] @ clean[b] for a, b in pairs])
  assert low["tar@far=1e-01"] == pytest.approx(
      _tar(same, scores, 0.1), abs=1e-12
  )
  assert low["low_res"] == 8 and "accuracy_mean" in low
  # Verification only: searches of shrunk faces are not what it measures.
  assert "open_set" not in low and "rank1" not in low
  assert low["mean_norm"] == pytest.approx(np.mean(shrunk_norms))
  assert low["mean_norm_clean"] == pytest.approx(np.mean(clean_norms))
  assert low["mean_norm"] != pytest.approx(low["mean_norm_clean"])


def _ranks_by_definition(feats, labels):
  """{image: rank} of each image with a mate: 1 + the other people's
  images scoring at least its best mate (ties against the probe)."""
  ranks = {}
  for i in range(len(labels)):
    others = [j for j in range(len(labels)) if j != i]
    mates = [feats[i] @ feats[j] for j in others if labels[j] == labels[i]]
    if mates:
      ranks[i] = 1 + sum(
          feats[i] @ feats[j] >= max(mates)
          for j in others
          if labels[j] != labels[i]
      )
  return [ranks[i] for i in sorted(ranks)]


def test_leave_one_out_counts_ties_against_the_probe_and_per_person():
  """Features in halves so scores tie exactly; person 0 has 12 photos,
  the others 2 or 3: the per-person mean weighs each person once."""
  rng = np.random.default_rng(4)
  counts = np.r_[12, rng.integers(2, 4, 7)]
  labels = np.repeat(np.arange(8), counts)
  centres = np.round(2 * rng.normal(size=(8, 4))) / 2
  feats = (
      centres[labels] + np.round(2 * rng.normal(0, 0.7, (len(labels), 4))) / 2
  )
  got = own_data.folder_metrics(feats, np.ones(len(labels)), labels)
  ranks = np.array(_ranks_by_definition(feats, labels))
  scores = feats @ feats.T
  np.fill_diagonal(scores, -np.inf)
  mate = labels[:, None] == labels[None, :]
  best = np.where(mate, scores, -np.inf).max(axis=1)
  assert np.any(~mate & (scores == best[:, None]))  # a mate ties a stranger
  assert got["rank1"] == pytest.approx(np.mean(ranks <= 1))
  per_person = [np.mean(ranks[labels == p] <= 1) for p in range(8)]
  assert got["rank1_per_person"] == pytest.approx(np.mean(per_person))
  assert got["rank1_per_person"] != pytest.approx(got["rank1"])
  assert got["probe_people"] == 8


def test_identical_files_under_two_names_are_reported(tmp_path):
  root = _folder(tmp_path / "people")
  same = (root / "person1" / "0.jpg").read_bytes()
  (root / "person1" / "copy.jpg").write_bytes(same)
  (root / "person2" / "stray.jpg").write_bytes(same)
  (root / "person3" / "a.jpg").write_bytes(
      (root / "person3" / "0.jpg").read_bytes()
  )
  got = own_data.evaluate_folder(
      eval_trees.embed_fn,
      str(root),
      batch_size=8,
      image_size=eval_trees.SIZE,
      fusion=None,
      progress=False,
  )[""]
  found = got["duplicate_files"]
  assert found["groups"] == 2 and found["across_people"] == 1
  assert sorted(map(len, found["examples"])) == [2, 3]


def test_a_pairs_file_scores_as_brute_force(tmp_path):
  root = _folder(tmp_path / "people", people=5, per_person=5)
  people = folders.read(root, "config.eval.folders", min_people=2)
  paths, labels = people.paths, people.labels
  rng = np.random.default_rng(1)
  chosen = [tuple(rng.choice(len(paths), 2, replace=False)) for _ in range(60)]
  text = ["# a comment line", ""]
  for k, (a, b) in enumerate(chosen):
    sep = "," if k % 2 else "\t"
    text.append(
        f"{paths[a].relative_to(tmp_path)}{sep}"
        f"{paths[b].relative_to(tmp_path)} "
        f"{int(labels[a] == labels[b])}"
    )
  (tmp_path / "pairs.txt").write_text("\n".join(text) + "\n")
  got = own_data.evaluate_pairs_file(
      eval_trees.embed_fn,
      str(tmp_path / "pairs.txt"),
      batch_size=8,
      image_size=eval_trees.SIZE,
      fusion=None,
      progress=False,
  )
  feats = np.stack([eval_trees.stored_feature(p) for p in paths])
  same = np.array([labels[a] == labels[b] for a, b in chosen])
  scores = np.array([feats[a] @ feats[b] for a, b in chosen])
  assert got["num_pairs"] == 60
  assert got["tar@far=1e-01"] == pytest.approx(
      _tar(same, scores, 0.1), abs=1e-12
  )
  assert 0 <= got["accuracy_mean"] <= 1
  impostors = int((~same).sum())
  assert [r["far"] for r in got["thresholds"]] == [
      f for f in (1e-2, 1e-3) if impostors * f >= 1
  ]


@pytest.mark.parametrize(
    "line, words",
    [
        ("a.jpg b.jpg", ":1: expected 'PATH_A PATH_B LABEL'"),
        ("a.jpg b.jpg 2", ":1: expected"),
        (
            "a.jpg b.jpg 1\nc.jpg d.jpg 1",
            r"needs both same \(1\) and different",
        ),
    ],
)
def test_a_bad_pairs_file_names_its_line(tmp_path, line, words):
  (tmp_path / "p.txt").write_text(line + "\n")
  with pytest.raises(own_data.OwnDataError, match=words):
    own_data.read_pairs_file(tmp_path / "p.txt")


def test_a_folder_of_one_person_is_refused(tmp_path):
  _folder(tmp_path / "one", people=1)
  with pytest.raises(folders.FolderError, match="at least 2"):
    folders.read(tmp_path / "one", "config.eval.folders", min_people=2)


def test_impostors_are_sampled_without_repeats_when_many():
  labels = np.repeat(np.arange(300), 3)  # 900 images, ~400k impostors
  genuine, impostor = own_data.sample_pairs(labels, max_pairs=5000)
  assert len(genuine) == 900 and len(impostor) == 5000
  assert len(np.unique(impostor, axis=0)) == 5000
  assert np.all(labels[impostor[:, 0]] != labels[impostor[:, 1]])
  assert np.all(impostor[:, 0] < impostor[:, 1])


def test_a_hostile_pairs_file_is_refused_before_reading(tmp_path, monkeypatch):
  (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 100)
  with pytest.raises(own_data.OwnDataError, match="not UTF-8 text"):
    own_data.read_pairs_file(tmp_path / "bin.txt")
  monkeypatch.setattr(own_data, "MAX_PAIRS_FILE_BYTES", 100)
  (tmp_path / "big.txt").write_text("a.jpg b.jpg 1\n" * 20)
  with pytest.raises(
      own_data.OwnDataError, match="over the 100 a pairs file may hold"
  ):
    own_data.read_pairs_file(tmp_path / "big.txt")
