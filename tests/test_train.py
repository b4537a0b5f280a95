"""The training loop: checkpoint round trip, stop and exact resume, eval mode.

The runs use a tiny recipe (32 px faces, width-8 IR-18, 8 identities, 32
steps). Compiling its train step takes tens of seconds on a small CPU, so
every run here shares one step program through JAX's persistent compilation
cache, and one uninterrupted reference run (`reference_run()`) is made once
per test process and reused by tests/test_reliability.py.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from qgjt_jax import checkpoint as ckpt
from qgjt_jax import optim
from qgjt_jax import parallel
from qgjt_jax import state as state_lib
from qgjt_jax import train
from qgjt_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tiny recipe, as flattened overrides of configs/synthetic.py, so the
# in-process runs and the command-line runs train exactly the same thing.
TINY = {
    "data.image_size": 32,
    "model.base_width": 8,
    "model.embedding_size": 32,
    "model.dtype": "float32",
    "data.synthetic.num_identities": 8,
    "data.synthetic.images_per_identity": 8,
    "data.synthetic.eval_identities": 4,
    "data.synthetic.eval_pairs": 16,
    "global_batch_size": 8,
    "queue.capacity": 48,
    "eval.batch_size": 8,
    "num_epochs": 4.0,
    "optim.warmup_epochs": 0.0,
    "optim.milestones": (3,),
    "contrastive.start_epoch": 0.0,
    "log_every_steps": 1,
    "checkpoint_every_steps": 8,
    "keep_checkpoints": 5,
}
NUM_CLASSES = 8
STEPS = 32  # 64 images / 8 per step x 4 epochs
LOSSES = ("loss", "loss_cls", "loss_con")


def tiny_config(**changes):
  config = synthetic.get_config()
  for dotted, value in {**TINY, **changes}.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_command(workdir, *extra, **changes) -> list[str]:
  """`python -m qgjt_jax.main` training the tiny recipe in workdir."""
  flags = []
  for dotted, value in {**TINY, **changes}.items():
    text = repr(value) if isinstance(value, tuple) else str(value)
    flags.append(f"--config.{dotted}={text}")
  return [sys.executable, "-m", "qgjt_jax.main",
          "--config=configs/synthetic.py", f"--workdir={workdir}",
          *flags, *extra]


# One scratch folder and one compilation cache per test process (or the
# cache JAX_COMPILATION_CACHE_DIR names, kept between sessions).
_SCRATCH = pathlib.Path(tempfile.mkdtemp(prefix="qgjt_train_tests_"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
COMPILE_CACHE = pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or
                             _SCRATCH / "jax_cache")


@contextlib.contextmanager
def compile_cache():
  """Cheap compiles for the tests, settings restored after.

  JAX's persistent cache is on, so each run loads the step program compiled
  by the first one (in this process or a subprocess) instead of compiling it
  again; and XLA skips most optimisation passes, which cuts the first
  compile of this tiny model's init and step from ~90 to ~30 CPU seconds
  (the runs themselves take well under a second). Every run here, the
  reference included, compiles the same way.
  """
  from jax._src import compilation_cache
  settings = {
      "jax_compilation_cache_dir": str(COMPILE_CACHE),
      "jax_persistent_cache_min_compile_time_secs": 0,
      "jax_persistent_cache_min_entry_size_bytes": -1,
      "jax_disable_most_optimizations": True,
  }
  before = {n: jax.config.values[n] for n in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def subprocess_env(devices: int | None = None) -> dict[str, str]:
  """Environment of a command-line run: compiles as in compile_cache() and
  into the same cache; TensorFlow hidden
  (metrics then go to stdout and metrics.jsonl, as on machines without it),
  which saves importing it in every subprocess."""
  env = dict(os.environ)
  shim = _SCRATCH / "no_tensorflow"
  if not shim.exists():
    (shim / "tensorflow").mkdir(parents=True)
    (shim / "tensorflow" / "__init__.py").write_text(
        "raise ImportError('TensorFlow is hidden in this test')\n")
  env.update(
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(COMPILE_CACHE),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
      JAX_DISABLE_MOST_OPTIMIZATIONS="1",
      PYTHONPATH=os.pathsep.join(
          [str(shim), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
      PYTHONUNBUFFERED="1",
  )
  # The parent's XLA flags are kept (they are part of the cache key); only
  # the device count is ours to set.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def run_in_process(config, workdir, raises=None) -> tuple[object, str]:
  """train_and_evaluate with its stdout captured: (results, output).

  With `raises` (an exception type), the run must raise it: (the exception,
  output).
  """
  out = io.StringIO()
  with compile_cache(), contextlib.redirect_stdout(out):
    try:
      results = train.train_and_evaluate(config, str(workdir))
    except BaseException as e:
      if raises is not None and isinstance(e, raises):
        return e, out.getvalue()
      e.add_note(f"Output of the run:\n{out.getvalue()}")
      raise
  if raises is not None:
    pytest.fail(f"The run did not raise {raises.__name__}:\n{out.getvalue()}")
  return results, out.getvalue()


def step_metrics(workdir) -> dict[int, dict]:
  """Per-step values of WORKDIR/metrics.jsonl (training and evaluation
  lines merged); a rerun's values win."""
  records = {}
  path = pathlib.Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines():
    record = json.loads(line)
    records.setdefault(record["step"], {}).update(record)
  return records


def assert_same_losses(actual: dict, expected: dict, steps) -> None:
  """Losses of `steps` equal (to 1e-6) in two runs' step records."""
  steps = list(steps)
  assert steps, "no steps to compare"
  missing = [s for s in steps if s not in actual]
  assert not missing, f"steps {missing} were not logged"
  for name in LOSSES:
    got = np.array([actual[s][name] for s in steps])
    want = np.array([expected[s][name] for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6,
                               err_msg=f"{name} of steps {steps}")


def load_state(workdir, step: int) -> dict:
  """The saved TrainState of a step as nested dicts of numpy arrays."""
  manager = ocp.CheckpointManager(
      os.path.abspath(pathlib.Path(workdir) / "checkpoints"),
      options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  restored["rng"] = jax.random.key_data(restored["rng"])
  return jax.tree.map(np.asarray, restored)


def assert_trees_equal(a, b, what: str = "") -> None:
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b], what
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(
        x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}")


_RUNS = {}


def reference_run() -> tuple[pathlib.Path, dict[int, dict]]:
  """The uninterrupted tiny run (made once): its workdir and step records.

  Do not write into the workdir; copy it.
  """
  if "reference" not in _RUNS:
    workdir = _SCRATCH / "reference"
    results, output = run_in_process(tiny_config(), workdir)
    assert results, output
    _RUNS["reference"] = (workdir, step_metrics(workdir))
  return _RUNS["reference"]


STOP_STEP = 16  # also a periodic checkpoint step (checkpoint_every_steps=8)


def stopped_run() -> tuple[pathlib.Path, str]:
  """The tiny run stopped by SIGTERM at STOP_STEP (made once): its workdir
  and output. Do not write into the workdir; copy it.

  The signal arrives while the loop draws batch STOP_STEP, so the loop must
  finish that step, checkpoint it (once, though the periodic save has just
  written the same step) and return.
  """
  if "stopped" not in _RUNS:
    def stop(n, batch):
      if n == STOP_STEP:
        os.kill(os.getpid(), signal.SIGTERM)
      return batch
    workdir = _SCRATCH / "stopped"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(pipeline, "make_train_dataset", poisoned_dataset(stop))
      results, output = run_in_process(tiny_config(), workdir)
    assert results == {}, output
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    _RUNS["stopped"] = (workdir, output)
  return _RUNS["stopped"]


def poisoned_dataset(hook):
  """make_train_dataset whose batches pass through hook(batch number, batch)
  (numbered from 1 in the order the loop draws them)."""
  original = pipeline.make_train_dataset
  counter = {"n": 0}

  def make(*args, **kwargs):
    def apply(batch):
      counter["n"] += 1
      return hook(counter["n"], batch)
    return original(*args, **kwargs).map(apply)
  return make


# ---------------------------------------------------------------------------
# Checkpoint round trip (no training).


def _random_like(rng: np.random.Generator, x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key(int(rng.integers(1 << 30)))
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.asarray(rng.integers(0, 1000, x.shape), x.dtype)
  return jnp.asarray(rng.standard_normal(x.shape), x.dtype)


def _new_state(config, mesh):
  schedule = optim.make_lr_schedule(config.optim, 8, config.num_epochs)
  tx = optim.make_optimizer(config.optim, schedule)
  model = state_lib.build_model(config)
  return state_lib.create_sharded_state(
      config, model, tx, NUM_CLASSES, jax.random.key(0), mesh)


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

  restored = ckpt.restore_latest(ckpt.make_manager(str(tmp_path /
                                                       "checkpoints")),
                                 template, shardings)
  unwrap = lambda s: s.replace(rng=jax.random.key_data(s.rng))
  assert_trees_equal(jax.device_get(unwrap(restored)),
                     jax.device_get(unwrap(state)))
  assert restored.rng.dtype == state.rng.dtype  # still a typed key

  # The `model` item alone restores without the train state's layout.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=parallel.replicated(mesh)),
      ckpt.model_item(template))
  model, step = ckpt.restore_model(str(tmp_path / "checkpoints"), abstract)
  assert step == int(state.step)
  assert_trees_equal(jax.device_get(model),
                     jax.device_get(ckpt.model_item(state)))


# ---------------------------------------------------------------------------
# The loop: stop, resume, evaluate.


def test_reference_run_trains_every_step():
  _, ref = reference_run()
  assert sorted(ref) == list(range(1, STEPS + 1))
  assert all(np.isfinite(ref[s]["loss"]) for s in ref)


def test_sigterm_in_the_loop_finishes_the_step_and_checkpoints_it():
  stopped_dir, output = stopped_run()
  assert f"Stopped by SIGTERM at step {STOP_STEP};" in output, output
  assert sorted(step_metrics(stopped_dir)) == list(range(1, STOP_STEP + 1))
  manager = ckpt.make_manager(str(stopped_dir / "checkpoints"))
  assert manager.all_steps() == [8, STOP_STEP]
  assert int(load_state(stopped_dir, STOP_STEP)["step"]) == STOP_STEP
  # Resuming it is tested on a damaged copy in test_reliability.py (in this
  # process) and on a real SIGTERM there (in subprocesses).


def test_config_record_keeps_the_config_and_version():
  ref_dir, _ = reference_run()
  record = json.loads((ref_dir / ckpt.CONFIG_RECORD).read_text())
  import qgjt_jax
  assert record["version"] == qgjt_jax.__version__
  assert record["config"]["num_classes"] == NUM_CLASSES
  assert record["config"]["model"]["base_width"] == 8
  assert record["config"]["queue"]["capacity"] == 48


def test_eval_mode_restores_the_model_on_another_device_count(tmp_path):
  """Trained on one device, evaluated by `--mode=eval` on two."""
  ref_dir, _ = reference_run()
  assert jax.device_count() == 1
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  trained = json.loads((workdir / "eval" / f"step_{STEPS}.json").read_text())
  (workdir / "eval" / f"step_{STEPS}.json").unlink()
  command = cli_command(workdir, "--mode=eval")
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(devices=2), timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "on 2 device(s)" in result.stdout, result.stdout
  assert f"Restored the model of step {STEPS}" in result.stdout
  assert "synthetic_lq_lq" in result.stdout  # the table
  evaluated = json.loads((workdir / "eval" / f"step_{STEPS}.json").read_text())
  assert sorted(evaluated) == sorted(trained)
  for name, metrics in trained.items():
    np.testing.assert_allclose(evaluated[name]["mean_norm"],
                               metrics["mean_norm"], rtol=1e-4, err_msg=name)
    # Two devices may round differently; a pair may flip at the threshold.
    assert abs(evaluated[name]["accuracy_mean"] -
               metrics["accuracy_mean"]) <= 1.0 / metrics["num_pairs"], name

  # Another architecture than the workdir's: one line naming the key.
  result = subprocess.run(cli_command(workdir, "--mode=eval",
                                      **{"model.base_width": 16}),
                          capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=600)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "config.model.base_width: the checkpoints have 8" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr
