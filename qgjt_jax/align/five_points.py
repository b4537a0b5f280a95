"""The five-point face template and the similarity warp onto it.

The points, in this order, are the left eye, right eye, nose tip, left and
right mouth corner, "left" meaning the image's left (the subject's right
eye). The template is ArcFace's for 112 x 112 crops, which MS1MV2, WebFace
and the IJB evaluation use; other crop sizes scale it.
"""
import cv2
import numpy as np

TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
POINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


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
    raise ValueError(f"need matching (n >= 2, 2) points, got {src.shape} and "
                     f"{dst.shape}")
  x, y = src[:, 0], src[:, 1]
  ones, zeros = np.ones_like(x), np.zeros_like(x)
  design = np.concatenate([
      np.stack([x, -y, ones, zeros], axis=1),
      np.stack([y, x, zeros, ones], axis=1)
  ])
  target = np.concatenate([dst[:, 0], dst[:, 1]])
  (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
  return np.array([[a, -b, tx], [b, a, ty]])


def align_face(image: np.ndarray, points: np.ndarray,
               image_size: int = 112) -> np.ndarray:
  """Warps `image` so its five points land on the template (bilinear,
  black outside the photo)."""
  matrix = similarity_transform(points, template(image_size))
  return cv2.warpAffine(image, matrix, (image_size, image_size),
                        flags=cv2.INTER_LINEAR, borderValue=0.0)
