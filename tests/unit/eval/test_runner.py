"""The evaluator: the authors' images and dtype, and what the table says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import parallel
from qgjt_jax import state as state_lib
from qgjt_jax.eval import extract
from qgjt_jax.eval import report
from qgjt_jax.eval import runner
from qgjt_jax.eval import tinyface
from qgjt_jax.inference import model as model_lib
from qgjt_jax.models import normalize_images
from tests.helpers import eval_trees
from tests.helpers import tiny_runs


def _config(tmp_path, **eval_changes):
  config = tiny_runs.tiny_config()
  config.model.dtype = "bfloat16"  # trained in bf16...
  config.data.update(kind="rec", image_size=eval_trees.SIZE)
  config.eval.update(batch_size=8, **eval_changes)
  return config


def _variables(config):
  model = state_lib.build_model(config)
  size = config.data.image_size
  return model, model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
  )


@pytest.mark.slow
def test_evaluation_runs_in_its_own_dtype(tmp_path):
  config = _config(tmp_path)
  assert config.eval.dtype == "float32"  # ...evaluated in float32
  model, variables = _variables(config)
  images = np.random.default_rng(0).integers(
      0, 256, (8, eval_trees.SIZE, eval_trees.SIZE, 3), np.uint8
  )
  mesh = parallel.make_mesh(1)
  want = model.clone(dtype=jnp.float32).apply(
      variables, normalize_images(images), train=False
  )[0]
  evaluator = runner.Evaluator(config, model, mesh)
  embed = model_lib.make_embed_fn(
      evaluator.model.clone(dtype=jnp.dtype(config.eval.dtype)), mesh, variables
  )
  np.testing.assert_allclose(embed(images)[0], want, rtol=1e-5, atol=1e-6)
  bf16 = model.apply(
      variables, normalize_images(images, jnp.bfloat16), train=False
  )[0]
  assert np.max(np.abs(np.asarray(bf16, np.float32) - want)) > 1e-4


def test_tinyface_is_scored_on_the_aligned_copies_and_says_so(tmp_path):
  root = tmp_path / "tinyface"
  eval_trees.tinyface_tree(root / "Testing_Set", np.random.default_rng(1))
  aligned = eval_trees.tinyface_tree(
      root / "aligned_pad_0.1_pad_high", np.random.default_rng(2)
  )
  config = _config(tmp_path, tinyface_root=str(root))
  model, variables = _variables(config)
  evaluator = runner.Evaluator(config, model, parallel.make_mesh(1))
  results = evaluator.evaluate_variables(variables)
  assert results["tinyface"]["images"] == "aligned_pad_0.1_pad_high"
  embed = model_lib.make_embed_fn(
      model.clone(dtype=jnp.float32), parallel.make_mesh(1), variables
  )
  want = tinyface.evaluate_tinyface(
      embed,
      root,
      aligned_dir="aligned_pad_0.1_pad_high",
      batch_size=8,
      image_size=eval_trees.SIZE,
      progress=False,
  )
  raw = tinyface.evaluate_tinyface(
      embed, root, batch_size=8, image_size=eval_trees.SIZE, progress=False
  )
  for key in ("rank1", "rank5", "rank20"):
    assert results["tinyface"][key] == want[key]
  assert len(aligned[0]) == results["tinyface"]["num_probes"]
  assert raw != want  # the raw crops would have given other numbers
  table = report.format_table(results)
  assert "tinyface images: aligned_pad_0.1_pad_high" in table

  raw_config = _config(
      tmp_path, tinyface_root=str(root), tinyface_aligned_dir=""
  )
  raw_results = runner.Evaluator(
      raw_config, model, parallel.make_mesh(1)
  ).evaluate_variables(variables)
  assert raw_results["tinyface"]["images"] == "raw Testing_Set"


def test_a_registered_protocol_runs_with_the_others(tmp_path, monkeypatch):
  """Evaluations are a registry: a new protocol gets the embedder (the
  forward pass, batch, fusion and face size) and the config, and its sets
  are published with the provenance decisions read."""
  monkeypatch.setattr(runner, "_PROTOCOLS", dict(runner._PROTOCOLS))
  seen = []

  @runner.register_protocol("norms")
  def _norms(embedder, config):
    seen.append((embedder.batch_size, embedder.fusion, embedder.image_size))
    faces = np.zeros((3, embedder.image_size, embedder.image_size, 3), np.uint8)
    _, norms = embedder.embed_fn(faces)
    yield runner.Measured(
        "norms_of_grey", "measured", {"mean_norm": float(np.mean(norms))}
    )

  config = _config(tmp_path)
  model, variables = _variables(config)
  results = runner.Evaluator(
      config, model, parallel.make_mesh(1)
  ).evaluate_variables(variables)
  assert seen == [(8, config.eval.fusion, eval_trees.SIZE)]
  assert results["norms_of_grey"]["mean_norm"] > 0
  assert results["norms_of_grey"]["provenance"] == {
      "kind": "measured",
      "scoring": extract.scoring_name(config.eval.fusion),
  }
