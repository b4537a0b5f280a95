"""A generated mixed-quality face-like dataset, for runs without real data.

Every identity is a random but fixed set of facial attributes (face outline,
skin tone and texture, moles, eye/brow/nose/mouth geometry, ears, hair style
and colour, beard, glasses) drawn from a seed. Every image of an identity is a
fresh random "photograph" of it: head pose (shift, roll, scale, a little yaw
and pitch), expression (smile, open mouth, blink, raised brows), lighting
(exposure, colour cast, directional shading), a cluttered random background,
occasional occluders, blur, sensor noise and a camera JPEG. Images are rendered
on access from (seed, index), so nothing is stored.

The nuisance factors are deliberately large: background and exposure dominate
the mean colour of an image, so identities cannot be told apart by colour
statistics alone and a model has to look at facial geometry and texture.
Evaluation pairs come from a separate stream of identities (never used for
training), so verification is open-set as on LFW.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import cv2
import numpy as np

from qgjt_jax.data import degrade
from qgjt_jax.files import images

# Seed-stream tags: training and held-out identities are drawn from different
# streams, so the two populations are disjoint by construction.
_TRAIN_STREAM = 0
_HELDOUT_STREAM = 1
_SHIFT = 4  # fractional bits of cv2 drawing coordinates (1/16 px)
_SCALE = float(1 << _SHIFT)

# BGR palettes. Skin tones run from dark to light along a line (plus
# per-identity hue noise); hair and iris colours are picked from small lists
# and perturbed.
_SKIN_DARK = np.array([55.0, 80.0, 125.0])
_SKIN_LIGHT = np.array([170.0, 195.0, 235.0])
_HAIR = np.array(
    [
        [20, 20, 25],
        [25, 45, 80],
        [40, 80, 130],
        [80, 140, 200],
        [40, 60, 150],
        [150, 150, 155],
        [60, 50, 45],
    ],
    np.float64,
)
_IRIS = np.array(
    [[20, 40, 70], [140, 100, 60], [80, 120, 60], [30, 30, 30], [90, 110, 130]],
    np.float64,
)


@dataclasses.dataclass(frozen=True, eq=False)
class Identity:
  """The fixed attributes of one generated person (unit-square coordinates).

  Compared and hashed by object identity (it holds an array); equal arguments
  to `make_identity` return the same cached object.
  """

  face_center: tuple[float, float]
  face_axes: tuple[float, float]
  jaw: tuple[float, float]  # lower ellipse: width factor, depth factor
  skin: tuple[float, float, float]  # BGR
  texture: np.ndarray  # (5, 5, 3) low-frequency skin modulation
  moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
  eye_y: float
  eye_dx: float
  eye_size: tuple[float, float]  # half width, height/width ratio
  iris: tuple[float, float, float]
  brow: tuple[float, float, float, float]  # gap, thickness, length factor, tilt
  nose: tuple[float, float]  # length, width
  # Mouth: gap below the nose, half width, lip thickness, curvature.
  mouth: tuple[float, float, float, float]
  lip_color: tuple[float, float, float]
  ears: float  # ear size
  hair_color: tuple[float, float, float]
  hair_style: int  # 0 short, 1 long, 2 fringe, 3 receding
  hair_line: float
  beard: bool
  glasses: bool


@functools.lru_cache(maxsize=4096)
def make_identity(seed: int, identity: int, heldout: bool = False) -> Identity:
  """Draws identity `identity` of the training (or held-out) population."""
  rng = np.random.default_rng(
      (seed, _HELDOUT_STREAM if heldout else _TRAIN_STREAM, identity)
  )
  u = rng.uniform
  face_ax, face_ay = u(0.24, 0.32), u(0.31, 0.40)
  face_center = (0.5 + u(-0.015, 0.015), 0.53 + u(-0.02, 0.02))
  tone = u()
  skin = (1 - tone) * _SKIN_DARK + tone * _SKIN_LIGHT + rng.normal(0, 8, 3)
  n_moles = rng.poisson(1.5)
  moles = tuple(
      (
          face_center[0] + u(-0.7, 0.7) * face_ax,
          face_center[1] + u(-0.5, 0.7) * face_ay,
          u(0.006, 0.013),
      )
      for _ in range(n_moles)
  )
  hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 12, 3)
  iris = _IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3)
  lip = skin * np.array([0.75, 0.7, 1.0]) + rng.normal(0, 8, 3)
  return Identity(
      face_center=face_center,
      face_axes=(face_ax, face_ay),
      jaw=(u(0.65, 1.0), u(0.9, 1.15)),
      skin=tuple(np.clip(skin, 30, 245)),
      texture=rng.normal(0, 1, (5, 5, 3)) * np.array([0.12, 0.10, 0.10]),
      moles=moles,
      eye_y=face_center[1] + u(-0.14, -0.07),
      eye_dx=u(0.085, 0.13),
      eye_size=(u(0.035, 0.06), u(0.35, 0.65)),
      iris=tuple(np.clip(iris, 0, 255)),
      brow=(u(0.035, 0.075), u(0.007, 0.02), u(1.0, 1.6), u(-0.35, 0.35)),
      nose=(u(0.08, 0.15), u(0.025, 0.055)),
      mouth=(u(0.05, 0.1), u(0.045, 0.085), u(0.007, 0.02), u(-0.01, 0.02)),
      lip_color=tuple(np.clip(lip, 0, 255)),
      ears=u(0.03, 0.055),
      hair_color=tuple(np.clip(hair, 0, 255)),
      hair_style=int(rng.integers(4)),
      hair_line=u(0.0, 0.12),
      beard=bool(u() < 0.25),
      glasses=bool(u() < 0.2),
  )


class _Canvas:
  """cv2 drawing in unit-square coordinates with sub-pixel precision."""

  def __init__(self, img: np.ndarray, alpha: np.ndarray | None = None):
    self.img, self.alpha = img, alpha
    self.size = img.shape[0]

  def _p(self, x: float, y: float) -> tuple[int, int]:
    return (
        int(round(x * self.size * _SCALE)),
        int(round(y * self.size * _SCALE)),
    )

  def _r(self, r: float) -> int:
    return max(1, int(round(r * self.size * _SCALE)))

  def ellipse(
      self, c, axes, angle, color, thickness=-1, arc=(0, 360), opaque=True
  ):
    args = (
        self._p(*c),
        (self._r(axes[0]), self._r(axes[1])),
        angle,
        arc[0],
        arc[1],
    )
    t = (
        thickness
        if thickness < 0
        else max(1, int(round(thickness * self.size)))
    )
    cv2.ellipse(self.img, *args, color, t, cv2.LINE_AA, _SHIFT)
    if opaque and self.alpha is not None:
      cv2.ellipse(self.alpha, *args, 255, t, cv2.LINE_AA, _SHIFT)

  def polyline(self, pts, color, thickness, closed=False):
    p = np.array([self._p(x, y) for x, y in pts], np.int32)[None]
    t = max(1, int(round(thickness * self.size)))
    cv2.polylines(self.img, p, closed, color, t, cv2.LINE_AA, _SHIFT)

  def poly(self, pts, color, opaque=True):
    p = np.array([self._p(x, y) for x, y in pts], np.int32)[None]
    cv2.fillPoly(self.img, p, color, cv2.LINE_AA, _SHIFT)
    if opaque and self.alpha is not None:
      cv2.fillPoly(self.alpha, p, 255, cv2.LINE_AA, _SHIFT)


def _arc_points(cx, cy, half_width, curve, n=9, tilt=0.0):
  """Points of a parabola-like arc: y offset `curve` at the ends vs centre."""
  t = np.linspace(-1, 1, n)
  return [
      (cx + half_width * s, cy + tilt * half_width * s - curve * (s * s))
      for s in t
  ]


@functools.lru_cache(maxsize=4096)
def _texture_field(ident: Identity, size: int) -> np.ndarray:
  return (
      cv2.resize(
          ident.texture.astype(np.float32),
          (size, size),
          interpolation=cv2.INTER_CUBIC,
      )
      + 1.0
  )


def _draw_face(
    ident: Identity, var: dict[str, Any], size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Renders the head in canonical pose; returns (BGR uint8, alpha uint8)."""
  img = np.zeros((size, size, 3), np.uint8)
  alpha = np.zeros((size, size), np.uint8)
  cv = _Canvas(img, alpha)
  cx, cy = ident.face_center
  ax, ay = ident.face_axes
  yaw, pitch = var["yaw"], var["pitch"]
  # Yaw moves the inner features sideways and shrinks the far side; pitch
  # moves them up/down. The outline stays put, which reads as a turned head.
  fx, fy = cx + yaw * 0.06, pitch * 0.04
  hair = ident.hair_color
  skin = ident.skin

  if ident.hair_style == 1:  # long hair behind the head
    cv.ellipse((cx, cy + 0.05), (ax * 1.25, ay * 1.15), 0, hair)
  for side in (-1, 1):  # ears
    ex = cx + side * ax * (0.98 - 0.15 * yaw * side)
    cv.ellipse(
        (ex, ident.eye_y + 0.04 + fy),
        (ident.ears * 0.6, ident.ears),
        0,
        tuple(0.85 * c for c in skin),
    )
  # Face: an upper ellipse and a lower "jaw" ellipse of its own width/depth.
  cv.ellipse((cx, cy), (ax, ay), 0, skin, arc=(180, 360))
  cv.ellipse((cx, cy), (ax, ay * 0.55), 0, skin)
  cv.ellipse(
      (cx, cy),
      (ax * ident.jaw[0] + 0.3 * ax * (1 - ident.jaw[0]), ay * ident.jaw[1]),
      0,
      skin,
      arc=(0, 180),
  )
  # Skin texture: a smooth per-identity field, applied to what is drawn so far.
  face = img.astype(np.float32) * _texture_field(ident, size)
  np.clip(face, 0, 255, out=face)
  img[...] = face.astype(np.uint8)

  for mx, my, mr in ident.moles:
    cv.ellipse(
        (mx + yaw * 0.04, my + fy), (mr, mr), 0, tuple(0.45 * c for c in skin)
    )
  # Eyes and brows.
  ew, er = ident.eye_size
  open_ = var["eye_open"]
  for side in (-1, 1):
    shrink = 1.0 - 0.35 * max(0.0, yaw * side)
    ex = fx + side * ident.eye_dx * (1.0 - 0.25 * yaw * side)
    ey = ident.eye_y + fy
    w = ew * shrink
    h = max(0.004, ew * er * open_)
    cv.ellipse((ex, ey), (w, h), 0, (235, 240, 245))
    if open_ > 0.25:
      ir = min(h, w * 0.55)
      cv.ellipse((ex + var["gaze"] * w * 0.3, ey), (ir, ir), 0, ident.iris)
      cv.ellipse(
          (ex + var["gaze"] * w * 0.3, ey),
          (ir * 0.45, ir * 0.45),
          0,
          (15, 15, 15),
      )
    cv.ellipse(
        (ex, ey), (w, h), 0, tuple(0.5 * c for c in skin), thickness=0.012
    )
    gap, thick, length, tilt = ident.brow
    by = ey - gap - var["brow_raise"]
    pts = _arc_points(ex, by, w * length, 0.01, tilt=tilt * side)
    cv.polyline(pts, tuple(0.8 * c for c in hair), thick + 0.006)
  # Nose: a shading line and nostrils.
  nl, nw = ident.nose
  ny = ident.eye_y + fy + nl
  nshade = tuple(0.7 * c for c in skin)
  cv.polyline(
      [
          (fx + 0.2 * nw * yaw, ident.eye_y + fy + 0.02),
          (fx + nw * 0.6 * (1 if yaw >= 0 else -1), ny - 0.01),
          (fx, ny),
      ],
      nshade,
      0.01,
  )
  for side in (-1, 1):
    cv.ellipse(
        (fx + side * nw * 0.55, ny),
        (nw * 0.3, nw * 0.17),
        0,
        tuple(0.4 * c for c in skin),
    )
  # Mouth: upper and lower lip arcs; open mouth shows a dark gap.
  gap, mw, lip, curve = ident.mouth
  my = ny + gap
  curve = curve + var["smile"]
  if var["mouth_open"] > 0.003:
    cv.ellipse(
        (fx, my + var["mouth_open"] / 2),
        (mw * 0.8, var["mouth_open"]),
        0,
        (40, 30, 60),
    )
  cv.polyline(_arc_points(fx, my, mw, curve), ident.lip_color, lip)
  cv.polyline(
      _arc_points(fx, my + lip + var["mouth_open"], mw * 0.8, curve * 1.3),
      ident.lip_color,
      lip * 1.2,
  )
  if ident.beard:
    top_y = my - 0.015
    pts = (
        [(cx - ax * 0.85, top_y)]
        + _arc_points(cx, cy + ay * ident.jaw[1] * 0.95, ax * 0.7, 0.1, n=7)[
            1:-1
        ]
        + [(cx + ax * 0.85, top_y)]
    )
    beard = img.copy()
    _Canvas(beard).poly(pts, hair)
    cv2.addWeighted(beard, 0.75, img, 0.25, 0.0, dst=img)
    cv.polyline(_arc_points(fx, my, mw, curve), ident.lip_color, lip)
  # Hair on top (drawn last so it covers the forehead).
  top = cy - ay
  hl = ident.hair_line
  if ident.hair_style == 3:  # receding: thin band only
    cv.ellipse(
        (cx, cy),
        (ax * 1.02, ay * 1.02),
        0,
        hair,
        arc=(200, 340),
        thickness=0.04,
    )
  else:
    cv.ellipse(
        (cx, top + 0.1 + hl), (ax * 1.08, 0.15 + hl), 0, hair, arc=(180, 360)
    )
    cv.poly(
        [
            (cx - ax * 1.08, top + 0.1 + hl),
            (cx + ax * 1.08, top + 0.1 + hl),
            (cx + ax * 0.9, top + 0.13 + hl),
            (cx - ax * 0.9, top + 0.13 + hl),
        ],
        hair,
    )
    if ident.hair_style == 2:  # fringe
      cv.ellipse(
          (cx - 0.03, top + 0.12 + hl), (ax * 0.8, 0.05), 0, hair, arc=(0, 180)
      )
  if ident.glasses:
    for side in (-1, 1):
      ex = fx + side * ident.eye_dx
      cv.ellipse(
          (ex, ident.eye_y + fy),
          (ew * 1.5, ew * 1.1),
          0,
          (30, 30, 30),
          thickness=0.012,
      )
    cv.polyline(
        [
            (fx - ident.eye_dx + ew * 1.5, ident.eye_y + fy),
            (fx + ident.eye_dx - ew * 1.5, ident.eye_y + fy),
        ],
        (30, 30, 30),
        0.01,
    )
  return img, alpha


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random scene: colour gradient plus a few flat shapes (clutter)."""
  corners = rng.uniform(15, 240, (2, 2, 3)).astype(np.float32)
  bg = cv2.resize(corners, (size, size), interpolation=cv2.INTER_LINEAR)
  bg = bg.astype(np.uint8)
  for _ in range(rng.integers(0, 5)):
    color = tuple(float(v) for v in rng.uniform(0, 255, 3))
    p = rng.uniform(0, size, 2).astype(int)
    if rng.uniform() < 0.5:
      q = p + rng.uniform(-size / 2, size / 2, 2).astype(int)
      cv2.rectangle(
          bg, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), color, -1
      )
    else:
      cv2.circle(
          bg,
          (int(p[0]), int(p[1])),
          int(rng.uniform(3, size / 4)),
          color,
          -1,
          cv2.LINE_AA,
      )
  return bg


def _variation(rng: np.random.Generator, k: float) -> dict[str, Any]:
  """Pose and expression of one photo; `k` scales every spread."""
  u = rng.uniform
  return dict(
      yaw=k * u(-1, 1),
      pitch=k * u(-1, 1),
      roll=k * u(-12, 12),
      scale=1 + k * u(-0.1, 0.1),
      shift=k * u(-0.045, 0.045, 2),
      eye_open=1 + k * ((u(0.15, 1.15) if u() < 0.85 else 0.1) - 1),
      gaze=k * u(-1, 1),
      brow_raise=k * u(-0.008, 0.015),
      smile=k * u(-0.012, 0.03),
      mouth_open=k * (u(0, 0.03) if u() < 0.3 else 0.0),
  )


def render(
    ident: Identity, rng: np.random.Generator, size: int, nuisance: float = 1.0
) -> np.ndarray:
  """One photograph of `ident`: uint8 BGR (size, size, 3), before any JPEG.

  `nuisance` scales pose, expression, lighting, occluders, blur and noise
  (0: every photo of a person alike but for the background; 1: the default).
  """
  k = nuisance
  var = _variation(rng, k)
  face, alpha = _draw_face(ident, var, size)
  cx, cy = ident.face_center
  m = cv2.getRotationMatrix2D((cx * size, cy * size), var["roll"], var["scale"])
  m[:, 2] += var["shift"] * size
  face = cv2.warpAffine(face, m, (size, size), flags=cv2.INTER_LINEAR)
  alpha = cv2.warpAffine(alpha, m, (size, size), flags=cv2.INTER_LINEAR)
  a = alpha.astype(np.float32) * (1 / 255)
  img = cv2.blendLinear(face, _background(rng, size), a, 1 - a)
  if rng.uniform() < 0.12 * k:  # an occluder (hand, microphone, another head)
    p = rng.uniform(0.1, 0.9, 2) * size
    cv2.circle(
        img,
        (int(p[0]), int(p[1])),
        int(rng.uniform(0.1, 0.25) * size),
        tuple(float(v) for v in rng.uniform(0, 255, 3)),
        -1,
        cv2.LINE_AA,
    )
  if rng.uniform() < 0.3 * k:
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0) * size / 112)
  # Lighting: exposure, colour cast and a directional shading gradient,
  # built at 2x2 and stretched (a cheap smooth ramp).
  d = rng.uniform(0, 2 * np.pi)
  s = k * rng.uniform(0, 0.35)
  c, t = s * np.cos(d), s * np.sin(d)
  shade = np.array([[1 - c - t, 1 + c - t], [1 - c + t, 1 + c + t]])
  gain = (1 + k * (rng.uniform(0.6, 1.3) - 1)) * (
      1 + k * (rng.uniform(0.85, 1.15, 3) - 1)
  )
  light = (shade[..., None] * gain).astype(np.float32)
  light = cv2.resize(light, (size, size), interpolation=cv2.INTER_LINEAR)
  out = img.astype(np.float32)
  out *= light
  noise = rng.standard_normal((size, size, 1), dtype=np.float32)
  out += noise * np.float32(k * rng.uniform(0, 6))
  return np.clip(out, 0, 255, out=out).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
  ok, buf = cv2.imencode(".jpg", img, (cv2.IMWRITE_JPEG_QUALITY, int(quality)))
  if not ok:
    raise ValueError("JPEG encoding failed")
  return buf.tobytes()


def render_photo(
    seed: int,
    identity: int,
    variation: int,
    size: int,
    heldout: bool = False,
    nuisance: float = 1.0,
) -> np.ndarray:
  """Image `variation` of an identity, deterministic in its arguments."""
  ident = make_identity(seed, identity, heldout)
  stream = _HELDOUT_STREAM if heldout else _TRAIN_STREAM
  rng = np.random.default_rng((seed, stream, identity, variation, 1))
  return render(ident, rng, size, nuisance)


class SyntheticFaces:
  """A grain random-access source of generated faces.

  Record `i` is image `i % images_per_identity` of identity
  `i // images_per_identity`: `{"image": JPEG bytes, "label": int32}`. Images
  are rendered on access; `cache=True` keeps the encoded bytes in memory
  (per process) for repeated epochs. `nuisance` scales how much photos of
  one person differ (see `render`); 1.0 is the intended difficulty.
  """

  def __init__(
      self,
      num_identities: int,
      images_per_identity: int,
      image_size: int = 112,
      seed: int = 0,
      cache: bool = False,
      nuisance: float = 1.0,
  ):
    if num_identities < 1 or images_per_identity < 1:
      raise ValueError("need at least one identity and one image each")
    self.num_identities = num_identities
    self.images_per_identity = images_per_identity
    self.image_size = image_size
    self.seed = seed
    self.nuisance = nuisance
    self.num_classes = num_identities
    self.name = (
        f"synthetic_faces_{num_identities}x{images_per_identity}"
        f"_{image_size}px_seed{seed}"
    )
    if nuisance != 1.0:
      self.name += f"_nuisance{nuisance:g}"
    self._cache: dict[int, bytes] | None = {} if cache else None

  def __len__(self) -> int:
    return self.num_identities * self.images_per_identity

  def __repr__(self) -> str:
    return f"SyntheticFaces({self.name})"

  def prerender(self) -> "SyntheticFaces":
    """Renders every record into the cache now (needs cache=True).

    Worker processes receive the filled cache with the source, so nothing is
    rendered twice.
    """
    if self._cache is None:
      raise ValueError("prerender() needs cache=True")
    for i in range(len(self)):
      self[i]
    return self

  def label(self, index: int) -> int:
    return index // self.images_per_identity

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    data = None if self._cache is None else self._cache.get(index)
    if data is None:
      identity, variation = divmod(index, self.images_per_identity)
      img = render_photo(
          self.seed,
          identity,
          variation,
          self.image_size,
          nuisance=self.nuisance,
      )
      # Camera JPEG quality varies a little, as in scraped photo collections.
      q = 80 + (index * 7919 + self.seed) % 16
      data = encode_jpeg(img, q)
      if self._cache is not None:
        self._cache[index] = data
    return {"image": data, "label": np.int32(self.label(index))}


def synthetic_verification_sets(
    num_identities: int,
    num_pairs: int,
    image_size: int = 112,
    seed: int = 0,
    view_config: degrade.ViewConfig | None = None,
    nuisance: float = 1.0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Open-set verification pairs from held-out identities.

  Returns {"hq_hq", "hq_lq", "lq_lq"} -> (images (2P, H, W, 3) uint8 BGR, pair
  i = images 2i and 2i+1; issame (P,) bool), half of the pairs positive. The
  three sets share identities and pairs and differ only in which side is
  degraded. LQ images always go through the L view's degradation (downscale
  by r in [min_scale, max_scale], JPEG, upscale) with the given `ViewConfig`'s
  ranges (the QGFace defaults when None), without its crop, jitter, rotation
  or flip: evaluation faces are aligned.
  """
  if num_identities < 2:
    raise ValueError("need at least two identities for negative pairs")
  rng = np.random.default_rng((seed, _HELDOUT_STREAM, 2**31))
  issame = np.zeros(num_pairs, bool)
  issame[: num_pairs // 2] = True
  rng.shuffle(issame)
  n_var = 1 << 20
  photos = []
  for same in issame:
    a = int(rng.integers(num_identities))
    b = (
        a
        if same
        else int((a + rng.integers(1, num_identities)) % num_identities)
    )
    va = int(rng.integers(n_var))
    vb = (va + int(rng.integers(1, n_var))) % n_var
    for ident, var in ((a, va), (b, vb)):
      img = render_photo(
          seed, ident, var, image_size, heldout=True, nuisance=nuisance
      )
      # The same camera JPEG step as the training source.
      photos.append(encode_jpeg(img, 80 + var % 16))
  hq = np.stack([images.decode_image(p) for p in photos])
  cfg = degrade.ViewConfig() if view_config is None else view_config
  lq_rng = np.random.default_rng((seed, _HELDOUT_STREAM, 2**31 + 1))
  lq = np.stack(
      [
          degrade.low_resolution(
              im, lq_rng, cfg.min_scale, cfg.max_scale, cfg.jpeg_quality
          )[0]
          for im in hq
      ]
  )
  hq_lq = hq.copy()
  hq_lq[1::2] = lq[1::2]
  return {
      "hq_hq": (hq, issame.copy()),
      "hq_lq": (hq_lq, issame.copy()),
      "lq_lq": (lq, issame.copy()),
  }
