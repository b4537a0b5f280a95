"""Which faces of which photos become crops, and the crops themselves.

`locate` turns photos into `Crop`s: with alignment "none" each photo is
taken whole (an aligned crop, resized to the model's input); with
"landmarks" or "detect" each photo gives its largest face (every face with
`all_faces`), and a photo without one is named and left out. `crop_image`
then cuts a crop when the embedding reads its photo, so a folder of any size is
held as points, not pixels.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np

from qgjt_jax import errors
from qgjt_jax import progress as progress_lib
from qgjt_jax import reporting
from qgjt_jax.align import detector as detector_lib
from qgjt_jax.align import five_points
from qgjt_jax.align import landmarks_file
from qgjt_jax.files import images as images_lib

MODES = ("none", "detect")


@dataclasses.dataclass(frozen=True)
class Alignment:
  """How photos become crops: --align, --landmarks and --all_faces."""

  mode: str = "none"  # none | detect | landmarks
  landmarks: Optional[str] = None
  all_faces: bool = False

  @classmethod
  def from_flags(
      cls, align: str, landmarks: Optional[str], all_faces: bool
  ) -> "Alignment":
    if align not in MODES:
      raise errors.UserError(
          f"--align={align}: use one of {', '.join(MODES)}"
          " (or --landmarks=FILE.csv)"
      )
    if landmarks and align == "detect":
      raise errors.UserError(
          "--landmarks and --align=detect both say where "
          "the faces are: give one of them"
      )
    if all_faces and not (landmarks or align == "detect"):
      raise errors.UserError(
          "--all_faces needs faces to choose from: add "
          "--align=detect or --landmarks=FILE.csv"
      )
    return cls("landmarks" if landmarks else align, landmarks, all_faces)


@dataclasses.dataclass(frozen=True)
class Crop:
  """One face crop to embed: a photo and, when aligned, its face."""

  path: pathlib.Path
  face: Optional[detector_lib.Face] = None
  index: int = 0  # the face's rank in its photo, 0 = largest


def crop_image(image: np.ndarray, crop: Crop, image_size: int) -> np.ndarray:
  """uint8 (size, size, 3) BGR of the photo `image` of `crop`: the face
  warped onto the template, or the photo resized when it was given as a
  crop.

  Raises:
    five_points.FaceError: the face's points are no face of this photo.
  """
  if crop.face is None:
    return images_lib.resize_square(image, image_size)
  five_points.check_face(
      crop.face.points, *image.shape[:2], f"{crop.path} (face {crop.index})"
  )
  return five_points.align_face(image, crop.face.points, image_size)


def _faces_from_file(path: str) -> Callable[[pathlib.Path], list]:
  table = landmarks_file.read_landmarks(path)

  def faces(photo):
    found = [
        detector_lib.from_points(p)
        for p in table.get(landmarks_file.resolved(photo), [])
    ]
    return sorted(found, key=lambda f: -f.size)

  return faces


def _faces_from_detector(
    on_error: Callable[[pathlib.Path, Exception], None],
) -> Callable[[pathlib.Path], list]:
  detect = detector_lib.Detector()

  def faces(photo):
    try:
      image = images_lib.imread_bgr(photo)
    except (OSError, ValueError) as e:  # limits.LimitError among them
      on_error(photo, e)
      return None
    return detect(image)

  return faces


def locate(
    paths: Sequence[pathlib.Path],
    alignment: Alignment,
    *,
    name: Callable[[pathlib.Path], str] = str,
    on_error: Callable[[pathlib.Path, Exception], None],
    show_progress: bool = True,
) -> list[Crop]:
  """The crops of `paths` (see module). A photo the detector cannot read
  goes to `on_error` (which raises, or records it and returns)."""
  if alignment.mode == "none":
    return [Crop(pathlib.Path(p)) for p in paths]
  if alignment.mode == "landmarks":
    find = _faces_from_file(alignment.landmarks)
    missing = "no row in " + alignment.landmarks
  else:
    find = _faces_from_detector(on_error)
    missing = "no face found"
  crops, lines = [], []
  bar = progress_lib.Progress(len(paths), "find faces", show_progress)
  for photo in map(pathlib.Path, paths):
    faces = find(photo)
    bar.update()
    if faces is None:  # unreadable, recorded by on_error
      continue
    if not faces:
      lines.append(f"{name(photo)}: {missing}; left out")
    elif len(faces) > 1 and not alignment.all_faces:
      lines.append(
          f"{name(photo)}: {len(faces)} faces; the largest is used "
          "(--all_faces for every one)"
      )
    keep = faces if alignment.all_faces else faces[:1]
    crops += [Crop(photo, face, k) for k, face in enumerate(keep)]
  bar.close()
  if lines:
    reporting.note("\n".join(lines))
  return crops


def note_unaligned(
    sizes: Sequence[tuple[int, int]], image_size: int, alignment: Alignment
) -> None:
  """One line when crops taken whole were not at the model's input size."""
  if alignment.mode != "none":
    return
  off = [s for s in sizes if tuple(s) != (image_size, image_size)]
  if off:
    reporting.note(
        f"{len(off)} of {len(sizes)} image(s) are not {image_size} x "
        f"{image_size} px (e.g. {off[0][1]} x {off[0][0]}): they were "
        "resized, not aligned. For photos, pass --align=detect (the "
        "`.[align]` extra) or --landmarks=FILE.csv."
    )


def face_records(crops: Sequence[Crop]) -> dict[str, np.ndarray]:
  """Box, five points, score and face index of each crop, for the .npz
  beside the embeddings (NaN where not known)."""
  nan_face = detector_lib.from_points(np.full((5, 2), np.nan))
  faces = [c.face or nan_face for c in crops]
  return {
      "boxes": np.array([f.box for f in faces], np.float32).reshape(-1, 4),
      "points": np.array([f.points for f in faces], np.float32).reshape(
          -1, 5, 2
      ),
      "detector_scores": np.array([f.score for f in faces], np.float32),
      "face_index": np.array([c.index for c in crops], np.int32),
  }


def crop_name(crop: Crop, name: Callable[[pathlib.Path], str]) -> str:
  """The crop's name: its photo's, with #k for the k-th face (k > 0)."""
  return name(crop.path) + (f"#{crop.index}" if crop.index else "")


def photo_loader(image_size: int) -> Callable[[pathlib.Path], np.ndarray]:
  """path -> the photo's largest face aligned to image_size (the photo
  resized when no face is found), one detector per thread: for evaluation
  sets of photos."""
  import threading  # pylint: disable=g-import-not-at-top

  local = threading.local()

  def load(path):
    if not hasattr(local, "detect"):
      local.detect = detector_lib.Detector()
    image = images_lib.imread_bgr(path)
    found = local.detect(image)
    return crop_image(
        image, Crop(pathlib.Path(path), found[0] if found else None), image_size
    )

  return load
