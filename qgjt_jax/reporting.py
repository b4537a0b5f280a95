"""What a run tells its user: notes, progress lines and metric writers.

One voice: in a multi-process run, process 0 prints (`note`); every other
process writes the same lines to its own WORKDIR/logs/process_I.log, so a
pod or a SLURM job shows one progress line per step, not one per host.

TensorBoard event files come from clu's writer where TensorFlow is installed
(Colab, TPU VMs), and from tensorboardX everywhere else: TensorFlow is not a
dependency. Every writer here has the subset of clu's MetricWriter interface
the trainer uses; with neither library, metrics go to stdout.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from qgjt_jax import errors
from qgjt_jax import workdir as workdir_layout

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
  layout = workdir_layout.Workdir(workdir)
  layout.logs.mkdir(parents=True, exist_ok=True)
  _process_log = open(
      layout.process_log(index),
      "a",
      buffering=1,
  )


def note(message: str, *, error: bool = False) -> None:
  """A line for the user: printed by process 0, logged by the others.

  `error` sends it to stderr (on process 0). A file name that is no valid
  text (bytes of another system's encoding) is printed with escapes.
  """
  message = errors.displayable(message)
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


class TensorBoardXWriter(StdoutWriter):
  """TensorBoard event files without TensorFlow (tensorboardX)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._writer.add_text(
        "hparams", json.dumps(dict(hparams), indent=1, default=str)
    )

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for key, value in texts.items():
      self._writer.add_text(key, value, int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


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


def _tensorboard_writer(workdir: str):
  """clu's writer where TensorFlow imports, else tensorboardX's; or None."""
  try:
    # TensorFlow's C++ start-up notices (oneDNN...) are INFO lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from clu import metric_writers  # imports TensorFlow

    return metric_writers.create_default_writer(workdir, asynchronous=True)
  except ImportError as e:
    logging.info("clu's TensorBoard writer unavailable (%s).", e)
  try:
    return TensorBoardXWriter(workdir)
  except ImportError as e:
    logging.info("tensorboardX unavailable (%s); metrics go to stdout.", e)
  return None


def create_writer(workdir: str, *, tensorboard: bool = True):
  """Process 0: TensorBoard event files (or stdout without any writer) plus
  WORKDIR/metrics.jsonl. Other processes: their log (see `note`)."""
  if jax.process_index() != 0:
    return StdoutWriter()
  os.makedirs(workdir, exist_ok=True)
  writer = (_tensorboard_writer(workdir) if tensorboard else None) or (
      StdoutWriter()
  )
  return Writers(
      [writer, JsonlWriter(str(workdir_layout.Workdir(workdir).metrics))]
  )


def create_report_progress(num_train_steps: int, writer: Any):
  """clu's ReportProgress hook (steps/s, uptime) where clu can be imported."""
  try:
    from clu import periodic_actions  # imports clu.metric_writers
  except ImportError:
    return None
  return periodic_actions.ReportProgress(
      num_train_steps=num_train_steps, writer=writer, every_secs=60
  )


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

  def __init__(
      self, total_steps: int, images_per_step: int, start_step: int = 0
  ):
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
    auc = metrics.get("quality_auc")  # absent with the moco queue
    auc = "n/a" if auc is None or not math.isfinite(auc) else f"{auc:.2f}"
    note(
        f"step {step}/{self.total_steps} "
        f"loss_cls {metrics['loss_cls']:.3f} "
        f"loss_con {metrics['loss_con']:.3f} "
        f"hq {metrics['hq_fraction']:.2f} "
        f"(clean {metrics['hq_fraction_clean']:.2f}, degraded "
        f"{metrics['hq_fraction_degraded']:.2f}; norm AUC {auc}) "
        f"norm {metrics['norm_mean']:.2f}±{metrics['norm_std']:.2f} "
        f"queue {metrics['queue_fill']:.2f} "
        f"lr {metrics['lr']:.4g} "
        f"{images_per_sec:,.0f} img/s "
        f"ETA {_format_seconds(eta)}"
    )
    return {"images_per_sec": images_per_sec}


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return (
      f"{hours}:{minutes:02d}:{seconds:02d}"
      if hours
      else f"{minutes}:{seconds:02d}"
  )


class StepProfiler:
  """A jax.profiler trace of training steps [START, STOP)
  (`config.profile_steps`) into `directory`, on process 0.

  `before(done)` is called before each step with the number of steps done,
  `finish(pending)` after the last (it waits for `pending`, so the trace
  holds the traced steps' device work).
  """

  def __init__(self, steps, directory: str):
    self.start, self.stop = tuple(steps) if steps else (None, None)
    self.directory = directory
    self.active = False

  def before(self, done: int, pending=None) -> None:
    if self.start is None or jax.process_index() != 0:
      return
    if done == self.start and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True
    elif done == self.stop:
      self.finish(pending)

  def finish(self, pending=None) -> None:
    if not self.active:
      return
    jax.block_until_ready(pending)
    jax.profiler.stop_trace()
    self.active = False
    note(
        f"Wrote a profile of steps {self.start}..{self.stop - 1} to "
        f"{self.directory}: open it with tensorboard "
        f"--logdir={self.directory} (Profile tab) or xprof."
    )
