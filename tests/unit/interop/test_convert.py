"""The conversion program: a PyTorch IResNet file becomes a workdir whose
checkpoint restores to the reference's outputs and evaluates with --mode=eval.
"""

import json

import jax
import numpy as np
import pytest

import qgjt_jax
from qgjt_jax import records
from qgjt_jax.eval import runner
from qgjt_jax.interop import convert
from qgjt_jax.interop import state_dicts
from qgjt_jax.interop import weight_files
from tests.helpers import commands
from tests.helpers import tiny_runs

PROJECT_ROOT = tiny_runs.ROOT
WEIGHTS = "iresnet18_eval.weights.npz"


def _run_cli(*args: str) -> commands.Result:
  return commands.run("qgjt_jax.convert", *args)


@pytest.fixture(scope="module")
def converted(reference_dir, tmp_path_factory):
  """(workdir, stdout) of one CLI run on the reference IR-18 weights."""
  workdir = tmp_path_factory.mktemp("convert_cli") / "ir18"
  result = _run_cli(f"--src={reference_dir / WEIGHTS}", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


def test_summary_describes_the_model(reference_dir, converted):
  workdir, stdout = converted
  assert "ir18: IResNet-18 (no SE, base width 64, adaface layout)" in stdout
  with np.load(reference_dir / WEIGHTS) as weights:
    # Trainable tensors: everything but BatchNorm's running statistics.
    num_params = sum(
        weights[k].size for k in weights.files if ".running_" not in k
    )
    fc_rows, fc_inputs = weights["output_layer.3.weight"].shape
  assert f"{num_params:,}" in stdout
  assert fc_inputs == 512 * 7 * 7
  record = json.loads((workdir / "converted_from.json").read_text())
  assert record["source"] == str(reference_dir / WEIGHTS)
  assert record["config_overrides"] == {
      "model.name": "ir18",
      "model.base_width": 64,
      "model.embedding_size": int(fc_rows),
      "model.input_order": "BGR",
      "data.image_size": 112,
  }
  # Using it needs nothing but the workdir.
  assert f"python -m qgjt_jax.main --workdir={workdir} --mode=eval" in stdout


def test_restored_model_reproduces_the_reference(reference_dir, converted):
  workdir, _ = converted
  model = qgjt_jax.load_model(str(workdir))
  assert (model.step, model.name, model.image_size) == (0, "ir18", 112)
  assert model.norm_stats is None  # a converted model has no statistics
  with np.load(reference_dir / "iresnet18_eval.npz") as case:
    images = case["in/images_nchw"].transpose(0, 2, 3, 1)
    want_embedding = case["out/embedding"]
    want_norm = case["out/norm"][:, 0]
  embedding, norm = jax.jit(lambda v, x: model.module.apply(v, x, train=False))(
      model.variables, images
  )
  np.testing.assert_allclose(embedding, want_embedding, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(norm, want_norm, rtol=1e-4)


def test_eval_mode_reads_the_converted_workdir(
    converted, insightface_rec_dir, capsys
):
  workdir, _ = converted
  config = records.recorded_config(str(workdir))
  # No flip fusion: half the forward passes, and the protocol is not what is
  # tested here.
  config.eval.update(
      bin_sets=(str(insightface_rec_dir / "lfw.bin"),),
      batch_size=16,
      fusion=None,
  )
  results = runner.evaluate_checkpoint(str(workdir), config=config)
  printed = capsys.readouterr().out
  assert "Restored the model of step 0" in printed
  rows = [line.split() for line in printed.splitlines()]
  assert any(row and row[0] == "lfw" for row in rows), printed
  assert results["lfw"]["num_pairs"] == 40
  written = sorted((workdir / "eval").glob("*.json"))
  assert [p.name for p in written] == ["step_0.json"]
  saved = json.loads(written[0].read_text())
  assert saved["lfw"]["accuracy_mean"] == pytest.approx(
      results["lfw"]["accuracy_mean"]
  )


def test_existing_checkpoints_are_kept_unless_overwrite(
    reference_dir, tmp_path
):
  old_step = tmp_path / "checkpoints" / "1000"
  old_step.mkdir(parents=True)
  result = _run_cli(f"--src={reference_dir / WEIGHTS}", f"--workdir={tmp_path}")
  assert result.returncode == 1
  assert "--overwrite" in result.stderr
  assert str(tmp_path / "checkpoints") in result.stderr
  assert "Traceback" not in result.stderr
  assert old_step.is_dir()

  model = convert.convert_state_dict(
      weight_files.read_state_dict(reference_dir / WEIGHTS)
  )
  with pytest.raises(FileExistsError, match="1000"):
    convert.write_checkpoint(str(tmp_path), model)
  convert.write_checkpoint(str(tmp_path), model, overwrite=True)
  # The old step is gone, so it cannot pass for the latest one.
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0"]


def test_unreadable_input_is_named(tmp_path):
  broken = tmp_path / "broken.npz"
  broken.write_bytes(b"not a zip archive")
  result = _run_cli(f"--src={broken}", f"--workdir={tmp_path / 'out'}")
  assert result.returncode == 1
  assert f"ERROR: cannot read {broken}" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out" / "checkpoints").exists()

  with pytest.raises(FileNotFoundError, match="missing.ckpt"):
    weight_files.read_state_dict(tmp_path / "missing.ckpt")


def test_not_a_backbone_is_named(tmp_path):
  path = tmp_path / "head_only.npz"
  np.savez(path, **{"head.kernel": np.zeros((4, 2), np.float32)})
  with pytest.raises(
      state_dicts.StateDictMismatchError, match="no backbone found"
  ):
    convert.convert_state_dict(weight_files.read_state_dict(path))


def test_wrong_arch_says_what_the_file_holds(reference_dir):
  state = weight_files.read_state_dict(reference_dir / WEIGHTS)
  with pytest.raises(
      state_dicts.StateDictMismatchError,
      match="ir_se50 was asked for, but the tensors look like ir18",
  ):
    convert.convert_state_dict(state, arch="ir_se50")
  with pytest.raises(ValueError, match="unknown backbone"):
    convert.convert_state_dict(state, arch="resnet50")


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
  path = tmp_path / "garbage.pth"
  path.write_text("not a checkpoint\n")
  with pytest.raises(
      ValueError, match="garbage.pth is not a PyTorch checkpoint"
  ):
    weight_files.read_state_dict(path)
