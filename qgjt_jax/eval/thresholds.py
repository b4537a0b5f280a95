"""Decision thresholds that mean something: the cosine at a false accept rate.

Every verification evaluation (the `.bin` sets, the synthetic pairs, IJB)
stores, for each FAR of `FARS` that its impostor count can resolve (at least
1 / FAR impostor pairs), the cosine threshold that accepts at most that
share of its impostors and the share of genuine pairs it accepts:

  "thresholds": [{"far": 0.0001, "cosine": 0.3215, "tar": 0.9412,
                  "impostors": 15658}, ...]

A pair is "same person" when its cosine is >= the threshold. `compare`,
`identify` and the exported models read these from the workdir's latest
evaluation (`latest`), so a decision says which FAR it stands for and which
evaluation measured it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Optional

import numpy as np

from qgjt_jax import errors

FARS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
_MAX_JSON_BYTES = 64 << 20
_RESULT_NAME = re.compile(r"^step_(\d+)(?:\.(\d+))?\.json$")


def at_far(genuine: np.ndarray, impostor: np.ndarray, fars=FARS
           ) -> list[dict[str, float]]:
  """The threshold of each FAR the impostors resolve (see module).

  With the n impostor scores in decreasing order s_1 >= s_2 >= ..., at
  most k = floor(FAR n) may be accepted: the threshold is the next float
  above s_(k+1), so a tie at s_(k+1) is rejected too and the measured FAR
  never exceeds the target.
  """
  genuine = np.asarray(genuine, np.float64).reshape(-1)
  impostor = np.sort(np.asarray(impostor, np.float64).reshape(-1))[::-1]
  out = []
  for far in fars:
    if len(impostor) * far < 1 or not len(genuine):
      continue
    cosine = float(np.nextafter(impostor[int(math.floor(far * len(impostor)))],
                                np.inf))
    out.append({"far": far, "cosine": cosine,
                "tar": float(np.mean(genuine >= cosine)),
                "impostors": int(len(impostor))})
  return out


def from_labels(labels: np.ndarray, scores: np.ndarray) -> list[dict]:
  """`at_far` of scores labelled same (true) and different (false)."""
  labels = np.asarray(labels).reshape(-1).astype(bool)
  scores = np.asarray(scores, np.float64).reshape(-1)
  return at_far(scores[labels], scores[~labels])


def roc_points(genuine: np.ndarray, impostor: np.ndarray,
               per_decade: int = 10) -> list[list[float]]:
  """A compact ROC for results and plots: [FAR, TAR] at log-spaced FARs
  from 1/impostors to 1 (per_decade points a decade), TAR being the share
  of genuine scores above the impostor score that FAR allows."""
  genuine = np.sort(np.asarray(genuine, np.float64).reshape(-1))
  impostor = np.sort(np.asarray(impostor, np.float64).reshape(-1))[::-1]
  if not len(genuine) or not len(impostor):
    return []
  lowest = math.log10(1.0 / len(impostor))
  points = []
  for far in np.logspace(lowest, 0, max(2, int(-lowest * per_decade) + 1)):
    accepted = int(math.floor(far * len(impostor) + 1e-9))
    cut = impostor[accepted] if accepted < len(impostor) else -np.inf
    tar = 1.0 - np.searchsorted(genuine, cut, side="right") / len(genuine)
    points.append([float(far), float(tar)])
  return points


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A decision threshold and what it stands for."""
  cosine: float
  far: Optional[float]  # None: given by hand
  source: str           # which evaluation measured it, or "--threshold"

  def describe(self) -> str:
    if self.far is None:
      return f"threshold {self.cosine:.4f} ({self.source})"
    return (f"threshold {self.cosine:.4f}, FAR {self.far:.0e} on "
            f"{self.source}")


def _results(workdir: str) -> list[tuple[tuple[int, int], pathlib.Path]]:
  """(step, repeat) and path of each evaluation result, oldest first."""
  folder = pathlib.Path(workdir) / "eval"
  found = []
  if folder.is_dir():
    for path in folder.iterdir():
      match = _RESULT_NAME.match(path.name)
      if match and path.is_file():
        found.append(((int(match[1]), int(match[2] or 1)), path))
  return sorted(found)


def _read(path: pathlib.Path) -> dict[str, Any]:
  if path.stat().st_size > _MAX_JSON_BYTES:
    raise errors.UserError(f"{path}: over {_MAX_JSON_BYTES:,} bytes; not an "
                           "evaluation result of this project")
  try:
    data = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.UserError(f"{path}: not a readable evaluation result "
                           f"({e}); pass --threshold=COSINE") from None
  return data if isinstance(data, dict) else {}


def _candidates(results: dict[str, Any]) -> dict[str, list[dict]]:
  """{set: its thresholds} of the sets that measured any."""
  out = {}
  for name, metrics in results.items():
    rows = metrics.get("thresholds") if isinstance(metrics, dict) else None
    if isinstance(rows, list) and rows and all(
        isinstance(r, dict) and {"far", "cosine"} <= r.keys() for r in rows):
      out[name] = rows
  return out


def measured(workdir: str) -> Optional[dict[str, Any]]:
  """Every set's thresholds of the workdir's latest evaluation, and which
  result file that is (None when no evaluation measured any): what the
  exported models carry in their metadata."""
  results = _results(workdir)
  if not results:
    return None
  (step, _), path = results[-1]
  sets = _candidates(_read(path))
  if not sets:
    return None
  return {"evaluation": f"step {step} ({path.name})",
          "decision": "same person when cosine >= threshold",
          "sets": {name: [{k: r[k] for k in ("far", "cosine", "tar")
                           if k in r} for r in rows]
                   for name, rows in sets.items()}}


def latest(workdir: str, far: float, set_name: Optional[str] = None
           ) -> tuple[Threshold, Optional[str]]:
  """The threshold at `far` of the workdir's latest evaluation, and a note
  when that FAR was out of reach and a larger one is used instead.

  The set is `set_name`, or the one with the most impostor pairs (the
  finest FARs). Raises UserError when no evaluation measured thresholds.
  """
  results = _results(workdir)
  if not results:
    raise errors.UserError(
        f"{workdir}/eval holds no evaluation to take a threshold from: run "
        "--mode=eval (with config.eval.bin_sets or ijb_root), or pass "
        "--threshold=COSINE")
  (step, _), path = results[-1]
  sets = _candidates(_read(path))
  if set_name:
    if set_name not in sets:
      raise errors.UserError(
          f"--threshold_set={set_name}: {path} has no thresholds for it; "
          f"sets with thresholds: {', '.join(sorted(sets)) or 'none'}")
    sets = {set_name: sets[set_name]}
  if not sets:
    raise errors.UserError(
        f"{path} measured no thresholds (written before they were, or no "
        "verification set): run --mode=eval again, or pass "
        "--threshold=COSINE")
  name = max(sets, key=lambda n: max(r.get("impostors", 0) for r in sets[n]))
  rows = sorted(sets[name], key=lambda r: r["far"])
  row = next((r for r in rows if math.isclose(r["far"], far)), None)
  note = None
  if row is None:
    row = next((r for r in rows if r["far"] >= far), rows[-1])
    count = int(rows[0].get("impostors", 0))
    note = (f"FAR {far:.0e} needs {math.ceil(1 / far):,} impostor pairs; "
            f"{name} has {count:,}: using its threshold at FAR "
            f"{row['far']:.0e} instead")
  source = f"{name}, evaluation of step {step} ({path.name})"
  return Threshold(float(row["cosine"]), float(row["far"]), source), note
