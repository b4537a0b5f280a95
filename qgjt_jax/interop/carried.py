"""What an exported model carries beyond its weights, and reading it back.

An export (ONNX, StableHLO's sidecar, safetensors) writes two records into
its metadata, and `convert` of that file restores both, so the converted
workdir decides and rates quality as the workdir it came from did:

  qgjt_jax.quality     the running feature-norm statistics and the
                       quality settings: {"mean", "std", "h", "eps", "b"}
  qgjt_jax.thresholds  every threshold its evaluation measured
                       (`decisions.exported`), each set with its provenance

A file is from others, so nothing is believed as written: each record is
bounded in size and depth, every set of thresholds is read by the one
checked reader of stored sets (`eval.stored.check_set`: the numbers must
add up), and the statistics must be finite and positive. Anything else is
refused in one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping, Optional

from qgjt_jax import errors
from qgjt_jax import records
from qgjt_jax.eval import extract
from qgjt_jax.eval import stored

QUALITY_KEY = "qgjt_jax.quality"
THRESHOLDS_KEY = "qgjt_jax.thresholds"
# An ONNX export's model settings ({config key: value}): what rebuilds the
# model around the weights it holds under their own names.
MODEL_SETTINGS_KEY = "qgjt_jax.model_settings"
_MAX_RECORD_CHARS = 4 << 20
_SET_NAME = re.compile(r"^[\w.@+-]{1,120}$")


class CarriedRecordError(errors.UserError):
  """An exported file's quality or threshold record does not add up."""


@dataclasses.dataclass(frozen=True)
class Carried:
  """The validated records of one file (None: the file has none)."""

  quality: Optional[dict[str, float]] = None
  thresholds: Optional[dict[str, Any]] = None

  def norm_stats(self) -> Optional[dict[str, float]]:
    if self.quality is None:
      return None
    return {"mean": self.quality["mean"], "std": self.quality["std"]}

  def settings(self) -> dict[str, float]:
    """{config key: value} of the quality settings."""
    if self.quality is None:
      return {}
    return {
        key: self.quality[name]
        for name, key in records.QUALITY_SETTINGS.items()
    }

  def evaluation(self, source: str) -> Optional[dict[str, Any]]:
    """The sets as an evaluation result of the converted step (the form
    `decisions` reads), each provenance naming `source`."""
    if self.thresholds is None:
      return None
    return {
        name: {
            **entry,
            "provenance": {**entry["provenance"], "carried_from": source},
        }
        for name, entry in self.thresholds["sets"].items()
    }


def quality_record(
    norm_stats: Optional[Mapping[str, float]], h: float, eps: float, b: float
) -> Optional[str]:
  """The quality record of a model (None without norm statistics)."""
  if norm_stats is None:
    return None
  return json.dumps(
      {
          "mean": float(norm_stats["mean"]),
          "std": float(norm_stats["std"]),
          "h": float(h),
          "eps": float(eps),
          "b": float(b),
      }
  )


def read(metadata: Mapping[str, str], path: str) -> Carried:
  """The records in a file's metadata, validated (see module).

  Raises:
    CarriedRecordError: naming `path` and the field.
  """
  return Carried(
      quality=_quality(_parse(metadata, QUALITY_KEY, path), path),
      thresholds=_thresholds(_parse(metadata, THRESHOLDS_KEY, path), path),
  )


def _parse(metadata: Mapping[str, str], key: str, path: str) -> Any:
  text = metadata.get(key)
  if text is None:
    return None
  if not isinstance(text, str) or len(text) > _MAX_RECORD_CHARS:
    raise CarriedRecordError(
        f"{path}: {key} is not a record this project "
        f"writes (over {_MAX_RECORD_CHARS:,} characters)"
    )
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:
    raise CarriedRecordError(
        f"{path}: {key} is not readable JSON ({type(e).__name__})"
    ) from None


def _fail(path: str, field: str, why: str):
  raise CarriedRecordError(f"{path}: {field} {why}; {_ALTERED}")


_ALTERED = (
    "the file's records were altered or damaged: convert its weights "
    "alone from a copy you trust, or re-export it"
)


def _number(
    value: Any,
    path: str,
    field: str,
    *,
    low: float = -math.inf,
    positive: bool = False,
) -> float:
  ok = (
      isinstance(value, (int, float))
      and not isinstance(value, bool)
      and math.isfinite(value)
      and value >= low
      and not (positive and value <= 0)
  )
  if not ok:
    _fail(
        path,
        field,
        f"is {str(value)[:40]!r}, not a "
        f"{'positive ' if positive else ''}number"
        + (f" of at least {low:g}" if low > -math.inf else ""),
    )
  return float(value)


def _quality(record: Any, path: str) -> Optional[dict[str, float]]:
  if record is None:
    return None
  field = QUALITY_KEY
  if not isinstance(record, dict):
    _fail(path, field, "is not a mapping")
  b = _number(record.get("b"), path, f"{field}.b", low=-1)
  if b > 1:
    _fail(path, f"{field}.b", f"is {b:g}, above 1")
  return {
      "mean": _number(record.get("mean"), path, f"{field}.mean", positive=True),
      "std": _number(record.get("std"), path, f"{field}.std", low=0),
      "h": _number(record.get("h"), path, f"{field}.h", positive=True),
      "eps": _number(record.get("eps"), path, f"{field}.eps", positive=True),
      "b": b,
  }


def _thresholds(record: Any, path: str) -> Optional[dict[str, Any]]:
  """The threshold record, each set checked (`eval.stored.check_set`)."""
  if record is None:
    return None
  field = THRESHOLDS_KEY
  if not isinstance(record, dict) or not isinstance(record.get("sets"), dict):
    _fail(path, field, "holds no mapping of sets")
  if record.get("scoring") != extract.DECISION_SCORING:
    _fail(
        path,
        f"{field}.scoring",
        f"is {str(record.get('scoring'))[:60]!r}"
        f", not this version's scoring ({extract.DECISION_SCORING})",
    )
  if len(record["sets"]) > stored.MAX_ROWS:
    _fail(path, f"{field}.sets", f"holds over {stored.MAX_ROWS} sets")
  sets = {}
  for name, entry in record["sets"].items():
    where = f"{field}.sets.{str(name)[:40]}"
    if not _SET_NAME.match(name):
      _fail(path, where, "is not a set name")
    try:
      sets[name] = stored.check_set(entry, where)
    except stored.StoredSetError as e:
      raise CarriedRecordError(f"{path}: {e}; {_ALTERED}") from None
    sets[name]["provenance"].pop("folder", None)  # another machine's path
  return {"sets": sets}
