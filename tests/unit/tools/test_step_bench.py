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
BLOCKED = ("tensorflow", "tensorflow_datasets", "grain", "clu", "orbax",
           "orbax.checkpoint", "array_record")

TINY = ["--arch=ir18", "--base_width=4", "--embedding_size=16",
        "--image_size=16", "--batch=4", "--classes=37", "--queue=16",
        "--steps=1", "--warmup=1", "--repeats=1", "--dtype=float32"]


@pytest.mark.slow
def test_smoke_run_without_tensorflow_grain_clu_orbax():
  script = textwrap.dedent(f"""
      import sys
      for name in {BLOCKED!r}:
        sys.modules[name] = None  # any import of it now fails
      from qgjt_jax.tools import step_bench
      step_bench.main({TINY!r})
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
  # Compile time and XLA's memory analysis, known before running.
  assert record["compile_s"] >= 0
  assert record["compiled_argument_bytes"] > 0
  assert record["compiled_output_bytes"] > 0
  assert record["compiled_temp_bytes"] >= 0


def _bench_config(**changes):
  settings = dict(arch="ir18", batch=4, dtype="float32", queue=16,
                  qgface=True, image_size=16, base_width=4,
                  embedding_size=16, model_parallelism=1, sample_rate=1.0,
                  logits_dtype="float32", remat="none")
  return step_bench.bench_config(step_bench.default_recipe(),
                            **{**settings, **changes})


def test_the_benchmark_times_the_recipe_of_its_config_file():
  config, recipe = _bench_config(), ms1m.get_config()
  # What the benchmark sets; everything else is the recipe's.
  assert (config.model.name, config.global_batch_size) == ("ir18", 4)
  assert config.contrastive.start_epoch == 0.0  # the joint phase
  for section in ("quality", "optim", "head"):
    want = recipe[section].to_dict()
    got = config[section].to_dict()
    for key in ("sample_rate", "logits_dtype"):
      want.pop(key, None), got.pop(key, None)
    assert got == want, section
  assert config.queue.kind == recipe.queue.kind == "proxy"


def test_no_qgface_removes_queue_and_gate_and_the_contrastive_term():
  """The --no_qgface step, traced (not compiled): no queue, loss_con 0."""
  from qgjt_jax import stack as stack_lib
  config = _bench_config(qgface=False)
  assert config.queue.kind == "none" and config.head.b == 0.0
  stack = stack_lib.build_stack(config, num_classes=37,
                                steps_per_epoch=100.0)
  state = jax.eval_shape(stack.create_state, jax.random.key(0))
  assert state.queue.labels.shape == (1,)  # kind "none": a placeholder
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       step_bench.synthetic_batches(1, 4, 16, 37)[0])
  new_state, metrics = jax.eval_shape(stack.train_step, state, batch)
  assert metrics["loss_con"].shape == ()
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


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
  assert step_bench.peak_flops(kind) == peak


def test_config_flags_are_taken_as_main_takes_them():
  """--config and --config.KEY= as for qgjt_jax.main, in both argparse
  tools; a key one of the benchmark's own flags sets is refused, naming
  the flag, and an unknown key names the nearest."""
  from qgjt_jax.tools import export_check
  a = step_bench._parse(["--config.seed=3", "--arch=ir18"])
  assert (a.recipe.seed, a.arch) == (3, "ir18")
  assert a.recipe.model.name == ms1m.get_config().model.name  # the default
  a = export_check._parse(["--config=configs/synthetic.py",
                           "--config.head.s=32.0", "--platforms=cpu"])
  assert a.recipe.head.s == 32.0 and a.platforms == "cpu"
  with pytest.raises(SystemExit, match="give --arch= instead"):
    step_bench._parse(["--config.model.name=ir18"])
  with pytest.raises(SystemExit, match='Did you mean "seed"'):
    export_check._parse(["--config.sed=3"])
