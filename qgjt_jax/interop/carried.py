"""What an exported model carries beyond its weights, and reading it back.

An export (ONNX, StableHLO's sidecar, safetensors) writes two records into
its metadata, and `convert` of that file restores both, so the converted
workdir decides and rates quality as the workdir it came from did:

  qgjt_jax.quality     the running feature-norm statistics and the
                       quality settings: {"mean", "std", "h", "eps", "b"}
  qgjt_jax.thresholds  every threshold its evaluation measured
                       (`decisions.exported`), each set with its provenance

A file is from others, so nothing is believed as written: each record is
bounded in size and depth, and every number must add up (a cosine in
[-1, 1], rates in (0, 1), counts that are integers with accepted <=
impostors <= the pairs its photos can make, an interval holding the rate
it was measured at). Anything else is refused in one line naming the file
and the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping, Optional

from qgjt_jax import errors

QUALITY_KEY = "qgjt_jax.quality"
THRESHOLDS_KEY = "qgjt_jax.thresholds"
# The config keys the quality record sets in a converted workdir.
QUALITY_SETTINGS = {"h": "quality.h", "eps": "quality.eps", "b": "head.b"}
_MAX_RECORD_CHARS = 4 << 20
_MAX_ROWS = 64
_SET_NAME = re.compile(r"^[\w.@+-]{1,120}$")
_PROVENANCE_TEXT = ("kind", "scoring")


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
    return {key: self.quality[name] for name, key in QUALITY_SETTINGS.items()}

  def evaluation(self, source: str) -> Optional[dict[str, Any]]:
    """The sets as an evaluation result of the converted step (the form
    `decisions` reads), each provenance naming `source`."""
    if self.thresholds is None:
      return None
    return {name: {**entry, "provenance": {**entry["provenance"],
                                           "carried_from": source}}
            for name, entry in self.thresholds["sets"].items()}


def quality_record(norm_stats: Optional[Mapping[str, float]], h: float,
                   eps: float, b: float) -> Optional[str]:
  """The quality record of a model (None without norm statistics)."""
  if norm_stats is None:
    return None
  return json.dumps({"mean": float(norm_stats["mean"]),
                     "std": float(norm_stats["std"]), "h": float(h),
                     "eps": float(eps), "b": float(b)})


def read(metadata: Mapping[str, str], path: str) -> Carried:
  """The records in a file's metadata, validated (see module).

  Raises:
    CarriedRecordError: naming `path` and the field.
  """
  return Carried(
      quality=_quality(_parse(metadata, QUALITY_KEY, path), path),
      thresholds=_thresholds(_parse(metadata, THRESHOLDS_KEY, path), path))


def _parse(metadata: Mapping[str, str], key: str, path: str) -> Any:
  text = metadata.get(key)
  if text is None:
    return None
  if not isinstance(text, str) or len(text) > _MAX_RECORD_CHARS:
    raise CarriedRecordError(f"{path}: {key} is not a record this project "
                             f"writes (over {_MAX_RECORD_CHARS:,} characters)")
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:
    raise CarriedRecordError(f"{path}: {key} is not readable JSON "
                             f"({type(e).__name__})") from None


def _fail(path: str, field: str, why: str):
  raise CarriedRecordError(f"{path}: {field} {why}; the file's records were "
                           "altered or damaged: convert its weights alone "
                           "from a copy you trust, or re-export it")


def _number(value: Any, path: str, field: str, low: float = -math.inf,
            high: float = math.inf, *, open_low: bool = False) -> float:
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and low <= value <= high
        and not (open_low and value == low))
  if not ok:
    _fail(path, field, f"is {str(value)[:40]!r}, not a number in "
          f"{'(' if open_low else '['}{low:g}, {high:g}]")
  return float(value)


def _count(value: Any, path: str, field: str, low: int = 0) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    _fail(path, field, f"is {str(value)[:40]!r}, not a whole count of at "
          f"least {low}")
  return value


def _quality(record: Any, path: str) -> Optional[dict[str, float]]:
  if record is None:
    return None
  field = QUALITY_KEY
  if not isinstance(record, dict):
    _fail(path, field, "is not a mapping")
  return {"mean": _number(record.get("mean"), path, f"{field}.mean", 0,
                          open_low=True),
          "std": _number(record.get("std"), path, f"{field}.std", 0),
          "h": _number(record.get("h"), path, f"{field}.h", 0,
                       open_low=True),
          "eps": _number(record.get("eps"), path, f"{field}.eps", 0,
                         open_low=True),
          "b": _number(record.get("b"), path, f"{field}.b", -1, 1)}


def _interval(row: dict, key: str, estimate: float, path: str,
              field: str) -> list[float]:
  interval = row.get(key)
  if not (isinstance(interval, list) and len(interval) == 2):
    _fail(path, f"{field}.{key}", "is not a [low, high] pair")
  low = _number(interval[0], path, f"{field}.{key}", 0, 1)
  high = _number(interval[1], path, f"{field}.{key}", 0, 1)
  if not low - 1e-9 <= estimate <= high + 1e-9:
    _fail(path, f"{field}.{key}", f"[{low:g}, {high:g}] does not hold the "
          f"measured rate {estimate:g}")
  return [low, high]


def _far_row(row: dict, path: str, field: str, pairs_bound: int) -> dict:
  """A FAR row; `pairs_bound`: the set's impostor pairs."""
  impostors = _count(row.get("impostors"), path, f"{field}.impostors", 1)
  accepted = _count(row.get("accepted"), path, f"{field}.accepted")
  if accepted > impostors:
    _fail(path, f"{field}.accepted", f"({accepted}) exceeds the impostor "
          f"pairs ({impostors})")
  if impostors > pairs_bound:
    _fail(path, f"{field}.impostors", f"({impostors:,}) exceeds the set's "
          f"impostor pairs ({pairs_bound:,})")
  clean = {"cosine": _number(row.get("cosine"), path, f"{field}.cosine",
                             -1, 1),
           "far": _number(row.get("far"), path, f"{field}.far", 0, 1,
                          open_low=True),
           "accepted": accepted, "impostors": impostors,
           "far_interval": _interval(row, "far_interval",
                                     accepted / impostors, path, field)}
  for key in ("genuine",):
    if key in row:
      clean[key] = _count(row[key], path, f"{field}.{key}")
  for key in ("tar",):
    if key in row:
      clean[key] = _number(row[key], path, f"{field}.{key}", 0, 1)
  for key in ("far_interval_pairs", "far_interval_people"):
    if key in row:
      clean[key] = _interval(row, key, accepted / impostors, path, field)
  return clean


def _open_set_row(row: dict, path: str, field: str) -> dict:
  searches = _count(row.get("searches"), path, f"{field}.searches", 1)
  alarms = _count(row.get("false_alarms"), path, f"{field}.false_alarms")
  if alarms > searches:
    _fail(path, f"{field}.false_alarms", f"({alarms}) exceeds the searches "
          f"({searches})")
  clean = {"cosine": _number(row.get("cosine"), path, f"{field}.cosine",
                             -1, 1),
           "fpir": _number(row.get("fpir"), path, f"{field}.fpir", 0, 1,
                           open_low=True),
           "false_alarms": alarms, "searches": searches,
           "gallery_people": _count(row.get("gallery_people"), path,
                                    f"{field}.gallery_people", 1),
           "template_false_match_rate": _number(
               row.get("template_false_match_rate"), path,
               f"{field}.template_false_match_rate", 0, 1),
           "fpir_interval": _interval(row, "fpir_interval",
                                      alarms / searches, path, field)}
  for key in ("mated_searches",):
    if key in row:
      clean[key] = _count(row[key], path, f"{field}.{key}")
  for key in ("tpir",):
    if key in row:
      clean[key] = _number(row[key], path, f"{field}.{key}", 0, 1)
  for key in ("fpir_interval_people", "fpir_interval_searches"):
    if key in row:
      clean[key] = _interval(row, key, alarms / searches, path, field)
  return clean


def _thresholds(record: Any, path: str) -> Optional[dict[str, Any]]:
  """The threshold record with only the fields decisions read, each
  checked."""
  if record is None:
    return None
  from qgjt_jax.eval import extract  # pylint: disable=g-import-not-at-top
  from qgjt_jax.inference import decisions  # pylint: disable=g-import-not-at-top
  field = THRESHOLDS_KEY
  if not isinstance(record, dict) or not isinstance(record.get("sets"), dict):
    _fail(path, field, "holds no mapping of sets")
  if record.get("scoring") != extract.DECISION_SCORING:
    _fail(path, f"{field}.scoring", f"is {str(record.get('scoring'))[:60]!r}"
          f", not this version's scoring ({extract.DECISION_SCORING})")
  sets = {}
  for name, entry in list(record["sets"].items())[:_MAX_ROWS]:
    where = f"{field}.sets.{str(name)[:40]}"
    if not _SET_NAME.match(name) or not isinstance(entry, dict):
      _fail(path, where, "is not a set name and its mapping")
    provenance = entry.get("provenance")
    if not isinstance(provenance, dict):
      _fail(path, f"{where}.provenance", "is not a mapping")
    kind = provenance.get("kind")
    if kind not in decisions.PHOTO_KINDS + decisions.NAMED_ONLY:
      _fail(path, f"{where}.provenance.kind", f"is {str(kind)[:40]!r}")
    if provenance.get("scoring") != extract.DECISION_SCORING:
      _fail(path, f"{where}.provenance.scoring", "is not this version's")
    impostor_pairs = _count(entry.get("impostor_pairs"), path,
                            f"{where}.impostor_pairs")
    clean = {"provenance": {k: provenance[k] for k in _PROVENANCE_TEXT},
             "impostor_pairs": impostor_pairs}
    # Sets of photos record how many; sets of given pairs (.bin, pairs
    # files) and generated ones do not, and their pairs are as many as
    # given.
    if entry.get("num_images") is not None:
      images = _count(entry["num_images"], path, f"{where}.num_images", 2)
      if impostor_pairs > images * (images - 1) // 2:
        _fail(path, f"{where}.impostor_pairs", f"({impostor_pairs:,}) "
              f"exceeds the pairs {images:,} photos can make "
              f"({images * (images - 1) // 2:,})")
      clean["num_images"] = images
    for key, check in (("thresholds", lambda r, f: _far_row(
        r, path, f, impostor_pairs)), ("open_set", lambda r, f: _open_set_row(
            r, path, f))):
      rows = entry.get(key, [])
      if not isinstance(rows, list) or len(rows) > _MAX_ROWS or not all(
          isinstance(r, dict) for r in rows):
        _fail(path, f"{where}.{key}", "is not a list of rows")
      clean[key] = [check(r, f"{where}.{key}[{i}]")
                    for i, r in enumerate(rows)]
    sets[name] = clean
  return {"sets": sets}
