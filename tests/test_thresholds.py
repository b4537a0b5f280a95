"""Cosine thresholds at a false accept rate, and the one a decision uses."""
import json
import math

import numpy as np
import pytest

from qgjt_jax import errors
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
    assert row["impostors"] == impostors


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
    assert got == pytest.approx(expected, rel=1e-12)


def _write(workdir, name, sets):
  folder = workdir / "eval"
  folder.mkdir(exist_ok=True)
  (folder / name).write_text(json.dumps({
      set_name: {"accuracy_mean": 0.9, "thresholds": [
          {"far": far, "cosine": cos, "tar": 0.5, "impostors": n}
          for far, cos in rows]}
      for set_name, (n, rows) in sets.items()}))


def test_the_latest_evaluation_and_its_largest_set_decide(tmp_path):
  _write(tmp_path, "step_10.json", {"lfw": (3000, [(1e-2, 0.1)])})
  _write(tmp_path, "step_200.json", {"lfw": (3000, [(1e-2, 0.2)])})
  _write(tmp_path, "step_200.2.json", {
      "lfw": (3000, [(1e-2, 0.3), (1e-3, 0.4)]),
      "ijbc": (200_000, [(1e-2, 0.5), (1e-3, 0.6), (1e-4, 0.7)])})
  (tmp_path / "eval" / "notes.json").write_text("{}")  # not a result
  chosen, note = thresholds.latest(str(tmp_path), 1e-4)
  assert (chosen.cosine, chosen.far, note) == (0.7, 1e-4, None)
  assert "ijbc, evaluation of step 200 (step_200.2.json)" in chosen.describe()
  chosen, note = thresholds.latest(str(tmp_path), 1e-4, "lfw")
  assert (chosen.cosine, chosen.far) == (0.4, 1e-3)
  assert "needs 10,000 impostor pairs; lfw has 3,000" in note
  with pytest.raises(errors.UserError, match="--threshold_set=agedb"):
    thresholds.latest(str(tmp_path), 1e-4, "agedb")
  assert thresholds.measured(str(tmp_path))["sets"]["ijbc"][2] == {
      "far": 1e-4, "cosine": 0.7, "tar": 0.5}


def test_no_evaluation_says_how_to_get_one(tmp_path):
  with pytest.raises(errors.UserError, match="--threshold=COSINE"):
    thresholds.latest(str(tmp_path), 1e-4)
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "step_5.json").write_text('{"tinyface": {"rank1": 1}}')
  with pytest.raises(errors.UserError, match="measured no thresholds"):
    thresholds.latest(str(tmp_path), 1e-4)
  (tmp_path / "eval" / "step_6.json").write_text("{not json")
  with pytest.raises(errors.UserError, match="not a readable evaluation"):
    thresholds.latest(str(tmp_path), 1e-4)
  assert thresholds.measured(str(tmp_path / "nothing")) is None


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
