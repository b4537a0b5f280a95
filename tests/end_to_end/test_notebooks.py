"""The notebooks run headless, tiny, on CPU; their helpers compute correctly.

Both notebooks execute in a fresh kernel (nbclient) started with this test's
interpreter, with small values injected after their `parameters` cell, as
papermill would. The quickstart trains a 32 px, width-8 IR-18 for 8 steps and
the evaluation notebook then evaluates its checkpoint on the fixture
`lfw.bin` (decoded at the model's 32 px) and the synthetic pairs. The two
kernels share one persistent compilation cache, so the second one loads the
embedding program compiled by the first.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
import pytest
from tests.helpers import tiny_runs

ROOT = tiny_runs.ROOT
NOTEBOOKS = ROOT / "notebooks"
pytestmark = [pytest.mark.notebook, pytest.mark.slow]
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
EVALUATE = NOTEBOOKS / "evaluate_checkpoint.ipynb"

# 8 identities x 8 images, batch 16, 2 epochs: 8 steps.
TINY = {
    "data.image_size": 32,
    "model.base_width": 8,
    "model.embedding_size": 32,
    "data.synthetic.num_identities": 8,
    "data.synthetic.images_per_identity": 8,
    "data.synthetic.eval_identities": 4,
    "data.synthetic.eval_pairs": 16,
    "global_batch_size": 16,
    "queue.capacity": 64,
    "eval.batch_size": 16,
    "optim.milestones": (1.5,),
    "optim.warmup_epochs": 0.0,
    "contrastive.start_epoch": 0.5,
}
CELL_TIMEOUT_S = 600


def _load(path: pathlib.Path):
  import nbformat

  return nbformat.read(path, as_version=4)


def _parameters_index(nb) -> int:
  tagged = [
      i
      for i, c in enumerate(nb.cells)
      if "parameters" in c.metadata.get("tags", [])
  ]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters': {tagged}"
  return tagged[0]


def _inject(nb, values: dict):
  """Inserts papermill's 'injected-parameters' cell after `parameters`."""
  import nbformat

  source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(_parameters_index(nb) + 1, cell)
  return nb


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A kernelspec running this interpreter, and the kernels' environment.

  The spec lives in a private folder, so no user-wide 'python3' kernel of
  another interpreter can be picked up. TensorFlow is hidden from the
  kernels (metrics then go to metrics.jsonl only, as on machines without it)
  to save importing it. JAX runs on the CPU, unoptimised (see below).
  """
  scratch = tmp_path_factory.mktemp("notebooks")
  spec_dir = scratch / "kernels" / "qgjt-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
      json.dumps(
          {
              "argv": [
                  sys.executable,
                  "-m",
                  "ipykernel_launcher",
                  "-f",
                  "{connection_file}",
              ],
              "display_name": "qgjt test kernel",
              "language": "python",
          }
      )
  )
  shim = scratch / "no_tensorflow" / "tensorflow"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text(
      "raise ImportError('TensorFlow is hidden in this test')\n"
  )
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(scratch / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
      PYTHONPATH=os.pathsep.join(
          [str(shim.parent)] + [p for p in [env.get("PYTHONPATH")] if p]
      ),
      MPLBACKEND="Agg",
  )
  # The tiny run compiles far more than it computes: XLA's CPU backend
  # without its LLVM optimisations compiles the train step in about half
  # the time, and 8 steps of a width-8 model do not notice the slower code.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return scratch, env


def _execute(nb, kernel_env):
  """Runs every cell; returns the executed notebook (raises on an error)."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  scratch, env = kernel_env
  specs = KernelSpecManager(
      kernel_dirs=[str(scratch / "kernels")], ensure_native_kernel=False
  )
  km = KernelManager(kernel_name="qgjt-test", kernel_spec_manager=specs)
  # The kernel starts in notebooks/, as in Jupyter; the set-up cell must find
  # the checkout from there.
  client = NotebookClient(
      nb,
      km=km,
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  client.execute(env=env)
  return nb


def _text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif "data" in out and "text/plain" in out.data:
        parts.append(out.data["text/plain"])
  return "\n".join(parts)


def _images(nb) -> int:
  return sum(
      "image/png" in out.get("data", {})
      for cell in nb.cells
      for out in cell.get("outputs", [])
  )


@pytest.fixture(scope="module")
def quickstart_run(kernel_env):
  """The quickstart, executed tiny once: (executed notebook, workdir)."""
  scratch, _ = kernel_env
  workdir = scratch / "quickstart"
  nb = _inject(
      _load(QUICKSTART),
      dict(
          workdir=str(workdir),
          fresh_start=True,
          num_epochs=2.0,
          overrides=TINY,
          log_every_steps=1,
          num_faces=16,
      ),
  )
  return _execute(nb, kernel_env), workdir


def test_notebooks_are_stored_without_outputs():
  for path in (QUICKSTART, EVALUATE):
    nb = _load(path)
    _parameters_index(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [], f"{path.name} holds outputs"
        assert cell.execution_count is None, f"{path.name} holds counts"


def test_quickstart_trains_plots_and_prints_the_table(quickstart_run):
  nb, workdir = quickstart_run
  text = _text(nb)
  assert "Backend: CPU" in text
  assert "accuracy_mean" in text
  for name in ("synthetic_hq_hq", "synthetic_hq_lq", "synthetic_lq_lq"):
    assert name in text
  assert "Restored the backbone of step 8." in text
  for label in ("same person", "same person, one LQ", "different people"):
    assert f"{label}: cosine" in text
  # Loss curves, H/L views, norms, face pairs; and the evaluation's ROC,
  # EDC (genuine pairs only, so drawn though its 8 impostor pairs resolve no
  # FAR) and norm histogram, drawn beside its JSON.
  for picture in ("roc", "reject", "norms"):
    assert f"step_8.{picture}.png" in text
  assert _images(nb) == 4 + 3
  assert (workdir / "checkpoints" / "8" / "model").is_dir()
  steps = {
      json.loads(line)["step"]
      for line in (workdir / "metrics.jsonl").read_text().splitlines()
  }
  assert steps == set(range(1, 9))


def test_evaluate_notebook_evaluates_the_quickstart_checkpoint(
    quickstart_run, kernel_env, insightface_rec_dir
):
  _, workdir = quickstart_run
  nb = _inject(
      _load(EVALUATE),
      dict(
          checkpoint=str(workdir / "checkpoints"),
          bin_sets=[str(insightface_rec_dir / "lfw.bin")],
          results_dir=str(workdir / "evaluation"),
      ),
  )
  text = _text(_execute(nb, kernel_env))
  # The model settings were read back from the run's config.json.
  assert "ir18 (width 8, 32-d) at 32 px." in text
  assert "Restored the model of step 8" in text
  assert "accuracy_mean" in text
  table = text[text.rindex("accuracy_mean") - 100 :]
  for name in ("lfw", "synthetic_hq_lq"):
    assert f"\n{name} " in table
  results = json.loads(
      (workdir / "evaluation" / "eval" / "step_8.json").read_text()
  )
  assert results["lfw"]["num_pairs"] == 40


# The helpers, against independent computations.


def test_hq_threshold_norm_is_where_quality_equals_b():
  import jax.numpy as jnp
  from qgjt_jax import notebook_utils as nbu
  from qgjt_jax.method import quality as quality_lib

  stats = quality_lib.QualityStats(mean=jnp.float32(21.0), std=jnp.float32(4.0))
  for b in (0.2, 0.4, 0.5, 0.7):
    n_star = nbu.hq_threshold_norm(21.0, 4.0, b, h=0.333, eps=1e-3)
    scaler = quality_lib.margin_scaler(
        jnp.array([n_star - 1e-3, n_star, n_star + 1e-3]),
        stats,
        h=0.333,
        eps=1e-3,
    )
    q = np.asarray(quality_lib.quality_from_scaler(scaler))
    np.testing.assert_allclose(q[1], b, atol=1e-5)
    assert q[0] < b < q[2]


def test_read_metrics_merges_the_records_of_a_step(tmp_path):
  from qgjt_jax import notebook_utils as nbu

  records = [
      {"step": 1, "loss_cls": 3.0},
      {"step": 2, "loss_cls": 2.0},
      {"step": 2, "loss_cls": 2.5, "loss_con": 1.0},  # resumed
      {"step": 3, "loss_cls": 1.0, "loss_con": 0.5},
      {"step": 3, "eval/hq_lq/accuracy_mean": 0.75},
  ]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records)
  )
  metrics = nbu.read_metrics(str(tmp_path))
  np.testing.assert_array_equal(metrics["step"], [1, 2, 3])
  np.testing.assert_array_equal(metrics["loss_cls"], [3.0, 2.5, 1.0])
  np.testing.assert_array_equal(metrics["loss_con"], [np.nan, 1.0, 0.5])
  np.testing.assert_array_equal(
      metrics["eval/hq_lq/accuracy_mean"], [np.nan, np.nan, 0.75]
  )


def test_overrides_refuse_unknown_keys_and_recorded_settings_read_back(
    tmp_path,
):
  from configs import synthetic
  from qgjt_jax import notebook_utils as nbu
  from qgjt_jax import records

  config = nbu.apply_overrides(
      synthetic.get_config(), {"model.base_width": 8, "data.image_size": 32}
  )
  assert (config.model.base_width, config.data.image_size) == (8, 32)
  with pytest.raises(KeyError, match="model.widht"):
    nbu.apply_overrides(config, {"model.widht": 8})
  with pytest.raises(KeyError, match="modle"):
    nbu.apply_overrides(config, {"modle.name": "ir50"})
  records.record_config(str(tmp_path), config.to_dict(), "0")
  assert records.recorded_model_settings(str(tmp_path)) == {
      "model.name": "ir18",
      "model.base_width": 8,
      "model.embedding_size": 128,
      "model.input_order": "BGR",
      "data.image_size": 32,
  }
  recorded = records.recorded_config(str(tmp_path))
  assert records.changed_keys(config.to_dict(), recorded.to_dict()) == []
  assert records.recorded_model_settings(str(tmp_path / "nothing")) == {}
  config.eval.batch_size = 100
  nbu.round_batch_sizes(config, 8)
  assert (config.global_batch_size, config.eval.batch_size) == (64, 104)
