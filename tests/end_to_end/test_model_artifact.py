"""A trained model used anywhere: every mode on another device count than
trained it, with only --workdir, and reloaded with orbax and flax alone.

The tiny recipe is trained on 2 XLA devices (and, as the `reference_run`
fixture, on 1); each model is then evaluated, embedded, compared,
identified and exported on the other count, through the real commands.
"""

import csv
import re
import shutil

import cv2
import numpy as np
import pytest

from qgjt_jax.data import synthetic
from tests.helpers import commands
from tests.helpers import tiny_runs

pytestmark = pytest.mark.slow
SIZE = tiny_runs.TINY["data.image_size"]


def _run(*args, devices=1, module="qgjt_jax.main", check=True):
  return commands.run(module, *args, devices=devices, check=check)


@pytest.fixture(scope="module")
def people(tmp_path_factory):
  """Generated 32 px faces of 8 people, 6 each (a calibration folder), and
  gallery / probe folders of other generated people."""
  root = tmp_path_factory.mktemp("people")
  for part, ids, views in (
      ("calibration", range(8), range(6)),
      ("gallery", range(20, 24), range(3)),
      ("probes", range(20, 26), range(3, 5)),
  ):
    for person in ids:
      folder = root / part / f"p{person}"
      folder.mkdir(parents=True)
      for view in views:
        cv2.imwrite(
            str(folder / f"{view}.png"),
            synthetic.render_photo(1, person, view, SIZE),
        )
  return root


@pytest.fixture(scope="module")
def trained_on_two(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two") / "run"
  result = commands.run(
      *tiny_runs.cli_command(workdir)[2:], devices=2, timeout=900, check=True
  )
  assert "on 2 device(s)" in result.stdout
  return workdir


def _use_everywhere(workdir, people, tmp_path, devices):
  """Every mode of the model in `workdir` on `devices` devices, with only
  --workdir; returns what embed wrote."""
  w = f"--workdir={workdir}"
  calibration = f"--config.eval.calibration_folders=('{people}/calibration',)"
  evaluated = _run(w, "--mode=eval", calibration, devices=devices)
  assert f"on {devices} device(s)" in evaluated.stdout
  assert "calibration_calibration" in evaluated.stdout  # the table's row
  out = tmp_path / f"faces{devices}.npz"
  _run(
      w,
      "--mode=embed",
      f"--images={people}/probes",
      f"--out={out}",
      devices=devices,
  )
  a, b = (
      people / "probes" / "p20" / "3.png",
      people / "probes" / "p21" / "3.png",
  )
  compared = _run(
      w, "--mode=compare", f"--images={a},{b}", "--far=1e-2", devices=devices
  )
  assert "calibration people" in compared.stdout, compared.stdout
  who = tmp_path / f"who{devices}.csv"
  identified = _run(
      w,
      "--mode=identify",
      f"--gallery={people}/gallery",
      f"--images={people}/probes",
      f"--out={who}",
      "--fpir=0.1",
      devices=devices,
  )
  assert re.search(
      r"on calibration_calibration \(.*\): FPIR about 0.1, " "a point estimate",
      identified.stdout,
  )
  assert "against this gallery of 4 people" in identified.stdout
  assert len(list(csv.DictReader(who.open()))) == 12
  for fmt in ("onnx", "stablehlo", "safetensors"):
    # StableHLO for CPU only: every platform is test_export's.
    where = ("--platforms=cpu",) if fmt == "stablehlo" else ()
    exported = _run(
        w,
        f"--format={fmt}",
        *where,
        f"--out={tmp_path / f'm{devices}.{fmt}'}",
        module="qgjt_jax.export",
        devices=devices,
    )
    assert "WARNING" not in exported.stdout + exported.stderr
  with np.load(out) as data:
    return {k: data[k] for k in data.files}


def test_trained_on_two_devices_used_on_one(trained_on_two, people, tmp_path):
  embedded = _use_everywhere(trained_on_two, people, tmp_path, devices=1)
  assert embedded["embeddings"].shape == (12, 32)


def test_trained_on_one_device_used_on_two(reference_run, people, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  on_two = _use_everywhere(workdir, people, tmp_path, devices=2)
  out = tmp_path / "faces_on_one.npz"
  _run(
      f"--workdir={workdir}",
      "--mode=embed",
      f"--images={people}/probes",
      f"--out={out}",
  )
  with np.load(out) as on_one:
    np.testing.assert_allclose(
        on_two["embeddings"], on_one["embeddings"], atol=1e-5
    )
    np.testing.assert_allclose(on_two["norms"], on_one["norms"], rtol=1e-5)
    assert list(on_two["paths"]) == list(on_one["paths"])


def _readme_block(title: str) -> str:
  text = (tiny_runs.ROOT / "README.md").read_text()
  section = text[text.index(title) :]
  return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_readme_reloads_a_checkpoint_with_orbax_alone(
    trained_on_two, people, tmp_path
):
  """The README's lines, run as written (the workdir and faces swapped in)
  in a process of 1 device on the checkpoint of 2, give --mode=embed's
  embeddings."""
  faces_dir = people / "probes" / "p22"
  out = tmp_path / "embedded.npz"
  _run(
      f"--workdir={trained_on_two}",
      "--mode=embed",
      f"--images={faces_dir}",
      f"--out={out}",
  )
  with np.load(out) as data:
    want, paths = data["embeddings"], list(data["paths"])
  faces = np.stack([cv2.imread(str(faces_dir / p)) for p in paths])
  np.save(tmp_path / "faces.npy", faces)
  code = _readme_block("## Reload a checkpoint with orbax alone")
  code = re.sub(
      r"^workdir = .*$", f'workdir = "{trained_on_two}"', code, flags=re.M
  )
  code = re.sub(
      r"^faces = .*$",
      f'faces = np.load("{tmp_path}/faces.npy")',
      code,
      flags=re.M,
  )
  script = tmp_path / "readme.py"
  script.write_text(code + "\nnp.save('got.npy', embeddings)\n")
  result = commands.run(None, script, cwd=tmp_path, devices=1, check=True)
  assert "WARNING" not in result.stderr, result.stderr
  np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, atol=1e-5)
