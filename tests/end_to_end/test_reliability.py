"""Preemption, checkpoint integrity, incompatible resumes, the numerical guard.

Runs the tiny recipe of tests/helpers/tiny_runs.py and reuses its reference run and
compilation cache (made once per test process).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import parallel
from qgjt_jax import stack as stack_lib
from qgjt_jax import state as state_lib
from qgjt_jax import train
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.data import pipeline
from qgjt_jax.method import contrastive
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.method import queue_buffer as queue_lib
from tests.helpers import tiny_runs as runs

TIMEOUT = 600

# After a failed restore, orbax's event loop is closed while tensorstore
# still completes the other reads it had started; their callbacks then
# raise "Event loop is closed" at garbage collection. Nothing is lost.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


# ---------------------------------------------------------------------------
# Preemption of a real training process.


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_exits_0_and_resumes_exactly(
    tmp_path, reference_run
):
  _, ref = reference_run
  workdir = tmp_path / "run"
  command = runs.cli_command(workdir)
  env = runs.subprocess_env()
  # Step 3's progress line: training is under way, with steps to spare.
  output = runs.signal_after_step(
      command,
      3,
      lambda proc: proc.send_signal(signal.SIGTERM),
      timeout=TIMEOUT,
      env=env,
  )
  stop = re.search(
      r"Stopped by SIGTERM at step (\d+); checkpoint written", output
  )
  assert stop, output
  stop_step = int(stop.group(1))
  assert 3 <= stop_step < runs.STEPS
  assert ckpt.make_manager(str(workdir / "checkpoints")).latest_step() == (
      stop_step
  )
  assert max(runs.step_metrics(workdir)) == stop_step
  # The same recipe as the in-process reference, or the comparison is moot.
  recorded = lambda d: json.loads(
      (d / workdir_layout.CONFIG_RECORD).read_text()
  )["config"]
  assert recorded(workdir) == recorded(reference_run[0])

  result = subprocess.run(
      command,
      capture_output=True,
      text=True,
      cwd=runs.ROOT,
      env=env,
      timeout=TIMEOUT,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"Resumed from step {stop_step} " in result.stdout, result.stdout
  assert "synthetic_lq_lq" in result.stdout  # finished and evaluated
  runs.assert_same_losses(
      runs.step_metrics(workdir), ref, range(1, runs.STEPS + 1)
  )
  # TensorFlow is hidden from these runs: TensorBoard events come from
  # tensorboardX, one file per run (the stopped one and its resume).
  events = sorted(workdir.glob("events.out.tfevents.*"))
  assert len(events) == 2, sorted(p.name for p in workdir.iterdir())
  assert all(b"loss_cls" in e.read_bytes() for e in events)


@pytest.mark.slow
def test_ctrl_c_with_worker_processes_stops_once_and_quietly(tmp_path):
  """A terminal's Ctrl-C reaches the whole process group: the grain workers
  ignore it (no KeyboardInterrupt from each), the main process checkpoints
  and exits 0."""
  workdir = tmp_path / "run"
  output = runs.signal_after_step(
      runs.cli_command(workdir, **{"data.worker_count": 2}),
      3,
      lambda proc: os.killpg(proc.pid, signal.SIGINT),
      timeout=TIMEOUT,
      start_new_session=True,
  )
  assert re.search(
      r"Stopped by SIGINT at step \d+; checkpoint written", output
  ), output
  assert "KeyboardInterrupt" not in output and "Traceback" not in output


class TestStopRequested:

  def test_single_process_reads_a_flag_without_syncing(self, monkeypatch):
    from jax.experimental import multihost_utils

    def no_sync(*args, **kwargs):
      raise AssertionError("a single process must not all-gather")

    monkeypatch.setattr(multihost_utils, "process_allgather", no_sync)
    with train.StopRequested() as stop:
      assert not stop.agreed()
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.agreed() and stop.signal_name == "SIGTERM"

  # Agreement across processes: tests/end_to_end/test_multihost.py, real processes.

  def test_second_sigint_aborts_and_handlers_are_restored(self):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      with train.StopRequested() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs between bytecodes
          pass
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------
# Checkpoint integrity (small hand-made states, no training).


def _state(step: int, value: float) -> state_lib.TrainState:
  return state_lib.TrainState(
      step=jnp.int32(step),
      params={
          "backbone": {"w": jnp.full((4, 3), value)},
          "classifier": {"kernel": jnp.full((3, 5), value)},
      },
      batch_stats={"bn": {"mean": jnp.full((3,), value)}},
      opt_state=({"trace": jnp.full((4,), value)},),
      quality=quality_lib.init_quality_stats(value, 1.0),
      queue=queue_lib.init_queue(6, 3),
      margin=contrastive.init_margin_state(),
      rng=jax.random.key(step),
      nonfinite_total=jnp.int32(0),
      nonfinite_streak=jnp.int32(0),
  )


def _shardings(state):
  replicated = parallel.replicated(parallel.make_mesh(1))
  return jax.tree.map(lambda _: replicated, state)


def _saved_steps(directory, *steps):
  manager = ckpt.make_manager(str(directory))
  for step in steps:
    assert ckpt.save(manager, _state(step, float(step)))
  manager.wait_until_finished()
  manager.close()


def test_the_manager_keeps_the_newest_steps(tmp_path):
  manager = ckpt.make_manager(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    assert ckpt.save(manager, _state(step, float(step)))
    manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  manager.close()


def _restore(directory):
  template = _state(0, 0.0)
  manager = ckpt.make_manager(str(directory))
  try:
    return ckpt.restore_latest(manager, template, _shardings(template))
  finally:
    # Its clean-up of leftovers must not race the next manager's.
    manager.close()


def test_a_save_interrupted_before_its_commit_never_becomes_latest(
    tmp_path, monkeypatch
):
  from orbax.checkpoint._src.path import atomicity

  directory = tmp_path / "checkpoints"
  _saved_steps(directory, 1)
  manager = ckpt.make_manager(str(directory))

  async def crash(*args, **kwargs):
    raise OSError("killed before the commit")

  # The data of step 2 is written, then the process "dies" where orbax would
  # rename the temporary folder into place.
  with monkeypatch.context() as m:
    m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    ckpt.save(manager, _state(2, 2.0))
    with pytest.raises(OSError, match="killed before the commit"):
      manager.wait_until_finished()
    # The dead process's other writes are over before anyone looks.
    with contextlib.suppress(OSError):
      manager.close()
  leftovers = [p.name for p in directory.iterdir() if p.name.startswith("2")]
  assert leftovers and all("orbax-checkpoint-tmp" in n for n in leftovers)
  assert any(any((directory / n).iterdir()) for n in leftovers)  # written

  restored = _restore(directory)
  assert int(restored.step) == 1
  np.testing.assert_array_equal(restored.params["backbone"]["w"], 1.0)
  # The next run saves over it: step 2 again, the leftover gone.
  manager = ckpt.make_manager(str(directory))
  assert ckpt.save(manager, _state(2, 2.0))
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def _truncate_data(step_dir: pathlib.Path):
  for f in (step_dir / "state" / "d").iterdir():
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bytes(step_dir: pathlib.Path):
  for f in (step_dir / "state" / "d").iterdir():
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated data": _truncate_data,
    "flipped bytes": _flip_bytes,
    "no metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "no manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "no state item": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_used(
    tmp_path, damage, capsys
):
  directory = tmp_path / "checkpoints"
  _saved_steps(directory, 1, 2)
  DAMAGE[damage](directory / "2")
  restored = _restore(directory)
  assert int(restored.step) == 1
  np.testing.assert_array_equal(restored.params["backbone"]["w"], 1.0)
  out = capsys.readouterr().out
  assert re.search(
      r"WARNING: checkpoint step 2 in .* could not be restored", out
  ), out
  # Kept for inspection under a name orbax ignores; step 2 can be saved anew.
  aside = [p.name for p in directory.iterdir() if p.name.startswith("2.")]
  assert len(aside) == 1 and aside[0].startswith("2.damaged-"), aside
  manager = ckpt.make_manager(str(directory))
  assert manager.all_steps() == [1]
  assert ckpt.save(manager, _state(2, 2.0))
  manager.wait_until_finished()
  assert int(_restore(directory).step) == 2


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved_steps(directory, 1, 2)
  for step in ("1", "2"):
    _truncate_data(directory / step)
  with pytest.raises(ckpt.CheckpointError, match="step 2: .*\n.*step 1: "):
    _restore(directory)
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_an_empty_workdir_starts_fresh(tmp_path):
  assert _restore(tmp_path / "checkpoints") is None


@pytest.mark.slow
def test_training_falls_back_past_a_damaged_latest_and_resumes_exactly(
    tmp_path, reference_run, stopped_run
):
  """The stopped run's newest step (16) is damaged: the resumed run reports
  it, restarts from step 8 (state and data position), saves step 16 again on
  its way and ends exactly as the run that was never stopped."""
  ref_dir, ref = reference_run
  stopped_dir, _ = stopped_run
  workdir = tmp_path / "run"
  shutil.copytree(stopped_dir, workdir)
  _truncate_data(workdir / "checkpoints" / str(runs.STOP_STEP))
  results, output = runs.run_in_process(runs.tiny_config(), workdir)
  assert results
  assert f"WARNING: checkpoint step {runs.STOP_STEP} in" in output, output
  assert "Resumed from step 8 " in output, output
  runs.assert_same_losses(
      runs.step_metrics(workdir), ref, range(1, runs.STEPS + 1)
  )
  # The queue, quality statistics, margin, optimiser and rng end the same.
  runs.assert_trees_equal(
      runs.load_state(workdir, runs.STEPS),
      runs.load_state(ref_dir, runs.STEPS),
      "state after the resumed run vs the reference: ",
  )
  result_file = pathlib.Path("eval") / f"step_{runs.STEPS}.json"
  assert (workdir / result_file).read_text() == (
      ref_dir / result_file
  ).read_text()
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert str(runs.STOP_STEP) in names
  assert any(n.startswith(f"{runs.STOP_STEP}.damaged-") for n in names)


# ---------------------------------------------------------------------------
# Resuming with an incompatible config.


def _abstract_state(config, num_classes=runs.NUM_CLASSES):
  stack = stack_lib.build_stack(
      config,
      num_classes=num_classes,
      steps_per_epoch=8.0,
      mesh=parallel.make_mesh(1),
  )
  return stack.abstract_state()


def _record_of(config, num_classes=runs.NUM_CLASSES):
  return {**config.to_dict(), "num_classes": num_classes}


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"num_classes": 9}, "num_classes: recorded 8, now 9"),
        (
            {"model.name": "ir34"},
            "config.model.name: recorded 'ir18', now 'ir34'",
        ),
        (
            {"model.base_width": 16},
            "config.model.base_width: recorded 8, now 16",
        ),
        ({"model.embedding_size": 64}, "config.model.embedding_size"),
        ({"data.image_size": 40}, "config.data.image_size"),
        ({"queue.capacity": 96}, "config.queue.capacity: recorded 48, now 96"),
        (
            {"queue.kind": "moco"},
            "config.queue.kind: recorded 'proxy', now 'moco'",
        ),
        ({"optim.backbone_lr_scale": 0.1}, "config.optim.backbone_lr_scale"),
        ({"optim.grad_clip_norm": 1.0}, "config.optim.grad_clip_norm"),
    ],
)
def test_an_incompatible_config_is_named(reference_run, changes, named):
  """The saved state's structure and shapes decide; the message names the
  arrays and the config keys that explain them."""
  classes = changes.pop("num_classes", runs.NUM_CLASSES)
  config = runs.tiny_config(**changes)
  with pytest.raises(ckpt.IncompatibleRunError) as e:
    ckpt.check_resumable(
        str(reference_run[0]),
        _record_of(config, classes),
        _abstract_state(config, classes),
    )
  message = str(e.value)
  assert named in message and "stored" in message, message
  assert message.count(": recorded ") == 1  # only the key that changed


def test_compatible_changes_resume(reference_run):
  config = runs.tiny_config(
      **{
          "optim.lr": 0.01,
          "num_epochs": 30.0,
          "eval.batch_size": 16,
          "optim.weight_decay": 1e-4,
      }
  )
  ckpt.check_resumable(
      str(reference_run[0]), _record_of(config), _abstract_state(config)
  )


def test_training_refuses_an_incompatible_workdir_before_touching_it(
    tmp_path, reference_run
):
  ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  for changes, named in (
      ({"model.base_width": 16}, "config.model.base_width"),
      ({"data.synthetic.num_identities": 9}, "num_classes: recorded 8, now 9"),
  ):
    with pytest.raises(ckpt.IncompatibleRunError, match=named):
      train.train_and_evaluate(runs.tiny_config(**changes), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
  assert (workdir / workdir_layout.CONFIG_RECORD).read_text() == (
      ref_dir / workdir_layout.CONFIG_RECORD
  ).read_text()


# ---------------------------------------------------------------------------
# Numerical guard in the loop.


@pytest.mark.slow
def test_nonfinite_batches_are_skipped_then_stop_the_run(
    tmp_path, reference_run
):
  """Batch 4 is bad once; from batch 9 on every batch is bad. With a limit of
  3, steps 9, 10, 11 make the streak; the loop reads each step's counters
  one step late, so it stops after step 12 with the state of step 8."""
  _, ref = reference_run

  def poison(n, batch):
    if n == 4 or n >= 9:
      batch = dict(batch, label=batch["label"].copy())
      batch["label"][0] = 10**6  # out of range: the margin loss is NaN
    return batch

  workdir = tmp_path / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "make_train_dataset", runs.poisoned_dataset(poison))
    error, output = runs.run_in_process(
        runs.tiny_config(max_consecutive_nonfinite=3),
        workdir,
        raises=train.NonFiniteError,
    )
  message = str(error)
  assert "config.max_consecutive_nonfinite" in message
  assert "checkpoint written at step 12" in message, message
  for step in (4, 9, 10, 11):
    assert f"WARNING: step {step} had a non-finite loss" in output, output
  assert "WARNING: step 5 " not in output

  records = runs.step_metrics(workdir)
  assert sorted(records) == list(range(1, 13))  # nothing after the stop
  assert [s for s in records if records[s]["nonfinite"]] == [4, 9, 10, 11, 12]
  assert np.isnan(records[4]["loss"])
  assert all(np.isfinite(records[s]["loss"]) for s in (5, 6, 7, 8))
  runs.assert_same_losses(records, ref, range(1, 4))  # before any skip

  last_good, stopped = runs.load_state(workdir, 8), runs.load_state(workdir, 12)
  for field in (
      "params",
      "batch_stats",
      "opt_state",
      "quality",
      "queue",
      "margin",
  ):
    runs.assert_trees_equal(stopped[field], last_good[field], f"{field}: ")
  assert int(stopped["step"]) == 12
  assert int(stopped["nonfinite_total"]) == 5
  assert int(stopped["nonfinite_streak"]) == 4
  assert int(last_good["nonfinite_total"]) == 1
  assert int(last_good["nonfinite_streak"]) == 0
