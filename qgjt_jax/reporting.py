"""What a run tells its user: notes, progress lines and metric writers.

One voice: in a multi-process run, process 0 prints (`note`); every other
process writes the same lines to its own WORKDIR/logs/process_I.log, so a
pod or a SLURM job shows one progress line per step, not one per host.

clu's metric writers (and its periodic actions, which import them) pull in
TensorFlow for TensorBoard summaries. Where TensorFlow or clu is absent (the
GPU images we target have neither), metrics go to stdout through a small
writer with the same interface, and the progress line below still shows.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np


_process_log = None  # this process's log file, on processes other than 0


def open_process_log(workdir: str) -> None:
  """Sends this process's notes to WORKDIR/logs/process_I.log (I > 0).

  Process 0 keeps printing. A workdir on object storage (gs://) cannot be
  appended to; the notes of the other processes then go to absl's log.
  """
  global _process_log
  index = jax.process_index()
  if index == 0 or _process_log is not None or "://" in workdir:
    return
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  _process_log = open(os.path.join(workdir, "logs", f"process_{index}.log"),
                      "a", buffering=1)


def note(message: str, *, error: bool = False) -> None:
  """A line for the user: printed by process 0, logged by the others.

  `error` sends it to stderr (on process 0).
  """
  if jax.process_index() == 0:
    print(message, file=sys.stderr if error else sys.stdout, flush=True)
  elif _process_log is not None:
    _process_log.write(message + "\n")
  else:
    logging.info("%s", message)


class StdoutWriter:
  """The subset of clu's MetricWriter interface the trainer uses."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    text = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
    note(f"[{step}] {text}")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("Hyperparameters: %s", dict(hparams))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      note(f"[{step}] {k}:\n{v}")

  def flush(self) -> None:
    sys.stdout.flush()

  def close(self) -> None:
    self.flush()


class JsonlWriter(StdoutWriter):
  """Appends scalars to WORKDIR/metrics.jsonl: easy to plot from a notebook."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    pass


class Writers(StdoutWriter):
  """Forwards every call to several writers."""

  def __init__(self, writers):
    self._writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams):
    for w in self._writers:
      w.write_hparams(hparams)

  def write_texts(self, step, texts):
    for w in self._writers:
      w.write_texts(step, texts)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def create_writer(workdir: str, *, tensorboard: bool = True):
  """TensorBoard (via clu, where TensorFlow is installed) or stdout, plus
  WORKDIR/metrics.jsonl on the first process."""
  writer = None
  if tensorboard:
    try:
      from clu import metric_writers  # imports TensorFlow
      writer = metric_writers.create_default_writer(
          workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    except ImportError as e:
      logging.info("TensorBoard writer unavailable (%s); logging to stdout.", e)
  writer = writer or StdoutWriter()
  if jax.process_index() != 0:
    return writer
  os.makedirs(workdir, exist_ok=True)
  return Writers([writer, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def create_report_progress(num_train_steps: int, writer: Any):
  """clu's ReportProgress hook (steps/s, uptime) where clu can be imported."""
  try:
    from clu import periodic_actions  # imports clu.metric_writers
  except ImportError:
    return None
  return periodic_actions.ReportProgress(num_train_steps=num_train_steps,
                                        writer=writer, every_secs=60)


def log_parameter_overview(params: Any) -> None:
  try:
    from clu import parameter_overview
    parameter_overview.log_parameter_overview(params)
    count = parameter_overview.count_parameters(params)
  except ImportError:
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  note(f"Parameters: {count:,}")


class ProgressLine:
  """Periodic one-line progress: step, losses, HQ fraction, img/s, ETA."""

  def __init__(self, total_steps: int, images_per_step: int,
               start_step: int = 0):
    self.total_steps = total_steps
    self.images_per_step = images_per_step
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def __call__(self, step: int, metrics: Mapping[str, float]) -> dict:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    images_per_sec = steps * self.images_per_step / seconds
    eta = (self.total_steps - step) * seconds / steps
    note(f"step {step}/{self.total_steps} "
          f"loss_cls {metrics['loss_cls']:.3f} "
          f"loss_con {metrics['loss_con']:.3f} "
          f"hq {metrics['hq_fraction']:.2f} "
          f"norm {metrics['norm_mean']:.2f}±{metrics['norm_std']:.2f} "
          f"queue {metrics['queue_fill']:.2f} "
          f"lr {metrics['lr']:.4g} "
          f"{images_per_sec:,.0f} img/s "
          f"ETA {_format_seconds(eta)}")
    return {"images_per_sec": images_per_sec}


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
