r"""Who is this? Probes searched against a gallery of known people.

  python -m qgjt_jax.main --workdir=runs/ms1m --mode=identify \
      --gallery=/data/people --images=/data/probes --out=who.csv \
      [--align=detect] [--fpir=0.01] [--template=quality]

The gallery holds one sub-folder per person (its name is the identity).
Each person's template is the mean of the unit embeddings of its photos,
or with `--template=quality` their mean weighted by each photo's quality,
then brought back to unit length. Each probe (every image below --images)
gets its five best identities and their cosines; its decision is the best
identity when that cosine reaches the threshold, else "unknown": an
open-set search.

The threshold of --fpir is measured against the gallery searched: the
calibration's photos, which its evaluation stores, search this gallery as
people it does not hold, and the threshold is cut where their false alarms
stay at the rate, bounded over the calibration's people where there are
enough (`inference/decisions.py`). An evaluation that stored no photos
gives the threshold of its own galleries (each calibration person left out
of the others'), and a warning where this gallery is bigger. With --far a
1:1 threshold instead, or --threshold by hand. The command warns when the
gallery's people are the very people the threshold was measured on. The
search runs on the accelerator, a block of probes against every template
at a time, so galleries of 100,000 people fit.
"""

from __future__ import annotations

import csv
import io
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qgjt_jax import errors
from qgjt_jax import outputs
from qgjt_jax import reporting
from qgjt_jax.align import faces as faces_lib
from qgjt_jax.files import folders
from qgjt_jax.inference import decisions
from qgjt_jax.inference import embed as embed_lib

TOP_K = 5
TEMPLATES = ("mean", "quality")
UNKNOWN = "unknown"
_SCORES_PER_BLOCK = 1 << 26  # probes x templates scored at once (256 MiB)


def templates(
    embeddings: np.ndarray, weights: np.ndarray, identities: list[str]
) -> tuple[list[str], np.ndarray]:
  """(sorted identities, (P, D) unit templates): the weighted mean of each
  identity's unit embeddings, normalised."""
  names, owner = np.unique(np.asarray(identities), return_inverse=True)
  sums = np.zeros((len(names), embeddings.shape[1]), np.float64)
  np.add.at(sums, owner.reshape(-1), embeddings * weights[:, None])
  norms = np.linalg.norm(sums, axis=1, keepdims=True)
  return list(names), (sums / np.maximum(norms, 1e-12)).astype(np.float32)


@jax.jit
def _top_k(probes, gallery, people):
  scores = probes @ gallery.T
  padding = jnp.arange(gallery.shape[0]) >= people  # never among the best
  return jax.lax.top_k(jnp.where(padding, -jnp.inf, scores), TOP_K)


def search(
    probes: np.ndarray, gallery: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(scores, indices), each (N, min(5, P)): the best templates of each
  probe by cosine, best first; blocks of probes on the accelerator."""
  k = min(TOP_K, len(gallery))
  padded = np.zeros((max(len(gallery), TOP_K), gallery.shape[1]), np.float32)
  padded[: len(gallery)] = gallery  # top_k needs TOP_K columns at least
  gallery_on_device = jnp.asarray(padded)
  block = max(1, min(4096, _SCORES_PER_BLOCK // len(padded)))
  scores, indices = [], []
  for start in range(0, len(probes), block):
    rows = np.zeros((block, probes.shape[1]), np.float32)
    chunk = probes[start : start + block]
    rows[: len(chunk)] = chunk  # one block shape: one compilation
    s, i = _top_k(jnp.asarray(rows), gallery_on_device, len(gallery))
    scores.append(np.asarray(s)[: len(chunk), :k])
    indices.append(np.asarray(i)[: len(chunk), :k])
  if not scores:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  return np.concatenate(scores), np.concatenate(indices)


def cell(text: str) -> str:
  """A name as a CSV cell a spreadsheet shows and does not run: one that
  starts like a formula (=, +, -, @, also after spaces, and their
  full-width forms, which spreadsheets read as the same) gets a leading
  apostrophe; control characters and bytes of a name that are no UTF-8 (a
  file named on another system) are written as \\xNN escapes."""
  text = errors.displayable(text)
  starts = text.lstrip(" \u3000")[:1]
  return "'" + text if starts and starts in _FORMULA_STARTS else text


_FORMULA_STARTS = "=+-@\uff1d\uff0b\uff0d\uff20"


def _csv(paths, names, scores, indices, threshold: float) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(
      ["probe", "decision", "score"]
      + [
          f"{c}{r}"
          for r in range(1, scores.shape[1] + 1)
          for c in ("identity", "score")
      ]
  )
  for path, row_scores, row_ids in zip(paths, scores, indices):
    known = row_scores[0] >= threshold
    writer.writerow(
        [
            cell(path),
            cell(names[row_ids[0]]) if known else UNKNOWN,
            f"{row_scores[0]:.4f}",
        ]
        + [
            v
            for s, i in zip(row_scores, row_ids)
            for v in (cell(names[i]), f"{s:.4f}")
        ]
    )
  return out.getvalue()


def _left_out(result) -> str:
  """Why a set of photos gave no face: the first one left out, with why."""
  if result.skipped:
    path, why = next(iter(result.skipped.items()))
    return f"{len(result.skipped)} left out, e.g. {path}: {why}"
  return f"{len(result.no_face)} without a face"


def decision_threshold(
    model,
    *,
    fpir: float = 0.01,
    far: Optional[float] = None,
    threshold: Optional[float] = None,
    threshold_set: Optional[str] = None,
    align: Optional[str] = None,
):
  """--threshold, else the threshold of --far (a 1:1 rate, if given), else
  the open-set one of --fpir, its notes printed (`align`: how the faces
  are made, checked against the threshold's)."""
  if threshold is not None or far is not None:
    return embed_lib.decision_threshold(
        model,
        far=far,
        threshold=threshold,
        threshold_set=threshold_set,
        align=align,
    )
  chosen, notes = decisions.at_fpir(
      model.workdir, model.step, fpir, threshold_set, align
  )
  for note in notes:
    reporting.note(note)
  return chosen


def _on_this_gallery(model, chosen, gallery: np.ndarray):
  """The open-set threshold measured against the gallery searched: the
  calibration's photos, stored by its evaluation, search it as people it
  does not hold, and the threshold is cut on their best scores. As it was
  where the evaluation stored none."""
  searches = decisions.stored_searches(model.workdir, chosen, gallery.shape[1])
  if searches is None:
    return chosen
  best = search(searches.embeddings, gallery)[0][:, 0]
  return decisions.on_gallery(chosen, searches, best, len(gallery)) or chosen


def _what_it_means(chosen, people: list[str]) -> list[str]:
  """Lines saying what the threshold stands for with this gallery."""
  count = len(people)
  if getattr(chosen, "on_gallery", False):
    lines = [
        f"Decided at {chosen.describe()}: the calibration's "
        f"{chosen.row['searches']:,} photos searched this gallery as "
        "people it does not hold."
    ]
  elif isinstance(chosen, decisions.OpenSetThreshold):
    measured = int(chosen.row.get("gallery_people", 0))
    lines = [
        f"Decided at {chosen.describe()}. The FPIR was measured on "
        f"galleries of {measured:,} people; this gallery has "
        f"{count:,}."
    ]
    if count > measured:
      # Each person is one more chance of a false alarm; extrapolating the
      # calibration's rate to a bigger gallery was measured to be 3x wrong
      # in a quarter of trials at 10x the size, so none is stated.
      lines.append(
          f"WARNING: a gallery larger than the calibration's raises false "
          f"alarms more often than the FPIR stated, by an amount this "
          f"calibration does not measure: calibrate on at least "
          f"{count + 1:,} people kept out of the gallery to state it."
      )
  elif chosen.far is not None:
    lines = [
        f"Decided at {chosen.describe()}. That is a 1:1 rate: a "
        f"search against {count:,} people has {count:,} chances, so "
        f"an unknown face raises a false alarm up to about "
        f"{min(1.0, count * chosen.far):.1%} of the time; --fpir "
        "states the open-set rate instead."
    ]
  else:
    return [f"Decided at {chosen.describe()}."]
  shared = decisions.calibration_people(chosen) & set(people)
  if shared:
    lines.append(
        f"WARNING: {len(shared):,} of the gallery's {count:,} people are "
        f"also in {chosen.provenance.get('folder')}, where the threshold "
        "was measured: it was set on the very people it now decides on; "
        f"{decisions.HOW_TO_CALIBRATE}"
    )
  return lines


def run_identify(
    model,
    gallery: str,
    probes: str,
    out: str,
    *,
    alignment: faces_lib.Alignment = faces_lib.Alignment(),
    template: str = "mean",
    fpir: float = 0.01,
    far: Optional[float] = None,
    threshold: Optional[float] = None,
    threshold_set: Optional[str] = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict:
  """--mode=identify (see module); returns the counts it printed."""
  if template not in TEMPLATES:
    raise errors.UserError(
        f"--template={template}: use one of {', '.join(TEMPLATES)}"
    )
  outputs.check_output(out, overwrite=overwrite)
  photos = folders.read(gallery, "--gallery").paths
  probe_paths = embed_lib.list_photos(probes, "--images")
  chosen = decision_threshold(
      model,
      fpir=fpir,
      far=far,
      threshold=threshold,
      threshold_set=threshold_set,
      align=alignment.mode,
  )
  embedder = embed_lib.Embedder(model, alignment)
  enrolled = embedder.embed(
      photos, root=gallery, skip_bad=skip_bad, desc="gallery"
  )
  owner = [pathlib.Path(p).parts[0] for p in enrolled.paths]  # PERSON/...
  weights = np.ones(len(owner), np.float32)
  if template == "quality":
    weights = enrolled.quality
    if np.isnan(weights).any():  # a converted model has no statistics
      reporting.note(
          "--template=quality: this checkpoint has no norm "
          "statistics; weighting by the feature norm instead"
      )
      weights = enrolled.norms
  if not owner:
    raise errors.UserError(
        f"--gallery={gallery}: none of its {len(photos)} "
        "photo(s) gave a face to enrol (" + _left_out(enrolled) + ")"
    )
  names, gallery_feats = templates(enrolled.embeddings, weights, owner)
  if isinstance(chosen, decisions.OpenSetThreshold):
    chosen = _on_this_gallery(model, chosen, gallery_feats)
  searched = embedder.embed(
      probe_paths, root=probes, skip_bad=skip_bad, desc="probes"
  )
  if not searched.paths:
    raise errors.UserError(
        f"--images={probes}: none of its "
        f"{len(probe_paths)} photo(s) gave a face to "
        "search (" + _left_out(searched) + ")"
    )
  scores, indices = search(searched.embeddings, gallery_feats)
  cut = chosen.cosine
  if jax.process_index() == 0:
    outputs.write(
        out,
        _csv(searched.paths, names, scores, indices, cut),
        overwrite=overwrite,
    )
  known = int(np.sum(scores[:, 0] >= cut))
  counts = {
      "people": len(names),
      "gallery_faces": len(owner),
      "probes": len(scores),
      "identified": known,
      "unknown": len(scores) - known,
  }
  reporting.note(
      "\n".join(
          [
              f"Wrote {out}: {counts['probes']} probe face(s) against "
              f"{counts['people']} people ({counts['gallery_faces']} gallery "
              f"faces, {template} templates, model of step {model.step}): {known} "
              f"identified, {counts['unknown']} unknown."
          ]
          + _what_it_means(chosen, names)
      )
  )
  return counts
