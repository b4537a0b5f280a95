"""The throughput benchmark: CPU smoke run without the heavy dependencies."""
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import pytest

from qgjt_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What accelerator images typically lack; none may be needed to benchmark.
BLOCKED = ("tensorflow", "tensorflow_datasets", "grain", "clu",
           "ml_collections", "orbax", "orbax.checkpoint", "array_record")

TINY = ["--arch=ir18", "--base_width=4", "--embedding_size=16",
        "--image_size=16", "--batch=4", "--classes=37", "--queue=16",
        "--steps=1", "--warmup=1", "--repeats=1", "--dtype=float32"]


def test_smoke_run_without_tensorflow_grain_clu_ml_collections_orbax():
  script = textwrap.dedent(f"""
      import sys
      for name in {BLOCKED!r}:
        sys.modules[name] = None  # any import of it now fails
      from qgjt_jax import bench
      bench.main({TINY!r})
      loaded = [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]
      print("LOADED", loaded)
  """)
  # Unoptimised CPU code: compiling dominates a one-step smoke run.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  lines = [json.loads(l) for l in result.stdout.splitlines()
           if l.startswith("{")]
  assert len(lines) == 1, result.stdout
  assert "LOADED []" in result.stdout
  record = lines[0]
  assert record["platform"] == "cpu" and record["devices"] == 1
  assert record["arch"] == "ir18" and record["batch"] == 4
  assert record["images"] == 8 and record["dtype"] == "float32"
  assert record["qgface"] and record["queue"] == 16
  assert record["step_ms"] > 0 and record["finite"]
  assert record["images_per_s"] == pytest.approx(
      8 / (record["step_ms"] / 1e3), rel=1e-2)
  assert record["samples_per_s"] == pytest.approx(
      record["images_per_s"] / 2, rel=1e-2)
  assert record["mfu"] is None  # a CPU has no entry in the peak table
  assert record["xla_flops_per_step"] is None or (
      record["xla_flops_per_step"] > 0)


def test_no_qgface_step_has_no_queue_or_contrastive_term():
  """The --no_qgface step, traced (not compiled): no queue, loss_con 0."""
  from qgjt_jax import state as state_lib
  from qgjt_jax import step as step_lib
  from qgjt_jax import optim
  config = bench.recipe_config(arch="ir18", batch=4, dtype="float32",
                               queue=16, qgface=False, image_size=16,
                               base_width=4, embedding_size=16)
  schedule = optim.make_lr_schedule(config.optim, 100.0, config.num_epochs)
  tx = optim.make_optimizer(config.optim, schedule)
  model = state_lib.build_model(config)
  state = jax.eval_shape(
      lambda r: state_lib.create_train_state(config, model, tx, 37, r),
      jax.random.key(0))
  assert state.queue.labels.shape == (1,)  # kind "none": a placeholder
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       bench.synthetic_batches(1, 4, 16, 37)[0])
  new_state, metrics = jax.eval_shape(
      lambda s, b: step_lib.train_step(
          s, b, model=model, tx=tx, config=config, lr_schedule=schedule,
          steps_per_epoch=100.0), state, batch)
  assert metrics["loss_con"].shape == ()
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def _flatten(ns, prefix=""):
  for key, value in vars(ns).items():
    if isinstance(value, types.SimpleNamespace):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_recipe_config_is_configs_ms1m():
  from configs import ms1m
  config = ms1m.get_config()
  # Set on purpose by the benchmark (see recipe_config's docstring).
  deliberate = {"contrastive.start_epoch", "global_batch_size"}
  recipe = bench.recipe_config(batch=config.global_batch_size // 2)
  checked = 0
  for key, value in _flatten(recipe):
    if key in deliberate:
      continue
    want = config
    for part in key.split("."):
      want = want[part]
    if isinstance(want, tuple):
      want, value = list(want), list(value)
    assert value == want, key
    checked += 1
  assert checked > 40


def test_no_qgface_removes_queue_and_gate():
  recipe = bench.recipe_config(qgface=False)
  assert recipe.queue.kind == "none" and recipe.head.b == 0.0


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("NVIDIA H100 PCIe", None),
    ("cpu", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_table(kind, peak):
  assert bench.peak_flops(kind) == peak
