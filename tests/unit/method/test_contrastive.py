"""Tests of the QGFace contrastive loss against the authors' outputs.

Parity: every `qgface_*` case of the reference fixtures, with the queue held
in a larger fixed-capacity buffer (filled rows at shuffled slots, garbage
elsewhere). Options the fixtures do not cover ('neg_inf' masking, the other
gate shapes, no margin) are checked against a plain float64 numpy
transcription of docs/METHOD.md section 4, which is itself first checked on the
fixtures.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax.method import contrastive
from tests.conftest import load_case, reference_cases

RTOL, ATOL = 1e-4, 1e-5

# index.json keys of a qgface case; anything else is a setting this port
# does not know and must not silently ignore.
_KNOWN_SETTINGS = {
    'head',
    's',
    'm',
    't_alpha',
    'quality_scale',
    'quality_scale_method',
    'quality_scale_range',
    'quality_select_method',
    'margin_method',
    'mask_same_class',
    'pair_coupling',
    'rescale',
    'rescale_reference_logits',
    'queue_chunk_size',
    'queue_filled',
}
_GATES = {'sgn': 'sgn', 'cos': 'cos', 'linear': 'linear'}
_RANGES = {'half': 'half', 'whole': 'whole'}
_PAIR_QUALITIES = {'low': 'low', 'mean': 'mean', 'high': 'high'}
_MARGINS = {'static': 'static', 'dynamic': 'dynamic', None: 'none'}
# mask_same_class=False is the reference's positional own-instance mask:
# 'own', which needs the slots of the pairs' copies (no fixture has it).
_MASKS = {True: 'zero'}


def _lookup(table, key, setting):
  if key not in table:
    raise ValueError(f'unsupported {setting}={key!r}')
  return table[key]


def loss_kwargs(settings: dict) -> dict:
  """Maps a qgface case's index.json settings to `contrastive_loss` kwargs."""
  unknown = set(settings) - _KNOWN_SETTINGS
  if unknown:
    raise ValueError(f'unknown settings {sorted(unknown)}')
  _lookup({'qgface': None}, settings['head'], 'head')
  # queue_chunk_size only matters without same-class masking (not ported);
  # queue_filled is the number of fixture queue rows, checked by the caller.
  return dict(
      s=float(settings['s']),
      m=float(settings['m']),
      b=float(settings['quality_scale']),
      alpha=float(settings['t_alpha']),
      gate=_lookup(
          _GATES, settings['quality_scale_method'], 'quality_scale_method'
      ),
      gate_range=_lookup(
          _RANGES, settings['quality_scale_range'], 'quality_scale_range'
      ),
      pair_quality=_lookup(
          _PAIR_QUALITIES,
          settings['quality_select_method'],
          'quality_select_method',
      ),
      margin=_lookup(_MARGINS, settings['margin_method'], 'margin_method'),
      mask=_lookup(_MASKS, settings['mask_same_class'], 'mask_same_class'),
      rescale=_lookup(
          {True: True, False: False}, settings['rescale'], 'rescale'
      ),
      rescale_reference=int(settings['rescale_reference_logits']),
      coupling=_lookup(
          {'D2N': 'D2N', 'S2N': 'S2N'},
          settings['pair_coupling'],
          'pair_coupling',
      ),
  )


def _padded_queue(queue, queue_labels, capacity, seed=0):
  """Places the K' rows at shuffled slots of a capacity-K buffer.

  The other slots hold garbage that would change the result if it leaked
  in: large rows, one NaN row, and labels that often equal the anchors'.
  """
  rng = np.random.default_rng(seed)
  filled, dim = queue.shape
  slots = rng.permutation(capacity)[:filled]
  buf = rng.normal(scale=50.0, size=(capacity, dim)).astype(np.float32)
  unfilled = np.setdiff1d(np.arange(capacity), slots)
  buf[rng.choice(unfilled)] = np.nan
  buf_labels = rng.integers(0, 3, capacity)
  valid = np.zeros(capacity, bool)
  buf[slots] = queue
  buf_labels[slots] = queue_labels
  valid[slots] = True
  return buf, buf_labels, valid, slots


def _inputs(inputs, capacity, seed=0, own_rows=None):
  """Fixture inputs as float32 arguments of contrastive_loss.

  `own_rows` (B, n): queue rows (of the K' filled ones) holding each pair's
  own copies, passed as their buffer slots for mask='own'.
  """
  f32 = lambda x: np.asarray(x, np.float32)
  queue, queue_labels, valid, slots = _padded_queue(
      f32(inputs['queue']), inputs['queue_labels'], capacity, seed
  )
  extra = {} if own_rows is None else {'own_slots': slots[own_rows]}
  return dict(
      **extra,
      q=f32(inputs['q']),
      k=f32(inputs['k']),
      labels=inputs['q_labels'],
      negatives=queue,
      negative_labels=queue_labels,
      negative_valid=valid,
      q_scaler=f32(inputs['q_margin_scaler']),
      k_scaler=f32(inputs['k_margin_scaler']),
      margin_state=contrastive.init_margin_state(
          float(np.reshape(inputs['batch_mean'], ()))
      ),
  )


def _loss_and_grads(args, **kwargs):
  """(loss, state, metrics, grad_q, grad_k) of one call, run op by op.

  Op-by-op dispatch caches each primitive per shape, so the many settings
  below cost far less than one whole-step compilation each; jit has its own
  test.
  """
  args = dict(args)
  q, k = args.pop('q'), args.pop('k')

  def fn(q, k):
    loss, state, metrics = contrastive.contrastive_loss(q, k, **args, **kwargs)
    return loss, (state, metrics)

  (loss, (state, metrics)), (grad_q, grad_k) = jax.value_and_grad(
      fn, argnums=(0, 1), has_aux=True
  )(q, k)
  return loss, state, metrics, grad_q, grad_k


# ---------------------------------------------------------------------------
# An independent float64 transcription of docs/METHOD.md section 4, row by row.


def _numpy_gate(t, b, gate, gate_range, eps=1e-3):
  if b == 0:
    return 1.0
  if t < b:
    if gate == 'sgn':
      return 1.0
    if gate == 'cos':
      return 0.5 * (1.0 - math.cos(math.pi * t / (b + eps)))
    return t / (b + eps)
  if gate_range == 'half':
    return 0.0
  if gate == 'sgn':
    return 1.0
  if gate == 'cos':
    # Falls from 1 at t = b to 0 at t = 1.
    return 1.0 + math.cos(math.pi * (t - b + 1.0 - b) / (2.0 * (1.0 - b + eps)))
  return (1.0 - t) / (1.0 - b - eps)


def numpy_loss(
    q,
    k,
    labels,
    negatives,
    negative_labels,
    q_scaler,
    k_scaler,
    margin_before,
    *,
    s,
    m,
    b,
    alpha,
    gate,
    gate_range,
    pair_quality,
    margin,
    mask,
    rescale,
    rescale_reference,
    coupling='D2N',
    detach_pos=False,
    own_rows=None,
    frozen_margin=None,
    frozen_positives=None,
):
  """Returns (loss, margin after); the queue is the K' filled rows only.

  For finite differences: `frozen_margin` replaces the positive margin (the
  dynamic margin is a constant to the gradient), and with detach_pos
  `frozen_positives` = (q, k) are the positives, constants too.
  `own_rows[i]` lists the queue rows holding pair i's own views (mask
  'own').
  """
  unit = lambda x: (
      np.asarray(x, np.float64)
      / np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True)
  )
  q, k = unit(q), unit(k)
  pos_q, pos_k = (
      (q, k) if frozen_positives is None else map(unit, frozen_positives)
  )
  negatives = np.asarray(negatives, np.float64)
  clamp = lambda x: min(max(float(x), -1.0), 1.0)
  tq = (np.ravel(q_scaler) + 1.0) / 2.0
  tk = (np.ravel(k_scaler) + 1.0) / 2.0
  pick = {'low': min, 'high': max, 'mean': lambda a, c: (a + c) / 2.0}
  weights = [
      _numpy_gate(pick[pair_quality](a, c), b, gate, gate_range)
      for a, c in zip(tq, tk)
  ]

  rows = []  # (positive cos, [negative cos or None when excluded], weight)
  couples = ((q, pos_k), (k, pos_q)) if coupling == 'D2N' else ((q, pos_k),)
  for anchors, positives in couples:
    for i in range(len(q)):
      pos = clamp(anchors[i] @ positives[i])
      negs = []
      for j in range(len(negatives)):
        if mask == 'own':
          same = j in own_rows[i]
        else:
          same = negative_labels[j] == labels[i]
        if same and mask == 'neg_inf':
          negs.append(None)
        elif same:
          negs.append(0.0)
        else:
          negs.append(clamp(anchors[i] @ negatives[j]))
      rows.append((pos, negs, weights[i]))

  # Hardest other column, the zeroed positive and masked entries counting 0.
  gaps = [
      pos - max([0.0] + [0.0 if c is None else c for c in negs])
      for pos, negs, _ in rows
  ]
  margin_after = alpha * np.mean(gaps) + (1.0 - alpha) * margin_before
  m_pos = {'static': m, 'dynamic': margin_after, 'none': 0.0}[margin]
  if frozen_margin is not None:
    m_pos = frozen_margin

  losses = []
  for pos, negs, w in rows:
    logits = np.array(
        [s * w * (pos - m_pos)] + [s * w * c for c in negs if c is not None]
    )
    top = logits.max()
    losses.append(top + math.log(np.exp(logits - top).sum()) - logits[0])
  loss = float(np.mean(losses))
  if rescale:
    loss *= math.log(rescale_reference) / math.log(len(negatives) + 1)
  return loss, margin_after


def _numpy_args(inputs):
  return dict(
      q=inputs['q'],
      k=inputs['k'],
      labels=inputs['q_labels'],
      negatives=inputs['queue'],
      negative_labels=inputs['queue_labels'],
      q_scaler=inputs['q_margin_scaler'],
      k_scaler=inputs['k_margin_scaler'],
      margin_before=float(np.reshape(inputs['batch_mean'], ())),
  )


# ---------------------------------------------------------------------------
# Parity with the reference.

# Every case runs with the queue in a buffer of this many slots, which must
# reproduce the reference's K'-row queue exactly.
_CAPACITY = 96


@pytest.mark.parametrize('name', reference_cases('qgface'))
def test_matches_reference(reference_dir, name):
  settings, inputs, outputs = load_case(reference_dir, name)
  kwargs = loss_kwargs(settings)
  assert inputs['queue'].shape[0] == settings['queue_filled']
  assert _CAPACITY > settings['queue_filled']
  args = _inputs(inputs, _CAPACITY)

  loss, state, metrics, grad_q, grad_k = _loss_and_grads(args, **kwargs)

  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, outputs['loss'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad_q, outputs['grad_q'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad_k, outputs['grad_k'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      state.value, np.reshape(outputs['batch_mean'], ()), rtol=RTOL, atol=ATOL
  )
  assert metrics['num_negatives'] == settings['queue_filled']


@pytest.mark.parametrize('name', reference_cases('qgface'))
def test_numpy_transcription_matches_reference(reference_dir, name):
  """Validates the oracle used for the options the fixtures lack."""
  settings, inputs, outputs = load_case(reference_dir, name)
  loss, margin_after = numpy_loss(
      **_numpy_args(inputs), **loss_kwargs(settings)
  )
  np.testing.assert_allclose(loss, outputs['loss'], rtol=1e-9)
  np.testing.assert_allclose(
      margin_after, np.reshape(outputs['batch_mean'], ()), rtol=1e-9, atol=1e-12
  )


@pytest.mark.parametrize(
    'settings',
    [
        {'quality_scale_method': 'tanh'},
        {'quality_scale_range': 'third'},
        {'quality_select_method': 'median'},
        {'margin_method': 'adaptive'},
        {'pair_coupling': 'D2D'},
        {'detach_pos': True},  # a key this mapping does not know
    ],
)
def test_unknown_settings_raise(reference_dir, settings):
  name = reference_cases('qgface')[0]
  base, _, _ = load_case(reference_dir, name)
  with pytest.raises(ValueError):
    loss_kwargs({**base, **settings})


def test_unknown_arguments_raise():
  x = jnp.ones((2, 4))
  common = (
      x,
      x,
      jnp.zeros(2, int),
      x,
      jnp.zeros(2, int),
      jnp.ones(2, bool),
      jnp.zeros(2),
      jnp.zeros(2),
      contrastive.init_margin_state(),
  )
  for bad in (
      {'gate': 'tanh'},
      {'gate_range': 'x'},
      {'pair_quality': 'x'},
      {'margin': 'x'},
      {'mask': 'x'},
      {'mask': 'none'},
      {'mask': 'own'},
      {'coupling': 'x'},
  ):
    with pytest.raises(ValueError):
      contrastive.contrastive_loss(*common, **bad)


def test_init_margin_state_starts_at_zero():
  state = contrastive.init_margin_state()
  assert state.value.dtype == jnp.float32 and float(state.value) == 0.0


# ---------------------------------------------------------------------------
# Options beyond the fixtures, against the numpy transcription.

_VARIANTS = [
    dict(mask='neg_inf'),
    dict(mask='neg_inf', margin='dynamic', gate='cos', gate_range='half'),
    dict(mask='own', margin='none'),
    dict(mask='own', coupling='S2N', margin='dynamic'),
    dict(coupling='S2N', gate='cos', gate_range='whole'),
    dict(detach_pos=True),
    dict(detach_pos=True, coupling='S2N', mask='neg_inf'),
    dict(gate='linear', gate_range='whole', pair_quality='mean'),
    dict(gate='sgn', gate_range='whole', pair_quality='high'),
    dict(gate='cos', gate_range='half', b=0.3),
    dict(b=0.0, mask='neg_inf'),
    dict(rescale=False, margin='dynamic'),
]


def _variant_id(variant):
  return '-'.join(f'{key}={value}' for key, value in variant.items())


@pytest.mark.parametrize('variant', _VARIANTS, ids=_variant_id)
def test_variants_match_numpy(reference_dir, variant):
  name = 'qgface_sgn_dynamic_partial'
  if name not in reference_cases('qgface'):
    name = reference_cases('qgface')[0]
  settings, inputs, _ = load_case(reference_dir, name)
  _check_against_numpy(inputs, {**loss_kwargs(settings), **variant})


def _own_rows(inputs):
  """Two queue rows per pair as its "own copies" (rows i and B + i)."""
  b = len(inputs['q'])
  return np.stack([np.arange(b), b + np.arange(b)], axis=1) % len(
      inputs['queue']
  )


def _check_against_numpy(inputs, kwargs):
  """Loss, margin state and gradient against the float64 transcription."""
  own_rows = _own_rows(inputs) if kwargs.get('mask') == 'own' else None
  numpy_kwargs = dict(kwargs, own_rows=own_rows)
  expected, margin_after = numpy_loss(**_numpy_args(inputs), **numpy_kwargs)
  args = _inputs(inputs, _CAPACITY, seed=1, own_rows=own_rows)

  loss, state, _, grad_q, grad_k = _loss_and_grads(args, **kwargs)

  np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(state.value, margin_after, rtol=RTOL, atol=ATOL)
  # Gradient along a random direction against central differences of the
  # float64 transcription, with the margin of this step held fixed.
  frozen = {'static': kwargs['m'], 'dynamic': margin_after, 'none': 0.0}[
      kwargs['margin']
  ]
  rng = np.random.default_rng(2)
  dq = rng.normal(size=inputs['q'].shape)
  dk = rng.normal(size=inputs['k'].shape)
  h = 1e-6
  frozen_positives = (
      (inputs['q'], inputs['k']) if kwargs.get('detach_pos') else None
  )
  shifted = lambda sign: numpy_loss(
      **{
          **_numpy_args(inputs),
          'q': inputs['q'] + sign * h * dq,
          'k': inputs['k'] + sign * h * dk,
      },
      **numpy_kwargs,
      frozen_margin=frozen,
      frozen_positives=frozen_positives,
  )[0]
  numeric = (shifted(1) - shifted(-1)) / (2 * h)
  analytic = float(np.sum(grad_q * dq) + np.sum(grad_k * dk))
  np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('queue_kind', ['opposite', 'long_rows'])
def test_queue_geometry_matches_numpy(queue_kind):
  """Cases the random fixtures never reach.

  'opposite': every queue cosine is negative, so the margin statistic's
  floor at 0 decides the hardest column. 'long_rows': proxy-updated rows are
  not unit vectors; some cosines exceed 1 and are clamped (no gradient).
  """
  rng = np.random.default_rng(3)
  batch, dim, filled = 8, 32, 40
  u = rng.normal(size=dim)
  u /= np.linalg.norm(u)
  noise = lambda n, scale: scale * rng.normal(size=(n, dim)) / np.sqrt(dim)
  q = u + noise(batch, 0.3)
  k = u + noise(batch, 0.3)
  if queue_kind == 'opposite':
    queue = -u + noise(filled, 0.3)
  else:
    queue = 1.5 * noise(filled, 1.0)
    queue[:10] += 3.0 * u
  inputs = {
      'q': q,
      'k': k,
      'queue': queue,
      'q_labels': np.arange(batch),
      'queue_labels': rng.integers(0, 20, filled),
      'q_margin_scaler': rng.uniform(-1, 0.2, (batch, 1)),
      'k_margin_scaler': rng.uniform(-1, 0.2, (batch, 1)),
      'batch_mean': np.array([0.1]),
  }
  kwargs = dict(
      s=64.0,
      m=0.4,
      b=0.5,
      alpha=0.01,
      gate='linear',
      gate_range='half',
      pair_quality='low',
      margin='dynamic',
      mask='zero',
      rescale=True,
      rescale_reference=129,
  )
  anchors = np.concatenate([q, k]) / np.linalg.norm(
      np.concatenate([q, k]), axis=1, keepdims=True
  )
  cos = anchors @ queue.T
  if queue_kind == 'opposite':
    assert cos.max() < 0
  else:
    assert cos.max() > 1.05 and (np.abs(cos) < 0.95).mean() > 0.3
  _check_against_numpy(inputs, kwargs)


def test_neg_inf_differs_from_zero_masking(reference_dir):
  """The switch matters: zeroed masked entries stay in the denominator."""
  name = reference_cases('qgface')[0]
  settings, inputs, _ = load_case(reference_dir, name)
  kwargs = loss_kwargs(settings)
  args = _inputs(inputs, _CAPACITY)
  zero = _loss_and_grads(args, **{**kwargs, 'mask': 'zero'})
  neg_inf = _loss_and_grads(args, **{**kwargs, 'mask': 'neg_inf'})
  assert float(neg_inf[0]) < float(zero[0])
  # The margin statistic does not depend on the masking mode.
  np.testing.assert_allclose(neg_inf[1].value, zero[1].value, rtol=1e-6)


# ---------------------------------------------------------------------------
# Behaviour.


def test_under_jit_with_traced_threshold(reference_dir):
  name = reference_cases('qgface')[0]
  settings, inputs, outputs = load_case(reference_dir, name)
  kwargs = loss_kwargs(settings)
  b = kwargs.pop('b')
  args = _inputs(inputs, _CAPACITY)

  step = jax.jit(lambda args, b: _loss_and_grads(args, b=b, **kwargs))
  loss, state, metrics, grad_q, grad_k = step(args, jnp.float32(b))
  np.testing.assert_allclose(loss, outputs['loss'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad_q, outputs['grad_q'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad_k, outputs['grad_k'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      state.value, np.reshape(outputs['batch_mean'], ()), rtol=RTOL, atol=ATOL
  )
  assert set(metrics) >= {'lq_fraction', 'positive_cos', 'num_negatives'}


def _random_args(batch=8, dim=32, capacity=_CAPACITY, seed=0, dtype=np.float32):
  # The fixtures' shapes, so op-by-op dispatch reuses compiled primitives.
  rng = np.random.default_rng(seed)
  return dict(
      q=jnp.asarray(rng.normal(size=(batch, dim)), dtype),
      k=jnp.asarray(rng.normal(size=(batch, dim)), dtype),
      labels=jnp.zeros(batch, jnp.int32),
      negatives=jnp.asarray(rng.normal(size=(capacity, dim)), dtype),
      negative_labels=jnp.zeros(capacity, jnp.int32),
      negative_valid=jnp.ones(capacity, bool),
      q_scaler=jnp.asarray(rng.uniform(-1, -0.5, batch), dtype),
      k_scaler=jnp.asarray(rng.uniform(-1, -0.5, batch), dtype),
      margin_state=contrastive.init_margin_state(),
  )


def _assert_finite(loss, state, grad_q, grad_k):
  for x in (loss, state.value, grad_q, grad_k):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))


@pytest.mark.parametrize('mask', ['zero', 'neg_inf'])
def test_all_negatives_masked_is_finite(mask):
  args = _random_args()  # every queue row has the anchors' label
  loss, state, _, grad_q, grad_k = _loss_and_grads(args, mask=mask)
  _assert_finite(loss, state, grad_q, grad_k)
  if mask == 'neg_inf':
    # Only the positive is left in every row's softmax.
    assert float(loss) == 0.0


@pytest.mark.parametrize('capacity', [0, _CAPACITY])
def test_empty_queue_is_finite(capacity):
  args = _random_args(capacity=capacity)
  args['negative_valid'] = jnp.zeros(capacity, bool)
  args['negatives'] = jnp.full_like(args['negatives'], jnp.nan)
  loss, state, metrics, grad_q, grad_k = _loss_and_grads(args)
  _assert_finite(loss, state, grad_q, grad_k)
  assert float(loss) == 0.0 and float(metrics['num_negatives']) == 0.0


def test_no_gradient_into_queue_or_scalers():
  args = _random_args()
  args['labels'] = jnp.arange(8)  # nothing masked
  names = ('negatives', 'q_scaler', 'k_scaler')

  def fn(*xs):
    loss, _, _ = contrastive.contrastive_loss(
        **{**args, **dict(zip(names, xs))}, gate='cos'
    )
    return loss

  grads = jax.grad(fn, argnums=(0, 1, 2))(*(args[n] for n in names))
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_bfloat16_inputs_computed_in_float32():
  args16 = _random_args(dtype=jnp.bfloat16)
  args16['labels'] = jnp.arange(8)
  args32 = {
      n: (
          x.astype(jnp.float32)
          if getattr(x, 'dtype', None) == jnp.bfloat16
          else x
      )
      for n, x in args16.items()
  }
  loss16, state16, _, grad_q16, _ = _loss_and_grads(args16, margin='dynamic')
  loss32, state32, _, grad_q32, _ = _loss_and_grads(args32, margin='dynamic')
  assert loss16.dtype == jnp.float32 and state16.value.dtype == jnp.float32
  assert grad_q16.dtype == jnp.bfloat16
  np.testing.assert_allclose(loss16, loss32, rtol=1e-6)
  np.testing.assert_allclose(state16.value, state32.value, rtol=1e-6)
  np.testing.assert_allclose(
      grad_q16.astype(jnp.float32), grad_q32, rtol=1e-2, atol=1e-2
  )


def test_gate_shapes():
  """Reference gate values at a few qualities (b = 0.5, eps = 1e-3)."""
  t = jnp.array([0.0, 0.25, 0.4999, 0.5, 0.75, 1.0])
  gate = functools.partial(contrastive.quality_gate, t, 0.5)
  expected = {
      ('sgn', 'half'): [1, 1, 1, 0, 0, 0],
      ('sgn', 'whole'): [1, 1, 1, 1, 1, 1],
      ('linear', 'half'): [0, 0.25 / 0.501, 0.4999 / 0.501, 0, 0, 0],
      ('linear', 'whole'): [
          0,
          0.25 / 0.501,
          0.4999 / 0.501,
          0.5 / 0.499,
          0.25 / 0.499,
          0,
      ],
      ('cos', 'half'): [
          0,
          (1 - math.cos(math.pi * 0.25 / 0.501)) / 2,
          (1 - math.cos(math.pi * 0.4999 / 0.501)) / 2,
          0,
          0,
          0,
      ],
  }
  for (shape, span), values in expected.items():
    np.testing.assert_allclose(
        gate(shape, span), values, atol=1e-6, err_msg=f'{shape}/{span}'
    )
  whole_cos = gate('cos', 'whole')
  np.testing.assert_allclose(whole_cos[3], 1.0, atol=1e-2)  # ~1 at t = b
  np.testing.assert_allclose(whole_cos[5], 0.0, atol=1e-4)  # 0 at t = 1
  np.testing.assert_array_equal(
      contrastive.quality_gate(t, 0.0, 'sgn', 'half'), 1.0
  )
