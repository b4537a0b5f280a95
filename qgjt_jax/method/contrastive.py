"""The QGFace contrastive loss for low-quality pairs (docs/METHOD.md section 4).

Each sample contributes two anchor rows ("D2N", symmetric coupling): the
view q_i with positive k_i, and the view k_i with positive q_i ("S2N" keeps
the q rows only). Every row is scored against the same negatives, the
proxy-updated queue (docs/METHOD.md section 5). Logits are
`s * w_i * (cos - m_pos * [column 0])`, where w_i is the quality gate of
the pair, and the loss is the mean
cross-entropy over the 2B rows with target column 0, rescaled by
`log(129) / log(K' + 1)` so its size does not depend on the number K' of
negatives.

The queue is a fixed-capacity buffer: `negative_valid` marks its filled
slots. Unfilled slots take no part in anything (softmax, margin statistic,
rescale), so a queue of capacity K holding K' rows gives exactly the loss of
a K'-row queue. Gradients reach q and k only; the queue is a constant.

Where this follows the reference (the authors' `head.QGFace`) on purpose:
- Same-class queue entries are masked by setting their cosine to 0 (`mask=
  'zero'`). They stay in the softmax denominator as exp(0) = 1 per entry, so
  a row with many same-class entries has a larger loss floor. `mask='neg_inf'`
  removes them from the softmax instead (the cleaner choice). `mask='own'`
  is the reference's `mask_same_class=False`: only the anchor's own views
  enqueued this step are zeroed (the caller names their slots), so other
  samples of its class stay negatives. Not masking at all would score every
  anchor against its own just-enqueued copy (cosine 1), so it is not
  offered.
- Rows whose gate weight is 0 (pairs of high quality under the "sgn"/"half"
  gate) have all-zero logits. They stay in the mean with the constant loss
  log(K'+1) and no gradient, so the loss value depends on how many pairs are
  gated out; only the gradient is unaffected by them.
- Queue rows are used as they are, not re-normalised: after the proxy update
  they are not unit vectors, and their "cosines" are clamped to [-1, 1] like
  every other entry (the clamp passes gradient on its closed interval, as
  torch.clamp does).
- The dynamic-margin statistic is `mean_rows(cos_pos - max(0, max_j cos_j))`:
  the reference zeroes the positive column before taking the row maximum, so
  the "largest other column" is never below 0. Because of that floor, masked
  columns give the same statistic whether they count as 0 or are excluded, so
  the statistic is identical under every `mask` mode. It is computed over all
  2B rows and updates the state whatever the margin mode; the dynamic margin
  is the value after this step's update, without gradient.
- The gate threshold b = 0 disables gating (every weight 1), as in the
  reference.

Deliberate departures: an empty queue (K' = 0) gives loss 0 instead of the
reference's 0/0 = NaN (every row's loss is already exactly 0 there), and
zero-norm features are normalised with a tiny floor instead of dividing by 0.

What the reference takes and this does not need:
- `q_norms`/`k_norms` only fill a logging attribute (the pair's norm for
  histograms); they never enter the loss.
- `queue_chunk_size` is only read when same-class masking is off, where the
  reference masks each anchor's own instance by its position among the
  newest queue rows. It does so for the first B of them, which is right for
  the MoCo queue (B keys per step) and does not broadcast for the D2N
  real-time and proxy queues (2B keys: a B-column mask for a 2B-column
  slice). `mask='own'` takes the slots of the anchor's own copies from the
  caller instead (`queue.last_slots`): the MoCo case is the reference's, and
  the other queues get the same meaning, both views of the pair.
- `detach_pos` (reference default off): the positive cosine of a q row is
  taken against a detached k, and that of a k row against a detached q, so
  each view learns only from its own row.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from qgjt_jax.method.quality import quality_from_scaler

# The reference's `eps` (docs/METHOD.md: eps = 1e-3), used in the gate ramps so a
# threshold of 0 or 1 does not divide by zero.
_GATE_EPS = 1e-3

# The options (config.contrastive.*), declared here once.
GATES = ('sgn', 'cos', 'linear')
GATE_RANGES = ('half', 'whole')
PAIR_QUALITIES = ('low', 'mean', 'high')
MARGINS = ('static', 'dynamic', 'none')
MASKS = ('zero', 'neg_inf', 'own')
COUPLINGS = ('D2N', 'S2N')


@flax.struct.dataclass
class MarginState:
  """EMA of (positive cosine - hardest other column): the dynamic margin."""

  value: jax.Array  # float32 scalar


def init_margin_state(value: float = 0.0) -> MarginState:
  """The reference starts the running value at 0 (a zero buffer)."""
  return MarginState(value=jnp.asarray(value, jnp.float32))


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'{name}={value!r}; expected one of {allowed}')


def _l2_normalize(x: jax.Array) -> jax.Array:
  """Unit rows in float32; the floor only matters for an all-zero row."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(jnp.float32).tiny))


def _clamp(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """Clamp whose gradient is 1 on the closed interval [lo, hi], like torch.

  jnp.clip splits the gradient at the boundary, which would differ from the
  reference for an exactly parallel pair.
  """
  return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


def pair_quality_score(
    q_scaler: jax.Array, k_scaler: jax.Array, mode: str = 'low'
) -> jax.Array:
  """Quality of each (q_i, k_i) pair in [0, 1] from the margin scalers a_i.

  Args:
    q_scaler: (B,) or (B, 1) margin scalers a_i in [-1, 1] of the q views.
    k_scaler: same for the k views.
    mode: 'low' (min of the two qualities), 'mean' or 'high' (max).

  Returns:
    (B,) float32 pair qualities, without gradient.
  """
  _check('pair_quality', mode, PAIR_QUALITIES)
  qq = quality_from_scaler(jnp.reshape(q_scaler, (-1,)).astype(jnp.float32))
  qk = quality_from_scaler(jnp.reshape(k_scaler, (-1,)).astype(jnp.float32))
  if mode == 'low':
    quality = jnp.minimum(qq, qk)
  elif mode == 'mean':
    quality = (qq + qk) / 2.0
  else:
    quality = jnp.maximum(qq, qk)
  return jax.lax.stop_gradient(quality)


def quality_gate(
    quality: jax.Array,
    b: float | jax.Array,
    gate: str = 'sgn',
    gate_range: str = 'half',
) -> jax.Array:
  """Per-pair weight w(t) of the contrastive logits, t = pair quality.

  Below the threshold b the weight rises from the LQ end: 'sgn' is 1, 'cos'
  is (1 - cos(pi t / (b + eps))) / 2 and 'linear' is t / (b + eps), both 0 at
  t = 0 and ~1 at t = b. Above b it is 0 ('half'), or for 'whole' it falls
  back towards 0 at t = 1: 'sgn' stays 1, 'cos' is
  cos(pi (t + 1 - 2b) / (2 (1 - b + eps))) + 1, 'linear' is
  (t - 1) / (b - 1 + eps). b = 0 turns the gate off (weight 1). b may be a
  traced value, so a threshold that ramps up during training needs no
  recompilation.
  """
  _check('gate', gate, GATES)
  _check('gate_range', gate_range, GATE_RANGES)
  t = jnp.asarray(quality, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  eps = _GATE_EPS
  if gate == 'sgn':
    below = jnp.ones_like(t)
    above = jnp.ones_like(t) if gate_range == 'whole' else jnp.zeros_like(t)
  elif gate == 'cos':
    below = (1.0 - jnp.cos(math.pi / (b + eps) * t)) / 2.0
    above = (
        jnp.cos(math.pi / (1.0 - b + eps) / 2.0 * (t + 1.0 - 2.0 * b)) + 1.0
        if gate_range == 'whole'
        else jnp.zeros_like(t)
    )
  else:
    below = t / (b + eps)
    above = (
        (t - 1.0) / (b - 1.0 + eps)
        if gate_range == 'whole'
        else jnp.zeros_like(t)
    )
  weight = jnp.where(t < b, below, above)
  return jax.lax.stop_gradient(jnp.where(b == 0, 1.0, weight))


def contrastive_cosines(
    q: jax.Array,
    k: jax.Array,
    labels: jax.Array,
    negatives: jax.Array,
    negative_labels: jax.Array,
    negative_valid: jax.Array,
    *,
    mask: str = 'zero',
    own_slots: jax.Array | None = None,
    coupling: str = 'D2N',
    detach_pos: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Cosine table of the anchor rows and the columns their softmax uses.

  Args:
    q: (B, D) features of one view, any scale and float dtype.
    k: (B, D) features of the other view.
    labels: (B,) int class of each pair.
    negatives: (K, D) queue rows, used as they are (not re-normalised).
    negative_labels: (K,) int class of each queue row.
    negative_valid: (K,) bool, True for filled slots.
    mask: 'zero', 'neg_inf' or 'own' (see the module docstring).
    own_slots: (B, n) int, for mask='own': the queue slots holding pair i's
      own views, enqueued this step.
    coupling: 'D2N' (q and k rows) or 'S2N' (q rows only).
    detach_pos: the positive cosine of a row sees its positive detached.

  Returns:
    cos: (R, 1 + K) float32, R = 2B rows [q anchors; k anchors] (B for
      S2N), column 0 the positive, columns 1.. the queue, all clamped to
      [-1, 1]. Masked and unfilled columns hold 0 and carry no gradient.
    keep: (R, 1 + K) bool, the columns that enter the softmax (column 0,
      filled slots, and masked slots unless mask == 'neg_inf').
  """
  _check('mask', mask, MASKS)
  _check('coupling', coupling, COUPLINGS)
  q = _l2_normalize(q)
  k = _l2_normalize(k)
  valid = jnp.asarray(negative_valid, bool)
  # Unfilled slots may hold anything (zeros, stale rows, even NaN); zeroing
  # them before the product keeps NaN out of both the values and the
  # gradient of q and k (0 * NaN is NaN in a matmul's backward pass).
  negatives = jnp.where(valid[:, None], negatives.astype(jnp.float32), 0.0)
  negatives = jax.lax.stop_gradient(negatives)

  positive_of = jax.lax.stop_gradient if detach_pos else (lambda x: x)
  if coupling == 'D2N':
    anchors = jnp.concatenate([q, k], axis=0)
    positives = jnp.concatenate([positive_of(k), positive_of(q)], axis=0)
  else:
    anchors, positives = q, positive_of(k)
  cos_pos = jnp.sum(anchors * positives, axis=-1, keepdims=True)
  cos_neg = anchors @ negatives.T
  cos = _clamp(jnp.concatenate([cos_pos, cos_neg], axis=1), -1.0, 1.0)

  masked, valid_cols = _masked_columns(
      labels, negative_labels, valid, anchors.shape[0], mask, own_slots
  )
  cos = jnp.where(valid_cols & ~masked, cos, 0.0)
  keep = valid_cols & ~masked if mask == 'neg_inf' else valid_cols
  return cos, keep


def _masked_columns(
    labels, negative_labels, valid, num_rows: int, mask: str, own_slots
) -> tuple[jax.Array, jax.Array]:
  """(R, 1 + K) bools: the masked columns of each row, and the filled ones
  (column 0, the positive, is never masked and always filled)."""
  if mask == 'own':
    if own_slots is None:
      raise ValueError("mask='own' needs the slots of the pairs' own copies")
    slots = jnp.arange(valid.shape[0])
    masked = jnp.any(jnp.asarray(own_slots)[:, :, None] == slots, axis=1)
  else:
    masked = labels[:, None] == negative_labels[None, :]
  masked = jnp.tile(masked, (num_rows // masked.shape[0], 1))
  masked = jnp.concatenate([jnp.zeros((num_rows, 1), bool), masked], axis=1)
  valid_cols = jnp.concatenate([jnp.ones((1,), bool), valid])[None, :].repeat(
      num_rows, axis=0
  )
  return masked, valid_cols


def positive_gap(cos: jax.Array) -> jax.Array:
  """Mean over rows of cos_pos - max(0, hardest queue cosine); no gradient.

  `cos` is the table from `contrastive_cosines`, where masked and unfilled
  columns already hold 0, which the floor at 0 makes harmless.
  """
  cos = jax.lax.stop_gradient(cos)
  hardest = jnp.max(cos.at[:, 0].set(0.0), axis=1)
  return jnp.mean(cos[:, 0] - hardest)


def contrastive_logits(
    cos: jax.Array, weight: jax.Array, margin: float | jax.Array, *, s: float
) -> jax.Array:
  """`s * w_row * (cos - margin on column 0)`; weight is per pair, (B,).

  The rows are the pairs' (B, S2N) or twice over (2B, D2N).
  """
  rows_weight = jnp.tile(weight, cos.shape[0] // weight.shape[0])[:, None]
  cos = cos.at[:, 0].add(-margin)
  return s * rows_weight * cos


def contrastive_loss(
    q: jax.Array,
    k: jax.Array,
    labels: jax.Array,
    negatives: jax.Array,
    negative_labels: jax.Array,
    negative_valid: jax.Array,
    q_scaler: jax.Array,
    k_scaler: jax.Array,
    margin_state: MarginState,
    *,
    s: float = 64.0,
    m: float = 0.4,
    b: float | jax.Array = 0.5,
    alpha: float = 0.01,
    gate: str = 'sgn',
    gate_range: str = 'half',
    pair_quality: str = 'low',
    margin: str = 'static',
    mask: str = 'zero',
    rescale: bool = True,
    rescale_reference: int = 129,
    coupling: str = 'D2N',
    detach_pos: bool = False,
    own_slots: jax.Array | None = None,
) -> tuple[jax.Array, MarginState, dict[str, Any]]:
  """QGFace contrastive loss of one step (docs/METHOD.md section 4).

  q: (B, D) features of one view (normalised here, in float32): the
  degraded view, or the online encoder's clean view (MoCo); k: the other
  view's (the clean view, or the momentum encoder's degraded one); labels:
  (B,) their classes. negatives, negative_labels, negative_valid: the (K, D)
  queue rows as the variant gives them, their classes and filled slots.
  q_scaler, k_scaler: (B,) margin scalers a_i of the views (section 2).
  margin_state: the running value of the dynamic positive margin; alpha
  its EMA rate. b: the quality threshold (0 disables the gate; may be
  traced). own_slots: (B, n) queue slots of each pair's own views (for
  mask='own'). The options (s, m, gate, gate_range, pair_quality, margin,
  mask, rescale, rescale_reference, coupling, detach_pos) are the
  config.contrastive keys of the same names (method/settings.py).

  Returns (loss, the margin state after this step's update, float32
  scalars: `lq_fraction` (pairs below b), `gate_mean`, `positive_cos`,
  `positive_gap` (this step's margin statistic), `margin` (used),
  `margin_state` and `num_negatives` (K')).
  """
  _check('margin', margin, MARGINS)
  quality = pair_quality_score(q_scaler, k_scaler, pair_quality)
  weight = quality_gate(quality, b, gate, gate_range)
  cos, keep = contrastive_cosines(
      q,
      k,
      labels,
      negatives,
      negative_labels,
      negative_valid,
      mask=mask,
      own_slots=own_slots,
      coupling=coupling,
      detach_pos=detach_pos,
  )
  gap = positive_gap(cos)
  new_value = alpha * gap + (1.0 - alpha) * jnp.asarray(
      margin_state.value, jnp.float32
  )
  if margin == 'static':
    m_pos = jnp.asarray(m, jnp.float32)
  elif margin == 'dynamic':
    m_pos = jax.lax.stop_gradient(new_value)
  else:
    m_pos = jnp.zeros((), jnp.float32)
  num_negatives = jnp.sum(jnp.asarray(negative_valid, jnp.int32))
  loss = _mean_cross_entropy(
      contrastive_logits(cos, weight, m_pos, s=s),
      keep,
      num_negatives if rescale else None,
      rescale_reference,
  )
  metrics = {
      'lq_fraction': jnp.mean((quality < b).astype(jnp.float32)),
      'gate_mean': jnp.mean(weight),
      'positive_gap': gap,
      'margin': m_pos,
      'positive_cos': jnp.mean(jax.lax.stop_gradient(cos[:, 0])),
      'margin_state': new_value,
      'num_negatives': num_negatives.astype(jnp.float32),
  }
  return loss, MarginState(value=new_value), metrics


def _mean_cross_entropy(
    logits: jax.Array,
    keep: jax.Array,
    num_negatives: jax.Array | None,
    rescale_reference: int,
) -> jax.Array:
  """Mean over the rows of the cross-entropy with target column 0 over the
  kept columns, times log(rescale_reference) / log(K' + 1) unless
  `num_negatives` (K') is None."""
  # Excluded columns become -inf before the exponent, so garbage never
  # reaches exp() (whose backward pass would turn 0 * inf into NaN); column 0
  # is always kept, so every row's maximum is finite.
  logits_kept = jnp.where(keep, logits, -jnp.inf)
  loss = jnp.mean(jax.nn.logsumexp(logits_kept, axis=1) - logits[:, 0])
  if num_negatives is None:
    return loss
  # With no negatives every row's loss is exactly 0; the floor of 2 logits
  # keeps the factor finite so the loss is 0 rather than 0 * inf.
  num_logits = jnp.maximum(num_negatives + 1, 2).astype(jnp.float32)
  return loss * (math.log(rescale_reference) / jnp.log(num_logits))
