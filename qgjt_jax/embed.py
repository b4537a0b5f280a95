r"""Embeddings of your own faces from a checkpoint (--mode=embed/compare).

  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --mode=embed --images=/data/my_faces --out=my_faces.npz [--skip_bad] \
      [--align=detect | --landmarks=points.csv] [--all_faces]
  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --mode=compare --images=a.jpg,b.jpg [--align=detect] [--far=1e-4]

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

`compare` prints the cosine of two faces and its decision at the cosine
threshold the workdir's latest evaluation measured at --far (see
`eval/thresholds.py`), or at --threshold.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import errors
from qgjt_jax import evaluate
from qgjt_jax import outputs
from qgjt_jax import parallel
from qgjt_jax import reporting
from qgjt_jax import state as state_lib
from qgjt_jax.align import faces as faces_lib
from qgjt_jax.eval import extract
from qgjt_jax.eval import images as images_lib
from qgjt_jax.eval import thresholds
from qgjt_jax.method import quality as quality_lib


class ImageError(ValueError):
  """An image that cannot be read (the message names it)."""


@dataclasses.dataclass
class Embedded:
  embeddings: np.ndarray  # (N, D) float32, unit rows
  norms: np.ndarray       # (N,) float32
  quality: np.ndarray     # (N,) float32 in [0, 1]; NaN without statistics
  hq: np.ndarray          # (N,) bool: quality >= threshold
  threshold: float
  paths: list[str]        # one per face: the photo, "#k" for its k-th face
  skipped: list[str]      # unreadable photos (--skip_bad)
  no_face: list[str] = dataclasses.field(default_factory=list)
  faces: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Embedder:
  """The model of a workdir's checkpoint, restored once, embedding lists
  of photos (see module)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               step: Optional[int] = None,
               alignment: faces_lib.Alignment = faces_lib.Alignment()):
    config = evaluate.with_recorded_input_order(config, workdir)
    mesh = parallel.make_mesh(1)
    dtype = jnp.dtype(config.eval.dtype)
    model = state_lib.build_model(config).clone(dtype=dtype)
    directory = f"{workdir}/checkpoints"
    variables, self.step = ckpt.restore_model(
        directory, evaluate.abstract_model_variables(config, model, mesh),
        step)
    self.stats = ckpt.restore_quality(directory, self.step)
    self.embed_fn = evaluate.make_embed_fn(model, dtype, mesh, variables)
    self.config, self.alignment = config, alignment

  def quality(self, norms: np.ndarray) -> np.ndarray:
    """q in [0, 1] of each norm under the run's statistics (NaN without)."""
    if self.stats is None:
      return np.full(len(norms), np.nan, np.float32)
    scaler = quality_lib.margin_scaler(
        jnp.asarray(norms), quality_lib.QualityStats(
            mean=jnp.float32(self.stats["mean"]),
            std=jnp.float32(self.stats["std"])),
        self.config.quality.h, self.config.quality.eps)
    return np.asarray(quality_lib.quality_from_scaler(scaler), np.float32)

  def embed(self, paths: Sequence[str | os.PathLike], *, root: str = "",
            skip_bad: bool = False, progress: bool = True,
            hint: str = "; pass --skip_bad to leave such images out",
            desc: str = "embed") -> Embedded:
    """Embeds the faces of `paths`. An unreadable image raises ImageError
    (its message ends with `hint`), or with `skip_bad` is left out and
    listed in `skipped`."""
    paths = [pathlib.Path(p) for p in paths]
    name = lambda p: os.path.relpath(p, root) if root else str(p)
    bad = set()  # a set: an image may be read more than once (padding)

    def unreadable(path, e):
      if not skip_bad:
        raise ImageError(f"{errors.one_line(e)}{hint}") from None
      bad.add(name(path))

    crops = faces_lib.locate(paths, self.alignment, name=name,
                             on_error=unreadable, show_progress=progress)
    size = self.config.data.image_size
    sizes = [None] * len(crops)

    def load(i):
      try:
        image = images_lib.imread_bgr(crops[i].path)
      except (OSError, ValueError) as e:  # limits.LimitError among them
        unreadable(crops[i].path, e)
        return np.zeros((size, size, 3), np.uint8)
      sizes[i] = image.shape[:2]
      return faces_lib.crop_image(image, crops[i], size)

    feats, norms = extract.extract_embeddings(
        self.embed_fn, images_lib.LazyImages(load, len(crops)),
        batch_size=self.config.eval.batch_size, flip=False,
        return_norms=True, progress=progress, desc=desc)
    keep = [i for i, c in enumerate(crops) if name(c.path) not in bad]
    faces_lib.note_unaligned([sizes[i] for i in keep if sizes[i]], size,
                             self.alignment)
    located = {name(c.path) for c in crops}
    quality = self.quality(norms[keep])
    threshold = float(self.config.head.b)
    return Embedded(
        embeddings=feats[keep], norms=norms[keep], quality=quality,
        hq=quality >= threshold, threshold=threshold,
        paths=[faces_lib.crop_name(crops[i], name) for i in keep],
        skipped=sorted(bad),
        no_face=[name(p) for p in paths
                 if name(p) not in located and name(p) not in bad],
        faces=faces_lib.face_records([crops[i] for i in keep]))


def run_embed(config: ml_collections.ConfigDict, workdir: str, folder: str,
              out: str, *, skip_bad: bool = False, step: Optional[int] = None,
              overwrite: bool = False,
              alignment: faces_lib.Alignment = faces_lib.Alignment()
              ) -> Embedded:
  """--mode=embed: every image below `folder` into the .npz `out` (that
  very name; refused before any work if it exists, unless `overwrite`)."""
  outputs.check_output(out, overwrite=overwrite)
  paths = list_photos(folder, "--images")
  embedder = Embedder(config, workdir, step, alignment)
  result = embedder.embed(paths, root=folder, skip_bad=skip_bad)
  _report(result, embedder.step)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with outputs.atomic_file(out, overwrite=overwrite) as f:
      np.savez(f, embeddings=result.embeddings, norms=result.norms,
               quality=result.quality, hq=result.hq,
               threshold=np.float64(result.threshold),
               paths=np.array(result.paths, dtype=str),
               skipped=np.array(result.skipped, dtype=str),
               no_face=np.array(result.no_face, dtype=str),
               alignment=np.array(alignment.mode),
               crop_size=np.int32(config.data.image_size), **result.faces)
  reporting.note(f"Wrote {out}: embeddings {result.embeddings.shape}, norms, "
                 "quality, hq, paths" + (", boxes, points" if
                                         alignment.mode != "none" else "") +
                 ".")
  return result


def list_photos(folder: str, flag: str) -> list[pathlib.Path]:
  """The images below `folder`, or a clear error naming `flag`."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise ImageError(f"{flag}={folder} is not a folder of face images")
  paths = images_lib.list_images(root)
  if not paths:
    raise ImageError(f"{flag}={folder} holds no images "
                     f"({', '.join(images_lib.IMAGE_EXTENSIONS)})")
  return paths


def _report(result: Embedded, step: int) -> None:
  left_out = [f"skipped {len(result.skipped)} unreadable"] * bool(
      result.skipped) + [f"{len(result.no_face)} without a face"] * bool(
          result.no_face)
  reporting.note(f"Embedded {len(result.paths)} face(s) with the model of "
                 f"step {step}" + (f"; {', '.join(left_out)}."
                                   if left_out else "."))


def decision_threshold(workdir: str, far: float, threshold: Optional[float],
                       threshold_set: Optional[str] = None
                       ) -> Optional[thresholds.Threshold]:
  """--threshold, else the workdir's latest evaluated threshold at `far`;
  None (said in one line) when the workdir measured none."""
  if threshold is not None:
    return thresholds.Threshold(float(threshold), None, "--threshold")
  try:
    chosen, note = thresholds.latest(workdir, far, threshold_set)
  except errors.UserError as e:
    if threshold_set:
      raise
    reporting.note(f"No decision: {e}")
    return None
  if note:
    reporting.note(note)
  return chosen


def run_compare(config: ml_collections.ConfigDict, workdir: str,
                images: Sequence[str], *, step: Optional[int] = None,
                alignment: faces_lib.Alignment = faces_lib.Alignment(),
                far: float = 1e-4, threshold: Optional[float] = None,
                threshold_set: Optional[str] = None) -> float:
  """--mode=compare: the cosine of two faces, the decision at the
  threshold of `far` (or `threshold`) and both qualities."""
  if len(images) != 2:
    raise ImageError(f"--images={','.join(images)}: give two images, "
                     "--images=A.jpg,B.jpg")
  chosen = decision_threshold(workdir, far, threshold, threshold_set)
  embedder = Embedder(config, workdir, step,
                      dataclasses.replace(alignment, all_faces=False))
  result = embedder.embed(images, progress=False, hint="")
  if result.no_face:
    raise ImageError(f"{result.no_face[0]}: no face to compare")
  cosine = float(result.embeddings[0] @ result.embeddings[1])
  verdict = ""
  if chosen is not None:
    same = cosine >= chosen.cosine
    verdict = (f": {'same person' if same else 'different people'} "
               f"({chosen.describe()})")
  lines = [f"cosine similarity {cosine:.4f}{verdict}"]
  for path, norm, q, hq in zip(result.paths, result.norms, result.quality,
                               result.hq):
    side = ("" if np.isnan(q) else
            f", quality {q:.3f} ({'HQ' if hq else 'LQ'} at b="
            f"{result.threshold})")
    lines.append(f"{path}: feature norm {norm:.3f}{side}")
  reporting.note("\n".join(lines))
  return cosine
