"""Tests of the proxy-updated ring-buffer queue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import load_case, reference_cases
from qgjt_jax.method import queue_buffer as qlib

RTOL, ATOL = 1e-4, 1e-5


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def _sorted_rows(*columns):
  """Rows [label, columns...] sorted lexicographically, to match as sets."""
  rows = np.concatenate(
      [np.asarray(c, np.float64).reshape(len(c), -1) for c in columns], axis=1
  )
  return rows[np.lexsort(rows.T[::-1])]


def _from_newest_first(capacity, embeds, labels, proxies):
  """A queue holding the reference's newest-first rows: one reversed write
  of the whole list puts its first row newest."""
  queue = qlib.init_queue(capacity, embeds.shape[1])
  if embeds.shape[0] == 0:
    return queue
  return qlib.enqueue(queue, embeds, labels, proxies)


@pytest.mark.parametrize('name', reference_cases('queue_proxy'))
def test_enqueue_and_proxy_update_match_reference(reference_dir, name):
  settings, inputs, outputs = load_case(reference_dir, name)
  capacity = settings['queue_size']
  assert inputs['queue_embeds'].shape[0] == settings['filled_before']
  # The reference's buffers are newest first and may be only partly filled.
  queue = _from_newest_first(
      capacity,
      _f32(inputs['queue_embeds']),
      jnp.asarray(inputs['queue_labels']),
      _f32(inputs['queue_proxies']),
  )
  kernel = _f32(inputs['kernel'])

  @jax.jit
  def step(queue, keys, labels, kernel):
    # The reference stores the current (unnormalised) class columns.
    proxies = qlib.class_proxies(kernel, labels)
    queue = qlib.enqueue(queue, keys, labels, proxies)
    return queue, qlib.proxy_update(queue, kernel)

  queue, negatives = step(
      queue, _f32(inputs['keys']), jnp.asarray(inputs['labels']), kernel
  )

  filled = outputs['queue_labels'].shape[0]
  assert int(queue.count) == filled
  valid = np.asarray(qlib.valid_mask(queue))
  assert valid.sum() == filled
  np.testing.assert_array_equal(negatives[~valid], 0.0)
  got = _sorted_rows(
      queue.labels[valid],
      queue.embeds[valid],
      queue.proxies[valid],
      negatives[valid],
  )
  want = _sorted_rows(
      outputs['queue_labels'],
      outputs['queue_embeds'],
      outputs['queue_proxies'],
      outputs['queue_for_loss'],
  )
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

  # Reading the ring newest first gives the reference's list itself.
  order = np.asarray(qlib.newest_first_order(queue))[:filled]
  np.testing.assert_array_equal(
      np.asarray(queue.labels)[order], outputs['queue_labels']
  )
  np.testing.assert_allclose(
      np.asarray(negatives)[order],
      outputs['queue_for_loss'],
      rtol=RTOL,
      atol=ATOL,
  )


def _reference_list(batches, capacity):
  """The reference's prepend-and-truncate queue after `batches`."""
  rows = []
  for batch in batches:
    rows = list(batch) + rows
    rows = rows[:capacity]
  return rows


@pytest.mark.parametrize('capacity,num', [(10, 3), (7, 7), (5, 4), (6, 1)])
def test_ring_keeps_the_reference_rows_when_n_does_not_divide_k(capacity, num):
  dim = 2
  enqueue = jax.jit(qlib.enqueue)
  queue = qlib.init_queue(capacity, dim)
  batches = []
  for step in range(6):
    ids = np.arange(step * num, (step + 1) * num)
    batches.append(ids)
    keys = np.stack([ids, -ids], axis=1).astype(np.float32)
    queue = enqueue(queue, keys, jnp.asarray(ids, jnp.int32), 2 * keys)
    want = _reference_list(batches, capacity)
    assert int(queue.count) == len(want)
    order = np.asarray(qlib.newest_first_order(queue))[: len(want)]
    np.testing.assert_array_equal(np.asarray(queue.labels)[order], want)
    np.testing.assert_array_equal(np.asarray(queue.embeds)[order, 0], want)
    np.testing.assert_array_equal(
        np.asarray(queue.proxies)[order, 1], -2 * np.asarray(want)
    )
    assert np.asarray(qlib.valid_mask(queue)).sum() == len(want)


def test_enqueue_rejects_more_rows_than_capacity():
  queue = qlib.init_queue(4, 3)
  with pytest.raises(ValueError):
    qlib.enqueue(
        queue, jnp.zeros((5, 3)), jnp.zeros((5,), jnp.int32), jnp.zeros((5, 3))
    )
  with pytest.raises(ValueError):
    qlib.enqueue(
        queue, jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 4))
    )


def test_proxy_update_formula_and_guards():
  rng = np.random.default_rng(0)
  dim, classes = 5, 4
  kernel_old = rng.normal(size=(dim, classes))
  kernel_new = kernel_old + 0.1 * rng.normal(size=(dim, classes))
  labels = np.array([0, 3, 1])
  keys = rng.normal(size=(3, dim)) * 3
  proxies = kernel_old.T[labels]
  proxies[2] = 0.0  # an all-zero stored proxy must not give NaN
  queue = qlib.enqueue(
      qlib.init_queue(6, dim),
      _f32(keys),
      jnp.asarray(labels, jnp.int32),
      _f32(proxies),
  )
  out = np.asarray(jax.jit(qlib.proxy_update)(queue, _f32(kernel_new)))
  assert np.isfinite(out).all()
  valid = np.asarray(qlib.valid_mask(queue))
  np.testing.assert_array_equal(out[~valid], 0.0)
  np.testing.assert_array_equal(qlib.realtime_negatives(queue)[~valid], 0.0)
  order = np.asarray(qlib.newest_first_order(queue))[:3]
  expected = keys[:2] + (
      np.linalg.norm(keys[:2], axis=1, keepdims=True)
      / np.linalg.norm(proxies[:2], axis=1, keepdims=True)
  ) * (kernel_new.T[labels[:2]] - proxies[:2])
  np.testing.assert_allclose(out[order[:2]], expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out[order[2]], keys[2], rtol=RTOL, atol=ATOL)
  # Unchanged W: the negatives are the stored keys.
  same = qlib.proxy_update(queue, _f32(kernel_old))
  np.testing.assert_allclose(
      np.asarray(same)[order[:2]], keys[:2], rtol=RTOL, atol=ATOL
  )


def test_no_gradient_flows_through_the_queue():
  rng = np.random.default_rng(1)
  kernel = _f32(rng.normal(size=(4, 3)))
  keys = _f32(rng.normal(size=(2, 4)))
  labels = jnp.array([0, 2], jnp.int32)

  def fn(keys, kernel):
    queue = qlib.enqueue(
        qlib.init_queue(5, 4), keys, labels, qlib.class_proxies(kernel, labels)
    )
    return jnp.sum(qlib.proxy_update(queue, 2 * kernel)) + jnp.sum(
        qlib.realtime_negatives(queue)
    )

  g_keys, g_kernel = jax.grad(fn, argnums=(0, 1))(keys, kernel)
  np.testing.assert_array_equal(g_keys, 0.0)
  np.testing.assert_array_equal(g_kernel, 0.0)


def test_class_proxies_are_unnormalised_columns():
  kernel = np.arange(12, dtype=np.float32).reshape(3, 4)
  got = qlib.class_proxies(jnp.asarray(kernel), jnp.array([3, 0, 3]))
  np.testing.assert_array_equal(got, kernel[:, [3, 0, 3]].T)
  # An out-of-range label must not silently pick another class.
  assert np.isnan(qlib.class_proxies(jnp.asarray(kernel), jnp.array([4]))).all()


def test_state_is_a_pytree_with_fixed_shapes():
  queue = qlib.init_queue(8, 3)
  leaves = jax.tree_util.tree_leaves(queue)
  assert len(leaves) == 5
  assert queue.labels.dtype == jnp.int32 and queue.embeds.dtype == jnp.float32
  after = jax.jit(qlib.enqueue)(
      queue,
      jnp.ones((3, 3), jnp.bfloat16),
      jnp.zeros((3,), jnp.int32),
      jnp.ones((3, 3)),
  )
  assert jax.tree_util.tree_map(
      lambda x: (x.shape, x.dtype), after
  ) == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), queue)


def test_last_slots_are_where_the_last_batch_went():
  queue = qlib.init_queue(7, 2)
  for start in (0, 5):  # the second batch wraps around the end
    keys = np.arange(start, start + 5, dtype=np.float32)[:, None].repeat(2, 1)
    queue = qlib.enqueue(queue, keys, np.arange(5), np.zeros((5, 2)))
    slots = np.asarray(qlib.last_slots(queue, 5))
    np.testing.assert_array_equal(
        np.asarray(queue.embeds)[slots, 0], keys[:, 0]
    )


def test_keep_newest_evicts_for_good_as_the_reference_truncation():
  """The reference keeps `list[:size]` of its newest-first queue each step:
  rows past the size are gone, also when the size grows later."""
  reference = []  # newest first
  queue = qlib.init_queue(12, 1)
  rng = np.random.default_rng(0)
  for size in (3, 5, 5, 9, 12, 12):
    keys = rng.normal(size=(2, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 2)
    reference = ([(k[0], l) for k, l in zip(keys, labels)] + reference)[:size]
    queue = qlib.enqueue(queue, keys, labels, np.zeros((2, 1)))
    queue = qlib.keep_newest(queue, jnp.int32(size))
    order = np.asarray(qlib.newest_first_order(queue))
    valid = np.asarray(qlib.valid_mask(queue))[order]
    got = [
        (float(queue.embeds[i, 0]), int(queue.labels[i]))
        for i, v in zip(order, valid)
        if v
    ]
    assert got == [(float(k), int(l)) for k, l in reference], size
    assert int(queue.count) == len(reference)
