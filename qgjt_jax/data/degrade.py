"""The two training views of a face (docs/METHOD.md section 6), with OpenCV.

All functions take and return uint8 BGR (H, W, 3) arrays and draw every random
number from an explicit `np.random.Generator`, so a view is a pure function of
(image, generator state).

The L view follows the reference `RandomRescale` + torchvision recipe, with
two deliberate differences:
- PIL's bilinear/bicubic/box/Lanczos downscaling is antialiased (its kernels
  widen with the reduction); OpenCV's are not. We reproduce the low-pass with
  cheap 2x box reductions before the chosen kernel (see `downscale`), so small
  faces look blurred as in the reference rather than aliased. OpenCV's
  bicubic (a = -0.75) and 8-tap Lanczos stand in for PIL's (a = -0.5, 6 taps).
- The reference hands BGR pixels to PIL as if they were RGB, so its JPEG
  step (luma/chroma split) and grayscale weights swap the red and blue roles.
  We treat the channels as what they are.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

# The reference picks one of PIL's five filters uniformly, down and up
# independently: bicubic, bilinear, nearest, box, Lanczos.
# config.data.view.recipe's values: the QGFace L view, or AdaFace's.
RECIPES = ("qgface", "adaface")
INTERPOLATIONS = (
    cv2.INTER_CUBIC,
    cv2.INTER_LINEAR,
    cv2.INTER_NEAREST,
    cv2.INTER_AREA,
    cv2.INTER_LANCZOS4,
)


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """How the L (degraded) view is made.

  recipe: "qgface" (downscale + JPEG + upscale, always; then optional crop,
    colour jitter, rotation, flip) or "adaface" (AdaFace's augmenter: crop into
    a black canvas, low resolution and colour jitter, each with a probability).
  min_scale, max_scale: range of the resolution factor r (side ratio).
  jpeg_quality: JPEG quality of the low-resolution image (0 = no JPEG).
  crop_p, crop_scale, crop_ratio: random-resized-crop probability and ranges.
  jitter_p, jitter: colour jitter probability and strength (brightness,
    contrast and saturation factors in [1 - jitter, 1 + jitter]).
  rotate_p, max_rotation: rotation probability and range in degrees.
  flip_p: horizontal flip probability.
  lowres_p: "adaface" only: probability of the low-resolution step.
  """

  recipe: str = "qgface"
  min_scale: float = 0.1
  max_scale: float = 0.5
  jpeg_quality: int = 75
  crop_p: float = 0.0
  crop_scale: tuple[float, float] = (0.8, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  jitter_p: float = 0.0
  jitter: float = 0.2
  rotate_p: float = 0.0
  max_rotation: float = 45.0
  flip_p: float = 0.5
  lowres_p: float = 0.0

  def __post_init__(self):
    if self.recipe not in RECIPES:
      raise ValueError(f"unknown view recipe {self.recipe!r}")
    if not 0 < self.min_scale <= self.max_scale <= 1:
      raise ValueError(
          f"need 0 < min_scale <= max_scale <= 1, got "
          f"{self.min_scale}, {self.max_scale}"
      )
    # Config files hand over lists; keep the dataclass hashable.
    object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
    object.__setattr__(self, "crop_ratio", tuple(self.crop_ratio))


def adaface_config(**overrides) -> ViewConfig:
  """AdaFace's augmenter settings (each step with probability 0.2)."""
  base = dict(
      recipe="adaface",
      min_scale=0.2,
      max_scale=1.0,
      jpeg_quality=0,
      crop_p=0.2,
      crop_scale=(0.2, 1.0),
      jitter_p=0.2,
      jitter=0.5,
      lowres_p=0.2,
  )
  return ViewConfig(**{**base, **overrides})


def view_config_from(mapping) -> ViewConfig:
  """The one builder of a ViewConfig from a config section (`config.data.view`,
  a dict or an ml_collections.ConfigDict): training, the config checks and the
  notebooks all call it.

  Keys are ViewConfig fields; unknown keys raise. Fields left out or None take
  the defaults of the section's recipe (`adaface_config()` for "adaface").
  """
  values = {k: v for k, v in dict(mapping).items() if v is not None}
  fields = {f.name for f in dataclasses.fields(ViewConfig)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(
        f"unknown view settings {unknown}; known: {sorted(fields)}"
    )
  base = adaface_config() if values.get("recipe") == "adaface" else ViewConfig()
  return dataclasses.replace(base, **values)


def flip(img: np.ndarray) -> np.ndarray:
  return cv2.flip(img, 1)


def clean_view(
    img: np.ndarray, rng: np.random.Generator, flip_p: float = 0.5
) -> np.ndarray:
  """The H view: the image itself, horizontally flipped with probability."""
  return flip(img) if rng.random() < flip_p else img


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
  ok, buf = cv2.imencode(".jpg", img, (cv2.IMWRITE_JPEG_QUALITY, int(quality)))
  if not ok:
    raise ValueError("JPEG encoding failed")
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def _resize(
    img: np.ndarray, size: tuple[int, int], interpolation: int
) -> np.ndarray:
  if interpolation == cv2.INTER_LANCZOS4:
    # OpenCV's 8-tap Lanczos is about twice as fast on float32 as on uint8.
    out = cv2.resize(img.astype(np.float32), size, interpolation=interpolation)
    np.clip(out, 0, 255, out=out)
    out += 0.5
    return out.astype(np.uint8)
  return cv2.resize(img, size, interpolation=interpolation)


def downscale(img: np.ndarray, side: int, interpolation: int) -> np.ndarray:
  """Resizes to (side, side) with a low-pass like PIL's antialiased filters.

  PIL widens a smooth filter's support with the reduction factor. We get the
  same low-pass cheaply: halve by 2x2 averaging while the result is still at
  least `side`, then apply the chosen kernel over the last (< 2x) step.
  Nearest neighbour stays unfiltered, as in PIL.
  """
  if interpolation != cv2.INTER_NEAREST:
    h, w = img.shape[:2]
    while h // 2 >= side and w // 2 >= side:
      h, w = h // 2, w // 2
      img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
  if img.shape[0] == side and img.shape[1] == side:
    return img
  return _resize(img, (side, side), interpolation)


def low_resolution(
    img: np.ndarray,
    rng: np.random.Generator,
    min_scale: float,
    max_scale: float,
    jpeg_quality: int,
    antialias: bool = True,
) -> tuple[np.ndarray, float]:
  """Down to r * size (random filter), optional JPEG, back up (random filter).

  Returns the image and the resolution factor actually applied: the small
  side over the original side (the drawn r, floored to whole pixels).
  """
  h, w = img.shape[:2]
  r = rng.uniform(min_scale, max_scale)
  side = max(1, int(r * h))
  down = INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))]
  up = INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))]
  if antialias:
    small = downscale(img, side, down)
  else:
    small = cv2.resize(img, (side, side), interpolation=down)
  if jpeg_quality:
    small = jpeg_roundtrip(small, jpeg_quality)
  return _resize(small, (w, h), up), side / h


def crop_params(
    rng: np.random.Generator,
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a random-resized crop (torchvision rule)."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      return top, int(rng.integers(0, w - cw + 1)), ch, cw
  # Fallback: the largest central crop within the ratio range.
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crop(
    img: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
  h, w = img.shape[:2]
  top, left, ch, cw = crop_params(rng, h, w, scale, ratio)
  return cv2.resize(
      img[top : top + ch, left : left + cw],
      (w, h),
      interpolation=cv2.INTER_LINEAR,
  )


def color_jitter(
    img: np.ndarray, rng: np.random.Generator, strength: float
) -> np.ndarray:
  """Brightness, contrast and saturation in a random order (no hue)."""
  lo, hi = max(0.0, 1 - strength), 1 + strength
  factors = rng.uniform(lo, hi, 3)
  for op in rng.permutation(3):
    f = float(factors[op])
    if op == 0:  # brightness: blend with black
      img = cv2.convertScaleAbs(img, alpha=f)
    elif op == 1:  # contrast: blend with the mean gray level
      mean = float(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).mean())
      img = cv2.addWeighted(img, f, img, 0.0, (1 - f) * round(mean))
    else:  # saturation: blend with the gray image
      gray = cv2.cvtColor(
          cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR
      )
      img = cv2.addWeighted(img, f, gray, 1 - f, 0.0)
  return img


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
  """Counter-clockwise about the centre, nearest neighbour, black corners."""
  h, w = img.shape[:2]
  # The centre of the pixel grid: pixel i is centred on coordinate i here.
  m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
  return cv2.warpAffine(
      img,
      m,
      (w, h),
      flags=cv2.INTER_NEAREST,
      borderMode=cv2.BORDER_CONSTANT,
      borderValue=0,
  )


def degraded_view(
    img: np.ndarray, rng: np.random.Generator, cfg: ViewConfig = ViewConfig()
) -> tuple[np.ndarray, float]:
  """The L view of the QGFace recipe; returns (image, resolution factor r)."""
  if cfg.recipe == "adaface":
    return adaface_augment(img, rng, cfg)
  out, r = low_resolution(
      img, rng, cfg.min_scale, cfg.max_scale, cfg.jpeg_quality
  )
  if cfg.crop_p and rng.random() < cfg.crop_p:
    out = resized_crop(out, rng, cfg.crop_scale, cfg.crop_ratio)
  if cfg.jitter_p and rng.random() < cfg.jitter_p:
    out = color_jitter(out, rng, cfg.jitter)
  if cfg.rotate_p and rng.random() < cfg.rotate_p:
    out = rotate(out, rng.uniform(-cfg.max_rotation, cfg.max_rotation))
  if rng.random() < cfg.flip_p:
    out = flip(out)
  return out, r


def adaface_augment(
    img: np.ndarray, rng: np.random.Generator, cfg: ViewConfig | None = None
) -> tuple[np.ndarray, float]:
  """AdaFace's augmenter, then a flip; returns (image, resolution factor).

  Crop: a random-resized-crop box is kept in place on a black canvas (not
  resized), so the face shrinks into a corner as in AdaFace. Low resolution:
  down and up with random OpenCV filters, not antialiased (as AdaFace does).
  The factor is 1.0 when the low-resolution step is skipped.
  """
  cfg = adaface_config() if cfg is None else cfg
  out, r = img, 1.0
  if rng.random() < cfg.crop_p:
    h, w = img.shape[:2]
    top, left, ch, cw = crop_params(rng, h, w, cfg.crop_scale, cfg.crop_ratio)
    out = np.zeros_like(img)
    out[top : top + ch, left : left + cw] = img[
        top : top + ch, left : left + cw
    ]
  if rng.random() < cfg.lowres_p:
    out, r = low_resolution(
        out,
        rng,
        cfg.min_scale,
        cfg.max_scale,
        cfg.jpeg_quality,
        antialias=False,
    )
  if rng.random() < cfg.jitter_p:
    out = color_jitter(out, rng, cfg.jitter)
  if rng.random() < cfg.flip_p:
    out = flip(out)
  return out, r
