"""A workdir's own folders, and the rule that writes stay inside it.

A workdir may come from others (downloaded, copied, shared), so before a
command writes into it, each folder the project writes to there must be a
real folder inside it: an `eval` folder that is a link would send
evaluation results, pictures and events wherever it points.
"""

from __future__ import annotations

import os
import re

from qgjt_jax import errors

CHECKPOINTS = "checkpoints"
EVAL = "eval"
LOGS = "logs"
PROFILE = "profile"
# The folders commands write to, beside the record files.
WRITTEN = (CHECKPOINTS, EVAL, LOGS, PROFILE)
# Training's metrics, one JSON object a line.
METRICS = "metrics.jsonl"

# In EVAL: the evaluation of step N as step_N.json (a repeat: step_N.R.json,
# R from 2), a set's stored searches beside it as step_N[.R].K.searches.npy
# (K counting the sets), pictures as step_N[.R].KIND.png.
EVAL_RESULT = re.compile(r"^step_(\d+)(?:\.(\d+))?\.json$")
EVAL_SEARCHES = re.compile(r"^step_\d+(?:\.\d+)?\.\d+\.searches\.npy$")


def eval_result_name(step: int) -> str:
  """The base name of step `step`'s evaluation results (EVAL_RESULT)."""
  return f"step_{step}"


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
