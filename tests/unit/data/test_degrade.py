"""Tests of the H and L views (qgjt_jax.data.degrade)."""

import dataclasses

import cv2
import numpy as np
import pytest

from qgjt_jax.data import degrade


def _face_like(size=112, seed=0):
  """A smooth picture with edges: low-res loss and JPEG are both visible."""
  rng = np.random.default_rng(seed)
  img = cv2.resize(
      rng.uniform(0, 255, (8, 8, 3)).astype(np.float32),
      (size, size),
      interpolation=cv2.INTER_CUBIC,
  )
  img = np.clip(img, 0, 255).astype(np.uint8)
  cv2.circle(img, (size // 2, size // 2), size // 4, (20, 200, 90), 2)
  cv2.rectangle(
      img, (size // 5, size // 5), (size // 3, size // 2), (240, 30, 30), -1
  )
  return img


ALL_ON = degrade.ViewConfig(crop_p=1.0, jitter_p=1.0, rotate_p=1.0)


@pytest.mark.parametrize(
    "cfg",
    [
        degrade.ViewConfig(),
        ALL_ON,
        degrade.adaface_config(crop_p=1.0, lowres_p=1.0, jitter_p=1.0),
    ],
    ids=["qgface", "qgface_all_on", "adaface_all_on"],
)
def test_views_keep_shape_and_dtype(cfg):
  img = _face_like(48)
  rng = np.random.default_rng(0)
  for _ in range(10):
    low, r = degrade.degraded_view(img, rng, cfg)
    assert low.shape == img.shape and low.dtype == np.uint8
    assert isinstance(r, float)
    high = degrade.clean_view(img, rng)
    assert high.shape == img.shape and high.dtype == np.uint8


def test_factor_is_the_applied_side_ratio():
  img = _face_like(112)
  rng = np.random.default_rng(1)
  factors = [degrade.degraded_view(img, rng)[1] for _ in range(200)]
  # The small side is int(r * 112) with r in [0.1, 0.5).
  assert min(factors) >= 11 / 112 and max(factors) < 0.5
  sides = np.array(factors) * 112
  np.testing.assert_allclose(sides, np.round(sides), atol=1e-9)
  # Spread over the range, not stuck at one value.
  assert np.ptp(factors) > 0.3


def test_views_are_deterministic_for_a_seeded_generator():
  img = _face_like(64)
  a = degrade.degraded_view(img, np.random.default_rng(7), ALL_ON)
  b = degrade.degraded_view(img, np.random.default_rng(7), ALL_ON)
  c = degrade.degraded_view(img, np.random.default_rng(8), ALL_ON)
  assert np.array_equal(a[0], b[0]) and a[1] == b[1]
  assert not np.array_equal(a[0], c[0])


def test_clean_view_only_flips():
  img = _face_like(32)
  rng = np.random.default_rng(0)
  assert np.array_equal(degrade.clean_view(img, rng, flip_p=0.0), img)
  assert np.array_equal(degrade.clean_view(img, rng, flip_p=1.0), img[:, ::-1])
  flips = [
      not np.array_equal(degrade.clean_view(img, rng), img) for _ in range(400)
  ]
  assert 0.4 < np.mean(flips) < 0.6


def test_low_resolution_removes_detail():
  # Pixel noise cannot survive a trip through a 11..16 px image: whatever the
  # filters, the result is nearly uncorrelated with the original pixels.
  img = np.random.default_rng(0).integers(0, 256, (112, 112, 3), np.uint8)
  cfg = degrade.ViewConfig(min_scale=0.1, max_scale=0.15, flip_p=0.0)
  rng = np.random.default_rng(0)
  x = img.astype(np.float64).ravel()
  for _ in range(10):
    low, _ = degrade.degraded_view(img, rng, cfg)
    assert abs(np.corrcoef(x, low.astype(np.float64).ravel())[0, 1]) < 0.2
  # A mild factor keeps much of a smooth picture.
  smooth = _face_like(112)
  mild = degrade.ViewConfig(min_scale=0.5, max_scale=0.5, flip_p=0.0)
  low, _ = degrade.degraded_view(smooth, rng, mild)
  y = smooth.astype(np.float64).ravel()
  assert np.corrcoef(y, low.astype(np.float64).ravel())[0, 1] > 0.9


def test_jpeg_is_applied():
  img = _face_like(112)
  base = degrade.ViewConfig(min_scale=0.5, max_scale=0.5, flip_p=0.0)
  no_jpeg = dataclasses.replace(base, jpeg_quality=0)
  diffs = []
  for seed in range(8):
    # The JPEG step draws no random numbers, so the same seed picks the same
    # filters and the only difference is the compression.
    with_jpeg, _ = degrade.degraded_view(img, np.random.default_rng(seed), base)
    without, _ = degrade.degraded_view(
        img, np.random.default_rng(seed), no_jpeg
    )
    diffs.append(np.abs(with_jpeg.astype(int) - without.astype(int)).mean())
  assert min(diffs) > 0.5


def test_jpeg_roundtrip_leaves_8x8_block_edges():
  rng = np.random.default_rng(0)
  img = cv2.GaussianBlur(rng.integers(0, 255, (64, 64, 3), np.uint8), (0, 0), 2)
  err = degrade.jpeg_roundtrip(img, 75).astype(np.float32) - img
  # step[c]: the jump between columns c and c + 1.
  step = np.abs(np.diff(err, axis=1)).mean(axis=(0, 2))
  at_edges = step[7::8].mean()
  inside = np.delete(step, np.s_[7::8]).mean()
  assert at_edges > 1.3 * inside


def test_crop_params_follow_the_ranges():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = degrade.crop_params(
        rng, 112, 112, (0.8, 1.0), (3 / 4, 4 / 3)
    )
    assert 0 <= top and top + h <= 112 and 0 <= left and left + w <= 112
    assert 0.8 * 112 * 112 * 0.97 <= h * w
    assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_color_jitter_of_strength_zero_is_identity():
  img = _face_like(32)
  out = degrade.color_jitter(img, np.random.default_rng(0), 0.0)
  assert np.array_equal(out, img)


def test_color_jitter_stays_in_its_range():
  # Brightness alone bounds the mean: every factor is within 1 +- strength,
  # and contrast/saturation keep the mean gray level (up to rounding).
  img = np.full((16, 16, 3), 100, np.uint8)
  rng = np.random.default_rng(0)
  means = [degrade.color_jitter(img, rng, 0.2).mean() for _ in range(100)]
  assert 80 - 1 <= min(means) and max(means) <= 120 + 1
  assert np.ptp(means) > 10


def test_rotation_turns_counter_clockwise_about_the_centre():
  img = _face_like(16)
  assert np.array_equal(degrade.rotate(img, 90), np.rot90(img))
  assert np.array_equal(degrade.rotate(img, 0), img)


def test_adaface_crop_keeps_the_box_in_place_on_black():
  img = _face_like(64) | 1  # no pure-black pixel in the picture itself
  cfg = degrade.adaface_config(
      crop_p=1.0, lowres_p=0.0, jitter_p=0.0, flip_p=0.0
  )
  out, r = degrade.adaface_augment(img, np.random.default_rng(3), cfg)
  assert r == 1.0
  inside = out.any(axis=2)
  rows, cols = np.nonzero(inside)
  box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
  assert inside[box].all()
  assert np.array_equal(out[box], img[box])
  assert inside.sum() < inside.size


def test_adaface_low_resolution_factor():
  img = _face_like(64)
  cfg = degrade.adaface_config(crop_p=0.0, lowres_p=1.0, jitter_p=0.0)
  rng = np.random.default_rng(0)
  factors = [degrade.adaface_augment(img, rng, cfg)[1] for _ in range(100)]
  assert 0.2 <= min(factors) and max(factors) <= 1.0


def test_view_config_checks_and_accepts_lists():
  cfg = degrade.ViewConfig(crop_scale=[0.8, 1.0])
  assert cfg.crop_scale == (0.8, 1.0)
  hash(cfg)
  with pytest.raises(ValueError):
    degrade.ViewConfig(min_scale=0.6, max_scale=0.5)
  with pytest.raises(ValueError):
    degrade.ViewConfig(recipe="nope")


def test_view_config_from_a_config_section():
  section = {
      "recipe": "qgface",
      "min_scale": 0.2,
      "max_scale": 0.4,
      "jpeg_quality": 60,
      "crop_p": 0.1,
      "jitter_p": 0.0,
      "rotate_p": 0.3,
      "flip_p": 0.5,
  }
  cfg = degrade.view_config_from(section)
  assert (cfg.min_scale, cfg.max_scale, cfg.jpeg_quality, cfg.rotate_p) == (
      0.2,
      0.4,
      60,
      0.3,
  )
  ada = degrade.view_config_from({"recipe": "adaface", "crop_p": 0.5})
  assert (
      ada.crop_p == 0.5 and ada.lowres_p == 0.2 and ada.crop_scale == (0.2, 1.0)
  )
  with pytest.raises(ValueError, match="unknown"):
    degrade.view_config_from({"min_scal": 0.2})


def test_the_config_names_every_view_setting_and_the_recipe_fills_the_rest():
  """qgjt_jax/base_config.py has every ViewConfig field (a locked config can set
  each); unset ones (None) take the recipe's values, so "adaface" views are
  AdaFace's, low resolution included."""
  from qgjt_jax import base_config as common

  section = common.get_base_config().data.view
  fields = {f.name for f in dataclasses.fields(degrade.ViewConfig)}
  assert set(section.keys()) == fields
  section.recipe = "adaface"
  assert degrade.view_config_from(section) == degrade.adaface_config()
  assert degrade.view_config_from(section).lowres_p > 0
  section.recipe = "qgface"
  section.crop_p = 0.3
  assert degrade.view_config_from(section) == degrade.ViewConfig(crop_p=0.3)
