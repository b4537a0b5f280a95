"""Stored threshold sets, checked before anything decides on them.

An evaluation stores, for each set, its threshold rows (FAR), open-set rows
(FPIR) and provenance (`thresholds.py`, `identification.py`, `runner.py`);
decisions read them from a workdir's eval/ folder and exports carry them.
Both are files others can hand us, so `check_set` is the one reader of a
stored set: it keeps only the fields decisions read, and every number must
add up (a cosine in [-1, 1], rates in (0, 1], whole counts with accepted
<= impostors <= the set's impostor pairs <= the pairs its photos can make,
enough of them for the rate, the measured rate within it and its bound
between the two, stated only over enough people, a known kind of set, the
scoring decisions use). Anything else is a `StoredSetError` naming the
field; the caller names the file.
"""

from __future__ import annotations

import math
import re
from typing import Any

from qgjt_jax import errors
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.eval import extract
from qgjt_jax.eval import thresholds

# Kinds of evaluated set, as the evaluation labels them, best first for a
# decision on photos; the last ones are used only when named.
PHOTO_KINDS = ("calibration", "own_folder", "own_pairs", "bin")
NAMED_ONLY = ("generated", "ijb_template", "low_res_folder")
MAX_ROWS = 64
# How photos became faces (config.eval.align; decisions' --align, and
# --landmarks).
ALIGNMENTS = ("none", "detect", "landmarks")


class StoredSetError(errors.UserError):
  """A stored set that does not add up: "FIELD why"."""


def _fail(field: str, why: str):
  raise StoredSetError(f"{field} {why}")


def _number(
    value: Any,
    field: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = False,
) -> float:
  ok = (
      isinstance(value, (int, float))
      and not isinstance(value, bool)
      and math.isfinite(value)
      and low <= value <= high
      and not (open_low and value == low)
  )
  if not ok:
    _fail(
        field,
        f"is {str(value)[:40]!r}, not a number in "
        f"{'(' if open_low else '['}{low:g}, {high:g}]",
    )
  return float(value)


def _count(value: Any, field: str, low: int = 0) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    _fail(
        field,
        f"is {str(value)[:40]!r}, not a whole count of at least {low}",
    )
  return value


def _optional(row: dict, clean: dict, field: str, counts=(), rates=()) -> dict:
  for key in counts:
    if row.get(key) is not None:
      clean[key] = _count(row[key], f"{field}.{key}")
  for key in rates:
    if row.get(key) is not None:
      clean[key] = _number(row[key], f"{field}.{key}", 0, 1)
  return clean


def _rate_row(
    row: Any,
    field: str,
    rate: str,
    k: str,
    n: str,
    what: str,
    bound: float = math.inf,
) -> dict:
  """The fields every stored row has: its cosine, its rate, k of n (`what`
  counts n, at most `bound`, the set's own count, and enough to resolve
  the rate) with k / n within the rate, and the rate's upper bound over
  people (none below MIN_PEOPLE) between the two."""
  if not isinstance(row, dict):
    _fail(field, "is not a row")
  cosine = _number(row.get("cosine"), f"{field}.cosine", -1, 1)
  target = _number(row.get(rate), f"{field}.{rate}", 0, 1, open_low=True)
  total = _count(row.get(n), f"{field}.{n}", 1)
  hits = _count(row.get(k), f"{field}.{k}")
  if total > bound:
    _fail(f"{field}.{n}", f"({total:,}) exceeds the set's {what} ({bound:,})")
  if total * target < thresholds.PER_RATE * (1 - 1e-9):
    _fail(
        f"{field}.{n}",
        f"({total:,}) is too few {what} to resolve "
        f"{rate.upper()} {target:g} (it needs {thresholds.PER_RATE} / "
        f"{rate.upper()})",
    )
  if hits > total * target * (1 + 1e-9):
    _fail(
        f"{field}.{k}",
        f"({hits:,} of {total:,}) is above the "
        f"{rate.upper()} {target:g} it was cut at",
    )
  clean = {
      "cosine": cosine,
      rate: target,
      k: hits,
      n: total,
      f"{rate}_upper": None,
      "design_effect": None,
      "people": None,
  }
  if row.get(f"{rate}_upper") is not None:
    clean[f"{rate}_upper"] = _number(
        row[f"{rate}_upper"],
        f"{field}.{rate}_upper",
        hits / total,
        target * (1 + 1e-9),
    )
    clean["design_effect"] = _number(
        row.get("design_effect"), f"{field}.design_effect", 1
    )
    clean["people"] = _count(
        row.get("people"), f"{field}.people", thresholds.MIN_PEOPLE
    )
  elif row.get("people") is not None:
    clean["people"] = _count(row["people"], f"{field}.people", 1)
  return clean


def far_row(row: Any, field: str, pairs_bound: float = math.inf) -> dict:
  """A FAR row; `pairs_bound`: the set's impostor pairs."""
  clean = _rate_row(
      row, field, "far", "accepted", "impostors", "impostor pairs", pairs_bound
  )
  return _optional(row, clean, field, counts=("genuine",), rates=("tar",))


def open_set_row(row: Any, field: str) -> dict:
  """An FPIR row."""
  clean = _rate_row(row, field, "fpir", "false_alarms", "searches", "searches")
  clean.update(
      gallery_people=_count(
          row.get("gallery_people"), f"{field}.gallery_people", 1
      ),
      template_false_match_rate=_number(
          row.get("template_false_match_rate"),
          f"{field}.template_false_match_rate",
          0,
          1,
      ),
  )
  return _optional(
      row, clean, field, counts=("mated_searches",), rates=("tpir",)
  )


def _searches(ref: Any, field: str, images: int | None) -> dict:
  """Where a set's photos were stored as searches: a file of eval/ by the
  name evaluation gives it, its SHA-256, and the person of each photo."""
  if not isinstance(ref, dict):
    _fail(field, "is not a mapping")
  file, digest, people = ref.get("file"), ref.get("sha256"), ref.get("people")
  if not (isinstance(file, str) and workdir_layout.EVAL_SEARCHES.match(file)):
    _fail(
        f"{field}.file",
        f"is {str(file)[:40]!r}, not a file name evaluation writes",
    )
  if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
    _fail(f"{field}.sha256", "is not a SHA-256 digest")
  if not (
      isinstance(people, list)
      and len(people) == images
      and all(
          isinstance(p, int)
          and not isinstance(p, bool)
          and 0 <= p < len(people)
          for p in people
      )
  ):
    _fail(
        f"{field}.people",
        "is not a list of person numbers, one for each of the set's photos",
    )
  return {"file": file, "sha256": digest, "people": people}


def check_set(entry: Any, field: str) -> dict:
  """A stored set ({"thresholds", "open_set", "provenance",
  "impostor_pairs", "num_images"}) with only what decisions read, every
  number checked (see module).

  Raises:
    StoredSetError: "FIELD why".
  """
  if not isinstance(entry, dict):
    _fail(field, "is not a mapping")
  provenance = entry.get("provenance")
  if not isinstance(provenance, dict):
    _fail(f"{field}.provenance", "is not a mapping")
  kind = provenance.get("kind")
  if kind not in PHOTO_KINDS + NAMED_ONLY:
    _fail(
        f"{field}.provenance.kind",
        f"is {str(kind)[:40]!r}, no kind of set this project evaluates",
    )
  if provenance.get("scoring") != extract.DECISION_SCORING:
    _fail(
        f"{field}.provenance.scoring",
        f"is not the scoring decisions use ({extract.DECISION_SCORING})",
    )
  clean = {"provenance": {k: provenance[k] for k in ("kind", "scoring")}}
  for key in ("step", "carried_from", "folder"):
    if isinstance(provenance.get(key), (int, str)):
      clean["provenance"][key] = provenance[key]
  if provenance.get("align") is not None:
    if provenance["align"] not in ALIGNMENTS:
      _fail(
          f"{field}.provenance.align",
          f"is {str(provenance['align'])[:40]!r}"
          f", not one of {', '.join(ALIGNMENTS)}",
      )
    clean["provenance"]["align"] = provenance["align"]
  if entry.get("num_people") is not None:
    clean["num_people"] = _count(entry["num_people"], f"{field}.num_people", 1)
  bound = math.inf
  # Sets of photos record how many; sets of given pairs (.bin, pairs files)
  # and templates do not.
  if entry.get("num_images") is not None:
    images = _count(entry["num_images"], f"{field}.num_images", 2)
    clean["num_images"] = bound = images
    bound = images * (images - 1) // 2
  if entry.get("impostor_pairs") is not None:
    pairs = _count(entry["impostor_pairs"], f"{field}.impostor_pairs")
    if pairs > bound:
      _fail(
          f"{field}.impostor_pairs",
          f"({pairs:,}) exceeds the pairs "
          f"{clean['num_images']:,} photos can make ({bound:,})",
      )
    clean["impostor_pairs"] = bound = pairs
  if entry.get("searches") is not None:
    clean["searches"] = _searches(
        entry["searches"], f"{field}.searches", clean.get("num_images")
    )
  for key, check in (
      ("thresholds", lambda r, f: far_row(r, f, bound)),
      ("open_set", open_set_row),
  ):
    rows = entry.get(key, [])
    if not isinstance(rows, list) or len(rows) > MAX_ROWS:
      _fail(f"{field}.{key}", f"is not a list of at most {MAX_ROWS} rows")
    clean[key] = [check(r, f"{field}.{key}[{i}]") for i, r in enumerate(rows)]
  return clean
