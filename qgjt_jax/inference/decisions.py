"""The thresholds decisions stand on, and what they may claim.

`compare` says "same person" when two faces' cosine reaches a threshold;
`identify` names a gallery person when a probe's best score does. A
threshold is only worth the evaluation that measured it, so it is chosen
among the rows the workdir's evaluations stored (`eval/thresholds.py`) by
these rules, and stated with where it comes from:

* the evaluation of the weights' own step (another step's is used with a
  warning);
* scored as decisions score (`extract.DECISION_SCORING`: flip-fused);
* measured on photos: calibration folders first (people kept apart from
  any gallery), then your own folders and pairs files, then `.bin` pair
  sets. Generated faces and IJB templates (pooled photos) say nothing of
  single photos: they are used only when named (`--threshold_set`), and
  the decision then says what they are;
* enough impostors for the FAR asked (at least 3 / FAR); otherwise the
  decision is refused, naming the count and the FAR that count resolves;
* stated as a bound where the set's people allow one ("FAR <= 1e-3 at 95%
  confidence over 60 people"), else said to be a point estimate.

`identify` asks for a false-positive identification rate instead: the
threshold at which the calibration's non-mated searches (each person left
out of a gallery of the others) raise a false alarm that often, and the
expected false alarms for the gallery searched (`OpenSetThreshold`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
from typing import Any, Optional

from etils import epath
import numpy as np

from qgjt_jax import errors
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.eval import extract
from qgjt_jax.eval import identification
from qgjt_jax.eval import stored
from qgjt_jax.eval import thresholds
from qgjt_jax.eval.stored import NAMED_ONLY, PHOTO_KINDS
from qgjt_jax.files import regular

KIND_TEXT = {
    "calibration": "calibration people",
    "own_folder": "your own folder of people",
    "own_pairs": "your own pairs file",
    "bin": "a .bin set of aligned pairs",
    "generated": "generated faces",
    "ijb_template": "IJB templates (pooled photos)",
    "low_res_folder": "your own folder, one face of each pair shrunk",
}
HOW_TO_CALIBRATE = (
    "calibrate on photos of people who are not in your gallery: "
    "--mode=eval --config.eval.calibration_folders=\"('/data/people',)\" "
    "(one sub-folder of photos per person, several people)"
)
_MAX_JSON_BYTES = 64 << 20


class DecisionError(errors.UserError):
  """No threshold the decision may honestly use (the message says why and
  what to do)."""


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A cosine threshold and what it stands for (far None: typed by hand)."""

  cosine: float
  far: Optional[float] = None
  set_name: Optional[str] = None
  step: Optional[int] = None
  file: Optional[str] = None
  provenance: dict = dataclasses.field(default_factory=dict)
  row: dict = dataclasses.field(default_factory=dict)
  people: Optional[int] = None  # how many people the set's photos show
  searches: Optional[dict] = None  # where the set's photos are stored

  @property
  def kind(self) -> Optional[str]:
    return self.provenance.get("kind")

  def origin(self) -> str:
    """Which set, of what, measured at which step, in which file."""
    kind = KIND_TEXT.get(self.kind, self.kind)
    if self.kind in NAMED_ONLY:
      kind += ", not single photos"
    carried = self.provenance.get("carried_from")
    return (
        f"{self.set_name} ({kind}; evaluation of step {self.step}, "
        f"eval/{self.file}"
        + (f", carried in {carried}" if carried else "")
        + ")"
    )

  def describe(self) -> str:
    if self.far is None:
      return f"threshold {self.cosine:.4f}, given by --threshold"
    return (
        f"threshold {self.cosine:.4f} on {self.origin()}: "
        + _stated(
            self.row,
            "FAR",
            self.far,
            ".0e",
            "accepted",
            "impostors",
            "impostor pairs accepted",
        )
        + self.rests_on()
    )

  def rests_on(self) -> str:
    """What the threshold does for genuine pairs (TAR; TPIR for open-set
    rows), and how many people it rests on, as far as the set recorded
    them."""
    tar, genuine = self.row.get("tar"), self.row.get("genuine")
    tpir = self.row.get("tpir")
    parts = (
        [
            f"TAR {tar:.3f} there"
            + (f" ({genuine:,} genuine pairs)" if genuine else "")
        ]
        if tar is not None
        else []
    )
    if tpir is not None:
      parts.append(f"TPIR {tpir:.3f} there")
    if self.people:
      parts.append(f"{self.people:,} people in the set")
    return "; " + ", ".join(parts) if parts else ""


@dataclasses.dataclass(frozen=True)
class OpenSetThreshold(Threshold):
  """A threshold at a false-positive identification rate: measured on
  galleries of the calibration's own people (each left out in turn), or
  with `on_gallery`, against the very gallery searched (`on_gallery()`)."""

  fpir: Optional[float] = None
  on_gallery: bool = False

  def describe(self) -> str:
    where = "this gallery of" if self.on_gallery else "galleries of"
    return (
        f"threshold {self.cosine:.4f} on {self.origin()}: "
        + _stated(
            self.row,
            "FPIR",
            self.fpir,
            "g",
            "false_alarms",
            "searches",
            "non-mated searches raising a false alarm",
        )
        + f" against {where} {self.row.get('gallery_people', 0):,} "
        f"people{self.rests_on()}"
    )


def on_gallery(
    threshold: OpenSetThreshold,
    searches: identification.Searches,
    best: np.ndarray,
    gallery_people: int,
) -> Optional[OpenSetThreshold]:
  """The threshold of `threshold`'s FPIR cut again against the gallery a
  search is about to use (of `gallery_people`): `best` holds each stored
  search's best cosine among its templates (`identification.open_set_cut`);
  None where that does not resolve the rate."""
  row = identification.open_set_cut(
      best, searches.people, threshold.fpir, gallery_people
  )
  if row is None:
    return None
  return dataclasses.replace(
      threshold, cosine=row["cosine"], row=row, on_gallery=True
  )


def _stated(
    row: dict, rate: str, value: float, form: str, k: str, n: str, counted: str
) -> str:
  """What a stored row claims: a bound over people where it has one, the
  measured count beside it; else a point estimate, said to be one."""
  measured = f"{row[k]:,} of {row[n]:,} {counted}"
  upper = row.get(f"{rate.lower()}_upper")
  if upper is not None:
    return (
        f"{rate} <= {value:{form}} at 95% confidence over "
        f"{row['people']:,} people (bound {upper:.1e}; measured "
        f"{row[k] / row[n]:.1e}, {measured})"
    )
  why = (
      f"only {row['people']:,} people"
      if row.get("people")
      else "pairs of people it does not know"
  )
  return (
      f"{rate} about {value:{form}}, a point estimate ({measured}) "
      f"that no bound backs: it rests on {why}, and a bound needs "
      f"{thresholds.MIN_PEOPLE} people or more"
  )


def _read(path: epath.Path) -> dict[str, Any]:
  """A stored evaluation: a regular file of bounded size holding JSON (its
  sets are checked where they are used, `checked`)."""
  text = regular.read_text(
      path, _MAX_JSON_BYTES, "an evaluation result", DecisionError
  )
  try:
    data = json.loads(text)
  except (ValueError, RecursionError) as e:
    raise DecisionError(
        f"{path}: not a readable evaluation result "
        f"({errors.one_line(e)[:100] or type(e).__name__}); "
        "run --mode=eval again, or pass --threshold=COSINE"
    ) from None
  return data if isinstance(data, dict) else {}


def evaluation(
    workdir: str, step: int
) -> tuple[int, epath.Path, dict[str, Any], list[str]]:
  """(its step, path, results, notes) of the evaluation of `step` (its
  latest repeat), else of the newest one, with a warning among the notes.

  Raises:
    DecisionError: the workdir holds no evaluation.
  """
  layout = workdir_layout.Workdir(workdir)
  found = layout.eval_results()
  if not found:
    raise DecisionError(
        f"{layout.eval} holds no evaluation to take a threshold from: "
        f"{HOW_TO_CALIBRATE}; or pass --threshold=COSINE"
    )
  same = [f for f in found if f[0][0] == step]
  (measured, _), path = (same or found)[-1]
  notes = (
      []
      if same
      else [
          f"WARNING: no evaluation of step {step}, the weights used; the "
          f"threshold comes from step {measured}'s ({path.name}): run "
          "--mode=eval to measure this step's"
      ]
  )
  return measured, path, _read(path), notes


def _measured(results: dict[str, Any], key: str) -> dict[str, dict]:
  """{set: its metrics} of the sets that measured `key` (thresholds or
  open_set rows, perhaps none: too few comparisons for any rate); their
  rows are checked where they are used (`checked`)."""
  return {
      name: metrics
      for name, metrics in results.items()
      if isinstance(metrics, dict) and isinstance(metrics.get(key), list)
  }


def _provenance(metrics: dict) -> dict:
  found = metrics.get("provenance")
  return found if isinstance(found, dict) else {}


def _usable_sets(
    results: dict[str, Any],
    path: epath.Path,
    key: str,
    set_name: Optional[str],
) -> dict[str, dict]:
  """{set: metrics} that may decide: scored as decisions are, on photos
  unless named (see module)."""
  measured = _measured(results, key)
  if set_name:
    if set_name not in measured:
      raise DecisionError(
          f"--threshold_set={set_name}: {path} has no {key} for it; sets "
          f"with {key}: {', '.join(sorted(measured)) or 'none'}"
      )
    measured = {set_name: measured[set_name]}
  scored = {
      n: m
      for n, m in measured.items()
      if _provenance(m).get("scoring") == extract.DECISION_SCORING
  }
  if measured and not scored:
    name, metrics = next(iter(measured.items()))
    scoring = _provenance(metrics).get("scoring")
    what = (
        f"were measured on {scoring} scores"
        if scoring
        else "do not record how they were scored (an older evaluation)"
    )
    raise DecisionError(
        f"{path}: {name}'s thresholds {what}, and decisions score "
        f"{extract.DECISION_SCORING}: run --mode=eval again (with the "
        "default config.eval.fusion) to measure them the way they are used"
    )
  if set_name:
    return scored
  photos = {
      n: m
      for n, m in scored.items()
      if _provenance(m).get("kind") in PHOTO_KINDS
  }
  if scored and not photos:
    kinds = sorted(
        {
            KIND_TEXT.get(_provenance(m).get("kind"), "?")
            for m in scored.values()
        }
    )
    raise DecisionError(
        f"{path} measured thresholds only on {' and '.join(kinds)} "
        f"({', '.join(sorted(scored))}), which say nothing of how photos "
        f"score: {HOW_TO_CALIBRATE}; or name one with --threshold_set=NAME "
        "to use it all the same, or pass --threshold=COSINE"
    )
  return photos


def _best(sets: dict[str, dict], count: str) -> str:
  """The set to decide on: the best kind, then the most comparisons."""

  def rank(name):
    kind = _provenance(sets[name]).get("kind")
    order = PHOTO_KINDS.index(kind) if kind in PHOTO_KINDS else len(PHOTO_KINDS)
    found = sets[name].get(count)
    return (order, -(found if isinstance(found, int) else 0))

  return min(sets, key=rank)


@dataclasses.dataclass(frozen=True)
class _Rate:
  """What decides at a rate: 1:1 thresholds or open-set ones."""

  key: str  # the rows' key in a set's results
  field: str  # the rate's key in a row
  flag: str
  count: str  # the set's count of comparisons that resolve a rate
  needs: str  # what that count counts
  more: str  # what to calibrate on more of
  format: str
  none: str  # when no set measured any
  grid: tuple[float, ...]  # the rates evaluations store rows at


_FAR = _Rate(
    "thresholds",
    "far",
    "--far",
    "impostor_pairs",
    "impostor pairs",
    "people",
    ".0e",
    f"{HOW_TO_CALIBRATE}; or pass --threshold=COSINE",
    thresholds.FARS,
)
_FPIR = _Rate(
    "open_set",
    "fpir",
    "--fpir",
    "num_images",
    "non-mated searches",
    "photos",
    "g",
    "they come from folders of people: "
    f"{HOW_TO_CALIBRATE}; or pass --far (a 1:1 rate) or "
    "--threshold=COSINE",
    identification.FPIRS,
)


def _row_at(
    rate: _Rate,
    value: float,
    workdir: str,
    step: int,
    set_name: Optional[str],
    align: Optional[str],
) -> tuple[dict, list[str]]:
  """The stored row of `rate` at `value` that may decide for the weights of
  `step` (see module), with where it comes from, and notes to print.

  Raises:
    DecisionError: none may be used (saying why and what to do).
  """
  check_rate(value, rate.flag)
  measured, path, results, notes = evaluation(workdir, step)
  sets = _usable_sets(results, path, rate.key, set_name)
  if not sets:
    raise DecisionError(
        f"{path} measured no {rate.key.replace('_', '-')} "
        f"thresholds: {rate.none}"
    )
  name = _best(sets, rate.count)
  entry = checked(sets[name], path, name)
  rows = entry[rate.key]
  row = next((r for r in rows if math.isclose(r[rate.field], value)), None)
  if row is None:
    # The coarsest rate the set resolves is the one most likely to hold.
    coarsest = max((r[rate.field] for r in rows), default=None)
    use = (
        f"use {rate.flag}={coarsest:{rate.format}}, the coarsest it resolves"
        if coarsest
        else HOW_TO_CALIBRATE
    )
    if not any(math.isclose(value, g) for g in rate.grid):
      raise DecisionError(
          f"{rate.flag}={value:g}: evaluations store thresholds at "
          f"{', '.join(f'{g:{rate.format}}' for g in rate.grid)} only; {use}"
      )
    raise DecisionError(
        f"{rate.field.upper()} {value:{rate.format}} needs "
        f"{math.ceil(round(thresholds.PER_RATE / value, 6)):,} {rate.needs}; "
        f"{name} ({path.name}) has "
        f"{entry.get(rate.count, 0):,}: {use}"
        + (f", or calibrate on more {rate.more}" if coarsest else "")
    )
  _check_use(entry, f"{name} ({path.name})", align)
  return (
      dict(
          cosine=row["cosine"],
          set_name=name,
          step=measured,
          file=path.name,
          provenance=entry["provenance"],
          row=row,
          people=entry.get("num_people"),
          searches=entry.get("searches"),
      ),
      notes,
  )


# How faces were made, as a threshold records it and a decision says it.
_ALIGNED = ("detect", "landmarks")
_FACES = {
    True: "photos whose faces were found and aligned to the template",
    False: "images resized as they are, not aligned",
}
# A threshold's true-accept rate within this factor of its false-accept
# rate tells people apart no better than chance does.
_MIN_SEPARATION = 2.0


def _check_use(entry: dict, where: str, align: Optional[str]) -> None:
  """Refuses a threshold measured on faces made differently from the
  decision's, or on a set whose people it does not tell apart."""
  measured = entry["provenance"].get("align")
  if (
      align is not None
      and measured is not None
      and ((measured in _ALIGNED) != (align in _ALIGNED))
  ):
    raise DecisionError(
        f"{where} measured its thresholds on {_FACES[measured in _ALIGNED]}"
        f", and this decision uses {_FACES[align in _ALIGNED]}: the same "
        "pair scores differently either way. Decide as it was measured ("
        + (
            "--align=detect or --landmarks"
            if measured in _ALIGNED
            else "without --align or --landmarks"
        )
        + "), or calibrate again with "
        f"--config.eval.align={'detect' if align in _ALIGNED else 'none'}"
    )
  # Read at the set's coarsest 1:1 rate, for open-set decisions too (a
  # TPIR has no such chance level: it depends on the gallery's size).
  coarsest = max(entry["thresholds"], key=lambda r: r["far"], default=None)
  if (
      coarsest is not None
      and coarsest.get("tar") is not None
      and (coarsest["tar"] <= _MIN_SEPARATION * coarsest["far"])
  ):
    raise DecisionError(
        f"{where} does not tell its people apart: TAR "
        f"{coarsest['tar']:.3f} at FAR {coarsest['far']:g}, within "
        f"{_MIN_SEPARATION:g}x of chance (photos of noise, or faces this "
        f"model cannot see): {HOW_TO_CALIBRATE}"
    )


def checked(entry: dict, path: epath.Path, name: str) -> dict:
  """A stored set read through `eval.stored.check_set`: one whose numbers
  do not add up decides nothing."""
  try:
    return stored.check_set(entry, name)
  except stored.StoredSetError as e:
    raise DecisionError(
        f"{path}: {e}: the stored evaluation was altered or damaged; run "
        "--mode=eval again to measure the thresholds, or pass "
        "--threshold=COSINE"
    ) from None


def at_far(
    workdir: str,
    step: int,
    far: float,
    set_name: Optional[str] = None,
    align: Optional[str] = None,
) -> tuple[Threshold, list[str]]:
  """The threshold of a 1:1 FAR for the weights of `step` (see module),
  and notes to print with it. `align` is how the decision's faces are made
  (none, detect, landmarks): a threshold measured otherwise, or on a set
  whose people it does not tell apart, is refused.

  Raises:
    DecisionError: none may be used (saying why and what to do).
  """
  found, notes = _row_at(_FAR, far, workdir, step, set_name, align)
  return Threshold(far=float(found["row"]["far"]), **found), notes


def at_fpir(
    workdir: str,
    step: int,
    fpir: float,
    set_name: Optional[str] = None,
    align: Optional[str] = None,
) -> tuple[OpenSetThreshold, list[str]]:
  """The threshold of an open-set false-positive identification rate,
  from the non-mated searches of calibration or own folders.

  Raises:
    DecisionError: none may be used (saying why and what to do).
  """
  found, notes = _row_at(_FPIR, fpir, workdir, step, set_name, align)
  return OpenSetThreshold(fpir=float(found["row"]["fpir"]), **found), notes


def stored_searches(
    workdir: str, threshold: Threshold, dim: int
) -> Optional[identification.Searches]:
  """The photos of the set a threshold was measured on, stored by its
  evaluation as searches (`eval.report.write_results`), for identify to
  measure the threshold against its own gallery; None where the set
  stored none (an older evaluation, or one carried in an export).

  Raises:
    DecisionError: the stored file is not the one the evaluation wrote
      (its digest), or not `dim`-wide float32 embeddings of its photos.
  """
  ref = threshold.searches
  if not ref:
    return None
  path = workdir_layout.Workdir(workdir).eval / ref["file"]
  if not os.path.lexists(path):
    return None
  count = len(ref["people"])
  limit = 4096 + count * dim * 4  # an .npy header and the float32 rows
  data = regular.read_bytes(path, limit, "stored searches", DecisionError)
  if hashlib.sha256(data).hexdigest() != ref["sha256"]:
    raise DecisionError(
        f"{path}: not the file {threshold.file} recorded "
        "(its SHA-256 differs): run --mode=eval again"
    )
  # The header is read and checked first: numpy allocates the shape an
  # .npy declares before it reads the rows.
  stream = io.BytesIO(data)
  try:
    version = np.lib.format.read_magic(stream)
    shape, fortran, dtype = (
        np.lib.format.read_array_header_1_0(stream)
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0(stream)
    )
  except ValueError as e:
    raise DecisionError(
        f"{path}: not an .npy array ({errors.one_line(e)})"
    ) from None
  expected = (count, dim)
  if (
      dtype != np.dtype("<f4")
      or fortran
      or shape != expected
      or len(data) - stream.tell() != count * dim * 4
  ):
    raise DecisionError(
        f"{path}: holds {dtype} {shape}, not the float32 {expected} "
        "embeddings of the set's photos: run --mode=eval again"
    )
  embeddings = np.frombuffer(data, "<f4", offset=stream.tell()).reshape(
      expected
  )
  if not np.isfinite(embeddings).all():
    raise DecisionError(
        f"{path}: holds values that are no numbers: run --mode=eval again"
    )
  return identification.Searches(embeddings, np.asarray(ref["people"]))


def check_rate(rate: float, flag: str) -> None:
  if not (isinstance(rate, (int, float)) and 0 < rate < 1):
    raise DecisionError(
        f"{flag}={rate}: a rate between 0 and 1 (e.g. {flag}=1e-3)"
    )


def by_hand(cosine: float) -> Threshold:
  if not (isinstance(cosine, (int, float)) and -1 <= cosine <= 1):
    raise DecisionError(f"--threshold={cosine}: a cosine between -1 and 1")
  return Threshold(float(cosine))


def calibration_people(threshold: Threshold) -> set[str]:
  """The people (sub-folder names) of the folder a threshold was measured
  on, when it was a folder that is still there; else empty."""
  folder = threshold.provenance.get("folder")
  if not folder or not os.path.isdir(folder):
    return set()
  return {p.name for p in pathlib.Path(folder).iterdir() if p.is_dir()}


def exported(workdir: str, step: int) -> Optional[dict[str, Any]]:
  """Every threshold the evaluation of `step` (else the newest) measured as
  decisions score, with its provenance, for the metadata of exported
  models; None without.

  Raises:
    DecisionError: a set's numbers do not add up (`checked`).
  """
  try:
    measured, path, results, _ = evaluation(workdir, step)
  except DecisionError:
    return None
  sets = {}
  for key in ("thresholds", "open_set"):
    for name, metrics in _measured(results, key).items():
      scored = _provenance(metrics).get("scoring") == extract.DECISION_SCORING
      if metrics[key] and scored and name not in sets:
        sets[name] = checked(metrics, path, name)
        # The folder's local path stays on this machine, and the stored
        # photos in the workdir (identify falls back without them).
        sets[name]["provenance"].pop("folder", None)
        sets[name].pop("searches", None)
  if not sets:
    return None
  return {
      "evaluation": f"{workdir_layout.EVAL}/{path.name}",
      "step": measured,
      "weights_step": step,
      "decision": "same person when cosine >= threshold",
      "scoring": extract.DECISION_SCORING,
      "sets": sets,
  }
