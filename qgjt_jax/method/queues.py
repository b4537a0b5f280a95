"""Queue variants: how a step encodes the two views, what it enqueues and
which negatives the contrastive loss sees (docs/METHOD.md section 5).

A variant is one registered class. The config checks (`config.queue.kind`
and the capacity a step needs), the train state (the state a variant adds),
the step and the checkpoints' compatibility check all ask the registry, so
adding a variant is writing its class:

  @queues.register
  class MyQueue(queues.RealtimeQueue):
    name = "mine"
    def negatives(self, ctx, queue, keys, labels, kernel, step): ...

The hooks, in the order a step calls them (see step.py):
  init_state   the state the variant adds to the train state (None: none)
  prepare      work outside the gradient, before the loss (MoCo's keys)
  encode       the online encoder on the views -> `Views`
  negatives    enqueue this step's keys; the queue and the negatives
  next_state   the variant's state after the step
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Optional

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qgjt_jax import parallel
from qgjt_jax.method import encoder
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.method import queue_buffer

_VARIANTS: dict[str, type["QueueVariant"]] = {}


def register(cls: type["QueueVariant"]) -> type["QueueVariant"]:
  """Class decorator: makes `cls` the variant `config.queue.kind=cls.name`."""
  _VARIANTS[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(_VARIANTS)


def get(name: str) -> "QueueVariant":
  if name not in _VARIANTS:
    raise ValueError(f"queue kind {name!r}; registered: {names()}")
  return _VARIANTS[name]()


@dataclasses.dataclass(frozen=True)
class Views:
  """What the online encoder made of a batch, for the losses.

  The classifier scores `online`'s rows with `labels`; the contrastive loss
  pairs q with k (B rows each, with their gate scalers); `keys` (with
  `key_labels`) are enqueued. `by_view` maps "clean"/"degraded" to the
  (norms, gate scaler) of each view, for the step's metrics;
  `truly_degraded` marks the degraded view's rows that the recipe did
  degrade (resolution factor below 1), when the online encoder saw that
  view (None otherwise: `quality_auc` then is not measured).
  """

  online: encoder.Encoding
  labels: jax.Array
  q: jax.Array
  k: jax.Array
  q_scaler: jax.Array
  k_scaler: jax.Array
  keys: jax.Array
  key_labels: jax.Array
  by_view: dict[str, tuple[jax.Array, jax.Array]]
  truly_degraded: jax.Array | None = None


class QueueVariant:
  """The base: no extra state, nothing outside the gradient."""

  name: ClassVar[str]
  contrastive: ClassVar[bool] = True  # False: no contrastive loss at all

  def keys_per_step(self, batch_size: int) -> int:
    return 2 * batch_size

  def init_state(
      self, params: Any, batch_stats: Any, stats: quality_lib.QualityStats
  ) -> Any:
    return None

  def prepare(self, ctx, state, batch, rngs) -> Any:
    return None

  def next_state(self, ctx, state, prepared) -> Any:
    return state.variant_state

  def encode(self, ctx, state, batch, rngs, params, prepared) -> Views:
    """Both views through the online encoder (2B images); q = degraded,
    k = clean; all 2B embeddings are the keys."""
    labels = batch["label"].astype(jnp.int32)
    b = labels.shape[0]
    online = encoder.encode(
        ctx,
        params["backbone"],
        state.batch_stats,
        state.quality,
        jnp.concatenate([batch["image_h"], batch["image_l"]]),
        jnp.concatenate([batch["degrade_h"], batch["degrade_l"]]),
        rngs["dropout"],
    )
    emb, gate = online.embeddings, online.gate_scaler
    labels2 = jnp.concatenate([labels, labels])
    return Views(
        online,
        labels2,
        q=emb[b:],
        k=emb[:b],
        q_scaler=gate[b:],
        k_scaler=gate[:b],
        keys=emb,
        key_labels=labels2,
        by_view={
            "clean": (online.norms[:b], gate[:b]),
            "degraded": (online.norms[b:], gate[b:]),
        },
        truly_degraded=batch["degrade_l"] < 1.0,
    )

  def negatives(
      self, ctx, queue, keys, labels, kernel, step
  ) -> tuple[queue_buffer.QueueState, jax.Array]:
    """Enqueues the keys (detached) with their class proxies; the stored
    rows as they are are the negatives."""
    queue = _enqueue(ctx, queue, keys, labels, kernel, step)
    return queue, queue_buffer.realtime_negatives(queue)


@register
class RealtimeQueue(QueueVariant):
  """The live encoder's own features, used as stored."""

  name = "realtime"


@register
class ProxyQueue(RealtimeQueue):
  """QGFace's queue: each stored row corrected by how far its class proxy
  has moved since it was enqueued."""

  name = "proxy"

  def negatives(self, ctx, queue, keys, labels, kernel, step):
    queue = _enqueue(ctx, queue, keys, labels, kernel, step)
    # Empty slots (label -1) look up class 0; their rows are zeroed.
    current = class_proxies(
        ctx.mesh,
        jax.lax.stop_gradient(kernel),
        jnp.where(queue_buffer.valid_mask(queue), queue.labels, 0),
        ctx.num_classes,
    )
    return queue, queue_buffer.corrected_negatives(queue, current)


@register
class NoQueue(QueueVariant):
  """No queue and no contrastive loss: AdaFace on both views."""

  name = "none"
  contrastive = False

  def keys_per_step(self, batch_size: int) -> int:
    return 0


@flax.struct.dataclass
class MomentumEncoder:
  """The key encoder of the "moco" queue, as the authors keep it.

  `params` ({'backbone', 'classifier'}) follow the online ones by momentum;
  `batch_stats` are its own, from its train-mode forward passes on the
  degraded views; `quality` are its head's own feature-norm statistics.
  """

  params: Any
  batch_stats: Any
  quality: quality_lib.QualityStats


@register
class MocoQueue(QueueVariant):
  """A momentum copy encodes the degraded view into B keys; the online
  encoder sees the clean view only (the classifier's input)."""

  name = "moco"

  def keys_per_step(self, batch_size: int) -> int:
    return batch_size

  def init_state(self, params, batch_stats, stats) -> MomentumEncoder:
    return MomentumEncoder(
        params=params, batch_stats=batch_stats, quality=stats
    )  # a copy of the online encoder

  def prepare(self, ctx, state, batch, rngs) -> tuple[encoder.Encoding, Any]:
    """The momentum encoder (train mode) on the degraded view: the keys,
    and the encoder with its own statistics moved."""
    moco = state.variant_state
    keys = encoder.encode(
        ctx,
        moco.params["backbone"],
        moco.batch_stats,
        moco.quality,
        batch["image_l"],
        batch["degrade_l"],
        rngs["moco_dropout"],
    )
    return keys, moco.replace(
        batch_stats=keys.batch_stats, quality=keys.quality
    )

  def next_state(self, ctx, state, prepared) -> MomentumEncoder:
    """The authors' key-encoder update, after the keys and before the
    optimiser step, from this step's online weights: parameters only."""
    _, moco = prepared
    momentum = ctx.settings.queue.moco_momentum
    return moco.replace(
        params=jax.tree.map(
            lambda k, q: momentum * k + (1.0 - momentum) * q,
            moco.params,
            jax.lax.stop_gradient(state.params),
        )
    )

  def encode(self, ctx, state, batch, rngs, params, prepared) -> Views:
    labels = batch["label"].astype(jnp.int32)
    online = encoder.encode(
        ctx,
        params["backbone"],
        state.batch_stats,
        state.quality,
        batch["image_h"],
        batch["degrade_h"],
        rngs["dropout"],
    )
    keys, _ = prepared
    k = jax.lax.stop_gradient(keys.embeddings)
    return Views(
        online,
        labels,
        q=online.embeddings,
        k=k,
        q_scaler=online.gate_scaler,
        k_scaler=keys.gate_scaler,
        keys=k,
        key_labels=labels,
        by_view={
            "clean": (online.norms, online.gate_scaler),
            "degraded": (keys.norms, keys.gate_scaler),
        },
    )


# ---------------------------------------------------------------------------
# What the variants share: the class proxies of W (split over `model`) and
# the enqueue with the progressive schedule.


def class_proxies(
    mesh, kernel: jax.Array, labels: jax.Array, num_classes: int
) -> jax.Array:
  """(N, D) columns `labels` of W (split over `model`), replicated."""
  fn = jax.shard_map(
      functools.partial(
          queue_buffer.sharded_class_proxies,
          axis_name=parallel.MODEL_AXIS,
          num_classes=num_classes,
      ),
      mesh=mesh,
      in_specs=(P(None, parallel.MODEL_AXIS), P()),
      out_specs=P(),
  )
  return fn(kernel, labels)


def queue_size(settings, step: jax.Array) -> jax.Array:
  """Rows the progressive queue keeps at `step` (the authors' schedule).

  It holds global_batch_size rows until the contrastive loss joins, then
  grows by an equal step each epoch towards the capacity, which the epoch
  after the last would reach.
  """
  epoch = jnp.floor(step / settings.steps_per_epoch)
  joined = max(settings.contrastive.start_epoch - 1.0, 0.0)  # apply epoch
  apply_epoch = jnp.minimum(epoch, joined)
  capacity = settings.queue.capacity
  growth = (capacity - settings.global_batch_size) / jnp.maximum(
      settings.num_epochs - apply_epoch, 1.0
  )
  size = growth * (epoch - apply_epoch) + settings.global_batch_size
  return jnp.minimum(size.astype(jnp.int32), capacity)


def _enqueue(
    ctx, queue, keys, labels, kernel, step: Optional[jax.Array]
) -> queue_buffer.QueueState:
  """This step's keys, detached, with the current columns of W."""
  kernel = jax.lax.stop_gradient(kernel)
  queue = queue_buffer.enqueue(
      queue,
      jax.lax.stop_gradient(keys),
      labels,
      class_proxies(ctx.mesh, kernel, labels, ctx.num_classes),
  )
  if ctx.settings.queue.progressive:
    queue = queue_buffer.keep_newest(queue, queue_size(ctx.settings, step))
  return queue
