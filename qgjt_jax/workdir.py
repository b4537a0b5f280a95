"""A workdir's layout (`Workdir`, the one place its names are spelled),
and the rule that writes stay inside it.

  config.json            the training run's config (records.py)
  converted_from.json    or: the converted model's settings (convert)
  run.lock               its one writer (workdir_lock.py)
  metrics.jsonl          training's metrics, one JSON object a line
  checkpoints/STEP/      the states (checkpoint.py)
  eval/                  evaluation results, searches, pictures, events
  logs/process_K.log     each process's log of a multi-process run
  profile/               traces (config.profile_steps)

A workdir may come from others (downloaded, copied, shared), so before a
command writes into it, each folder the project writes to there must be a
real folder inside it: an `eval` folder that is a link would send
evaluation results, pictures and events wherever it points.
"""

from __future__ import annotations

import os
import re

from etils import epath

from qgjt_jax import errors

CONFIG_RECORD = "config.json"
CONVERTED_RECORD = "converted_from.json"
LOCK = "run.lock"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
LOGS = "logs"
PROFILE = "profile"
# The folders commands write to, beside the record files.
WRITTEN = (CHECKPOINTS, EVAL, LOGS, PROFILE)

# In EVAL: the evaluation of step N as step_N.json (a repeat: step_N.R.json,
# R from 2), a set's stored searches beside it as step_N[.R].K.searches.npy
# (K counting the sets), pictures as step_N[.R].KIND.png.
EVAL_RESULT = re.compile(r"^step_(\d+)(?:\.(\d+))?\.json$")
EVAL_SEARCHES = re.compile(r"^step_\d+(?:\.\d+)?\.\d+\.searches\.npy$")


def eval_result_name(step: int) -> str:
  """The base name of step `step`'s evaluation results (EVAL_RESULT)."""
  return f"step_{step}"


class Workdir:
  """The paths of a workdir (a local folder or an object-store URL such as
  gs://bucket/run), each an `epath.Path`."""

  def __init__(self, root: str | os.PathLike[str]):
    self.root = epath.Path(root)
    self.config_record = self.root / CONFIG_RECORD
    self.converted_record = self.root / CONVERTED_RECORD
    self.lock = self.root / LOCK
    self.metrics = self.root / METRICS
    self.checkpoints = self.root / CHECKPOINTS
    self.eval = self.root / EVAL
    self.logs = self.root / LOGS
    self.profile = self.root / PROFILE

  def __repr__(self) -> str:
    return f"Workdir({str(self.root)!r})"

  def process_log(self, index: int) -> epath.Path:
    return self.logs / f"process_{index}.log"

  def eval_results(self) -> list[tuple[tuple[int, int], epath.Path]]:
    """(step, repeat) and path of each evaluation result, oldest first.

    Not only regular files: a link to a device or a FIFO under a result's
    name is listed, to be named when read, not passed over.
    """
    found = []
    if self.eval.is_dir():
      for path in self.eval.iterdir():
        match = EVAL_RESULT.match(path.name)
        if match and not path.is_dir():
          found.append(((int(match[1]), int(match[2] or 1)), path))
    return sorted(found)


class WorkdirLinkError(errors.UserError):
  """A folder of the workdir that leads outside it (the message names it)."""


def check_writes_stay_inside(workdir: str) -> None:
  """Refuses a workdir whose folders of `WRITTEN` are links (or not
  folders): nothing is written through them.

  Object storage (gs://) has no links; it is not checked.

  Raises:
    WorkdirLinkError: naming the folder and where it leads.
  """
  if "://" in workdir:
    return
  for name in WRITTEN:
    path = os.path.join(workdir, name)
    if os.path.islink(path):
      raise WorkdirLinkError(
          f"{path} is a link to {os.readlink(path)}: this command writes "
          f"into the workdir's {name} folder and never through a link; "
          "replace the link with a folder (or use another --workdir)"
      )
    if os.path.lexists(path) and not os.path.isdir(path):
      raise WorkdirLinkError(
          f"{path} is not a folder: this command writes "
          f"into the workdir's {name} folder; move it "
          "away (or use another --workdir)"
      )
