"""The tiny training recipe and helpers to run it, shared by the test modules.

The runs use a tiny recipe (32 px faces, width-8 IR-18, 8 identities, 32
steps). Compiling its train step takes tens of seconds on a small CPU, so
every run of a test session, in-process or on the command line, shares one
step program through JAX's persistent compilation cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from qgjt_jax import train
from qgjt_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]

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
  return [
      sys.executable,
      "-m",
      "qgjt_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={workdir}",
      *flags,
      *extra,
  ]


# The compilation cache every run of a test session shares: conftest.py
# points JAX_COMPILATION_CACHE_DIR at a session folder unless it is set
# (a folder kept between sessions then makes later sessions faster), and a
# folder hiding TensorFlow from subprocesses (QGJT_TEST_NO_TENSORFLOW).
def _compile_cache_dir() -> str:
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


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
  from jax.experimental.compilation_cache import compilation_cache

  settings = {
      "jax_compilation_cache_dir": _compile_cache_dir(),
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
  shim = os.environ["QGJT_TEST_NO_TENSORFLOW"]
  env.update(
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=_compile_cache_dir(),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
      JAX_DISABLE_MOST_OPTIMIZATIONS="1",
      PYTHONPATH=os.pathsep.join(
          [shim, str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
      ),
      PYTHONUNBUFFERED="1",
  )
  # The parent's XLA flags are kept (they are part of the cache key); only
  # the device count is ours to set.
  flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]
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
    np.testing.assert_allclose(
        got, want, rtol=1e-6, atol=1e-6, err_msg=f"{name} of steps {steps}"
    )


def load_state(workdir, step: int) -> dict:
  """The saved TrainState of a step as nested dicts of numpy arrays."""
  manager = ocp.CheckpointManager(
      os.path.abspath(pathlib.Path(workdir) / "checkpoints"),
      options=ocp.CheckpointManagerOptions(read_only=True),
  )
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )["state"]
  restored["rng"] = jax.random.key_data(restored["rng"])
  return jax.tree.map(np.asarray, restored)


def assert_trees_equal(a, b, what: str = "") -> None:
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b], what
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(
        x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}"
    )


def make_reference_run(
    workdir: pathlib.Path,
) -> tuple[pathlib.Path, dict[int, dict]]:
  """The uninterrupted tiny run: its workdir and step records (the
  `reference_run` fixture makes it once per session)."""
  results, output = run_in_process(tiny_config(), workdir)
  assert results, output
  return workdir, step_metrics(workdir)


DEMO_STEPS = 32  # one epoch of the embedded default: 2,048 images / 64


def make_demo_run(workdir: pathlib.Path) -> pathlib.Path:
  """The embedded default (configs/synthetic.py as it stands: 40 px, IR-18
  width 16, 128-d) trained for one epoch on the command line and evaluated
  at its end (the `demo_run` fixture makes it once per session)."""
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "qgjt_jax.main",
          "--config=configs/synthetic.py",
          f"--workdir={workdir}",
          "--config.num_epochs=1",
          "--config.optim.milestones=(1,)",
          "--config.contrastive.start_epoch=0",
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=subprocess_env(),
      timeout=900,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert (workdir / "eval" / f"step_{DEMO_STEPS}.json").is_file()
  return workdir


STOP_STEP = 16  # also a periodic checkpoint step (checkpoint_every_steps=8)


def make_stopped_run(workdir: pathlib.Path) -> tuple[pathlib.Path, str]:
  """The tiny run stopped by SIGTERM at STOP_STEP: its workdir and output
  (the `stopped_run` fixture makes it once per session).

  The signal arrives while the loop draws batch STOP_STEP, so the loop must
  finish that step, checkpoint it (once, though the periodic save has just
  written the same step) and return.
  """

  def stop(n, batch):
    if n == STOP_STEP:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  handler = signal.getsignal(signal.SIGTERM)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "make_train_dataset", poisoned_dataset(stop))
    results, output = run_in_process(tiny_config(), workdir)
  assert results == {}, output
  assert signal.getsignal(signal.SIGTERM) is handler  # put back
  return workdir, output


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


class OutputReader:
  """Collects a process's output lines in a thread; waits for a marker."""

  def __init__(
      self, proc: subprocess.Popen, marker: re.Pattern, timeout: float = 600
  ):
    self.lines, self.seen = [], threading.Event()
    self._proc, self._marker, self._timeout = proc, marker, timeout
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    for line in self._proc.stdout:
      self.lines.append(line)
      if self._marker.search(line):
        self.seen.set()
    self.seen.set()  # end of output: stop waiting either way

  def output(self) -> str:
    self._thread.join(timeout=self._timeout)
    return "".join(self.lines)


def signal_after_step(
    command: list[str],
    step: int,
    send,
    *,
    anchored: bool = False,
    timeout: float = 600,
    **popen,
) -> str:
  """Runs `command` until its progress line of `step` (at a line's start
  with `anchored`), then calls `send(process)`; returns its output once it
  has exited 0. A process that outlives `timeout` is killed (its whole
  group when started with start_new_session)."""
  proc = subprocess.Popen(
      command,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      cwd=ROOT,
      env=popen.pop("env", None) or subprocess_env(),
      **popen,
  )
  marker = re.compile(("^" if anchored else "") + rf"step {step}/{STEPS} ")
  reader = OutputReader(proc, marker, timeout)
  try:
    assert reader.seen.wait(timeout), "no progress line"
    if proc.poll() is None:
      send(proc)
    proc.wait(timeout)
  finally:
    if proc.poll() is None:
      if popen.get("start_new_session"):
        os.killpg(proc.pid, signal.SIGKILL)
      else:
        proc.kill()
  output = reader.output()
  assert proc.returncode == 0, output
  return output
