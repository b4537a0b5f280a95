"""From a trained model to decisions on real photos, through the commands.

The model is the embedded default (configs/synthetic.py, 40 px) trained for
one epoch; the photos are the 120 real ORL faces (12 people). Accuracy on
them is not the point: the mechanics are (alignment, templates, the search,
thresholds, and models leaving and entering the project unchanged).
"""
import csv
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests import tiny_runs

pytestmark = pytest.mark.slow
pytest.importorskip("dlib", reason="the alignment extra: pip install -e "
                    "'.[align]'")

_DEMO = ["--config=configs/synthetic.py"]


def _run(*args, module="qgjt_jax.main", check=True):
  result = subprocess.run([sys.executable, "-m", module, *args],
                          capture_output=True, text=True, cwd=tiny_runs.ROOT,
                          env=tiny_runs.subprocess_env(), timeout=600)
  if check:
    assert result.returncode == 0, result.stdout + result.stderr
  return result


@pytest.fixture(scope="module")
def split(faces_dir, tmp_path_factory):
  """Gallery: photos 1-5 of each person; probes: 6-10 (links)."""
  root = tmp_path_factory.mktemp("orl")
  for person in sorted(faces_dir.iterdir()):
    for part, shots in (("gallery", range(1, 6)), ("probes", range(6, 11))):
      (root / part / person.name).mkdir(parents=True)
      for shot in shots:
        (root / part / person.name / f"{shot}.pgm").symlink_to(
            person / f"{shot}.pgm")
  return root


def _embed(workdir, folder, out, *flags):
  _run(*_DEMO, f"--workdir={workdir}", "--mode=embed", f"--images={folder}",
       f"--out={out}", *flags)
  with np.load(out) as data:
    return {k: data[k] for k in data.files}


def test_identify_ranks_as_brute_force_on_the_embeddings(demo_run, split,
                                                         tmp_path):
  out = tmp_path / "who.csv"
  result = _run(*_DEMO, f"--workdir={demo_run}", "--mode=identify",
                f"--gallery={split / 'gallery'}",
                f"--images={split / 'probes'}", f"--out={out}",
                "--align=detect")
  assert "against 12 people (60 gallery faces, mean templates)" in (
      result.stdout)
  assert "FAR 1e-02 on synthetic_" in result.stdout  # what 150 impostors allow
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == 60
  # Independently: embeddings of the same aligned faces, mean templates,
  # every score computed, sorted.
  gallery = _embed(demo_run, split / "gallery", tmp_path / "g.npz",
                   "--align=detect")
  probes = _embed(demo_run, split / "probes", tmp_path / "p.npz",
                  "--align=detect")
  people = sorted({p.split("/")[0] for p in gallery["paths"]})
  templates = np.stack([gallery["embeddings"][[
      p.startswith(f"{name}/") for p in gallery["paths"]]].mean(axis=0)
                        for name in people])
  templates /= np.linalg.norm(templates, axis=1, keepdims=True)
  scores = probes["embeddings"] @ templates.T
  evaluated = json.loads(
      (demo_run / "eval" / f"step_{tiny_runs.DEMO_STEPS}.json").read_text())
  used = re.search(r"FAR 1e-02 on (\w+),", result.stdout)[1]
  cut = evaluated[used]["thresholds"][0]["cosine"]
  by_probe = {r["probe"]: r for r in rows}
  for path, row_scores in zip(probes["paths"], scores):
    order = np.argsort(-row_scores)[:5]
    row = by_probe[path]
    assert [row[f"identity{k}"] for k in range(1, 6)] == [
        people[i] for i in order]
    np.testing.assert_allclose([float(row[f"score{k}"]) for k in range(1, 6)],
                               row_scores[order], atol=2e-4)
    want = people[order[0]] if row_scores[order[0]] >= cut else "unknown"
    assert row["decision"] == want


def test_compare_prints_its_decision_and_what_it_stands_for(demo_run,
                                                           faces_dir):
  photos = f"{faces_dir / 's1' / '1.pgm'},{faces_dir / 's2' / '1.pgm'}"
  result = _run(*_DEMO, f"--workdir={demo_run}", "--mode=compare",
                f"--images={photos}", "--align=detect")
  assert "FAR 1e-04 needs 10,000 impostor pairs" in result.stdout
  line = result.stdout.splitlines()[1]
  assert line.startswith("cosine similarity ") and (
      "same person (threshold " in line or
      "different people (threshold " in line), result.stdout
  assert "FAR 1e-02 on synthetic_" in line
  given = _run(*_DEMO, f"--workdir={demo_run}", "--mode=compare",
               f"--images={photos}", "--align=detect", "--threshold=-1")
  assert "same person (threshold -1.0000 (--threshold))" in given.stdout


def test_unaligned_photos_are_said_once(demo_run, faces_dir, tmp_path):
  result = _run(*_DEMO, f"--workdir={demo_run}", "--mode=embed",
                f"--images={faces_dir / 's3'}", f"--out={tmp_path / 'e.npz'}")
  assert ("10 of 10 image(s) are not 40 x 40 px (e.g. 92 x 112): they were "
          "resized, not aligned") in result.stdout


def test_onnx_of_the_default_workdir_matches_embed(demo_run, faces_dir,
                                                   tmp_path):
  ort = pytest.importorskip("onnxruntime")
  crops = tmp_path / "crops"
  crops.mkdir()
  for photo in sorted(faces_dir.glob("s*/1.pgm")):  # model-sized: no resize
    cv2.imwrite(str(crops / f"{photo.parent.name}.png"),
                cv2.resize(cv2.imread(str(photo)), (40, 40),
                           interpolation=cv2.INTER_AREA))
  _run(f"--workdir={demo_run}", "--format=onnx",
       f"--out={tmp_path / 'm.onnx'}", module="qgjt_jax.export")
  embedded = _embed(demo_run, crops, tmp_path / "e.npz")
  images = np.stack([cv2.imread(str(crops / p)) for p in embedded["paths"]])
  session = ort.InferenceSession(str(tmp_path / "m.onnx"))
  got, norms = session.run(None, {"images": images})
  cosines = np.sum(got * embedded["embeddings"], axis=1)
  assert cosines.min() > 0.999, cosines
  np.testing.assert_allclose(norms, embedded["norms"], rtol=1e-3)
  import onnx
  metadata = {p.key: p.value for p in onnx.load(
      tmp_path / "m.onnx").metadata_props}
  carried = json.loads(metadata["qgjt_jax.thresholds"])
  assert carried["sets"]["synthetic_hq_hq"][0]["far"] == 1e-2


def test_safetensors_round_trip_gives_the_same_embeddings(demo_run, faces_dir,
                                                         tmp_path):
  exported = tmp_path / "model.safetensors"
  result = _run(f"--workdir={demo_run}", "--format=safetensors",
                f"--out={exported}", module="qgjt_jax.export")
  assert "for 40 px BGR input" in result.stdout
  back = tmp_path / "converted"
  result = _run(f"--src={exported}", f"--workdir={back}",
                module="qgjt_jax.convert")
  assert "input size      40 x 40" in result.stdout
  folder = faces_dir / "s4"
  want = _embed(demo_run, folder, tmp_path / "a.npz")
  got = _embed(back, folder, tmp_path / "b.npz")
  np.testing.assert_allclose(got["embeddings"], want["embeddings"],
                             atol=1e-5)
  np.testing.assert_allclose(got["norms"], want["norms"], rtol=1e-5)
  assert np.isnan(got["quality"]).all()  # a converted model has no stats
