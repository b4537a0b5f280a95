"""The five-point face template and the similarity warp onto it.

The points, in this order, are the left eye, right eye, nose tip, left and
right mouth corner, "left" meaning the image's left (the subject's right
eye). The template is ArcFace's for 112 x 112 crops, which MS1MV2, WebFace
and the IJB evaluation use; other crop sizes scale it.
"""

import cv2
import numpy as np

from qgjt_jax import errors

TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float64,
)


def template(image_size: int) -> np.ndarray:
  """(5, 2) x/y of the template in an image_size x image_size crop."""
  return TEMPLATE_112 * (image_size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """(2, 3) similarity (rotation, uniform scale, shift) taking src to dst.

  Least squares over the points. With a = s cos(t) and b = s sin(t) the
  model x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty),
  so an ordinary linear solve gives the optimum; it coincides with Umeyama's
  estimate (what skimage's SimilarityTransform computes) whenever the best
  fit is not a reflection, which a similarity cannot express anyway.
  """
  src = np.asarray(src, np.float64).reshape(-1, 2)
  dst = np.asarray(dst, np.float64).reshape(-1, 2)
  if src.shape != dst.shape or len(src) < 2:
    raise ValueError(
        f"need matching (n >= 2, 2) points, got {src.shape} and {dst.shape}"
    )
  x, y = src[:, 0], src[:, 1]
  ones, zeros = np.ones_like(x), np.zeros_like(x)
  design = np.concatenate(
      [
          np.stack([x, -y, ones, zeros], axis=1),
          np.stack([y, x, zeros, ones], axis=1),
      ]
  )
  target = np.concatenate([dst[:, 0], dst[:, 1]])
  (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
  return np.array([[a, -b, tx], [b, a, ty]])


MIN_EYE_DISTANCE = 2.0  # pixels: closer eyes are no face to align
_MARGIN = 0.1  # of the photo's longer side: points a little outside pass


class FaceError(errors.UserError, ValueError):
  """Five points that are no face of their photo (the message says why)."""


def check_face(points: np.ndarray, height: int, width: int, where: str) -> None:
  """Refuses five points that cannot be a face of a height x width photo:
  not finite, outside the photo (beyond a margin of a tenth of its longer
  side), or the eyes closer than MIN_EYE_DISTANCE. Warping such points
  would embed a black or smeared crop whose norm can read as high quality.

  Raises:
    FaceError: naming `where` and why.
  """
  points = np.asarray(points, np.float64)
  if points.shape != (5, 2) or not np.isfinite(points).all():
    raise FaceError(f"{where}: five points that are not finite numbers")
  margin = _MARGIN * max(height, width)
  inside = (
      (points >= -margin) & (points <= np.array([width, height]) + margin)
  ).all()
  if not inside:
    raise FaceError(
        f"{where}: five points outside the {width} x {height} "
        f"photo ({np.round(points, 1).tolist()})"
    )
  eyes = float(np.linalg.norm(points[1] - points[0]))
  if eyes < MIN_EYE_DISTANCE:
    raise FaceError(
        f"{where}: the eyes are {eyes:.1f} px apart, no face to align"
    )


def align_face(
    image: np.ndarray, points: np.ndarray, image_size: int = 112
) -> np.ndarray:
  """Warps `image` so its five points land on the template (bilinear,
  black outside the photo)."""
  matrix = similarity_transform(points, template(image_size))
  return cv2.warpAffine(
      image,
      matrix,
      (image_size, image_size),
      flags=cv2.INTER_LINEAR,
      borderValue=0.0,
  )
