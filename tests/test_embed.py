"""--mode=embed and --mode=compare on the reference run's checkpoint."""
import shutil
import subprocess

import cv2

import numpy as np
import pytest

from qgjt_jax import embed
from qgjt_jax import state as state_lib
from qgjt_jax.data import synthetic
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.models import normalize_images
from tests import tiny_runs


@pytest.fixture
def faces(tmp_path):
  folder = tmp_path / "faces"
  for identity in range(3):
    person = folder / f"id{identity}"
    person.mkdir(parents=True)
    for view in range(2):
      size = 32 if view else 48  # another size is resized
      cv2.imwrite(str(person / f"{view}.png"),
                  synthetic.render_photo(0, identity, view, size))
  (folder / "id1" / "broken.jpg").write_bytes(b"not an image")
  return folder


def _expected(workdir, paths):
  """Unit embeddings, norms and qualities computed here from the saved
  state (its backbone and its running norm statistics)."""
  config = tiny_runs.tiny_config()
  state = tiny_runs.load_state(workdir, tiny_runs.STEPS)
  images = np.stack([cv2.resize(cv2.imread(str(p)), (32, 32),
                                interpolation=cv2.INTER_AREA) for p in paths])
  model = state_lib.build_model(config)
  emb, norms = model.apply({"params": state["params"]["backbone"],
                            "batch_stats": state["batch_stats"]},
                           normalize_images(images), train=False)
  stats = quality_lib.QualityStats(mean=state["quality"]["mean"],
                              std=state["quality"]["std"])
  quality = quality_lib.quality_from_scaler(quality_lib.margin_scaler(
      norms, stats, config.quality.h, config.quality.eps))
  return np.asarray(emb), np.asarray(norms), np.asarray(quality)


def test_embed_writes_each_image_with_its_quality(reference_run, faces,
                                                  tmp_path):
  workdir, _ = reference_run
  out = tmp_path / "faces.npz"
  with tiny_runs.compile_cache():
    embed.run_embed(tiny_runs.tiny_config(), str(workdir), str(faces),
                    str(out), skip_bad=True)
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


def test_an_unreadable_image_is_named_with_the_way_out(reference_run, faces,
                                                       tmp_path):
  workdir, _ = reference_run
  with tiny_runs.compile_cache(), pytest.raises(
      embed.ImageError, match=r"broken.jpg.*--skip_bad"):
    embed.run_embed(tiny_runs.tiny_config(), str(workdir), str(faces),
                    str(tmp_path / "x.npz"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(embed.ImageError, match="empty holds no images"):
    embed.run_embed(tiny_runs.tiny_config(), str(workdir),
                    str(tmp_path / "empty"), str(tmp_path / "x.npz"))


@pytest.mark.slow
def test_compare_on_the_command_line(reference_run, faces, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  a, b = faces / "id0" / "0.png", faces / "id2" / "1.png"
  result = subprocess.run(
      tiny_runs.cli_command(workdir, "--mode=compare", f"--images={a},{b}"),
      capture_output=True, text=True, cwd=tiny_runs.ROOT,
      env=tiny_runs.subprocess_env(), timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  emb, norms, quality = _expected(reference_run[0], [a, b])
  assert f"cosine similarity {emb[0] @ emb[1]:.4f}" in result.stdout
  assert f"feature norm {norms[1]:.3f}, quality {quality[1]:.3f}" in (
      result.stdout)
  bad = subprocess.run(
      tiny_runs.cli_command(workdir, "--mode=compare", f"--images={a}"),
      capture_output=True, text=True, cwd=tiny_runs.ROOT,
      env=tiny_runs.subprocess_env(), timeout=600)
  assert bad.returncode == 1 and "give two images" in bad.stderr
  assert "Traceback" not in bad.stderr

