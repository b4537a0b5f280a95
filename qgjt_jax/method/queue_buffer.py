"""The proxy-updated real-time queue of negatives (docs/METHOD.md section 5).

A fixed-shape, device-resident ring buffer of detached embeddings, their
labels and the class proxy w_y (column y of the unnormalised classifier W) at
the time they were enqueued. Every function is pure and jit-able; the queue is
part of the train state.

The reference prepends each batch and truncates to K rows ("newest first").
Here a batch of N rows is written *reversed* at the write pointer, so reading
the ring backwards from the pointer (`newest_first_order`) reproduces the
reference's list exactly, including which rows of a partly evicted batch
survive when N does not divide K. The losses do not depend on the row order,
but this keeps checkpoints and debugging comparable with the reference.

The reference computes the corrected negatives under `no_grad` with the
current W (after this step's forward, before its update), so the newest rows
get a zero correction and no gradient reaches W or the encoder through the
queue: every output here is detached.
"""

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class QueueState:
  """Ring buffer of K slots; empty slots hold zeros and label -1."""

  embeds: jax.Array  # (K, D) float32
  labels: jax.Array  # (K,) int32, -1 where empty
  proxies: jax.Array  # (K, D) float32, class proxy w_y at enqueue time
  count: jax.Array  # int32 scalar, filled rows (<= K)
  ptr: jax.Array  # int32 scalar, next write position

  @property
  def capacity(self) -> int:
    return self.embeds.shape[0]


def init_queue(capacity: int, dim: int) -> QueueState:
  """An empty queue of `capacity` slots of dimension `dim`."""
  if capacity < 1 or dim < 1:
    raise ValueError(
        f'capacity and dim must be positive, got {capacity}, {dim}'
    )
  return QueueState(
      embeds=jnp.zeros((capacity, dim), jnp.float32),
      labels=jnp.full((capacity,), -1, jnp.int32),
      proxies=jnp.zeros((capacity, dim), jnp.float32),
      count=jnp.zeros((), jnp.int32),
      ptr=jnp.zeros((), jnp.int32),
  )


def class_proxies(kernel: jax.Array, labels: jax.Array) -> jax.Array:
  """(N, D) class proxies: columns `labels` of the unnormalised W (D, C)."""
  kernel = jax.lax.stop_gradient(jnp.asarray(kernel, jnp.float32))
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'labels must be integers, got {labels.dtype}')
  # Out-of-range labels would silently wrap or clamp; make them NaN instead.
  return jnp.take(kernel.T, labels, axis=0, mode='fill', fill_value=jnp.nan)


def enqueue(
    queue: QueueState, keys: jax.Array, labels: jax.Array, proxies: jax.Array
) -> QueueState:
  """Writes N <= K rows, evicting the oldest ones once the queue is full.

  Args:
    queue: the queue before this step.
    keys: (N, D) embeddings (detached here).
    labels: (N,) class ids.
    proxies: (N, D) class proxies of `labels` now, see `class_proxies`.

  Returns:
    The queue after the write.
  """
  capacity, dim = queue.embeds.shape
  keys = jnp.asarray(keys)
  num = keys.shape[0]
  if keys.ndim != 2 or keys.shape[1] != dim:
    raise ValueError(f'keys must be (N, {dim}), got {keys.shape}')
  if num > capacity:
    raise ValueError(f'cannot enqueue {num} rows into a queue of {capacity}')
  if jnp.shape(labels) != (num,) or jnp.shape(proxies) != (num, dim):
    raise ValueError(
        f'labels {jnp.shape(labels)} / proxies '
        f'{jnp.shape(proxies)} do not match keys {keys.shape}'
    )
  keys = jax.lax.stop_gradient(keys.astype(jnp.float32))
  proxies = jax.lax.stop_gradient(jnp.asarray(proxies, jnp.float32))
  labels = jnp.asarray(labels, jnp.int32)
  # Row i goes to ptr + N - 1 - i: the batch's first row is the newest, as in
  # the reference's prepend. N <= K keeps the slots distinct.
  slots = (queue.ptr + num - 1 - jnp.arange(num, dtype=jnp.int32)) % capacity
  return QueueState(
      embeds=queue.embeds.at[slots].set(keys, unique_indices=True),
      labels=queue.labels.at[slots].set(labels, unique_indices=True),
      proxies=queue.proxies.at[slots].set(proxies, unique_indices=True),
      count=jnp.minimum(queue.count + num, capacity).astype(jnp.int32),
      ptr=((queue.ptr + num) % capacity).astype(jnp.int32),
  )


def valid_mask(queue: QueueState) -> jax.Array:
  """(K,) bool, True on filled slots.

  Decided by the label, so rows enqueued with a negative label (batch padding)
  count as empty too; `count` only tracks how many rows were written.
  """
  return queue.labels >= 0


def newest_first_order(queue: QueueState) -> jax.Array:
  """(K,) slot indices, newest first; the first `count` are the filled ones.

  `queue.embeds[newest_first_order(queue)][:count]` is the reference's queue.
  """
  capacity = queue.capacity
  return (queue.ptr - 1 - jnp.arange(capacity, dtype=jnp.int32)) % capacity


def last_slots(queue: QueueState, num: int) -> jax.Array:
  """(num,) slots of the rows of the last `enqueue` of `num` rows, in row
  order (row i of that batch is at slot ptr - 1 - i)."""
  return (queue.ptr - 1 - jnp.arange(num, dtype=jnp.int32)) % queue.capacity


def keep_newest(queue: QueueState, size: jax.Array) -> QueueState:
  """Evicts every row but the `size` newest (the progressive queue).

  The reference truncates its newest-first list to the current size each
  step, so rows beyond it are gone for good even when the size grows later;
  here they are marked empty (label -1) the same way. `size` may be traced.
  """
  age = (queue.ptr - 1 - jnp.arange(queue.capacity, dtype=jnp.int32)) % (
      queue.capacity
  )
  keep = age < size
  return queue.replace(
      labels=jnp.where(keep, queue.labels, -1),
      count=jnp.minimum(queue.count, size).astype(jnp.int32),
  )


def realtime_negatives(queue: QueueState) -> jax.Array:
  """(K, D) stored embeddings without correction ("realtime" variant)."""
  return jax.lax.stop_gradient(queue.embeds)


def proxy_update(queue: QueueState, kernel: jax.Array) -> jax.Array:
  """(K, D) negatives e~_j = e_j + |e_j| / |w_old_j| (W[:, y_j] - w_old_j).

  Not re-normalised, as in the reference. Empty slots come out as zeros, and a
  stored all-zero proxy gives no correction instead of a NaN.
  """
  kernel = jax.lax.stop_gradient(jnp.asarray(kernel, jnp.float32))
  valid = valid_mask(queue)
  # Empty slots carry label -1, which would index the last column; a label
  # >= C (a bug upstream) becomes NaN rather than another class's proxy.
  current = jnp.take(
      kernel.T,
      jnp.where(valid, queue.labels, 0),
      axis=0,
      mode='fill',
      fill_value=jnp.nan,
  )
  return corrected_negatives(queue, current)


def sharded_class_proxies(
    kernel_block: jax.Array, labels: jax.Array, *, axis_name, num_classes: int
) -> jax.Array:
  """`class_proxies` with W's class axis split over `axis_name`.

  Call inside `shard_map`, with the same labels on every device of the axis.
  Each device copies the columns it holds (zeros elsewhere) and one (N, D)
  sum over the axis assembles the rows, so W is never gathered. Labels
  outside [0, num_classes) give NaN rows, as in `class_proxies`.
  """
  kernel_block = jax.lax.stop_gradient(jnp.asarray(kernel_block, jnp.float32))
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'labels must be integers, got {labels.dtype}')
  num_local = kernel_block.shape[1]
  local = labels.astype(jnp.int32) - jax.lax.axis_index(axis_name) * num_local
  in_block = (local >= 0) & (local < num_local)
  cols = jnp.take(kernel_block.T, jnp.where(in_block, local, 0), axis=0)
  proxies = jax.lax.psum(jnp.where(in_block[:, None], cols, 0.0), axis_name)
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid[:, None], proxies, jnp.nan)


def corrected_negatives(queue: QueueState, current: jax.Array) -> jax.Array:
  """`proxy_update` given the current proxies W[:, y_j] of the queue's rows.

  `current` is (K, D), e.g. `sharded_class_proxies` of the queue's labels
  with empty slots (-1) mapped to class 0; empty slots come out as zeros.
  """
  current = jax.lax.stop_gradient(jnp.asarray(current, jnp.float32))
  valid = valid_mask(queue)
  embed_norm = jnp.linalg.norm(queue.embeds, axis=1, keepdims=True)
  proxy_norm = jnp.linalg.norm(queue.proxies, axis=1, keepdims=True)
  has_proxy = proxy_norm > 0
  ratio = jnp.where(
      has_proxy, embed_norm / jnp.where(has_proxy, proxy_norm, 1.0), 0.0
  )
  corrected = queue.embeds + ratio * (current - queue.proxies)
  return jax.lax.stop_gradient(jnp.where(valid[:, None], corrected, 0.0))
