"""The quality indicator (docs/METHOD.md section 2): how good an image is,
read from its own feature norm against running statistics.

Both branches read it: the margin head scales its margin by the scaler a,
and both gates (HQ classifier, LQ contrastive) compare the quality
q = (a + 1) / 2 with a threshold b. The running statistics live in the
train state as a `QualityStats` and are threaded through explicitly; every
function here is pure.

Where this follows the reference (IsidoreSong/QGFace `head.py`): the
statistics are updated with the current batch *before* its scaler is
computed, and start at mean 0, std 0 (AdaFace starts at 20/100:
`init_quality_stats(20.0, 100.0)`, config.quality.init_mean/init_std).
The "degradation" partition (an ablation) replaces the gates' quality with
the known downscale factor of each view and leaves the margin on the norm.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

NORM_MIN = 0.001
NORM_MAX = 100.0
# Which images count as HQ or LQ for the gates (config.quality.partition).
PARTITIONS = ("norm", "degradation")


@flax.struct.dataclass
class QualityStats:
  """Running statistics of the clipped feature norms (part of the state)."""

  mean: jax.Array  # float32 scalar
  std: jax.Array  # float32 scalar


def init_quality_stats(mean: float = 0.0, std: float = 0.0) -> QualityStats:
  """Initial statistics: the reference starts at 0/0, AdaFace at 20/100."""
  return QualityStats(
      mean=jnp.asarray(mean, jnp.float32), std=jnp.asarray(std, jnp.float32)
  )


def _safe_norms(norms: jax.Array) -> jax.Array:
  """Flattened float32 norms clipped to [0.001, 100], without gradient."""
  norms = jnp.asarray(norms)
  if norms.ndim == 2 and norms.shape[1] == 1:
    norms = norms[:, 0]
  if norms.ndim != 1:
    raise ValueError(f"norms must be (N,) or (N, 1), got {norms.shape}")
  norms = jax.lax.stop_gradient(norms.astype(jnp.float32))
  return jnp.clip(norms, NORM_MIN, NORM_MAX)


def update_quality_stats(
    stats: QualityStats, norms: jax.Array, alpha: float = 0.01
) -> QualityStats:
  """EMA update of mean/std (unbiased) of the clipped norms of one batch.

  Args:
    stats: statistics before this batch.
    norms: (N,) or (N, 1) raw feature norms |z|; N >= 2 (the unbiased std of
      one value is undefined). Under a sharded jit the mean/std are global.
    alpha: EMA weight of the current batch.

  Returns:
    The updated statistics.
  """
  safe = _safe_norms(norms)
  if safe.shape[0] < 2:
    raise ValueError(
        f"update_quality_stats needs at least 2 norms, got {safe.shape[0]}"
    )
  mean = jnp.mean(safe)
  std = jnp.std(safe, ddof=1)
  return QualityStats(
      mean=alpha * mean + (1.0 - alpha) * stats.mean.astype(jnp.float32),
      std=alpha * std + (1.0 - alpha) * stats.std.astype(jnp.float32),
  )


def margin_scaler(
    norms: jax.Array, stats: QualityStats, h: float = 0.333, eps: float = 1e-3
) -> jax.Array:
  """a_i = clip(h (n_i - mu) / (sigma + eps), -1, 1): (N,), no gradient."""
  safe = _safe_norms(norms)
  scaler = (safe - stats.mean) / (stats.std + eps) * h
  return jax.lax.stop_gradient(jnp.clip(scaler, -1.0, 1.0))


def quality_from_scaler(scaler: jax.Array) -> jax.Array:
  """Quality q = (a + 1) / 2 in [0, 1]."""
  return (scaler + 1.0) / 2.0


def scaler_from_degradation(factors: jax.Array) -> jax.Array:
  """Quality from the known downscale factor r in (0, 1] (ablation switch).

  q = r, so a = 2r - 1: clean views are fully HQ and a threshold b marks views
  downscaled below b as LQ.
  """
  return 2.0 * jnp.clip(factors.astype(jnp.float32), 0.0, 1.0) - 1.0


def read_quality(
    settings: Any, stats: QualityStats, norms: jax.Array, degradation: jax.Array
) -> tuple[QualityStats, jax.Array, jax.Array]:
  """Running statistics updated over `norms`, then used.

  `settings` is the `QualitySettings` of the config. Returns (new
  statistics, the margin scaler a_i of the AdaFace margin, the scaler whose
  quality (a + 1) / 2 the gates read): the same unless the partition is by
  known degradation, which swaps the gates' HQ/LQ split and leaves the
  margin on the feature norm.
  """
  stats = update_quality_stats(stats, norms, settings.alpha)
  scaler = margin_scaler(norms, stats, settings.h, settings.eps)
  if settings.partition == "degradation":
    return stats, scaler, scaler_from_degradation(degradation)
  return stats, scaler, scaler


def separation_auc(
    clean: jax.Array, degraded: jax.Array, counted: jax.Array | None = None
) -> jax.Array:
  """How well the feature norm tells clean views from degraded ones: the
  probability that a clean view's norm exceeds a degraded view's (ties
  count half), the area under the ROC of the norm as a clean-vs-degraded
  score. 1: perfectly told apart; 0.5: not at all. `counted` marks the
  degraded views to compare (all when None; NaN when it marks none).
  Logged in training as `quality_auc`, and by the evaluation of HQ-LQ
  pairs."""
  clean = jnp.asarray(clean, jnp.float32)
  degraded = jnp.asarray(degraded, jnp.float32)
  weight = (
      jnp.ones(degraded.shape, jnp.float32)
      if counted is None
      else jnp.asarray(counted, jnp.float32)
  )
  above = (clean[:, None] > degraded[None, :]).astype(jnp.float32)
  ties = (clean[:, None] == degraded[None, :]).astype(jnp.float32)
  per_degraded = jnp.mean(above + 0.5 * ties, axis=0)
  return jnp.sum(per_degraded * weight) / jnp.sum(weight)
