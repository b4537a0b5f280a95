"""Feature-norm quality indicator and margin classification heads.

Everything here is a pure function of arrays (jit-able, no Python side
effects); the running norm statistics live in the train state as a
`QualityStats` and are threaded through explicitly.

The train step calls `update_quality_stats` once over all 2B images, derives
`margin_scaler` once and hands the same scaler to `classification_loss` and to
the contrastive loss. `adaface_loss` is that composition for the classifier
alone and is what the reference fixtures check.

Where this deliberately follows the reference (IsidoreSong/QGFace `head.py`),
and the switch that gives a cleaner alternative:

* Statistics are updated with the current batch *before* its scaler is
  computed (`adaface_loss(update_before_use=False)` uses the old statistics).
* The reference starts the statistics at mean 0, std 0, so for the first few
  hundred steps mu and sigma are ~1% of the true values and almost every image
  gets a_i = 1 ("all high quality", every gate open). AdaFace starts at 20/100:
  `init_quality_stats(20.0, 100.0)`.
* The gate multiplies *all* logits of an image, so a gated-out image has
  logits ~0, cross-entropy log C and no gradient, yet it still counts in the
  mean over 2B images: the classification loss shrinks with the HQ fraction.
  `classification_loss(reduction='gated_mean')` averages over the gate mass
  instead.
* b == 0 disables the gate (g = 1) although sigmoid(2s(q - 0)) would not be 1.
* ArcFace is the plain clipped angle form clip(theta + m, eps, pi - eps) of the
  AdaFace repository, without insightface's "easy margin"/cos(pi - m) fallback.
  The reference's plain softmax head ignores the quality gate; here the gate is
  applied uniformly to every head (b = 0 reproduces the reference).
"""
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

NORM_MIN = 0.001
NORM_MAX = 100.0
HEADS = ('adaface', 'arcface', 'cosface', 'softmax')
REDUCTIONS = ('mean', 'gated_mean')

# The classifier matmul decides the margins (acos near cos ~ 1 amplifies any
# error), and on TPU/GPU the default float32 matmul precision is bf16/TF32.
# Its cost is small next to the backbone, so it runs at full precision.
_MATMUL_PRECISION = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class QualityStats:
  """Running statistics of the clipped feature norms (part of the state)."""
  mean: jax.Array  # float32 scalar
  std: jax.Array  # float32 scalar


def init_quality_stats(mean: float = 0.0, std: float = 0.0) -> QualityStats:
  """Initial statistics: the reference starts at 0/0, AdaFace at 20/100."""
  return QualityStats(mean=jnp.asarray(mean, jnp.float32),
                      std=jnp.asarray(std, jnp.float32))


def _safe_norms(norms: jax.Array) -> jax.Array:
  """Flattened float32 norms clipped to [0.001, 100], without gradient."""
  norms = jnp.asarray(norms)
  if norms.ndim == 2 and norms.shape[1] == 1:
    norms = norms[:, 0]
  if norms.ndim != 1:
    raise ValueError(f'norms must be (N,) or (N, 1), got {norms.shape}')
  norms = jax.lax.stop_gradient(norms.astype(jnp.float32))
  return jnp.clip(norms, NORM_MIN, NORM_MAX)


def update_quality_stats(stats: QualityStats, norms: jax.Array,
                         alpha: float = 0.01) -> QualityStats:
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
    raise ValueError('update_quality_stats needs at least 2 norms, '
                     f'got {safe.shape[0]}')
  mean = jnp.mean(safe)
  std = jnp.std(safe, ddof=1)
  return QualityStats(
      mean=alpha * mean + (1.0 - alpha) * stats.mean.astype(jnp.float32),
      std=alpha * std + (1.0 - alpha) * stats.std.astype(jnp.float32))


def margin_scaler(norms: jax.Array, stats: QualityStats, h: float = 0.333,
                  eps: float = 1e-3) -> jax.Array:
  """a_i = clip(h (n_i - mu) / (sigma + eps), -1, 1): (N,), no gradient."""
  safe = _safe_norms(norms)
  scaler = (safe - stats.mean) / (stats.std + eps) * h
  return jax.lax.stop_gradient(jnp.clip(scaler, -1.0, 1.0))


def quality_from_scaler(scaler: jax.Array) -> jax.Array:
  """Quality q = (a + 1) / 2 in [0, 1]."""
  return (scaler + 1.0) / 2.0


def hq_gate(quality: jax.Array, b: Any, s: float = 64.0) -> jax.Array:
  """High-quality gate g = sigmoid(2 s (q - b)); b == 0 turns it off (g = 1).

  `b` may be a traced scalar (a threshold that ramps up during training).
  """
  gate = jax.nn.sigmoid(2.0 * s * (quality - b))
  return jnp.where(jnp.asarray(b) == 0, jnp.ones_like(gate), gate)


def cosine_logits(embeddings: jax.Array, kernel: jax.Array,
                  eps: float = 1e-3) -> jax.Array:
  """Cosines between unit embeddings (N, D) and the columns of W (D, C).

  Columns are L2-normalised here (W itself stays unnormalised, as the queue's
  proxies need it); the result is float32 and clamped to [-1+eps, 1-eps] so
  that acos and its gradient stay finite.
  """
  embeddings = jnp.asarray(embeddings, jnp.float32)
  kernel = jnp.asarray(kernel, jnp.float32)
  col_norm = jnp.linalg.norm(kernel, axis=0, keepdims=True)
  # An all-zero column would be NaN in the reference; keep it a zero cosine.
  kernel_unit = kernel / jnp.maximum(col_norm, jnp.finfo(jnp.float32).tiny)
  cos = jnp.matmul(embeddings, kernel_unit, precision=_MATMUL_PRECISION)
  return jnp.clip(cos, -1.0 + eps, 1.0 - eps)


def _check_labels(labels: jax.Array, num_rows: int) -> jax.Array:
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'labels must be integers, got {labels.dtype}')
  if labels.shape != (num_rows,):
    raise ValueError(f'labels must have shape ({num_rows},), got '
                     f'{labels.shape}')
  return labels.astype(jnp.int32)


def margin_logits(cos: jax.Array, labels: jax.Array, scaler: jax.Array, *,
                  head: str = 'adaface', s: float = 64.0, m: float = 0.4,
                  eps: float = 1e-3) -> jax.Array:
  """Scaled logits s * f(cos) with the head's margin on the target column.

  Args:
    cos: (N, C) clamped cosines from `cosine_logits`.
    labels: (N,) integer class ids in [0, C). A row whose label is outside
      that range gets NaN logits, so the loss turns NaN instead of silently
      training without a target.
    scaler: (N,) margin scaler a_i (only AdaFace uses it).
    head: 'adaface', 'arcface', 'cosface' or 'softmax'.
    s: logit scale.
    m: margin.
    eps: angle clip for the angular margins.

  Returns:
    (N, C) float32 logits, before the quality gate.
  """
  if head not in HEADS:
    raise ValueError(f'unknown head {head!r}; expected one of {HEADS}')
  cos = jnp.asarray(cos, jnp.float32)
  num_rows, num_classes = cos.shape
  labels = _check_labels(labels, num_rows)
  valid = (labels >= 0) & (labels < num_classes)
  target_mask = labels[:, None] == jnp.arange(num_classes)[None, :]
  # The margin only touches the target column; computing it on (N,) values
  # avoids an acos/cos round trip over all C columns.
  cos_y = jnp.sum(jnp.where(target_mask, cos, 0.0), axis=1)
  scaler = jnp.asarray(scaler, jnp.float32).reshape(num_rows)

  if head == 'adaface':
    theta = jnp.clip(jnp.arccos(cos_y) - m * scaler, eps, math.pi - eps)
    target = jnp.cos(theta) - (m + m * scaler)
  elif head == 'arcface':
    target = jnp.cos(jnp.clip(jnp.arccos(cos_y) + m, eps, math.pi - eps))
  elif head == 'cosface':
    target = cos_y - m
  else:
    target = cos_y

  logits = s * jnp.where(target_mask, target[:, None], cos)
  return jnp.where(valid[:, None], logits, jnp.nan)


def classification_loss(
    embeddings: jax.Array, labels: jax.Array, kernel: jax.Array,
    scaler: jax.Array, *, head: str = 'adaface', s: float = 64.0,
    m: float = 0.4, eps: float = 1e-3, b: Any = 0.0,
    reduction: str = 'mean') -> tuple[jax.Array, dict[str, jax.Array]]:
  """Quality-gated margin cross-entropy of the HQ branch.

  Args:
    embeddings: (N, D) unit embeddings (any float dtype; math in float32).
    labels: (N,) class ids in [0, C).
    kernel: (D, C) classifier W, unnormalised.
    scaler: (N,) margin scaler a_i from `margin_scaler`.
    head: see `margin_logits`.
    s: logit scale (also the gate's sharpness).
    m: margin.
    eps: cosine clamp / angle clip.
    b: quality threshold of the gate; 0 disables it.
    reduction: 'mean' (reference: mean over all N rows, gated rows included)
      or 'gated_mean' (sum(g_i * ce_i) / sum(g_i): mean over the HQ rows).

  Returns:
    (loss, aux) with aux holding per-row 'gate', 'quality', 'cos_target'
    (detached target cosine, before the margin) and 'per_example_loss'.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f'unknown reduction {reduction!r}; expected {REDUCTIONS}')
  scaler = jnp.asarray(scaler, jnp.float32).reshape(-1)
  cos = cosine_logits(embeddings, kernel, eps)
  logits = margin_logits(cos, labels, scaler, head=head, s=s, m=m, eps=eps)
  quality = quality_from_scaler(scaler)
  gate = hq_gate(quality, b, s)
  logits = logits * gate[:, None]

  labels = jnp.asarray(labels, jnp.int32)
  target_mask = labels[:, None] == jnp.arange(cos.shape[1])[None, :]
  target_logit = jnp.sum(jnp.where(target_mask, logits, 0.0), axis=1)
  per_example = jax.nn.logsumexp(logits, axis=1) - target_logit
  if reduction == 'mean':
    loss = jnp.mean(per_example)
  else:
    loss = jnp.sum(gate * per_example) / jnp.maximum(jnp.sum(gate), 1e-6)
  cos_target = jnp.sum(jnp.where(target_mask, cos, 0.0), axis=1)
  aux = {
      'gate': gate,
      'quality': quality,
      'cos_target': jax.lax.stop_gradient(cos_target),
      'per_example_loss': jax.lax.stop_gradient(per_example),
  }
  return loss, aux


def adaface_loss(
    embeddings: jax.Array, norms: jax.Array, labels: jax.Array,
    kernel: jax.Array, stats: QualityStats, *, s: float = 64.0,
    m: float = 0.4, h: float = 0.333, alpha: float = 0.01, eps: float = 1e-3,
    b: Any = 0.0, head: str = 'adaface', reduction: str = 'mean',
    update_before_use: bool = True
) -> tuple[jax.Array, QualityStats, jax.Array]:
  """The reference head end to end: update stats, scaler, gated loss.

  Returns:
    (loss, new_stats, margin_scaler (N,)).
  """
  new_stats = update_quality_stats(stats, norms, alpha)
  scaler = margin_scaler(norms, new_stats if update_before_use else stats,
                         h, eps)
  loss, _ = classification_loss(embeddings, labels, kernel, scaler, head=head,
                                s=s, m=m, eps=eps, b=b, reduction=reduction)
  return loss, new_stats, scaler
