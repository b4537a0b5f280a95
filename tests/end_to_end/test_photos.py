"""From a trained model to decisions on real photos, through the commands.

The model is the embedded default (configs/synthetic.py, 40 px) trained for
one epoch; the photos are the 120 real ORL faces (12 people): s1-s6 are the
calibration people, s7-s12 people the model's thresholds never saw.
Accuracy on them is not the point: the mechanics are (alignment, templates,
the search, one scoring, thresholds that hold and say where they come from,
and models leaving and entering the project unchanged).
"""

import csv
import json
import re
import shlex
import shutil

import cv2
import numpy as np
import pytest

from qgjt_jax.eval import thresholds
from qgjt_jax.inference import decisions
from tests.helpers import commands
from tests.helpers import tiny_runs

pytestmark = pytest.mark.slow
pytest.importorskip(
    "dlib", reason="the alignment extra: pip install -e '.[align]'"
)


def _run(*args, module="qgjt_jax.main", check=True):
  return commands.run(module, *args, check=check)


@pytest.fixture(scope="module")
def orl_people(faces_dir, tmp_path_factory):
  """ORL s1-s6 as calibration people, s7-s12 as unseen ones (links)."""
  root = tmp_path_factory.mktemp("orl_people")
  for person in sorted(faces_dir.iterdir()):
    part = "calibration" if int(person.name[1:]) <= 6 else "unseen"
    (root / part).mkdir(exist_ok=True)
    (root / part / person.name).symlink_to(person)
  return root


@pytest.fixture(scope="module")
def calibrated(demo_run, orl_people, tmp_path_factory):
  """The demo model evaluated with ORL s1-s6 as calibration people."""
  workdir = tmp_path_factory.mktemp("calibrated") / "run"
  shutil.copytree(demo_run, workdir)
  _run(
      f"--workdir={workdir}",
      "--mode=eval",
      "--config.eval.align=detect",
      f"--config.eval.calibration_folders=('{orl_people}/calibration',)",
  )
  return workdir


def _latest(workdir) -> dict:
  """The newest evaluation of the demo's step."""
  return decisions.evaluation(str(workdir), tiny_runs.DEMO_STEPS)[2]


def _calibration(workdir) -> dict:
  return _latest(workdir)["calibration_calibration"]


def _embed(workdir, folder, out, *flags):
  _run(
      f"--workdir={workdir}",
      "--mode=embed",
      f"--images={folder}",
      f"--out={out}",
      *flags,
  )
  with np.load(out) as data:
    return {k: data[k] for k in data.files}


def _by_person(embedded) -> np.ndarray:
  return np.array([p.split("/")[0] for p in embedded["paths"]])


def test_six_calibration_people_state_a_point_estimate_and_no_bound(calibrated):
  """s1-s6 make 1,500 impostor pairs: enough for FAR 1e-2 (3 / FAR), too
  few people for a bound that holds (thresholds.MIN_PEOPLE)."""
  rows = _calibration(calibrated)["thresholds"]
  assert [r["far"] for r in rows] == [1e-2]
  assert rows[0]["impostors"] == 1500 and rows[0]["accepted"] <= 15
  assert rows[0]["far_upper"] is None and rows[0]["people"] == 6


def test_compare_refuses_generated_thresholds_and_says_how_to_calibrate(
    demo_run, calibrated, faces_dir
):
  photos = f"{faces_dir / 's7' / '1.pgm'},{faces_dir / 's8' / '1.pgm'}"
  refused = _run(
      f"--workdir={demo_run}",
      "--mode=compare",
      f"--images={photos}",
      "--align=detect",
      check=False,
  )
  assert refused.returncode == 1
  assert "only on generated faces" in refused.stderr
  assert "--config.eval.calibration_folders" in refused.stderr
  # A generated set named by hand is used, and said to be one.
  named = _run(
      f"--workdir={demo_run}",
      "--mode=compare",
      f"--images={photos}",
      "--align=detect",
      "--far=1e-2",
      "--threshold_set=synthetic_hq_hq",
  )
  assert "(generated faces, not single photos;" in named.stdout
  decided = _run(
      f"--workdir={calibrated}",
      "--mode=compare",
      f"--images={photos}",
      "--align=detect",
      "--far=1e-2",
  )
  verdict, provenance = decided.stdout.splitlines()[:2]
  assert verdict.startswith("cosine similarity ") and (
      verdict.endswith("same person") or verdict.endswith("different people")
  )
  assert (
      "on calibration_calibration (calibration people; evaluation of step 32"
  ) in provenance
  assert (
      "FAR about 1e-02, a point estimate (" in provenance
      and "impostor pairs accepted) that no bound backs: it rests on only 6 "
      "people, and a bound needs 30 people or more" in provenance
  )
  too_fine = _run(
      f"--workdir={calibrated}",
      "--mode=compare",
      f"--images={photos}",
      "--align=detect",
      check=False,
  )
  assert "FAR 1e-04 needs 30,000 impostor pairs" in too_fine.stderr
  given = _run(
      f"--workdir={demo_run}",
      "--mode=compare",
      f"--images={photos}",
      "--align=detect",
      "--threshold=-1",
  )
  assert "same person" in given.stdout
  assert "threshold -1.0000, given by --threshold" in given.stdout


def test_identify_ranks_as_brute_force_at_the_calibrated_fpir(
    calibrated, orl_people, tmp_path
):
  """Gallery: photos 1-5 of the unseen people; probes: their photos 6-10."""
  split = tmp_path / "split"
  for person in sorted((orl_people / "unseen").iterdir()):
    for part, shots in (("gallery", range(1, 6)), ("probes", range(6, 11))):
      (split / part / person.name).mkdir(parents=True)
      for shot in shots:
        (split / part / person.name / f"{shot}.pgm").symlink_to(
            person / f"{shot}.pgm"
        )
  out = tmp_path / "who.csv"
  result = _run(
      f"--workdir={calibrated}",
      "--mode=identify",
      f"--gallery={split / 'gallery'}",
      f"--images={split / 'probes'}",
      f"--out={out}",
      "--align=detect",
      "--fpir=0.1",
  )
  assert "against 6 people (30 gallery faces, mean templates" in result.stdout
  assert re.search(
      r"on calibration_calibration \(.*\): FPIR about 0.1, a " "point estimate",
      result.stdout,
  )
  # Measured against this gallery: the calibration's 60 stored photos
  # searched it as strangers.
  assert "against this gallery of 6 people; 6 people in the set" in (
      result.stdout
  )
  assert (
      "the calibration's 60 photos searched this gallery as people it "
      "does not hold"
  ) in result.stdout
  assert "WARNING: a gallery larger" not in result.stdout
  assert "also in" not in result.stdout  # the gallery is not calibration's
  rows = list(csv.DictReader(out.open()))
  assert len(rows) == 30
  gallery = _embed(
      calibrated, split / "gallery", tmp_path / "g.npz", "--align=detect"
  )
  probes = _embed(
      calibrated, split / "probes", tmp_path / "p.npz", "--align=detect"
  )
  people = sorted(set(_by_person(gallery)))
  templates = np.stack(
      [
          gallery["embeddings"][_by_person(gallery) == name].mean(axis=0)
          for name in people
      ]
  )
  templates /= np.linalg.norm(templates, axis=1, keepdims=True)
  scores = probes["embeddings"] @ templates.T
  by_probe = {r["probe"]: r for r in rows}
  # The threshold by hand: at most floor(0.1 x 60) of the calibration
  # photos' best scores in this gallery reach it (6 people: no bound).
  strangers = _embed(
      calibrated,
      orl_people / "calibration",
      tmp_path / "c.npz",
      "--align=detect",
  )
  best = np.sort((strangers["embeddings"] @ templates.T).max(axis=1))[::-1]
  assert len(best) == 60
  cosine = float(np.nextafter(best[6], np.inf))
  assert f"threshold {cosine:.4f} on calibration_calibration" in (result.stdout)
  for path, row_scores in zip(probes["paths"], scores):
    order = np.argsort(-row_scores)[:5]
    found = by_probe[path]
    assert [found[f"identity{k}"] for k in range(1, 6)] == [
        people[i] for i in order
    ]
    np.testing.assert_allclose(
        [float(found[f"score{k}"]) for k in range(1, 6)],
        row_scores[order],
        atol=2e-4,
    )
    want = people[order[0]] if row_scores[order[0]] >= cosine else "unknown"
    assert found["decision"] == want
  # Identifying the calibration people themselves is warned about.
  again = _run(
      f"--workdir={calibrated}",
      "--mode=identify",
      f"--gallery={orl_people / 'calibration'}",
      f"--images={split / 'probes'}",
      f"--out={tmp_path / 'w.csv'}",
      "--align=detect",
      "--fpir=0.1",
  )
  assert "WARNING: 6 of the gallery's 6 people are also in" in again.stdout


def test_every_command_scores_as_the_evaluation_measured(
    calibrated, orl_people, tmp_path
):
  """The thresholds an evaluation of a folder stores are those of the
  scores --mode=embed gives for the same faces; compare prints the same
  cosine."""
  folder = orl_people / "unseen"
  workdir = tmp_path / "run"
  shutil.copytree(calibrated, workdir)
  _run(
      f"--workdir={workdir}",
      "--mode=eval",
      "--config.eval.align=detect",
      f"--config.eval.folders=('{folder}',)",
  )
  stored = _latest(workdir)["folder_unseen"]["thresholds"]
  embedded = _embed(workdir, folder, tmp_path / "e.npz", "--align=detect")
  people = _by_person(embedded)
  first, second = np.triu_indices(len(people), 1)
  same = people[first] == people[second]
  scores = np.sum(
      embedded["embeddings"][first] * embedded["embeddings"][second], axis=1
  )
  mine = thresholds.at_far(scores[same], scores[~same])
  assert [r["far"] for r in mine] == [r["far"] for r in stored]
  for got, want in zip(stored, mine):
    assert got["cosine"] == pytest.approx(want["cosine"], abs=2e-6)
    assert got["accepted"] == want["accepted"]
  a, b = embedded["paths"][0], embedded["paths"][-1]
  compared = _run(
      f"--workdir={workdir}",
      "--mode=compare",
      f"--images={folder / a},{folder / b}",
      "--align=detect",
      "--threshold=0",
  )
  cosine = float(embedded["embeddings"][0] @ embedded["embeddings"][-1])
  assert f"cosine similarity {cosine:.4f}:" in compared.stdout


def test_exported_models_score_as_embed_and_carry_the_calibration(
    calibrated, faces_dir, tmp_path
):
  ort = pytest.importorskip("onnxruntime")
  import onnx  # pylint: disable=g-import-not-at-top

  crops = tmp_path / "crops"
  crops.mkdir()
  for photo in sorted(faces_dir.glob("s*/1.pgm")):  # model-sized: no resize
    cv2.imwrite(
        str(crops / f"{photo.parent.name}.png"),
        cv2.resize(
            cv2.imread(str(photo)), (40, 40), interpolation=cv2.INTER_AREA
        ),
    )
  embedded = _embed(calibrated, crops, tmp_path / "e.npz")
  images = np.stack([cv2.imread(str(crops / p)) for p in embedded["paths"]])
  for layout in ("qgjt", "insightface"):
    out = tmp_path / f"{layout}.onnx"
    result = _run(
        f"--workdir={calibrated}",
        "--format=onnx",
        f"--onnx_layout={layout}",
        f"--out={out}",
        module="qgjt_jax.export",
    )
    assert "WARNING" not in result.stdout + result.stderr
    session = ort.InferenceSession(str(out))
    if layout == "qgjt":
      got, norms = session.run(None, {"images": images})
    else:  # what insightface's get_feat feeds: RGB, NCHW, (x - 127.5) / 127.5
      blob = (
          images[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) - 127.5
      ) / 127.5
      feature = session.run(None, {"input.1": blob})[0]
      norms = np.linalg.norm(feature, axis=1)
      got = feature / norms[:, None]
    np.testing.assert_allclose(got, embedded["embeddings"], atol=1e-5)
    np.testing.assert_allclose(norms, embedded["norms"], rtol=1e-5)
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    carried = json.loads(metadata["qgjt_jax.thresholds"])["sets"]
    calibration = carried["calibration_calibration"]
    assert calibration["provenance"]["kind"] == "calibration"
    assert "folder" not in calibration["provenance"]
    assert calibration["thresholds"][0]["impostors"] == 1500
    assert str(tmp_path.parent) not in json.dumps(metadata)
  out = tmp_path / "m.stablehlo"
  _run(
      f"--workdir={calibrated}",
      "--format=stablehlo",
      f"--out={out}",
      module="qgjt_jax.export",
  )
  import jax  # pylint: disable=g-import-not-at-top

  reloaded = jax.export.deserialize(out.read_bytes())
  got, norms = (np.asarray(a) for a in reloaded.call(images))
  np.testing.assert_allclose(got, embedded["embeddings"], atol=1e-5)
  sidecar = json.loads((tmp_path / "m.stablehlo.json").read_text())
  assert sidecar["qgjt_jax.scoring"] == embedded["scoring"]


def test_unaligned_photos_are_said_once(demo_run, faces_dir, tmp_path):
  result = _run(
      f"--workdir={demo_run}",
      "--mode=embed",
      f"--images={faces_dir / 's3'}",
      f"--out={tmp_path / 'e.npz'}",
  )
  assert (
      "10 of 10 image(s) are not 40 x 40 px (e.g. 92 x 112): they were "
      "resized, not aligned"
  ) in result.stdout


def test_exports_convert_back_with_embeddings_quality_and_thresholds(
    calibrated, orl_people, faces_dir, tmp_path
):
  """convert of an export (safetensors, ONNX) restores what the workdir
  knew beyond its weights: the norm statistics (quality) and the
  calibrated thresholds."""
  folder = faces_dir / "s4"
  want = _embed(calibrated, folder, tmp_path / "a.npz")
  pair = ",".join(
      str(p) for p in sorted((orl_people / "unseen").glob("*/1.pgm"))[:2]
  )
  threshold = re.compile(
      r"threshold (\S+) on calibration_calibration .*: "
      r"FAR about 1e-02, a point estimate \((\d+ of "
      r"[\d,]+)"
  )

  def decided(workdir):
    return _run(
        f"--workdir={workdir}",
        "--mode=compare",
        f"--images={pair}",
        "--align=detect",
        "--far=1e-2",
    ).stdout

  measured = threshold.search(decided(calibrated)).groups()
  for name in ("model.safetensors", "model.onnx"):
    exported = tmp_path / name
    result = _run(
        f"--workdir={calibrated}",
        f"--format={name[6:]}",
        f"--out={exported}",
        module="qgjt_jax.export",
    )
    if name.endswith("safetensors"):
      assert "for 40 px BGR input" in result.stdout
      # The authors' net.py builds width-64, 112 px, 512-d models only.
      assert (
          "Loads in: qgjt_jax.convert only (AdaFace/QGFace net.py "
          "cannot build it: base width 16 (it builds 64); image size 40"
      ) in result.stdout
    back = tmp_path / f"from_{name}"
    result = _run(
        f"--src={exported}", f"--workdir={back}", module="qgjt_jax.convert"
    )
    assert "input size      40 x 40" in result.stdout
    got = _embed(back, folder, tmp_path / f"{name}.npz")
    np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=1e-5)
    for key in ("norms", "quality"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    np.testing.assert_array_equal(got["hq"], want["hq"])
    again = decided(back)
    assert threshold.search(again).groups() == measured, name
    assert f"carried in {name}" in again


def test_the_readme_photo_commands_run_with_only_the_workdir(
    demo_run, faces_dir, tmp_path
):
  """The README's block "From photos to decisions", command by command, on
  the embedded default's workdir as runs/demo, its /data folders standing
  for the ORL people (all 12 calibrate: 120 searches resolve FPIR 0.01)."""
  readme = (tiny_runs.ROOT / "README.md").read_text()
  block = readme[readme.index("From photos to decisions") :]
  block = block[block.index("```bash\n") + 8 :]
  block = block[: block.index("```")]
  lines = [
      shlex.split(c)
      for c in re.sub(r"\\\n\s*", " ", block).splitlines()
      if c.strip() and not c.startswith("#")
  ]
  assert len(lines) == 9
  (tmp_path / "runs").mkdir()
  shutil.copytree(demo_run, tmp_path / "runs" / "demo")
  split = tmp_path / "split"
  for person in sorted(faces_dir.iterdir()):
    for part, shots in (("gallery", range(1, 6)), ("probes", range(6, 11))):
      (split / part / person.name).mkdir(parents=True)
      for shot in shots:
        (split / part / person.name / f"{shot}.pgm").symlink_to(
            person / f"{shot}.pgm"
        )
  (tmp_path / "pairs.txt").write_text(
      "".join(
          f"{faces_dir}/s{a}/1.pgm {faces_dir}/s{b}/{2 + a % 3}.pgm "
          f"{int(a == b)}\n"
          for a in range(1, 13)
          for b in range(1, 13)
      )
  )
  stand_ins = {
      "/data/calibration_people": str(faces_dir),
      "/data/my_photos": str(faces_dir / "s1"),
      "a.jpg": str(faces_dir / "s1" / "1.pgm"),
      "b.jpg": str(faces_dir / "s2" / "1.pgm"),
      "/data/people": str(split / "gallery"),
      "/data/probes": str(split / "probes"),
      "/data/my_people": str(faces_dir),
      "/data/my_pairs.txt": str(tmp_path / "pairs.txt"),
  }
  for words in lines:
    assert words[:2] == ["python", "-m"] and not any(
        w.startswith("--config=") for w in words
    ), words
    for old, new in stand_ins.items():
      words = [w.replace(old, new) for w in words]
    commands.run(*words[2:], cwd=tmp_path, check=True)
  assert (tmp_path / "who.csv").is_file() and (
      tmp_path / "model.stablehlo.json"
  ).is_file()
