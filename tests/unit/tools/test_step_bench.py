"""The throughput benchmark: CPU smoke run without the heavy dependencies."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from configs import ms1m
from qgjt_jax.tools import step_bench
from tests.helpers import tiny_runs

ROOT = str(tiny_runs.ROOT)

# What accelerator images typically lack; none may be needed to benchmark.
BLOCKED = (
    "tensorflow",
    "tensorflow_datasets",
    "grain",
    "clu",
    "orbax",
    "orbax.checkpoint",
    "array_record",
)

# The benchmark's settings are the recipe's keys; its own flags, the run's.
TINY = [
    "--config.model.name=ir18",
    "--config.model.base_width=4",
    "--config.model.embedding_size=16",
    "--config.data.image_size=16",
    "--config.global_batch_size=4",
    "--config.queue.capacity=16",
    "--config.model.dtype=float32",
    "--classes=37",
    "--steps=1",
    "--warmup=1",
    "--repeats=1",
]


@pytest.mark.slow
def test_smoke_run_without_tensorflow_grain_clu_orbax():
  script = textwrap.dedent(f"""
      import sys
      for name in {BLOCKED!r}:
        sys.modules[name] = None  # any import of it now fails
      from qgjt_jax import bench
      try:
        bench.cli()
      except SystemExit as e:
        assert not e.code, e.code
      loaded = [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]
      print("LOADED", loaded)
  """)
  # Unoptimised CPU code: compiling dominates a one-step smoke run.
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_backend_optimization_level=0",
  )
  result = subprocess.run(
      [sys.executable, "-c", script, *TINY],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
      env=env,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  lines = [
      json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")
  ]
  assert len(lines) == 1, result.stdout
  assert "LOADED []" in result.stdout
  record = lines[0]
  assert record["platform"] == "cpu" and record["devices"] == 1
  assert record["arch"] == "ir18" and record["batch"] == 4
  assert record["images"] == 8 and record["dtype"] == "float32"
  assert record["qgface"] and record["queue"] == 16
  assert record["step_ms"] > 0 and record["finite"]
  assert record["images_per_s"] == pytest.approx(
      8 / (record["step_ms"] / 1e3), rel=1e-2
  )
  assert record["samples_per_s"] == pytest.approx(
      record["images_per_s"] / 2, rel=1e-2
  )
  assert record["mfu"] is None  # a CPU has no entry in the peak table
  assert record["xla_flops_per_step"] is None or (
      record["xla_flops_per_step"] > 0
  )
  # Compile time and XLA's memory analysis, known before running.
  assert record["compile_s"] >= 0
  assert record["compiled_argument_bytes"] > 0
  assert record["compiled_output_bytes"] > 0
  assert record["compiled_temp_bytes"] >= 0


def _bench_config(qgface=True):
  recipe = step_bench.default_recipe()
  recipe.update_from_flattened_dict(
      {
          "model.name": "ir18",
          "model.base_width": 4,
          "model.embedding_size": 16,
          "data.image_size": 16,
          "global_batch_size": 4,
          "queue.capacity": 16,
          "model.dtype": "float32",
      }
  )
  return step_bench.bench_config(recipe, qgface=qgface)


def test_the_benchmark_times_the_recipe_of_its_config_file():
  config, recipe = _bench_config(), ms1m.get_config()
  # What the benchmark sets; everything else is the recipe's.
  assert (config.model.name, config.global_batch_size) == ("ir18", 4)
  assert config.contrastive.start_epoch == 0.0  # the joint phase
  for section in ("quality", "optim", "head"):
    want = recipe[section].to_dict()
    got = config[section].to_dict()
    assert got == want, section
  assert config.queue.kind == recipe.queue.kind == "proxy"


def test_no_qgface_removes_queue_and_gate_and_the_contrastive_term():
  """The --no_qgface step, traced (not compiled): no queue, loss_con 0."""
  from qgjt_jax import stack as stack_lib

  config = _bench_config(qgface=False)
  assert config.queue.kind == "none" and config.head.b == 0.0
  stack = stack_lib.build_stack(config, num_classes=37, steps_per_epoch=100.0)
  state = jax.eval_shape(stack.create_state, jax.random.key(0))
  assert state.queue.labels.shape == (1,)  # kind "none": a placeholder
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      step_bench.synthetic_batches(1, 4, 16, 37)[0],
  )
  new_state, metrics = jax.eval_shape(stack.train_step, state, batch)
  assert metrics["loss_con"].shape == ()
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("NVIDIA H100 PCIe", None),
        ("cpu", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_table(kind, peak):
  assert step_bench.peak_flops(kind) == peak


def test_the_recipe_is_taken_as_main_takes_it():
  """--config (default configs/ms1m.py) and --config.KEY= as for
  qgjt_jax.main; an unknown key names the nearest, in one line."""
  script = textwrap.dedent("""
      import sys
      from absl import flags
      from qgjt_jax import bench, recipe_flags
      recipe_flags.parse(flags.FLAGS, sys.argv,
                         default_recipe=str(bench.step_bench.DEFAULT_CONFIG))
      print(flags.FLAGS.config.seed, flags.FLAGS.config.model.name)
  """)

  def parsed(*args):
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )

  result = parsed("--config.seed=3", "--steps=2")
  assert result.stdout.split() == [
      "3",
      ms1m.get_config().model.name,
  ], result.stderr
  result = parsed("--config.sed=3")
  assert result.returncode != 0 and result.stdout == ""
  assert 'Did you mean "seed"' in result.stderr.strip().splitlines()[-1]
