"""Tests of the quality indicator and the margin heads."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_case, reference_cases
from qgjt_jax.method import heads as margin
from qgjt_jax.method import quality as quality_lib

RTOL, ATOL = 1e-4, 1e-5


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


@pytest.mark.parametrize('name', reference_cases('adaface'))
def test_adaface_matches_reference(reference_dir, name):
  settings, inputs, outputs = load_case(reference_dir, name)
  stats = quality_lib.init_quality_stats(
      float(inputs['batch_mean'][0]), float(inputs['batch_std'][0])
  )
  norms = _f32(inputs['norms'])
  labels = jnp.asarray(inputs['labels'], jnp.int32)

  def loss_fn(embeddings, kernel):
    loss, new_stats, scaler = margin.adaface_loss(
        embeddings,
        norms,
        labels,
        kernel,
        stats,
        s=settings['s'],
        m=settings['m'],
        h=settings['h'],
        alpha=settings['t_alpha'],
        eps=settings['eps'],
        b=settings['quality_scale'],
    )
    return loss, (new_stats, scaler)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, (new_stats, scaler)), (g_emb, g_kernel) = grad_fn(
      _f32(inputs['embeddings']), _f32(inputs['kernel'])
  )

  np.testing.assert_allclose(loss, outputs['loss'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      scaler, outputs['margin_scaler'][:, 0], rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      new_stats.mean, outputs['batch_mean'][0], rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      new_stats.std, outputs['batch_std'][0], rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      g_emb, outputs['grad_embeddings'], rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      g_kernel, outputs['grad_kernel'], rtol=RTOL, atol=ATOL
  )


# --- An independent float64 numpy version of the heads. ---


def _np_cos(emb, kernel, eps):
  w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
  return np.clip(emb @ w, -1 + eps, 1 - eps)


def _np_logits(cos, labels, scaler, head, s, m, eps):
  out = cos.copy()
  rows = np.arange(len(labels))
  c = cos[rows, labels]
  if head == 'adaface':
    t = np.clip(np.arccos(c) - m * scaler, eps, math.pi - eps)
    out[rows, labels] = np.cos(t) - m - m * scaler
  elif head == 'arcface':
    out[rows, labels] = np.cos(np.clip(np.arccos(c) + m, eps, math.pi - eps))
  elif head == 'cosface':
    out[rows, labels] = c - m
  return s * out


def _np_ce(logits, labels):
  mx = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
  return lse - logits[np.arange(len(labels)), labels]


def _problem(seed=0, n=12, d=16, c=9):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(n, d))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  kernel = rng.normal(size=(d, c))
  labels = rng.integers(0, c, size=n)
  # Make a few samples close to their class so margins and clips matter.
  emb[:3] = kernel[:, labels[:3]].T + 0.05 * rng.normal(size=(3, d))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  scaler = rng.uniform(-1, 1, size=n)
  scaler[0], scaler[1] = -1.0, 1.0
  return emb, kernel, labels, scaler


@pytest.mark.parametrize('head', margin.HEADS)
@pytest.mark.parametrize('b', [0.0, 0.5])
def test_heads_match_numpy(head, b):
  emb, kernel, labels, scaler = _problem()
  s, m, eps = 64.0, 0.4, 1e-3
  loss_fn = jax.jit(
      lambda e, w, y, a: margin.classification_loss(
          e, y, w, a, head=head, s=s, m=m, eps=eps, b=b
      )
  )
  loss, aux = loss_fn(
      _f32(emb), _f32(kernel), jnp.asarray(labels), _f32(scaler)
  )

  cos = _np_cos(emb, kernel, eps)
  logits = _np_logits(cos, labels, scaler, head, s, m, eps)
  q = (scaler + 1) / 2
  gate = np.ones_like(q) if b == 0 else 1 / (1 + np.exp(-2 * s * (q - b)))
  ce = _np_ce(logits * gate[:, None], labels)
  np.testing.assert_allclose(aux['gate'], gate, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(aux['quality'], q, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      aux['cos_target'],
      cos[np.arange(len(labels)), labels],
      rtol=RTOL,
      atol=ATOL,
  )
  np.testing.assert_allclose(aux['per_example_loss'], ce, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(loss, ce.mean(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('head', margin.HEADS)
def test_margin_logits_match_numpy(head):
  emb, kernel, labels, scaler = _problem(seed=1)
  cos = _np_cos(emb, kernel, 1e-3)
  got = jax.jit(
      lambda c, y, a: margin.margin_logits(c, y, a, head=head, s=30.0, m=0.5)
  )(_f32(cos), jnp.asarray(labels), _f32(scaler))
  np.testing.assert_allclose(
      got,
      _np_logits(cos, labels, scaler, head, 30.0, 0.5, 1e-3),
      rtol=RTOL,
      atol=1e-4,
  )


def test_quality_stats_and_scaler_match_numpy():
  rng = np.random.default_rng(2)
  norms = np.concatenate([rng.uniform(0, 30, size=10), [0.0, 500.0]])
  stats = quality_lib.init_quality_stats(20.0, 100.0)
  new = jax.jit(quality_lib.update_quality_stats)(
      stats, _f32(norms)[:, None], 0.1
  )
  safe = np.clip(norms, 0.001, 100)
  mu = 0.1 * safe.mean() + 0.9 * 20.0
  sd = 0.1 * safe.std(ddof=1) + 0.9 * 100.0
  np.testing.assert_allclose(new.mean, mu, rtol=RTOL)
  np.testing.assert_allclose(new.std, sd, rtol=RTOL)
  tight = quality_lib.QualityStats(jnp.float32(15.0), jnp.float32(4.0))
  a = jax.jit(quality_lib.margin_scaler)(_f32(norms), tight, 0.333, 1e-3)
  np.testing.assert_allclose(
      a,
      np.clip(0.333 * (safe - 15.0) / (4.0 + 1e-3), -1, 1),
      rtol=RTOL,
      atol=ATOL,
  )
  assert a.shape == (12,)
  assert float(a.min()) == -1.0 and float(a.max()) == 1.0
  np.testing.assert_allclose(quality_lib.quality_from_scaler(a), (a + 1) / 2)


def test_scaler_has_no_gradient():
  stats = quality_lib.QualityStats(jnp.float32(5.0), jnp.float32(2.0))
  grad = jax.grad(lambda n: quality_lib.margin_scaler(n, stats).sum())(
      jnp.array([3.0, 5.0, 6.0])
  )
  np.testing.assert_array_equal(grad, 0.0)


def test_gate_off_and_on():
  q = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_array_equal(margin.hq_gate(q, 0.0), 1.0)
  # A traced zero threshold also switches the gate off.
  np.testing.assert_array_equal(jax.jit(margin.hq_gate)(q, 0.0), 1.0)
  gate = jax.jit(margin.hq_gate)(q, 0.5)
  assert float(gate[0]) < 1e-20 and float(gate[-1]) > 1 - 1e-6
  np.testing.assert_allclose(gate[5], 0.5, atol=1e-6)


def test_gated_out_rows_cost_log_c_and_no_gradient():
  emb, kernel, labels, _ = _problem(seed=3, c=7)
  scaler = jnp.where(jnp.arange(12) < 6, -1.0, 1.0)  # first half LQ

  def loss_fn(e, reduction):
    return margin.classification_loss(
        e, jnp.asarray(labels), _f32(kernel), scaler, b=0.5, reduction=reduction
    )

  loss, aux = loss_fn(_f32(emb), 'mean')
  np.testing.assert_allclose(
      aux['per_example_loss'][:6], math.log(7), rtol=1e-6
  )
  grad = jax.grad(lambda e: loss_fn(e, 'mean')[0])(_f32(emb))
  np.testing.assert_allclose(grad[:6], 0.0, atol=1e-12)
  assert np.abs(grad[6:]).max() > 1e-3
  # The cleaner reduction averages only over the open gates.
  gated, _ = loss_fn(_f32(emb), 'gated_mean')
  np.testing.assert_allclose(
      gated, aux['per_example_loss'][6:].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(loss, aux['per_example_loss'].mean(), rtol=1e-6)


def test_bfloat16_embeddings_give_float32_loss():
  emb, kernel, labels, scaler = _problem(seed=4)
  loss, aux = margin.classification_loss(
      jnp.asarray(emb, jnp.bfloat16),
      jnp.asarray(labels),
      jnp.asarray(kernel, jnp.bfloat16),
      _f32(scaler),
  )
  assert loss.dtype == jnp.float32 and aux['gate'].dtype == jnp.float32
  ref, _ = margin.classification_loss(
      _f32(np.asarray(jnp.asarray(emb, jnp.bfloat16), np.float64)),
      jnp.asarray(labels),
      _f32(np.asarray(jnp.asarray(kernel, jnp.bfloat16), np.float64)),
      _f32(scaler),
  )
  np.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_out_of_range_label_is_loud():
  emb, kernel, labels, scaler = _problem(seed=5, c=9)
  bad = labels.copy()
  bad[2] = 9
  loss, _ = jax.jit(margin.classification_loss)(
      _f32(emb), jnp.asarray(bad), _f32(kernel), _f32(scaler)
  )
  assert np.isnan(loss)
  bad[2] = -1
  loss, _ = margin.classification_loss(
      _f32(emb), jnp.asarray(bad), _f32(kernel), _f32(scaler)
  )
  assert np.isnan(loss)
  with pytest.raises(TypeError):
    margin.classification_loss(
        _f32(emb), _f32(labels), _f32(kernel), _f32(scaler)
    )


def test_update_before_use_switch():
  emb, kernel, labels, _ = _problem(seed=6)
  norms = _f32(np.linspace(5, 25, 12))
  stats = quality_lib.init_quality_stats(20.0, 100.0)
  kwargs = dict(s=64.0, m=0.4, h=0.333, alpha=0.5, eps=1e-3, b=0.0)
  _, new_a, scaler_after = margin.adaface_loss(
      _f32(emb), norms, jnp.asarray(labels), _f32(kernel), stats, **kwargs
  )
  _, new_b, scaler_before = margin.adaface_loss(
      _f32(emb),
      norms,
      jnp.asarray(labels),
      _f32(kernel),
      stats,
      update_before_use=False,
      **kwargs
  )
  np.testing.assert_allclose(new_a.mean, new_b.mean)
  np.testing.assert_allclose(
      scaler_after, quality_lib.margin_scaler(norms, new_a)
  )
  np.testing.assert_allclose(
      scaler_before, quality_lib.margin_scaler(norms, stats)
  )


def test_single_norm_is_rejected():
  with pytest.raises(ValueError):
    quality_lib.update_quality_stats(
        quality_lib.init_quality_stats(), jnp.ones((1,))
    )
