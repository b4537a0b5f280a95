"""train_and_evaluate(config, workdir): the training loop, nothing else.

The loop feeds host batches to the jitted step, logs, checkpoints (state,
model and data iterator together) and evaluates. It stops cleanly on SIGTERM
or SIGINT (finishing the step, checkpointing, returning normally so the
program exits 0; every process stops at the same step) and resumes from the
newest readable checkpoint in the workdir when it is run again, with the same
per-step losses as a run that was never stopped. A run of
`config.max_consecutive_nonfinite` skipped (non-finite) steps stops it with a
checkpoint of the last good state and NonFiniteError.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any, Iterable

from absl import logging
import jax
import ml_collections
import numpy as np

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import config_checks
from qgjt_jax import errors
from qgjt_jax import finetune
from qgjt_jax import parallel
from qgjt_jax import records
from qgjt_jax import reporting
from qgjt_jax import stack as stack_lib
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.version import __version__
from qgjt_jax import workdir_lock
from qgjt_jax.data import degrade
from qgjt_jax.data import pipeline
from qgjt_jax.data import sources
from qgjt_jax.eval import runner


class StopRequested:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

  A second SIGINT aborts at once (KeyboardInterrupt), for a user who does not
  want to wait for the step and the checkpoint. Outside the main thread
  Python cannot install handlers; the loop then runs without them.
  """

  def __init__(self):
    self.signal_name = None  # the signal this process received
    self.stopped_by = None  # which process got which signal (several)
    self._previous = {}
    self._share = self._in_flight = None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning(
          "Not in the main thread: SIGTERM/SIGINT will not stop "
          "training cleanly."
      )
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = self.signal_name or name
    # os.write, not print: a handler may interrupt a print in progress.
    os.write(
        2,
        f"{name} received: stopping after the current step with a "
        "checkpoint (press Ctrl-C again to abort now).\n".encode(),
    )

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def agreed(self) -> bool:
    """True when the run should stop after this step, on every process.

    On one process this reads the flag. With several, each call sends this
    process's signal to all of them (a tiny all-gather, dispatched without
    waiting) and reads the answer sent by the previous call: every process
    reads the same answer, so all stop after the same step (a preempted
    node's SIGTERM stops the whole run, with one checkpoint), one step later
    than a single process would, and the loop never waits on the device.
    """
    if jax.process_count() == 1:
      return self.signal_name is not None
    previous, self._in_flight = self._in_flight, self._share_signal()
    if previous is None:
      return False
    codes = np.asarray(previous)  # replicated: readable on every process
    senders = np.flatnonzero(codes)
    if not len(senders):
      return False
    first = jax.devices()[int(senders[0])]
    self.stopped_by = (
        f"{signal.Signals(int(codes[senders[0]])).name} to "
        f"process {first.process_index}"
    )
    return True

  def _share_signal(self) -> jax.Array:
    """(devices,) signal numbers, each device holding its process's."""
    if self._share is None:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
      self._sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("all")
      )
      self._share = jax.jit(
          lambda codes: codes,
          out_shardings=(
              jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
          ),
      )
    code = signal.Signals[self.signal_name].value if self.signal_name else 0
    local = np.full((jax.local_device_count(),), code, np.int32)
    return self._share(
        jax.make_array_from_process_local_data(self._sharding, local)
    )

  @property
  def description(self) -> str:
    """What stopped the run, for the final message."""
    return self.stopped_by or self.signal_name


def _processes_text() -> str:
  count = jax.process_count()
  return f" in {count} processes" if count > 1 else ""


class NonFiniteError(errors.UserError, RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    force_lock: bool = False,
    explicit: Iterable[str] = (),
) -> dict:
  """Trains config's recipe in workdir; returns the final evaluation.

  `explicit`: the config keys typed as flags (`--config.KEY=`); a fine-tune
  takes its model from `config.init_from` unless one of them contradicts
  it.

  Returns {} when stopped by a signal (after checkpointing). Raises
  config_checks.ConfigError for a bad config, WorkdirLockedError when
  another run holds the workdir (`force_lock` takes it anyway), ValueError
  when the workdir holds an incompatible run, checkpoint.CheckpointError
  when its checkpoints are all unreadable and NonFiniteError (after
  checkpointing the last good state) when the numerical guard gives up.
  """
  # Before building anything: a bad value fails in seconds.
  config_checks.check_train_config(config)
  lock = _lock_workdir(workdir, force_lock)
  try:
    with StopRequested() as stop:
      return _train_and_evaluate(config, workdir, stop, tuple(explicit))
  finally:
    if lock is not None:
      lock.release()


def _lock_workdir(workdir: str, force: bool):
  """Process 0 takes the workdir's lock before anything is written there;
  every process learns whether it could."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = workdir_lock.acquire(workdir, force=force, note=reporting.note)
    except Exception as e:  # pylint: disable=broad-except
      error = e  # raised below, once the other processes know
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      error = workdir_lock.WorkdirLockedError(
          f"{workdir}: process 0 could not take the workdir's lock (its "
          "output says why)"
      )
  if error is not None:
    raise error
  return lock


def _weights_config(config, workdir: str, explicit: tuple[str, ...]):
  """The config with the model this run trains: on a rerun, its own
  record's (a fine-tune's records the source's model, which replaced the
  recipe's: all of it is taken, so a rerun needs neither the source nor a
  recipe that names its model; a training run's only the channel order,
  the rest of it checked against the recipe by `check_resumable`), else
  the model of `config.init_from`."""
  settings = records.recorded_model_settings(workdir)
  if settings and config.init_from:
    try:
      return records.adopt_settings(config, settings, explicit, workdir)
    except records.RecordError as e:
      raise config_checks.ConfigError(str(e)) from None
  if settings:
    return records.with_input_order(
        config, settings.get("model.input_order"), f"The model in {workdir}"
    )
  if config.init_from:
    return finetune.check_source(config, explicit)
  return config


@dataclasses.dataclass
class _Run:
  """What one training run works with, once it is set up."""

  config: ml_collections.ConfigDict
  workdir: str
  source: Any
  stack: stack_lib.TrainingStack
  record: dict  # the config and class count, as config.json keeps them
  num_train_steps: int
  manager: Any = None
  writer: Any = None


def _set_up(config, workdir: str, explicit: tuple[str, ...] = ()) -> _Run:
  """Checks, data source and training stack, before anything is written."""
  config = _weights_config(config, workdir, explicit)
  source = sources.train_source(config)
  config_checks.check_num_classes(source.num_classes)
  mesh = parallel.make_mesh(config.model_parallelism)
  config_checks.check_mesh(config, mesh)
  steps_per_epoch = len(source) // config.global_batch_size
  if steps_per_epoch < 1:
    raise config_checks.ConfigError(
        f"config.global_batch_size={config.global_batch_size} is larger than "
        f"the training set ({len(source)} images); use at most "
        f"{len(source)}."
    )
  num_train_steps = config.num_train_steps or int(
      config.num_epochs * steps_per_epoch
  )
  if config.num_train_steps:
    # A length in steps is this set's epochs from here on: the schedule,
    # the method's epoch-counted settings and the record all read them.
    config.num_epochs = config.num_train_steps / steps_per_epoch
  record = config.to_dict()
  record["num_classes"] = source.num_classes
  stack = stack_lib.build_stack(
      config,
      num_classes=source.num_classes,
      steps_per_epoch=steps_per_epoch,
      mesh=mesh,
  )
  ckpt.check_resumable(workdir, record, stack.abstract_state())
  return _Run(
      config,
      workdir,
      source,
      stack,
      record,
      num_train_steps,
  )


def _starting_state(run: _Run):
  """The newest readable checkpoint's state, else a fresh one (from
  `init_from`'s backbone when set)."""
  state = run.stack.init_state(jax.random.key(run.config.seed))
  restored = ckpt.restore_latest(run.manager, state, run.stack.state_shardings)
  if restored is not None:
    reporting.note(f"Resumed from step {int(restored.step)} in {run.workdir}.")
    return restored
  if run.config.init_from:
    return finetune.initialise(state, run.stack, run.config, run.source)
  return state


def _batches(run: _Run, start_step: int):
  """This process's batches from `start_step` on. The stream is a function
  of (seed, step): resuming needs no saved iterator, on any process count."""
  config = run.config
  return iter(
      pipeline.make_train_dataset(
          run.source,
          global_batch_size=config.global_batch_size,
          seed=config.seed,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
          view_config=degrade.view_config_from(config.data.view),
          worker_count=config.data.worker_count,
          image_size=config.data.image_size,
          start_step=start_step,
      )
  )


def _train_and_evaluate(
    config, workdir, stop: StopRequested, explicit: tuple[str, ...] = ()
) -> dict:
  run = _set_up(config, workdir, explicit)
  run.manager = ckpt.make_manager(
      str(workdir_layout.Workdir(workdir).checkpoints),
      max_to_keep=run.config.keep_checkpoints,
  )
  try:
    state = _starting_state(run)
    records.record_config(workdir, run.record, __version__)
    run.writer = reporting.create_writer(workdir)
    run.writer.write_hparams({k: str(v) for k, v in run.record.items()})
    reporting.log_parameter_overview(state.params)
    reporting.note(
        f"Training {run.config.model.name} on {run.source.name}: "
        f"{len(run.source):,} images, {run.source.num_classes:,} identities, "
        f"{run.num_train_steps:,} steps of {run.config.global_batch_size} x 2 "
        f"views on {jax.device_count()} device(s){_processes_text()}."
    )
    return _loop(run, state, stop)
  finally:
    # Pending asynchronous saves complete even when the loop raised.
    run.manager.close()
    if run.writer is not None:
      run.writer.flush()
      run.writer.close()


def _loop(run: _Run, state, stop: StopRequested) -> dict:
  """Trains to the last step; returns the final evaluation ({} if stopped)."""
  config, manager, writer = run.config, run.manager, run.writer
  step = int(state.step)
  batches = _batches(run, step)
  report_progress = reporting.create_report_progress(
      run.num_train_steps, writer
  )
  progress = reporting.ProgressLine(
      run.num_train_steps, 2 * config.global_batch_size, step
  )
  evaluator = runner.Evaluator(config, run.stack.model, run.stack.mesh)
  guard = _NonFiniteGuard(config.max_consecutive_nonfinite)
  profiler = reporting.StepProfiler(
      config.get("profile_steps", ()),
      str(workdir_layout.Workdir(run.workdir).profile),
  )
  pending = None  # the previous step's metrics, read one step late
  evaluated = (None, {})  # (step, results) of the last evaluation
  while step < run.num_train_steps:
    profiler.before(step, state)
    batch = parallel.host_to_global(next(batches), run.stack.mesh)
    state, metrics = run.stack.train_step(state, batch)
    step += 1
    if report_progress is not None:
      report_progress(step, time.time())
    if step % config.log_every_steps == 0 or step == run.num_train_steps:
      scalars = jax.device_get(metrics)
      scalars.update(progress(step, scalars))
      writer.write_scalars(step, scalars)
    # The previous step's guard counters are read while this step runs: a
    # host sync one step late instead of a device stall every step. So a
    # streak reaching the limit at step s stops the run after step s + 1.
    if pending is not None and guard.exhausted(pending, step - 1):
      _stop_nonfinite(manager, state, config)
    pending = metrics
    if step % config.checkpoint_every_steps == 0:
      ckpt.save(manager, state)
    if config.eval_every_steps and step % config.eval_every_steps == 0:
      evaluated = step, evaluator.run(state, step, writer, run.workdir)
    if stop.agreed():
      profiler.finish(state)
      ckpt.save(manager, state, force=True)
      ckpt.wait(manager)
      reporting.note(
          f"Stopped by {stop.description} at step {step}; checkpoint "
          f"written to {workdir_layout.Workdir(run.workdir).checkpoints}. "
          "Run the same command to resume."
      )
      return {}
  profiler.finish(state)
  if pending is not None and guard.exhausted(pending, step):
    _stop_nonfinite(manager, state, config)
  ckpt.save(manager, state, force=True)
  ckpt.wait(manager)
  if evaluated[0] == step:  # the periodic evaluation was of this step
    return evaluated[1]
  return evaluator.run(state, step, writer, run.workdir)


class _NonFiniteGuard:
  """Reports skipped steps and says when the streak reached the limit."""

  def __init__(self, limit: int):
    self.limit = limit

  def exhausted(self, metrics: dict[str, Any], step: int) -> bool:
    skipped, streak = jax.device_get(
        (metrics["nonfinite"], metrics["nonfinite_streak"])
    )
    if skipped:
      reporting.note(
          f"WARNING: step {step} had a non-finite loss or gradient; its "
          f"update was skipped ({int(streak)} in a row, the limit is "
          f"config.max_consecutive_nonfinite={self.limit})."
      )
    return int(streak) >= self.limit


def _stop_nonfinite(manager, state, config) -> None:
  """The guard left the state at its last good values: keep them and stop."""
  ckpt.save(manager, state, force=True)
  ckpt.wait(manager)
  total, step = jax.device_get((state.nonfinite_total, state.step))
  raise NonFiniteError(
      f"{config.max_consecutive_nonfinite} consecutive steps had a non-finite "
      f"loss or gradient (config.max_consecutive_nonfinite; {int(total)} "
      "skipped in all). Each was skipped, so the checkpoint written at step "
      f"{int(step)} holds the last good parameters. Lower config.optim.lr, "
      "set config.optim.grad_clip_norm, or check the data, then run the same "
      "command to resume from it."
  )
