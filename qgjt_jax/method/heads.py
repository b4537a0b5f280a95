"""The HQ branch: margin classification heads (docs/METHOD.md section 3).

Everything here is a pure function of arrays (jit-able, no Python side
effects). The quality indicator they read is `quality.py`'s: the train step
updates the statistics once over all images, derives `margin_scaler` once
and hands the same scaler to `classification_loss` and to the contrastive
loss. `adaface_loss` is that composition for the classifier alone and is
what the reference fixtures check.

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

import jax
import jax.numpy as jnp

from qgjt_jax.method.quality import margin_scaler
from qgjt_jax.method.quality import quality_from_scaler
from qgjt_jax.method.quality import QualityStats
from qgjt_jax.method.quality import update_quality_stats

HEADS = ('adaface', 'arcface', 'cosface', 'softmax')
REDUCTIONS = ('mean', 'gated_mean')

# The classifier matmul decides the margins (acos near cos ~ 1 amplifies any
# error), and on TPU/GPU the default float32 matmul precision is bf16/TF32.
# Its cost is small next to the backbone, so it runs at full precision.
_MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def hq_gate(quality: jax.Array, b: Any, s: float = 64.0) -> jax.Array:
  """High-quality gate g = sigmoid(2 s (q - b)); b == 0 turns it off (g = 1).

  `b` may be a traced scalar (a threshold that ramps up during training).
  """
  gate = jax.nn.sigmoid(2.0 * s * (quality - b))
  return jnp.where(jnp.asarray(b) == 0, jnp.ones_like(gate), gate)


def cosine_logits(
    embeddings: jax.Array, kernel: jax.Array, eps: float = 1e-3
) -> jax.Array:
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
    raise ValueError(
        f'labels must have shape ({num_rows},), got {labels.shape}'
    )
  return labels.astype(jnp.int32)


def margin_logits(
    cos: jax.Array,
    labels: jax.Array,
    scaler: jax.Array,
    *,
    head: str = 'adaface',
    s: float = 64.0,
    m: float = 0.4,
    eps: float = 1e-3,
) -> jax.Array:
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
  cos = jnp.asarray(cos, jnp.float32)
  num_rows, num_classes = cos.shape
  labels = _check_labels(labels, num_rows)
  valid = (labels >= 0) & (labels < num_classes)
  target_mask = labels[:, None] == jnp.arange(num_classes)[None, :]
  # The margin only touches the target column; computing it on (N,) values
  # avoids an acos/cos round trip over all C columns.
  cos_y = jnp.sum(jnp.where(target_mask, cos, 0.0), axis=1)
  scaler = jnp.asarray(scaler, jnp.float32).reshape(num_rows)
  target = margin_target(cos_y, scaler, head=head, m=m, eps=eps)
  logits = s * jnp.where(target_mask, target[:, None], cos)
  return jnp.where(valid[:, None], logits, jnp.nan)


def classification_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    kernel: jax.Array,
    scaler: jax.Array,
    *,
    head: str = 'adaface',
    s: float = 64.0,
    m: float = 0.4,
    eps: float = 1e-3,
    b: Any = 0.0,
    reduction: str = 'mean',
) -> tuple[jax.Array, dict[str, jax.Array]]:
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
    embeddings: jax.Array,
    norms: jax.Array,
    labels: jax.Array,
    kernel: jax.Array,
    stats: QualityStats,
    *,
    s: float = 64.0,
    m: float = 0.4,
    h: float = 0.333,
    alpha: float = 0.01,
    eps: float = 1e-3,
    b: Any = 0.0,
    head: str = 'adaface',
    reduction: str = 'mean',
    update_before_use: bool = True,
) -> tuple[jax.Array, QualityStats, jax.Array]:
  """The reference head end to end: update stats, scaler, gated loss.

  Returns:
    (loss, new_stats, margin_scaler (N,)).
  """
  new_stats = update_quality_stats(stats, norms, alpha)
  scaler = margin_scaler(
      norms, new_stats if update_before_use else stats, h, eps
  )
  loss, _ = classification_loss(
      embeddings,
      labels,
      kernel,
      scaler,
      head=head,
      s=s,
      m=m,
      eps=eps,
      b=b,
      reduction=reduction,
  )
  return loss, new_stats, scaler


# ---------------------------------------------------------------------------
# The classifier with its class axis split over devices (PartialFC-style).
#
# `sharded_classification_loss` runs inside `jax.shard_map` on one block of
# W's columns: each device scores its rows against its own classes, and only
# per-row numbers cross devices (the target cosine, the running max and the
# sum of exponentials), so neither W nor the (N, C) logits are ever gathered.
# With one block it computes what `classification_loss` computes.
# ---------------------------------------------------------------------------


def margin_target(
    cos_y: jax.Array,
    scaler: jax.Array,
    *,
    head: str = 'adaface',
    m: float = 0.4,
    eps: float = 1e-3,
) -> jax.Array:
  """f(cos_y): the head's margin applied to the (N,) target cosines.

  The unscaled target logit, as `margin_logits` puts it in the target column.
  """
  if head not in HEADS:
    raise ValueError(f'unknown head {head!r}; expected one of {HEADS}')
  scaler = jnp.asarray(scaler, jnp.float32).reshape(cos_y.shape)
  if head == 'adaface':
    theta = jnp.clip(jnp.arccos(cos_y) - m * scaler, eps, math.pi - eps)
    return jnp.cos(theta) - (m + m * scaler)
  if head == 'arcface':
    return jnp.cos(jnp.clip(jnp.arccos(cos_y) + m, eps, math.pi - eps))
  if head == 'cosface':
    return cos_y - m
  return cos_y


def sample_classes(
    rng: jax.Array,
    num_local: int,
    num_sample: int,
    positives: jax.Array,
    class_offset: Any,
    num_classes: int,
) -> jax.Array:
  """(num_sample,) sorted local column ids: every positive, random others.

  PartialFC's negative sampling on one block of classes: the block's
  positives (labels of the global batch that fall in it) are always kept and
  the rest is a uniform draw without replacement among its other real
  classes; padding columns come last. `num_sample` must be at least the
  number of distinct positives in the block (the caller bounds it by the
  batch size).
  """
  local = jnp.asarray(positives, jnp.int32) - class_offset
  in_block = (local >= 0) & (local < num_local)
  scores = jax.random.uniform(rng, (num_local,), jnp.float32)
  real = class_offset + jnp.arange(num_local) < num_classes
  scores = jnp.where(real, scores, -1.0)
  scores = scores.at[jnp.where(in_block, local, num_local)].set(
      2.0, mode='drop'
  )
  _, picked = jax.lax.top_k(scores, num_sample)
  # Ascending ids: the column gather below reads W's rows in order.
  return jnp.sort(picked)


def num_sampled_classes(
    num_local: int, sample_rate: float, num_positives: int
) -> int:
  """Columns kept per block: rate x block, but room for every positive."""
  wanted = int(math.ceil(sample_rate * num_local))
  return min(num_local, max(wanted, num_positives, 1))


def _block_cosines(
    embeddings: jax.Array,
    kernel_block: jax.Array,
    eps: float,
    logits_dtype: Any,
) -> jax.Array:
  """(N, c) clamped cosines against one block of columns."""
  if jnp.dtype(logits_dtype) == jnp.float32:
    return cosine_logits(embeddings, kernel_block, eps)
  # Tensor-core matmul with float32 accumulation; the target column, whose
  # arccos amplifies errors, is recomputed in float32 by the caller.
  kernel = jnp.asarray(kernel_block, jnp.float32)
  col_norm = jnp.linalg.norm(kernel, axis=0, keepdims=True)
  kernel_unit = kernel / jnp.maximum(col_norm, jnp.finfo(jnp.float32).tiny)
  cos = jnp.matmul(
      embeddings.astype(logits_dtype),
      kernel_unit.astype(logits_dtype),
      preferred_element_type=jnp.float32,
  )
  return jnp.clip(cos, -1.0 + eps, 1.0 - eps)


def _exact_target_cosines(
    embeddings: jax.Array,
    kernel_block: jax.Array,
    local_target: jax.Array,
    eps: float,
) -> jax.Array:
  """(N,) float32 cos(e_i, w_{y_i}) for rows whose class is in this block."""
  in_block = local_target >= 0
  kernel = jnp.asarray(kernel_block, jnp.float32)
  cols = jnp.take(kernel, jnp.where(in_block, local_target, 0), axis=1).T
  norm = jnp.linalg.norm(cols, axis=1)
  cos = jnp.sum(embeddings.astype(jnp.float32) * cols, axis=1) / jnp.maximum(
      norm, jnp.finfo(jnp.float32).tiny
  )
  return jnp.where(in_block, jnp.clip(cos, -1.0 + eps, 1.0 - eps), 0.0)


def _varying(x: jax.Array, axis_name: Any) -> jax.Array:
  """Marks a per-row value, equal on every device of the axis, as varying.

  Inside `shard_map`, combining such a value with a device's own block makes
  jax insert this cast implicitly, on the broadcast (N, c) array, and the
  backward pass then sums an (N, c) cotangent over the axis. Casting the (N,)
  vector first keeps that sum at N numbers.
  """
  if hasattr(jax.lax, 'pcast'):
    return jax.lax.pcast(x, axis_name, to='varying')
  return jax.lax.pvary(x, axis_name)


def sharded_classification_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    kernel_block: jax.Array,
    scaler: jax.Array,
    *,
    axis_name: Any,
    num_classes: int,
    head: str = 'adaface',
    s: float = 64.0,
    m: float = 0.4,
    eps: float = 1e-3,
    b: Any = 0.0,
    sample_rate: float | None = None,
    positives: jax.Array | None = None,
    rng: jax.Array | None = None,
    logits_dtype: Any = jnp.float32,
    gate_quality: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-row gated margin cross-entropy on one block of W's columns.

  Call inside `shard_map`, with W's class axis split over `axis_name` (block
  j holds classes [j*c, (j+1)*c)) and the same rows on every device of that
  axis; the outputs, (per-example loss (N,), {'gate', 'quality',
  'cos_target'}), are identical across it. `kernel_block` is this device's
  (D, c) columns of W; columns from `num_classes` on are padding, left out.
  A label outside [0, num_classes) gives NaN. `head`, `s`, `m`, `eps`, `b`:
  see `classification_loss`.

  `sample_rate` None scores every class; r keeps, per block, ceil(r c)
  columns (at least len(positives)): every class of `positives` (the whole
  global batch) and uniformly drawn others, with `rng` (the same
  everywhere; blocks fold in their index): PartialFC. `logits_dtype`
  bfloat16 runs the (N, c) matmul on tensor cores (the target cosine stays
  float32). `gate_quality` is the gate's quality when it is not the
  scaler's (the degradation partition).
  """
  embeddings = jnp.asarray(embeddings, jnp.float32)
  num_rows = embeddings.shape[0]
  labels = _check_labels(labels, num_rows)
  scaler = jnp.asarray(scaler, jnp.float32).reshape(num_rows)
  num_local = kernel_block.shape[1]
  padded = num_local * jax.lax.axis_size(axis_name) != num_classes
  kernel_used, columns, local_target = _block_columns(
      labels, kernel_block, axis_name, num_classes, sample_rate, positives, rng
  )
  if padded:
    # Padding columns are zero, and the gradient of a zero column's norm is
    # NaN even where the result is masked; give them a harmless value.
    kernel_used = jnp.where((columns < num_classes)[None, :], kernel_used, 1.0)
  cos = _block_cosines(embeddings, kernel_used, eps, logits_dtype)
  target_mask = local_target[:, None] == jnp.arange(cos.shape[1])[None, :]
  cos_y = _target_cosines(
      embeddings,
      kernel_used,
      cos,
      target_mask,
      local_target,
      eps,
      logits_dtype,
      axis_name,
  )
  target = margin_target(cos_y, scaler, head=head, m=m, eps=eps)
  quality = (
      quality_from_scaler(scaler)
      if gate_quality is None
      else jnp.asarray(gate_quality, jnp.float32).reshape(num_rows)
  )
  gate = hq_gate(quality, b, s)
  target_v, gate_v = _varying(target, axis_name), _varying(gate, axis_name)
  logits = s * jnp.where(target_mask, target_v[:, None], cos) * gate_v[:, None]
  if padded:
    # After the gate: a gate of 0 times -inf would be NaN.
    logits = jnp.where((columns < num_classes)[None, :], logits, -jnp.inf)
  per_example = _sharded_logsumexp(logits, axis_name) - s * target * gate
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid, per_example, jnp.nan), {
      'gate': gate,
      'quality': quality,
      'cos_target': jax.lax.stop_gradient(cos_y),
  }


def _target_cosines(
    embeddings,
    kernel_used,
    cos,
    target_mask,
    local_target,
    eps,
    logits_dtype,
    axis_name,
) -> jax.Array:
  """(N,) each row's target cosine, from the block that holds its class
  (exact in float32 even when the block's matmul ran in bfloat16)."""
  if jnp.dtype(logits_dtype) == jnp.float32:
    cos_y_local = jnp.sum(jnp.where(target_mask, cos, 0.0), axis=1)
  else:
    cos_y_local = _exact_target_cosines(
        embeddings, kernel_used, local_target, eps
    )
  # Exactly one block holds each row's class: the sum is that block's value.
  return jax.lax.psum(cos_y_local, axis_name)


def _block_columns(
    labels: jax.Array,
    kernel_block: jax.Array,
    axis_name: Any,
    num_classes: int,
    sample_rate: float | None,
    positives: jax.Array | None,
    rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(the block's columns scored, their global class ids, each row's target
  position among them or -1): every column, or PartialFC's sample."""
  num_local = kernel_block.shape[1]
  block = jax.lax.axis_index(axis_name)
  offset = block * num_local
  local = labels - offset
  in_block = (local >= 0) & (local < num_local)
  if sample_rate is None:
    return (
        kernel_block,
        offset + jnp.arange(num_local),
        jnp.where(in_block, local, -1),
    )
  if positives is None or rng is None:
    raise ValueError('sampling needs the positives and an rng')
  num_sample = num_sampled_classes(
      num_local, sample_rate, jnp.shape(positives)[0]
  )
  picked = sample_classes(
      jax.random.fold_in(rng, block),
      num_local,
      num_sample,
      positives,
      offset,
      num_classes,
  )
  position = (
      jnp.full((num_local,), -1, jnp.int32)
      .at[picked]
      .set(jnp.arange(num_sample, dtype=jnp.int32))
  )
  return (
      jnp.take(kernel_block, picked, axis=1),
      offset + picked,
      jnp.where(in_block, position[jnp.where(in_block, local, 0)], -1),
  )


def _sharded_logsumexp(logits: jax.Array, axis_name: Any) -> jax.Array:
  """log-sum-exp of each row over every block: a shared max, then one sum
  of exponentials."""
  row_max = jax.lax.pmax(
      jax.lax.stop_gradient(jnp.max(logits, axis=1)), axis_name
  )
  sum_exp = jax.lax.psum(
      jnp.sum(jnp.exp(logits - _varying(row_max, axis_name)[:, None]), axis=1),
      axis_name,
  )
  return row_max + jnp.log(sum_exp)
