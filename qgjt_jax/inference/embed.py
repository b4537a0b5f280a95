r"""Embeddings of your own faces from a checkpoint (--mode=embed/compare).

  python -m qgjt_jax.main --workdir=runs/ms1m --mode=embed \
      --images=/data/my_faces --out=my_faces.npz [--skip_bad] \
      [--align=detect | --landmarks=points.csv] [--all_faces]
  python -m qgjt_jax.main --workdir=runs/ms1m --mode=compare \
      --images=a.jpg,b.jpg [--align=detect] [--far=1e-4]

Without alignment flags the images are aligned face crops (any size:
resized to the model's input; a line says so when they were not at it).
With --align=detect or --landmarks each photo's largest face (every face
with --all_faces) is warped onto the five-point template (`align/`). For
each face, `embed` writes the unit embedding, the feature norm (the quality
indicator), its quality q in [0, 1] under the run's running norm statistics
and which side of the HQ/LQ threshold (`config.head.b`) that puts it on,
its path relative to the folder ("#k" after it for a photo's k-th face),
and its box, five points and detector score (NaN where not known). A
checkpoint without norm statistics (a converted model) leaves quality NaN.
Faces are scored as every decision is (`extract.DECISION_SCORING`: each
face fused with its mirror image; the norm is the two views' mean).

`compare` prints the cosine of two faces and its decision at the cosine
threshold of --far that the evaluation of the model's step measured on
photos (`inference/decisions.py` says which sets qualify), or at
--threshold; it refuses, saying how to calibrate, where none qualifies.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Sequence

import numpy as np

from qgjt_jax import errors
from qgjt_jax import outputs
from qgjt_jax import reporting
from qgjt_jax.align import faces as faces_lib
from qgjt_jax.eval import extract
from qgjt_jax.files import images as images_lib
from qgjt_jax.inference import decisions
from qgjt_jax.inference import model as model_lib


@dataclasses.dataclass
class Embedded:
  embeddings: np.ndarray  # (N, D) float32, unit rows
  norms: np.ndarray  # (N,) float32
  quality: np.ndarray  # (N,) float32 in [0, 1]; NaN without statistics
  hq: np.ndarray  # (N,) bool: quality >= threshold
  threshold: float
  paths: list[str]  # one per face: the photo, "#k" for its k-th face
  skipped: dict[str, str]  # left-out photo -> why (--skip_bad)
  no_face: list[str] = dataclasses.field(default_factory=list)
  faces: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Embedder:
  """Photos to embeddings with a loaded model (see module)."""

  def __init__(
      self,
      model: model_lib.Model,
      alignment: faces_lib.Alignment = faces_lib.Alignment(),
  ):
    self.model, self.alignment = model, alignment

  def embed(
      self,
      paths: Sequence[str | os.PathLike],
      *,
      root: str = "",
      skip_bad: bool = False,
      progress: bool = True,
      hint: str = "; pass --skip_bad to leave such images out",
      desc: str = "embed",
  ) -> Embedded:
    """Embeds the faces of `paths`. An image that cannot be used (unreadable,
    not an image, over a limit) raises its error (the message ends with
    `hint`), or with `skip_bad` is left out and listed in `skipped` with
    the reason."""
    paths = [pathlib.Path(p) for p in paths]
    name = lambda p: os.path.relpath(p, root) if root else str(p)
    bad = {}  # face -> why: an image may be read more than once (padding)

    def unusable(face: str, e: Exception):
      if not skip_bad:
        raise images_lib.ImageError(f"{errors.one_line(e)}{hint}") from None
      bad.setdefault(face, errors.one_line(e))

    crops = faces_lib.locate(
        paths,
        self.alignment,
        name=name,
        on_error=lambda p, e: unusable(name(p), e),
        show_progress=progress,
    )
    faces = [faces_lib.crop_name(c, name) for c in crops]
    size = self.model.image_size
    sizes = [None] * len(crops)

    def load(i):
      try:
        image = images_lib.imread_bgr(crops[i].path)
        sizes[i] = image.shape[:2]
        return faces_lib.crop_image(image, crops[i], size)
      except (OSError, ValueError) as e:  # LimitError, FaceError among them
        unusable(faces[i], e)
        return np.zeros((size, size, 3), np.uint8)

    feats, norms = self.model.embed(
        images_lib.LazyImages(load, len(crops)), progress=progress, desc=desc
    )
    keep = [i for i, face in enumerate(faces) if face not in bad]
    faces_lib.note_unaligned(
        [sizes[i] for i in keep if sizes[i]], size, self.alignment
    )
    located = {name(c.path) for c in crops}
    quality = self.model.quality(norms[keep])
    threshold = self.model.hq_threshold
    return Embedded(
        embeddings=feats[keep],
        norms=norms[keep],
        quality=quality,
        hq=quality >= threshold,
        threshold=threshold,
        paths=[faces[i] for i in keep],
        skipped=dict(sorted(bad.items())),
        no_face=[
            name(p)
            for p in paths
            if name(p) not in located and name(p) not in bad
        ],
        faces=faces_lib.face_records([crops[i] for i in keep]),
    )


def run_embed(
    model: model_lib.Model,
    folder: str,
    out: str,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    alignment: faces_lib.Alignment = faces_lib.Alignment(),
) -> Embedded:
  """--mode=embed: every image below `folder` into the .npz `out` (that
  very name; refused before any work if it exists, unless `overwrite`)."""
  outputs.check_output(out, overwrite=overwrite)
  paths = list_photos(folder, "--images")
  result = Embedder(model, alignment).embed(
      paths, root=folder, skip_bad=skip_bad
  )
  _report(result, model.step)
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    with outputs.atomic_file(out, overwrite=overwrite) as f:
      np.savez(
          f,
          embeddings=result.embeddings,
          norms=result.norms,
          quality=result.quality,
          hq=result.hq,
          threshold=np.float64(result.threshold),
          paths=np.array(result.paths, dtype=str),
          skipped=np.array(list(result.skipped), dtype=str),
          skipped_reasons=np.array(list(result.skipped.values()), dtype=str),
          no_face=np.array(result.no_face, dtype=str),
          alignment=np.array(alignment.mode),
          scoring=np.array(extract.DECISION_SCORING),
          step=np.int64(model.step),
          crop_size=np.int32(model.image_size),
          **result.faces,
      )
  reporting.note(
      f"Wrote {out}: embeddings {result.embeddings.shape}, norms, "
      "quality, hq, paths"
      + (", boxes, points" if alignment.mode != "none" else "")
      + "."
  )
  return result


def list_photos(folder: str, flag: str) -> list[pathlib.Path]:
  """The images below `folder`, or a clear error naming `flag`."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise images_lib.ImageError(
        f"{flag}={folder} is not a folder of face images"
    )
  paths = images_lib.list_images(root)
  if not paths:
    raise images_lib.ImageError(
        f"{flag}={folder} holds no images "
        f"({', '.join(images_lib.IMAGE_EXTENSIONS)})"
    )
  return paths


def _report(result: Embedded, step: int) -> None:
  """The counts, and the first few photos left out, each with why (all of
  them are in the output)."""
  left_out = [f"{len(result.skipped)} left out"] * bool(result.skipped) + [
      f"{len(result.no_face)} without a face"
  ] * bool(result.no_face)
  lines = [
      f"Embedded {len(result.paths)} face(s) with the model of step "
      f"{step}" + (f"; {', '.join(left_out)}." if left_out else ".")
  ]
  for path, why in list(result.skipped.items())[:_SHOWN]:
    lines.append(f"  left out {path}: {why}")
  if len(result.skipped) > _SHOWN:
    lines.append(
        f"  ... and {len(result.skipped) - _SHOWN} more (all are "
        "listed in the output, with why)"
    )
  reporting.note("\n".join(lines))


_SHOWN = 5  # photos left out that the console names


def decision_threshold(
    model: model_lib.Model,
    *,
    far: float = 1e-4,
    threshold: Optional[float] = None,
    threshold_set: Optional[str] = None,
    align: Optional[str] = None,
) -> decisions.Threshold:
  """--threshold, else the threshold of `far` the evaluations of the
  model's step measured (inference/decisions.py), its notes printed.

  Raises:
    decisions.DecisionError: no threshold may honestly be used.
  """
  if threshold is not None:
    return decisions.by_hand(threshold)
  chosen, notes = decisions.at_far(
      model.workdir, model.step, far, threshold_set, align
  )
  for note in notes:
    reporting.note(note)
  return chosen


def run_compare(
    model: model_lib.Model,
    images: Sequence[str],
    *,
    alignment: faces_lib.Alignment = faces_lib.Alignment(),
    far: float = 1e-4,
    threshold: Optional[float] = None,
    threshold_set: Optional[str] = None,
) -> float:
  """--mode=compare: the cosine of two faces, the decision at the
  threshold of `far` (or `threshold`) and both qualities."""
  if len(images) != 2:
    raise images_lib.ImageError(
        f"--images={','.join(images)}: give two images, --images=A.jpg,B.jpg"
    )
  embedder = Embedder(model, dataclasses.replace(alignment, all_faces=False))
  result = embedder.embed(images, progress=False, hint="")
  if result.no_face:
    raise images_lib.ImageError(f"{result.no_face[0]}: no face to compare")
  chosen = decision_threshold(
      model,
      far=far,
      threshold=threshold,
      threshold_set=threshold_set,
      align=alignment.mode,
  )
  cosine = float(result.embeddings[0] @ result.embeddings[1])
  same = cosine >= chosen.cosine
  lines = [
      f"cosine similarity {cosine:.4f}: "
      f"{'same person' if same else 'different people'}",
      f"  decided at {chosen.describe()}; model of step {model.step}, "
      f"{extract.DECISION_SCORING} scores",
  ]
  for path, norm, q, hq in zip(
      result.paths, result.norms, result.quality, result.hq
  ):
    side = (
        ""
        if np.isnan(q)
        else f", quality {q:.3f} ({'HQ' if hq else 'LQ'} at b="
        f"{result.threshold})"
    )
    lines.append(f"{path}: feature norm {norm:.3f}{side}")
  reporting.note("\n".join(lines))
  return cosine
