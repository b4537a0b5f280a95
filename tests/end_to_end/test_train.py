"""The training loop: checkpoint round trip, stop and exact resume, eval mode.

Runs the tiny recipe of tests/helpers/tiny_runs.py; the uninterrupted and the stopped
runs are session fixtures (conftest.py), shared with test_reliability.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import parallel
from qgjt_jax import stack as stack_lib
from qgjt_jax import train
from qgjt_jax import workdir as workdir_layout
from tests.helpers.tiny_runs import (
    NUM_CLASSES,
    ROOT,
    STEPS,
    STOP_STEP,
    assert_trees_equal,
    cli_command,
    compile_cache,
    load_state,
    step_metrics,
    subprocess_env,
    tiny_config,
)

# ---------------------------------------------------------------------------
# Checkpoint round trip (no training).


def _random_like(rng: np.random.Generator, x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key(int(rng.integers(1 << 30)))
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.asarray(rng.integers(0, 1000, x.shape), x.dtype)
  return jnp.asarray(rng.standard_normal(x.shape), x.dtype)


def _new_state(config, mesh):
  stack = stack_lib.build_stack(
      config, num_classes=NUM_CLASSES, steps_per_epoch=8, mesh=mesh
  )
  return stack.init_state(jax.random.key(0)), stack.state_shardings


def test_checkpoint_round_trip_keeps_every_field(tmp_path):
  config = tiny_config()
  mesh = parallel.make_mesh(1)
  with compile_cache():
    template, shardings = _new_state(config, mesh)
  # Every leaf (queue, quality statistics, margin, rng, optimiser momentum,
  # counters) set to values that no initialisation produces.
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: _random_like(rng, x), template)
  state = jax.device_put(state, shardings)

  manager = ckpt.make_manager(str(tmp_path / "checkpoints"))
  assert ckpt.save(manager, state, force=True)
  manager.wait_until_finished()
  # A second save of the same step (periodic save, then the stop's) is a
  # no-op rather than orbax's StepAlreadyExistsError.
  assert not ckpt.save(manager, state, force=True)
  manager.close()

  restored = ckpt.restore_latest(
      ckpt.make_manager(str(tmp_path / "checkpoints")), template, shardings
  )
  unwrap = lambda s: s.replace(rng=jax.random.key_data(s.rng))
  assert_trees_equal(
      jax.device_get(unwrap(restored)), jax.device_get(unwrap(state))
  )
  assert restored.rng.dtype == state.rng.dtype  # still a typed key

  # The `model` item alone restores without the train state's layout.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=parallel.replicated(mesh)
      ),
      ckpt.model_item(template),
  )
  model, step = ckpt.restore_model(str(tmp_path / "checkpoints"), abstract)
  assert step == int(state.step)
  assert_trees_equal(
      jax.device_get(model), jax.device_get(ckpt.model_item(state))
  )


# ---------------------------------------------------------------------------
# The loop: stop, resume, evaluate.


def test_reference_run_trains_every_step(reference_run):
  _, ref = reference_run
  assert sorted(ref) == list(range(1, STEPS + 1))
  assert all(np.isfinite(ref[s]["loss"]) for s in ref)


def test_sigterm_in_the_loop_finishes_the_step_and_checkpoints_it(stopped_run):
  stopped_dir, output = stopped_run
  assert f"Stopped by SIGTERM at step {STOP_STEP};" in output, output
  assert sorted(step_metrics(stopped_dir)) == list(range(1, STOP_STEP + 1))
  manager = ckpt.make_manager(str(stopped_dir / "checkpoints"))
  assert manager.all_steps() == [8, STOP_STEP]
  assert int(load_state(stopped_dir, STOP_STEP)["step"]) == STOP_STEP
  # Resuming it is tested on a damaged copy in test_reliability.py (in this
  # process) and on a real SIGTERM there (in subprocesses).


def test_config_record_keeps_the_config_and_version(reference_run):
  ref_dir, _ = reference_run
  record = json.loads((ref_dir / workdir_layout.CONFIG_RECORD).read_text())
  import qgjt_jax

  assert record["version"] == qgjt_jax.__version__
  assert record["config"]["num_classes"] == NUM_CLASSES
  assert record["config"]["model"]["base_width"] == 8
  assert record["config"]["queue"]["capacity"] == 48


@pytest.mark.slow
def test_eval_mode_restores_the_model_on_another_device_count(
    tmp_path, reference_run
):
  """Trained on one device, evaluated by `--mode=eval` on two."""
  ref_dir, _ = reference_run
  assert jax.device_count() == 1
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  trained = json.loads((workdir / "eval" / f"step_{STEPS}.json").read_text())
  for result in (workdir / "eval").glob(f"step_{STEPS}.*"):
    result.unlink()  # the JSON and its pictures: the name is free again
  command = cli_command(workdir, "--mode=eval")
  result = subprocess.run(
      command,
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=subprocess_env(devices=2),
      timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "on 2 device(s)" in result.stdout, result.stdout
  assert f"Restored the model of step {STEPS}" in result.stdout
  assert "synthetic_lq_lq" in result.stdout  # the table
  evaluated = json.loads((workdir / "eval" / f"step_{STEPS}.json").read_text())
  assert sorted(evaluated) == sorted(trained)
  for name, metrics in trained.items():
    np.testing.assert_allclose(
        evaluated[name]["mean_norm"],
        metrics["mean_norm"],
        rtol=1e-4,
        err_msg=name,
    )
    # Two devices may round differently; a pair may flip at the threshold.
    assert (
        abs(evaluated[name]["accuracy_mean"] - metrics["accuracy_mean"])
        <= 1.0 / metrics["num_pairs"]
    ), name

  # Another architecture than the workdir's: one line naming the key.
  result = subprocess.run(
      cli_command(workdir, "--mode=eval", **{"model.base_width": 16}),
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=subprocess_env(),
      timeout=600,
  )
  assert result.returncode == 1, result.stdout + result.stderr
  assert "--config.model.base_width=16 contradicts the model" in result.stderr
  assert "model.base_width = 8 in its record" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr


def test_training_builds_its_views_with_the_recipe_defaults(
    tmp_path, monkeypatch
):
  """`data.view.recipe=adaface` trains on AdaFace's views (low resolution
  included), through the one builder the config checks use."""
  from qgjt_jax.data import degrade
  from qgjt_jax.data import pipeline

  seen = {}

  class Captured(Exception):
    pass

  def capture(*args, **kwargs):
    seen.update(kwargs)
    raise Captured

  monkeypatch.setattr(pipeline, "make_train_dataset", capture)
  with compile_cache(), pytest.raises(Captured):
    train.train_and_evaluate(
        tiny_config(**{"data.view.recipe": "adaface"}), str(tmp_path)
    )
  assert seen["view_config"] == degrade.adaface_config()
  assert seen["view_config"].lowres_p > 0
