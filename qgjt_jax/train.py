"""train_and_evaluate(config, workdir): the training loop, nothing else.

The loop feeds host batches to the jitted step, logs, checkpoints (state,
model and data iterator together) and evaluates. It stops cleanly on SIGTERM
or SIGINT (finishing the step, checkpointing, exiting 0) and resumes from the
newest readable checkpoint in the workdir when it is run again.
"""
from __future__ import annotations

import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import qgjt_jax
from qgjt_jax import checkpoint as ckpt
from qgjt_jax import config_checks
from qgjt_jax import evaluate as evaluate_lib
from qgjt_jax import optim
from qgjt_jax import parallel
from qgjt_jax import reporting
from qgjt_jax import state as state_lib
from qgjt_jax import step as step_lib
from qgjt_jax.data import pipeline
from qgjt_jax.data import sources


class StopRequested:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """True when any process was asked to stop (all processes agree)."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))


class NonFiniteError(RuntimeError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config's recipe in workdir; returns the final evaluation."""
  source = sources.train_source(config)
  num_classes = source.num_classes
  config_checks.check_train_config(config, num_classes=num_classes)
  mesh = parallel.make_mesh(config.model_parallelism)
  config_checks.check_mesh(config, mesh)
  run_record = config.to_dict()
  run_record["num_classes"] = num_classes
  ckpt.check_compatible(workdir, run_record)

  global_batch = config.global_batch_size
  steps_per_epoch = len(source) // global_batch
  if steps_per_epoch < 1:
    raise ValueError(f"The training set ({len(source)} images) is smaller than "
                     f"config.global_batch_size={global_batch}.")
  num_train_steps = int(config.num_epochs * steps_per_epoch)
  schedule = optim.make_lr_schedule(config.optim, steps_per_epoch,
                                    config.num_epochs)
  tx = optim.make_optimizer(config.optim, schedule)
  model = state_lib.build_model(config)
  state, shardings = state_lib.create_sharded_state(
      config, model, tx, num_classes, jax.random.key(config.seed), mesh)

  dataset = pipeline.make_train_dataset(
      source, global_batch_size=global_batch, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      view_config=evaluate_lib.view_config(config),
      worker_count=config.data.worker_count,
      image_size=config.data.image_size)
  data_iterator = iter(dataset)

  manager = ckpt.make_manager(f"{workdir}/checkpoints",
                              max_to_keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(manager, state, shardings, data_iterator)
  if restored is not None:
    state = restored
    print(f"Resumed from step {int(state.step)} in {workdir}.", flush=True)
  ckpt.record_config(workdir, run_record, qgjt_jax.__version__)

  writer = reporting.create_writer(workdir)
  writer.write_hparams({k: str(v) for k, v in run_record.items()})
  reporting.log_parameter_overview(state.params)
  report_progress = reporting.create_report_progress(num_train_steps, writer)
  start_step = int(state.step)
  progress = reporting.ProgressLine(num_train_steps, 2 * global_batch,
                                    start_step)
  train_step = step_lib.make_train_step(
      model=model, tx=tx, config=config, lr_schedule=schedule,
      steps_per_epoch=steps_per_epoch, mesh=mesh, state_shardings=shardings)
  evaluator = evaluate_lib.Evaluator(config, model, mesh)
  print(f"Training {config.model.name} on {source.name}: {len(source):,} "
        f"images, {num_classes:,} identities, {num_train_steps:,} steps of "
        f"{global_batch} x 2 views on {jax.device_count()} device(s).",
        flush=True)

  step = start_step
  pending = None  # the previous step's metrics, read one step late
  with StopRequested() as stop:
    while step < num_train_steps:
      batch = parallel.host_to_global(next(data_iterator), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      if report_progress is not None:
        report_progress(step, time.time())
      # Reading the previous step's streak keeps the device one step ahead.
      if pending is not None and int(pending["nonfinite_streak"]) >= (
          config.max_consecutive_nonfinite):
        _stop_nonfinite(manager, state, data_iterator, config)
      pending = metrics
      if step % config.log_every_steps == 0 or step == num_train_steps:
        scalars = jax.device_get(metrics)
        scalars.update(progress(step, scalars))
        writer.write_scalars(step, scalars)
      if step % config.checkpoint_every_steps == 0:
        ckpt.save(manager, state, data_iterator)
      if config.eval_every_steps and step % config.eval_every_steps == 0:
        evaluator.run(state, step, writer, workdir)
      if stop.agreed():
        ckpt.save(manager, state, data_iterator, force=True)
        manager.wait_until_finished()
        print(f"Stopped by {stop.signal_name or 'a peer process'} at step "
              f"{step}; checkpoint written to {workdir}/checkpoints. Run the "
              "same command to resume.", flush=True)
        return {}
  if int(manager.latest_step() or -1) != step:
    ckpt.save(manager, state, data_iterator, force=True)
  manager.wait_until_finished()
  results = evaluator.run(state, step, writer, workdir)
  writer.flush()
  return results


def _stop_nonfinite(manager, state, data_iterator, config) -> None:
  """The guard left the state at its last good values: keep them and stop."""
  ckpt.save(manager, state, data_iterator, force=True)
  manager.wait_until_finished()
  raise NonFiniteError(
      f"{config.max_consecutive_nonfinite} consecutive steps had a non-finite "
      "loss or gradient (each was skipped); the last good state is "
      f"checkpointed at step {int(state.step)}. Lower config.optim.lr, enable "
      "config.optim.grad_clip_norm, or check the data.")
