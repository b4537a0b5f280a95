"""--mode=embed and --mode=compare on the reference run's checkpoint."""

import shutil

import cv2

import numpy as np
import pytest

import qgjt_jax
from qgjt_jax import state as state_lib
from qgjt_jax.data import synthetic
from qgjt_jax.files import images as images_lib
from qgjt_jax.inference import embed
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.models import normalize_images
from tests.helpers import commands
from tests.helpers import tiny_runs


@pytest.fixture
def faces(tmp_path):
  folder = tmp_path / "faces"
  for identity in range(3):
    person = folder / f"id{identity}"
    person.mkdir(parents=True)
    for view in range(2):
      size = 32 if view else 48  # another size is resized
      cv2.imwrite(
          str(person / f"{view}.png"),
          synthetic.render_photo(0, identity, view, size),
      )
  (folder / "id1" / "broken.jpg").write_bytes(b"not an image")
  return folder


def _expected(workdir, paths):
  """Unit embeddings, norms and qualities computed here from the saved
  state (its backbone and its running norm statistics), scored as
  decisions are: each face and its mirror image, the features n e added
  and normalised, the norm their mean."""
  config = tiny_runs.tiny_config()
  state = tiny_runs.load_state(workdir, tiny_runs.STEPS)
  images = np.stack(
      [
          cv2.resize(cv2.imread(str(p)), (32, 32), interpolation=cv2.INTER_AREA)
          for p in paths
      ]
  )
  model = state_lib.build_model(config)
  variables = {
      "params": state["params"]["backbone"],
      "batch_stats": state["batch_stats"],
  }
  views = [
      model.apply(variables, normalize_images(faces), train=False)
      for faces in (images, images[:, :, ::-1])
  ]
  features = sum(np.asarray(e) * np.asarray(n)[:, None] for e, n in views)
  emb = features / np.linalg.norm(features, axis=1, keepdims=True)
  norms = (np.asarray(views[0][1]) + np.asarray(views[1][1])) / 2
  stats = quality_lib.QualityStats(
      mean=state["quality"]["mean"], std=state["quality"]["std"]
  )
  quality = quality_lib.quality_from_scaler(
      quality_lib.margin_scaler(
          norms, stats, config.quality.h, config.quality.eps
      )
  )
  return np.asarray(emb), np.asarray(norms), np.asarray(quality)


def test_embed_writes_each_image_with_its_quality(
    reference_run, faces, tmp_path
):
  workdir, _ = reference_run
  out = tmp_path / "faces.npz"
  with tiny_runs.compile_cache():
    embed.run_embed(
        qgjt_jax.load_model(str(workdir)), str(faces), str(out), skip_bad=True
    )
  data = np.load(out)
  good = sorted(p for p in faces.rglob("*.png"))
  assert list(data["paths"]) == [str(p.relative_to(faces)) for p in good]
  assert list(data["skipped"]) == ["id1/broken.jpg"]
  emb, norms, quality = _expected(workdir, good)
  np.testing.assert_allclose(data["embeddings"], emb, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(data["norms"], norms, rtol=1e-4)
  np.testing.assert_allclose(data["quality"], quality, rtol=1e-4, atol=1e-5)
  b = tiny_runs.tiny_config().head.b
  np.testing.assert_array_equal(data["hq"], quality >= b)
  assert float(data["threshold"]) == b


def test_an_unreadable_image_is_named_with_the_way_out(
    reference_run, faces, tmp_path
):
  workdir, _ = reference_run
  with tiny_runs.compile_cache():
    model = qgjt_jax.load_model(str(workdir))
    with pytest.raises(images_lib.ImageError, match=r"broken.jpg.*--skip_bad"):
      embed.run_embed(model, str(faces), str(tmp_path / "x.npz"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(images_lib.ImageError, match="empty holds no images"):
    embed.run_embed(model, str(tmp_path / "empty"), str(tmp_path / "x.npz"))


@pytest.mark.slow
def test_compare_on_the_command_line(reference_run, faces, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  a, b = faces / "id0" / "0.png", faces / "id2" / "1.png"
  command = [f"--workdir={workdir}", "--mode=compare", f"--images={a},{b}"]
  # Its only evaluation is of generated faces: no threshold for photos.
  refused = commands.main(*command)
  commands.assert_refused(refused, "generated faces", "calibration_folders")
  result = commands.main(*command, "--threshold=0.5", check=True)
  emb, norms, quality = _expected(reference_run[0], [a, b])
  cosine = emb[0] @ emb[1]
  assert (
      f"cosine similarity {cosine:.4f}: "
      + ("same person" if cosine >= 0.5 else "different people")
      in result.stdout
  )
  assert f"feature norm {norms[1]:.3f}, quality {quality[1]:.3f}" in (
      result.stdout
  )
  commands.assert_refused(
      commands.main(*command[:-1], f"--images={a}"), "give two images"
  )
