"""Every backbone family through every mode, as a user runs them.

For MobileFaceNet and the ViT: the tiny recipe trained by two processes of
two CPU devices joined by jax.distributed, the classifier split over the
`model` axis, each unit recomputed in the backward pass (remat); the model
then evaluated, embedded, exported by the command to insightface's ONNX
layout and to safetensors on one device, the ONNX file scoring as
--mode=embed in onnxruntime, and the safetensors file converted back to the
same embeddings. (tests/unit/interop/test_export.py exports every family in
both ONNX layouts and StableHLO; the export command's other formats are
tested with the IResNet.) The accelerator programs of configs/ms1m.py with
the ViT are lowered for TPU and GPU.
"""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from qgjt_jax.data import synthetic
from tests.helpers import commands
from tests.helpers import tiny_runs

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
SIZE = tiny_runs.TINY["data.image_size"]
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
  root = tmp_path_factory.mktemp("faces")
  for person in range(3):
    folder = root / f"p{person}"
    folder.mkdir()
    for view in range(2):
      cv2.imwrite(
          str(folder / f"{view}.png"),
          synthetic.render_photo(2, person, view, SIZE),
      )
  return root


def _train(workdir, name):
  """The tiny recipe with `name` (its IResNet width is no setting of these
  families, and is not read)."""
  flags = tiny_runs.cli_command(
      workdir,
      **{
          "model.name": name,
          "model.remat": "block",
          "model_parallelism": 2,
          "num_epochs": 0.5,  # 4 steps: the sharded program, run
      },
  )[3:]
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "qgjt_jax.launch_local",
          "--processes=2",
          "--devices_per_process=2",
          "--",
          *flags,
      ],
      capture_output=True,
      text=True,
      cwd=tiny_runs.ROOT,
      env=tiny_runs.subprocess_env(),
      timeout=900,
  )


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_trains_on_a_cluster_then_every_mode_and_export(name, faces, tmp_path):
  workdir = tmp_path / name
  result = _train(workdir, name)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert f"Training {name} on" in result.stdout
  assert "in 2 processes" in result.stdout
  w = f"--workdir={workdir}"
  evaluated = commands.run("qgjt_jax.main", w, "--mode=eval", check=True)
  assert "synthetic_hq_lq" in evaluated.stdout
  out = tmp_path / "faces.npz"
  commands.run(
      "qgjt_jax.main",
      w,
      "--mode=embed",
      f"--images={faces}",
      f"--out={out}",
      check=True,
  )
  with np.load(out) as data:
    want, want_norms = data["embeddings"], data["norms"]
  images = np.stack(
      [
          cv2.imread(str(faces / f"p{p}" / f"{v}.png"))
          for p in range(3)
          for v in range(2)
      ]
  )
  path = tmp_path / "insightface.onnx"
  commands.run(
      "qgjt_jax.export",
      w,
      "--format=onnx",
      "--onnx_layout=insightface",
      f"--out={path}",
      check=True,
  )
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  rgb = (images[..., ::-1].astype(np.float32) - 127.5) / 127.5
  feature = session.run(None, {"input.1": rgb.transpose(0, 3, 1, 2)})[0]
  norms = np.linalg.norm(feature, axis=1)
  np.testing.assert_allclose(feature / norms[:, None], want, atol=1e-5)
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
  commands.run(
      "qgjt_jax.export",
      w,
      "--format=safetensors",
      f"--out={tmp_path / 'm.safetensors'}",
      check=True,
  )
  back = tmp_path / "back"
  converted = commands.run(
      "qgjt_jax.convert",
      f"--src={tmp_path / 'm.safetensors'}",
      f"--workdir={back}",
      check=True,
  )
  assert f"architecture    {name}:" in converted.stdout
  out_back = tmp_path / "back.npz"
  commands.run(
      "qgjt_jax.main",
      f"--workdir={back}",
      "--mode=embed",
      f"--images={faces}",
      f"--out={out_back}",
      check=True,
  )
  with np.load(out_back) as data:
    np.testing.assert_allclose(data["embeddings"], want, atol=1e-5)


def test_the_vit_programs_lower_for_tpu_and_gpu():
  result = commands.run(
      "qgjt_jax.export_check",
      "--config=configs/ms1m.py",
      "--config.model.name=vit_t",
      "--platforms=tpu,cuda",
      "--config.model_parallelism=2",
      devices=8,
      timeout=900,
      check=True,
  )
  records = [
      json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")
  ]
  assert [r["program"] for r in records] == ["train_step", "eval_forward"]
  for record in records:
    assert record["platforms"] == ["tpu", "cuda"] and record["arch"] == "vit_t"
