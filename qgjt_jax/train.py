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

import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

import qgjt_jax
from qgjt_jax import checkpoint as ckpt
from qgjt_jax import config_checks
from qgjt_jax import evaluate as evaluate_lib
from qgjt_jax import finetune
from qgjt_jax import parallel
from qgjt_jax import reporting
from qgjt_jax import stack as stack_lib
from qgjt_jax.data import degrade
from qgjt_jax.data import pipeline
from qgjt_jax.data import sources


class StopRequested:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

  A second SIGINT aborts at once (KeyboardInterrupt), for a user who does not
  want to wait for the step and the checkpoint. Outside the main thread
  Python cannot install handlers; the loop then runs without them.
  """

  def __init__(self):
    self.signal_name = None  # the signal this process received
    self.stopped_by = None   # which process got which signal (several)
    self._previous = {}
    self._share = self._in_flight = None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not in the main thread: SIGTERM/SIGINT will not stop "
                      "training cleanly.")
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
    os.write(2, f"{name} received: stopping after the current step with a "
                "checkpoint (press Ctrl-C again to abort now).\n".encode())

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
    self.stopped_by = (f"{signal.Signals(int(codes[senders[0]])).name} to "
                       f"process {first.process_index}")
    return True

  def _share_signal(self) -> jax.Array:
    """(devices,) signal numbers, each device holding its process's."""
    if self._share is None:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
      self._sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("all"))
      self._share = jax.jit(lambda codes: codes, out_shardings=(
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    code = signal.Signals[self.signal_name].value if self.signal_name else 0
    local = np.full((jax.local_device_count(),), code, np.int32)
    return self._share(jax.make_array_from_process_local_data(
        self._sharding, local))

  @property
  def description(self) -> str:
    """What stopped the run, for the final message."""
    return self.stopped_by or self.signal_name


def _processes_text() -> str:
  count = jax.process_count()
  return f" in {count} processes" if count > 1 else ""


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config's recipe in workdir; returns the final evaluation.

  Returns {} when stopped by a signal (after checkpointing). Raises
  config_checks.ConfigError for a bad config, ValueError when the workdir
  holds an incompatible run, checkpoint.CheckpointError when its checkpoints
  are all unreadable and NonFiniteError (after checkpointing the last good
  state) when the numerical guard gives up.
  """
  # Before building anything: a bad value fails in seconds.
  config_checks.check_train_config(config)
  with StopRequested() as stop:
    return _train_and_evaluate(config, workdir, stop)


def _weights_config(config, workdir: str):
  """The config with the channel order of the weights this run trains: its
  own record's on a resume, else that of `config.init_from`'s weights."""
  if ckpt.recorded_model_settings(workdir):
    return evaluate_lib.with_recorded_input_order(config, workdir)
  if config.init_from:
    return finetune.check_source(config)
  return config


def _train_and_evaluate(config, workdir, stop: StopRequested) -> dict:
  config = _weights_config(config, workdir)
  source = sources.train_source(config)
  num_classes = source.num_classes
  config_checks.check_num_classes(num_classes)
  mesh = parallel.make_mesh(config.model_parallelism)
  config_checks.check_mesh(config, mesh)
  run_record = config.to_dict()
  run_record["num_classes"] = num_classes
  ckpt.check_compatible(workdir, run_record)

  global_batch = config.global_batch_size
  steps_per_epoch = len(source) // global_batch
  if steps_per_epoch < 1:
    raise config_checks.ConfigError(
        f"config.global_batch_size={global_batch} is larger than the training "
        f"set ({len(source)} images); use at most {len(source)}.")
  num_train_steps = int(config.num_epochs * steps_per_epoch)
  stack = stack_lib.build_stack(config, num_classes=num_classes,
                                steps_per_epoch=steps_per_epoch, mesh=mesh)
  state = stack.init_state(jax.random.key(config.seed))

  manager = ckpt.make_manager(f"{workdir}/checkpoints",
                              max_to_keep=config.keep_checkpoints)
  writer = None
  try:
    restored = ckpt.restore_latest(manager, state, stack.state_shardings)
    if restored is not None:
      state = restored
      reporting.note(f"Resumed from step {int(state.step)} in {workdir}.")
    elif config.init_from:
      state = finetune.initialise(state, stack, config, source)
    start_step = int(state.step)
    # The input stream is a function of (seed, step): resuming at the
    # restored step needs no saved iterator, whatever the process count.
    data_iterator = iter(pipeline.make_train_dataset(
        source, global_batch_size=global_batch, seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        view_config=degrade.view_config_from(config.data.view),
        worker_count=config.data.worker_count,
        image_size=config.data.image_size, start_step=start_step))
    ckpt.record_config(workdir, run_record, qgjt_jax.__version__)

    writer = reporting.create_writer(workdir)
    writer.write_hparams({k: str(v) for k, v in run_record.items()})
    reporting.log_parameter_overview(state.params)
    report_progress = reporting.create_report_progress(num_train_steps,
                                                       writer)
    progress = reporting.ProgressLine(num_train_steps, 2 * global_batch,
                                      start_step)
    train_step = stack.train_step
    evaluator = evaluate_lib.Evaluator(config, stack.model, mesh)
    reporting.note(
        f"Training {config.model.name} on {source.name}: {len(source):,} "
        f"images, {num_classes:,} identities, {num_train_steps:,} steps of "
        f"{global_batch} x 2 views on {jax.device_count()} device(s)"
        f"{_processes_text()}.")
    guard = _NonFiniteGuard(config.max_consecutive_nonfinite)

    step = start_step
    pending = None  # the previous step's metrics, read one step late
    evaluated = (None, {})  # (step, results) of the last evaluation
    while step < num_train_steps:
      batch = parallel.host_to_global(next(data_iterator), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      if report_progress is not None:
        report_progress(step, time.time())
      if step % config.log_every_steps == 0 or step == num_train_steps:
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
        evaluated = step, evaluator.run(state, step, writer, workdir)
      if stop.agreed():
        ckpt.save(manager, state, force=True)
        ckpt.wait(manager)
        reporting.note(
            f"Stopped by {stop.description} at step "
            f"{step}; checkpoint written to {workdir}/checkpoints. Run the "
            "same command to resume.")
        return {}
    if pending is not None and guard.exhausted(pending, step):
      _stop_nonfinite(manager, state, config)
    ckpt.save(manager, state, force=True)
    ckpt.wait(manager)
    if evaluated[0] == step:  # the periodic evaluation was of this step
      return evaluated[1]
    return evaluator.run(state, step, writer, workdir)
  finally:
    # Pending asynchronous saves complete even when the loop raised.
    manager.close()
    if writer is not None:
      writer.flush()
      writer.close()


class _NonFiniteGuard:
  """Reports skipped steps and says when the streak reached the limit."""

  def __init__(self, limit: int):
    self.limit = limit

  def exhausted(self, metrics: dict[str, Any], step: int) -> bool:
    skipped, streak = jax.device_get((metrics["nonfinite"],
                                      metrics["nonfinite_streak"]))
    if skipped:
      logging.warning("Step %d: non-finite loss or gradient; update skipped "
                      "(%d in a row).", step, int(streak))
      reporting.note(
          f"WARNING: step {step} had a non-finite loss or gradient; its "
          f"update was skipped ({int(streak)} in a row, the limit is "
          f"config.max_consecutive_nonfinite={self.limit}).")
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
      "command to resume from it.")
