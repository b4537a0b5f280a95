"""The pure QGFace train step.

`train_step(state, batch) -> (state, metrics)` is all of METHOD.md for one
global batch; `make_train_step` jits it once with explicit shardings, and
everything it changes is in the state. Every config value it reads is read
once, outside the trace, into `StepSettings`. (The evaluation forward pass
is `evaluate.make_embed_fn`.)

One step, as the authors' `FaceModel.training_step`:
* "proxy" / "realtime" / "none" queues: the backbone encodes both views (2B
  images); the quality statistics are updated over all of them; the gated
  margin classifier scores all 2B; the 2B keys, labels and class proxies are
  enqueued; the contrastive loss pairs the degraded view q with the clean
  view k against the (proxy-updated) queue.
* "moco": the backbone encodes the clean view only (B images, the margin
  classifier's input); the momentum encoder, in train mode with its own
  BatchNorm and norm statistics, encodes the degraded view into the keys k;
  the momentum weights follow the online ones before the optimiser step;
  the B keys are enqueued; the contrastive loss pairs q (online, clean) with
  k (momentum, degraded).

Layout (see parallel.py): the backbone is data-parallel over every device; the
classifier W is split over the mesh's `model` axis. The two places that touch
W by class, the margin softmax and the proxy lookup of the queue, run under an
explicit `shard_map` rather than being left to GSPMD's propagation:

* each device scores its rows against its own block of classes and only
  per-row numbers (target cosine, max, sum of exponentials) cross devices,
  as in insightface's PartialFC; the proxy lookup copies the columns a device
  holds and sums over `model`. W and the (2B, C) logits are never gathered,
  whatever the compiler version decides (tests/test_sharding.py reads the
  compiled HLO to check);
* PartialFC's negative sampling is a per-block top-k, which under GSPMD
  would gather the sharded class axis;
* on one device the same code runs with no collectives at all.

Speed notes (each keeps the float32 path's numerics):
* images travel as uint8 and are normalised on the device, straight into the
  compute dtype (the model casts them anyway), NHWC throughout;
* the two views are concatenated and pinned to the batch sharding, so XLA does
  not choose a replicated layout for the 2B-image forward pass;
* the optional `head.logits_dtype="bfloat16"` runs the (2B, C) cosine matmul,
  the one large float32 matmul of the step, on tensor cores, with the target
  cosine (which the margin's arccos amplifies) still exact in float32;
* the state is donated, and nothing in the step waits for the host.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qgjt_jax import parallel
from qgjt_jax.method import queue_buffer as queue_lib
from qgjt_jax.method import contrastive
from qgjt_jax.method import heads as margin
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.models.iresnet import normalize_images
from qgjt_jax.state import MomentumEncoder, TrainState

Batch = dict[str, jax.Array]
_DATA, _MODEL = parallel.DATA_AXIS, parallel.MODEL_AXIS


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the step reads of the config (and of the data), read once.

  Hashable and frozen: the step is traced with these as constants.
  """
  compute_dtype: Any
  steps_per_epoch: float
  num_epochs: float
  global_batch_size: int
  # Quality indicator.
  alpha: float
  h: float
  eps: float
  partition: str
  # Margin classifier.
  head: str
  head_s: float
  head_m: float
  head_threshold: float
  sample_rate: Optional[float]
  logits_dtype: Any
  # Contrastive loss.
  contrastive_weight: float
  start_epoch: float
  end_epoch: float
  contrastive_threshold: float
  warmup_epochs: float
  warmup: str
  contrastive_s: float
  contrastive_m: float
  gate: str
  gate_range: str
  pair_quality: str
  positive_margin: str
  mask: str
  rescale: bool
  rescale_reference: int
  coupling: str
  detach_pos: bool
  # Queue.
  queue_kind: str
  queue_capacity: int
  progressive: bool
  moco_momentum: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  steps_per_epoch: float) -> "StepSettings":
    hc, cc, qc, qu = (config.head, config.contrastive, config.quality,
                      config.queue)
    return cls(
        compute_dtype=jnp.dtype(config.model.dtype),
        steps_per_epoch=float(steps_per_epoch),
        num_epochs=float(config.num_epochs),
        global_batch_size=config.global_batch_size,
        alpha=qc.alpha, h=qc.h, eps=qc.eps, partition=qc.partition,
        head=hc.kind, head_s=hc.s, head_m=hc.m, head_threshold=hc.b,
        sample_rate=(None if hc.sample_rate >= 1.0 else float(hc.sample_rate)),
        logits_dtype=jnp.dtype(hc.logits_dtype),
        contrastive_weight=cc.weight, start_epoch=cc.start_epoch,
        end_epoch=cc.end_epoch, contrastive_threshold=cc.b,
        warmup_epochs=cc.b_warmup_epochs, warmup=cc.b_warmup,
        contrastive_s=cc.s, contrastive_m=cc.m, gate=cc.gate,
        gate_range=cc.gate_range, pair_quality=cc.pair_quality,
        positive_margin=cc.margin, mask=cc.mask, rescale=cc.rescale,
        rescale_reference=cc.rescale_reference, coupling=cc.coupling,
        detach_pos=cc.detach_pos,
        queue_kind=qu.kind, queue_capacity=qu.capacity,
        progressive=qu.progressive, moco_momentum=qu.moco_momentum)


# ---------------------------------------------------------------------------
# What the step's schedule says at a given step (all traced).


def thresholds(settings: StepSettings, step: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """(head, contrastive) quality thresholds b at `step`, after warm-up.

  "epoch" is the authors' rule: b x min(1, e / J) with e the whole epoch and
  J = warmup_epochs, one threshold (the contrastive one) for both gates.
  "step" ramps each gate's own b linearly per step.
  """
  head_b, con_b = settings.head_threshold, settings.contrastive_threshold
  if settings.warmup_epochs <= 0:
    return jnp.float32(head_b), jnp.float32(con_b)
  if settings.warmup == "epoch":
    epoch = jnp.floor(step / settings.steps_per_epoch)
    shared = con_b * jnp.minimum(1.0, epoch / settings.warmup_epochs)
    return shared, shared
  ramp = jnp.minimum(1.0, step.astype(jnp.float32) /
                     (settings.warmup_epochs * settings.steps_per_epoch))
  return head_b * ramp, con_b * ramp


def contrastive_weight(settings: StepSettings, step: jax.Array) -> jax.Array:
  """lambda at `step`: nonzero in [start_epoch, end_epoch) (0 = no end)."""
  epoch = step.astype(jnp.float32) / settings.steps_per_epoch
  active = epoch >= settings.start_epoch
  if settings.end_epoch > 0:
    active &= epoch < settings.end_epoch
  return jnp.where(active, settings.contrastive_weight, 0.0)


def queue_size(settings: StepSettings, step: jax.Array) -> jax.Array:
  """Rows the progressive queue keeps at `step` (the authors' schedule).

  It holds global_batch_size rows until the contrastive loss joins, then
  grows by an equal step each epoch towards the capacity, which the epoch
  after the last would reach.
  """
  epoch = jnp.floor(step / settings.steps_per_epoch)
  joined = max(settings.start_epoch - 1.0, 0.0)  # the authors' apply epoch
  apply_epoch = jnp.minimum(epoch, joined)
  growth = ((settings.queue_capacity - settings.global_batch_size) /
            jnp.maximum(settings.num_epochs - apply_epoch, 1.0))
  size = growth * (epoch - apply_epoch) + settings.global_batch_size
  return jnp.minimum(size.astype(jnp.int32), settings.queue_capacity)


# ---------------------------------------------------------------------------
# The pieces of the loss.


def _scaler_from_degradation(factors: jax.Array) -> jax.Array:
  """Quality from the known downscale factor r in (0, 1] (ablation switch).

  q = r, so a = 2r - 1: clean views are fully HQ and a threshold b marks views
  downscaled below b as LQ.
  """
  return 2.0 * jnp.clip(factors.astype(jnp.float32), 0.0, 1.0) - 1.0


def encode(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array,
           dropout_rng: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
  """Train-mode forward: (unit embeddings, norms, new batch_stats), float32."""
  (embeddings, norms), updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True,
      mutable=["batch_stats"], rngs={"dropout": dropout_rng})
  return (embeddings.astype(jnp.float32), norms.astype(jnp.float32),
          updates["batch_stats"])


def read_quality(settings: StepSettings, stats: quality_lib.QualityStats,
                 norms: jax.Array, degradation: jax.Array
                 ) -> tuple[quality_lib.QualityStats, jax.Array, jax.Array]:
  """Running statistics updated over `norms`, then used.

  Returns (new statistics, the margin scaler a_i of the AdaFace margin, the
  scaler whose quality (a + 1) / 2 the gates read): the same unless the
  partition is by known degradation, which swaps the gates' HQ/LQ split and
  leaves the margin on the feature norm.
  """
  stats = quality_lib.update_quality_stats(stats, norms, settings.alpha)
  scaler = quality_lib.margin_scaler(norms, stats, settings.h, settings.eps)
  if settings.partition == "degradation":
    return stats, scaler, _scaler_from_degradation(degradation)
  return stats, scaler, scaler


def classification_loss(mesh: Mesh, settings: StepSettings,
                        embeddings: jax.Array, labels: jax.Array,
                        kernel: jax.Array, scaler: jax.Array,
                        gate_scaler: jax.Array, threshold: jax.Array, *,
                        num_classes: int, positives: jax.Array,
                        rng: Optional[jax.Array]) -> jax.Array:
  """Mean gated margin cross-entropy over N rows, W split over `model`.

  The rows are split over `data` (each `model` group sees its group's rows)
  and W's columns over `model`; see `margin.sharded_classification_loss`.
  Equal to `margin.classification_loss(..., reduction="mean")` on W's first
  `num_classes` columns when there is no class sampling.
  """
  num_rows = embeddings.shape[0]
  sampling = settings.sample_rate is not None

  def per_shard(emb, lab, w, scal, gate_q, thr, pos, key):
    per_example, _ = margin.sharded_classification_loss(
        emb, lab, w, scal, axis_name=_MODEL, num_classes=num_classes,
        head=settings.head, s=settings.head_s, m=settings.head_m,
        eps=settings.eps, b=thr, sample_rate=settings.sample_rate,
        positives=pos, rng=key, logits_dtype=settings.logits_dtype,
        gate_quality=gate_q)
    return jax.lax.psum(jnp.sum(per_example), _DATA) / num_rows

  if not sampling:
    positives = jnp.zeros((1,), jnp.int32)
    rng = jax.random.key(0)
  fn = jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(P(_DATA), P(_DATA), P(None, _MODEL), P(_DATA), P(_DATA), P(),
                P(), P()),
      out_specs=P())
  return fn(embeddings, labels, kernel, scaler,
            quality_lib.quality_from_scaler(gate_scaler),
            jnp.asarray(threshold, jnp.float32), positives, rng)


def class_proxies(mesh: Mesh, kernel: jax.Array, labels: jax.Array,
                  num_classes: int) -> jax.Array:
  """(N, D) columns `labels` of W (split over `model`), replicated."""
  fn = jax.shard_map(
      functools.partial(queue_lib.sharded_class_proxies, axis_name=_MODEL,
                        num_classes=num_classes),
      mesh=mesh, in_specs=(P(None, _MODEL), P()), out_specs=P())
  return fn(kernel, labels)


def enqueue_keys(mesh: Mesh, settings: StepSettings,
                 queue: queue_lib.QueueState, keys: jax.Array,
                 labels: jax.Array, kernel: jax.Array, step: jax.Array, *,
                 num_classes: int
                 ) -> tuple[queue_lib.QueueState, jax.Array]:
  """Enqueues this step's keys; returns the queue and the negatives.

  The class proxies are the current W's columns (no gradient). The "proxy"
  queue corrects every row by its class proxy's movement since it was
  enqueued; "realtime" and "moco" use the stored rows as they are.
  """
  kernel = jax.lax.stop_gradient(kernel)
  proxies_of = functools.partial(class_proxies, mesh, kernel,
                                 num_classes=num_classes)
  queue = queue_lib.enqueue(queue, jax.lax.stop_gradient(keys), labels,
                            proxies_of(labels))
  if settings.progressive:
    queue = queue_lib.keep_newest(queue, queue_size(settings, step))
  if settings.queue_kind != "proxy":
    return queue, queue_lib.realtime_negatives(queue)
  # Empty slots (label -1) look up class 0; their rows are zeroed.
  current = proxies_of(jnp.where(queue_lib.valid_mask(queue), queue.labels,
                                 0))
  return queue, queue_lib.corrected_negatives(queue, current)


def contrastive_term(settings: StepSettings, queue: queue_lib.QueueState,
                     negatives: jax.Array, margin_state, q: jax.Array,
                     k: jax.Array, labels: jax.Array, q_scaler: jax.Array,
                     k_scaler: jax.Array, threshold: jax.Array,
                     copies: int):
  """The contrastive loss of (q, k) pairs against the queue's negatives.

  `copies` is how many of each pair's views this step enqueued (2: k's then
  q's rows; 1: the MoCo keys), for the "own" mask.
  """
  batch_size = labels.shape[0]
  own_slots = queue_lib.last_slots(queue, copies * batch_size).reshape(
      copies, batch_size).T
  return contrastive.contrastive_loss(
      q, k, labels, negatives, queue.labels, queue_lib.valid_mask(queue),
      q_scaler, k_scaler, margin_state, s=settings.contrastive_s,
      m=settings.contrastive_m, b=threshold, alpha=settings.alpha,
      gate=settings.gate, gate_range=settings.gate_range,
      pair_quality=settings.pair_quality, margin=settings.positive_margin,
      mask=settings.mask, rescale=settings.rescale,
      rescale_reference=settings.rescale_reference,
      coupling=settings.coupling, detach_pos=settings.detach_pos,
      own_slots=own_slots)


# ---------------------------------------------------------------------------
# The two shapes of the step's loss.


@dataclasses.dataclass(frozen=True)
class _StepContext:
  """What one step's loss functions share (constants of the trace)."""
  model: nn.Module
  mesh: Mesh
  settings: StepSettings
  num_classes: int


def _shard_batch(mesh: Mesh, images: jax.Array, dtype: Any) -> jax.Array:
  images = jax.lax.with_sharding_constraint(
      images, NamedSharding(mesh, P(parallel.BATCH_AXES)))
  return normalize_images(images, dtype)


def _two_view_loss(ctx: _StepContext, state: TrainState, batch: Batch,
                   rngs: dict[str, Any], schedule: dict[str, jax.Array],
                   params: Any):
  """Loss of the "proxy", "realtime" and "none" queues: both views online."""
  settings = ctx.settings
  labels = batch["label"].astype(jnp.int32)
  batch_size = labels.shape[0]
  labels2 = jnp.concatenate([labels, labels])
  images = _shard_batch(ctx.mesh, jnp.concatenate(
      [batch["image_h"], batch["image_l"]]), settings.compute_dtype)
  embeddings, norms, batch_stats = encode(
      ctx.model, params["backbone"], state.batch_stats, images,
      rngs["dropout"])
  degradation = jnp.concatenate([batch["degrade_h"], batch["degrade_l"]])
  quality, scaler, gate_scaler = read_quality(settings, state.quality, norms,
                                              degradation)
  kernel = params["classifier"]["kernel"]
  loss_cls = classification_loss(
      ctx.mesh, settings, embeddings, labels2, kernel, scaler, gate_scaler,
      schedule["head_b"], num_classes=ctx.num_classes, positives=labels,
      rng=rngs.get("sample"))
  new = {"batch_stats": batch_stats, "quality": quality,
         "queue": state.queue, "margin": state.margin}
  loss_con, con_aux = jnp.zeros((), jnp.float32), {}
  if settings.queue_kind != "none":
    queue, negatives = enqueue_keys(ctx.mesh, settings, state.queue,
                                    embeddings, labels2, kernel, state.step,
                                    num_classes=ctx.num_classes)
    loss_con, new["margin"], con_aux = contrastive_term(
        settings, queue, negatives, state.margin, q=embeddings[batch_size:],
        k=embeddings[:batch_size], labels=labels,
        q_scaler=gate_scaler[batch_size:], k_scaler=gate_scaler[:batch_size],
        threshold=schedule["con_b"], copies=2)
    new["queue"] = queue
  loss = loss_cls + schedule["con_weight"] * loss_con
  views = {"clean": (norms[:batch_size], gate_scaler[:batch_size]),
           "degraded": (norms[batch_size:], gate_scaler[batch_size:])}
  return loss, (new, _loss_metrics(loss, loss_cls, loss_con, con_aux, views,
                                   quality, schedule))


def _moco_keys(ctx: _StepContext, state: TrainState, batch: Batch,
               dropout_rng: jax.Array):
  """The momentum encoder (train mode) on the degraded view: the keys."""
  settings, moco = ctx.settings, state.moco
  images = _shard_batch(ctx.mesh, batch["image_l"], settings.compute_dtype)
  keys, norms, batch_stats = encode(ctx.model, moco.params["backbone"],
                                    moco.batch_stats, images, dropout_rng)
  quality, _, gate_scaler = read_quality(settings, moco.quality, norms,
                                         batch["degrade_l"])
  return (jax.lax.stop_gradient(keys), norms, gate_scaler,
          moco.replace(batch_stats=batch_stats, quality=quality))


def _moco_loss(ctx: _StepContext, state: TrainState, batch: Batch,
               rngs: dict[str, Any], schedule: dict[str, jax.Array],
               keys: tuple, params: Any):
  """Loss of the "moco" queue: the online encoder on the clean view only."""
  settings = ctx.settings
  k, k_norms, k_scaler, _ = keys
  labels = batch["label"].astype(jnp.int32)
  images = _shard_batch(ctx.mesh, batch["image_h"], settings.compute_dtype)
  q, norms, batch_stats = encode(ctx.model, params["backbone"],
                                 state.batch_stats, images, rngs["dropout"])
  quality, scaler, gate_scaler = read_quality(settings, state.quality, norms,
                                              batch["degrade_h"])
  kernel = params["classifier"]["kernel"]
  loss_cls = classification_loss(
      ctx.mesh, settings, q, labels, kernel, scaler, gate_scaler,
      schedule["head_b"], num_classes=ctx.num_classes, positives=labels,
      rng=rngs.get("sample"))
  queue, negatives = enqueue_keys(ctx.mesh, settings, state.queue, k, labels,
                                  kernel, state.step,
                                  num_classes=ctx.num_classes)
  loss_con, margin_state, con_aux = contrastive_term(
      settings, queue, negatives, state.margin, q=q, k=k, labels=labels,
      q_scaler=gate_scaler, k_scaler=k_scaler, threshold=schedule["con_b"],
      copies=1)
  loss = loss_cls + schedule["con_weight"] * loss_con
  new = {"batch_stats": batch_stats, "quality": quality, "queue": queue,
         "margin": margin_state}
  views = {"clean": (norms, gate_scaler), "degraded": (k_norms, k_scaler)}
  return loss, (new, _loss_metrics(loss, loss_cls, loss_con, con_aux, views,
                                   quality, schedule))


def _loss_metrics(loss, loss_cls, loss_con, con_aux, views, quality,
                  schedule) -> dict[str, jax.Array]:
  """Scalars of the step. `views` maps "clean"/"degraded" to (norms, the
  gates' scaler) of each view's encoded images."""
  hq = lambda scaler: (quality_lib.quality_from_scaler(scaler) >=
                       schedule["head_b"]).astype(jnp.float32)
  norms = jnp.concatenate([n for n, _ in views.values()])
  metrics = {
      "loss": loss, "loss_cls": loss_cls, "loss_con": loss_con,
      "hq_fraction": jnp.mean(jnp.concatenate(
          [hq(s) for _, s in views.values()])),
      "norm_mean": jnp.mean(norms), "norm_std": jnp.std(norms),
      "quality_mean": quality.mean, "quality_std": quality.std,
      "con_weight": schedule["con_weight"],
      "head_b": schedule["head_b"], "con_b": schedule["con_b"],
  }
  for view, (view_norms, scaler) in views.items():
    metrics[f"hq_fraction_{view}"] = jnp.mean(hq(scaler))
    metrics[f"norm_mean_{view}"] = jnp.mean(view_norms)
  metrics.update({f"con_{k}": v for k, v in con_aux.items()
                  if jnp.ndim(v) == 0})
  return metrics


# ---------------------------------------------------------------------------
# The step.


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def _momentum_update(moco: MomentumEncoder, params: Any,
                     momentum: float) -> MomentumEncoder:
  """The authors' key-encoder update: parameters only (BatchNorm statistics
  and the head's norm statistics stay the encoder's own)."""
  return moco.replace(params=jax.tree.map(
      lambda k, q: momentum * k + (1.0 - momentum) * q, moco.params,
      jax.lax.stop_gradient(params)))


def _guarded(state: TrainState, finite: jax.Array, **new) -> TrainState:
  """The state with `new` fields where the step was finite, else the old
  ones: a non-finite loss or gradient must not poison the state. The step
  counter, the rng and the non-finite counters move either way."""
  keep = lambda field, value: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), value, getattr(state, field))
  guarded = {k: keep(k, v) for k, v in new.items()
             if k not in ("step", "rng")}
  return state.replace(
      **guarded, step=new["step"], rng=new["rng"],
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, settings: StepSettings,
               lr_schedule: Callable[[jax.Array], jax.Array],
               mesh: Optional[Mesh] = None
               ) -> tuple[TrainState, dict[str, Any]]:
  """One update on a global batch; pure, shapes fixed, no host sync.

  `mesh` is the one the state is sharded over (default: one device).
  """
  mesh = mesh or parallel.make_mesh(1, jax.devices()[:1])
  ctx = _StepContext(model, mesh, settings,
                     state.num_classes or state.classifier_width)
  names = ("next", "dropout", "moco_dropout", "sample")
  rngs = dict(zip(names, jax.random.split(state.rng, len(names))))
  if settings.sample_rate is None:
    del rngs["sample"]
  head_b, con_b = thresholds(settings, state.step)
  schedule = {"head_b": head_b, "con_b": con_b,
              "con_weight": contrastive_weight(settings, state.step)}

  moco = state.moco
  if settings.queue_kind == "moco":
    keys = _moco_keys(ctx, state, batch, rngs["moco_dropout"])
    loss_fn = functools.partial(_moco_loss, ctx, state, batch, rngs,
                                schedule, keys)
    # As the authors: after the keys are computed, before the optimiser
    # step, from the online weights of this step.
    moco = _momentum_update(keys[3], state.params, settings.moco_momentum)
  else:
    loss_fn = functools.partial(_two_view_loss, ctx, state, batch, rngs,
                                schedule)
  (loss, (new, metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & _all_finite(grads)
  new_state = _guarded(state, finite, step=state.step + 1, rng=rngs["next"],
                       params=params, opt_state=opt_state, moco=moco, **new)
  metrics.update(
      queue_fill=(new_state.queue.count.astype(jnp.float32) /
                  new_state.queue.capacity),
      lr=lr_schedule(state.step), grad_norm=optax.tree.norm(grads),
      nonfinite=(~finite).astype(jnp.float32),
      nonfinite_streak=new_state.nonfinite_streak)
  return new_state, metrics


def make_train_step(*, model, tx, settings: StepSettings, lr_schedule,
                    mesh: Mesh, state_shardings: TrainState):
  """Jits `train_step` once: state donated, batch split over `data`."""
  fn = functools.partial(train_step, model=model, tx=tx, settings=settings,
                         lr_schedule=lr_schedule, mesh=mesh)
  return jax.jit(fn,
                 in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=0)
