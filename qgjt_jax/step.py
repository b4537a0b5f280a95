"""The pure QGFace train step and the embedding step used by evaluation.

`train_step(state, batch) -> (state, metrics)` is all of METHOD.md for one
global batch: the backbone on both views (2B images), the quality statistics,
the HQ-gated margin classifier, the enqueue + proxy update of the queue, the
LQ-gated contrastive loss, and the optimiser update. It is jitted once with
explicit shardings by `make_train_step`; everything it changes is in the state.
(The evaluation forward pass is `evaluate.make_embed_fn`.)

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

import functools
from typing import Any, Callable, Optional, TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qgjt_jax import parallel
from qgjt_jax import queue as queue_lib
from qgjt_jax.losses import contrastive
from qgjt_jax.losses import margin
from qgjt_jax.models.iresnet import normalize_images
from qgjt_jax.state import TrainState

if TYPE_CHECKING:  # configs need ml_collections; the benchmark runs without.
  import ml_collections

Batch = dict[str, jax.Array]
_DATA, _MODEL = parallel.DATA_AXIS, parallel.MODEL_AXIS


def _ramp(step: jax.Array, value: float, ramp_steps: float) -> jax.Array:
  """`value` reached linearly over `ramp_steps` (threshold warm-up)."""
  if ramp_steps <= 0:
    return jnp.asarray(value, jnp.float32)
  return value * jnp.minimum(1.0, step.astype(jnp.float32) / ramp_steps)


def _scaler_from_degradation(factors: jax.Array) -> jax.Array:
  """Quality from the known downscale factor r in (0, 1] (ablation switch).

  q = r, so a = 2r - 1: clean views are fully HQ and a threshold b marks views
  downscaled below b as LQ.
  """
  return 2.0 * jnp.clip(factors.astype(jnp.float32), 0.0, 1.0) - 1.0


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def sharded_classifier_loss(
    mesh: Mesh, embeddings: jax.Array, labels: jax.Array, kernel: jax.Array,
    scaler: jax.Array, b: Any, *, num_classes: int, head: str, s: float,
    m: float, eps: float, sample_rate: Optional[float] = None,
    positives: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
    logits_dtype: Any = jnp.float32) -> jax.Array:
  """Mean gated margin cross-entropy over N rows, W split over `model`.

  The rows are split over `data` (each `model` group sees its group's rows)
  and W's columns over `model`; see `margin.sharded_classification_loss`.
  Equal to `margin.classification_loss(..., reduction="mean")` on W's first
  `num_classes` columns when `sample_rate` is None.
  """
  num_rows = embeddings.shape[0]
  sampling = sample_rate is not None

  def per_shard(emb, lab, w, scal, thr, pos, key):
    per_example, _ = margin.sharded_classification_loss(
        emb, lab, w, scal, axis_name=_MODEL, num_classes=num_classes,
        head=head, s=s, m=m, eps=eps, b=thr, sample_rate=sample_rate,
        positives=pos, rng=key, logits_dtype=logits_dtype)
    return jax.lax.psum(jnp.sum(per_example), _DATA) / num_rows

  if not sampling:
    positives = jnp.zeros((1,), jnp.int32)
    rng = jax.random.key(0)
  fn = jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(P(_DATA), P(_DATA), P(None, _MODEL), P(_DATA), P(), P(),
                P()),
      out_specs=P())
  return fn(embeddings, labels, kernel, scaler, jnp.asarray(b, jnp.float32),
            positives, rng)


def sharded_class_proxies(mesh: Mesh, kernel: jax.Array, labels: jax.Array,
                          num_classes: int) -> jax.Array:
  """(N, D) columns `labels` of W (split over `model`), replicated."""
  fn = jax.shard_map(
      functools.partial(queue_lib.sharded_class_proxies, axis_name=_MODEL,
                        num_classes=num_classes),
      mesh=mesh, in_specs=(P(None, _MODEL), P()), out_specs=P())
  return fn(kernel, labels)


def _single_device_mesh() -> Mesh:
  return parallel.make_mesh(1, jax.devices()[:1])


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict,
               lr_schedule: Callable[[jax.Array], jax.Array],
               steps_per_epoch: float, mesh: Optional[Mesh] = None
               ) -> tuple[TrainState, dict[str, Any]]:
  """One update on a global batch; pure, shapes fixed, no host sync.

  `mesh` is the one the state is sharded over (default: one device).
  """
  mesh = mesh or _single_device_mesh()
  b = batch["label"].shape[0]
  labels = batch["label"].astype(jnp.int32)
  labels2 = jnp.concatenate([labels, labels])
  images = jnp.concatenate([batch["image_h"], batch["image_l"]])
  images = jax.lax.with_sharding_constraint(
      images, NamedSharding(mesh, P(parallel.BATCH_AXES)))
  images = normalize_images(images, jnp.dtype(config.model.dtype))
  hc = config.head
  sample_rate = getattr(hc, "sample_rate", 1.0)
  sample_rate = None if sample_rate is None or sample_rate >= 1.0 else float(
      sample_rate)
  logits_dtype = jnp.dtype(getattr(hc, "logits_dtype", "float32"))
  num_classes = state.num_classes or state.classifier_width
  if sample_rate is None:
    rng, dropout_rng = jax.random.split(state.rng)
    sample_rng = None
  else:
    rng, dropout_rng, sample_rng = jax.random.split(state.rng, 3)
  proxies_of = functools.partial(sharded_class_proxies, mesh,
                                 num_classes=num_classes)
  step = state.step
  epoch = step.astype(jnp.float32) / steps_per_epoch
  qc, cc, queue_kind = config.quality, config.contrastive, config.queue.kind
  b_ramp = cc.b_warmup_epochs * steps_per_epoch
  head_b = _ramp(step, hc.b, b_ramp)
  con_b = _ramp(step, cc.b, b_ramp)
  con_weight = jnp.where(epoch >= cc.start_epoch, cc.weight, 0.0)

  # Keys of the "moco" variant come from the momentum encoder on the clean view.
  moco_keys = moco_proxies = None
  if queue_kind == "moco":
    ema_out = model.apply(
        {"params": state.ema["params"]["backbone"],
         "batch_stats": state.ema["batch_stats"]},
        images[:b], train=False)
    moco_keys = jax.lax.stop_gradient(ema_out[0])
    moco_proxies = proxies_of(state.ema["params"]["classifier"]["kernel"],
                              labels)

  def loss_fn(params):
    (embeddings, norms), updates = model.apply(
        {"params": params["backbone"], "batch_stats": state.batch_stats},
        images, train=True, mutable=["batch_stats"],
        rngs={"dropout": dropout_rng})
    embeddings = embeddings.astype(jnp.float32)
    norms = norms.astype(jnp.float32)
    kernel = params["classifier"]["kernel"]

    # Quality: running statistics updated over all 2B images, then used.
    quality_stats = margin.update_quality_stats(state.quality, norms, qc.alpha)
    if qc.partition == "degradation":
      scaler = _scaler_from_degradation(
          jnp.concatenate([batch["degrade_h"], batch["degrade_l"]]))
    else:
      scaler = margin.margin_scaler(norms, quality_stats, qc.h, qc.eps)

    loss_cls = sharded_classifier_loss(
        mesh, embeddings, labels2, kernel, scaler, head_b,
        num_classes=num_classes, head=hc.kind, s=hc.s, m=hc.m, eps=qc.eps,
        sample_rate=sample_rate, positives=labels, rng=sample_rng,
        logits_dtype=logits_dtype)

    queue, margin_state = state.queue, state.margin
    loss_con = jnp.zeros((), jnp.float32)
    con_aux = {}
    if queue_kind != "none":
      frozen_kernel = jax.lax.stop_gradient(kernel)
      if queue_kind == "moco":
        queue = queue_lib.enqueue(queue, moco_keys, labels, moco_proxies)
        negatives = queue_lib.realtime_negatives(queue)
        k = moco_keys
      else:
        queue = queue_lib.enqueue(
            queue, jax.lax.stop_gradient(embeddings), labels2,
            proxies_of(frozen_kernel, labels2))
        if queue_kind == "proxy":
          # Empty slots (label -1) look up class 0; their rows are zeroed.
          current = proxies_of(frozen_kernel, jnp.where(
              queue_lib.valid_mask(queue), queue.labels, 0))
          negatives = queue_lib.corrected_negatives(queue, current)
        else:
          negatives = queue_lib.realtime_negatives(queue)
        k = embeddings[:b]
      loss_con, margin_state, con_aux = contrastive.contrastive_loss(
          embeddings[b:], k, labels, negatives, queue.labels,
          queue_lib.valid_mask(queue), scaler[b:], scaler[:b], state.margin,
          s=cc.s, m=cc.m, b=con_b, alpha=qc.alpha, gate=cc.gate,
          gate_range=cc.gate_range, pair_quality=cc.pair_quality,
          margin=cc.margin, mask=cc.mask, rescale=cc.rescale,
          rescale_reference=cc.rescale_reference)

    loss = loss_cls + con_weight * loss_con
    quality = margin.quality_from_scaler(scaler)
    metrics = {
        "loss": loss, "loss_cls": loss_cls, "loss_con": loss_con,
        "hq_fraction": jnp.mean((quality >= head_b).astype(jnp.float32)),
        "hq_fraction_clean": jnp.mean((quality[:b] >= head_b).astype(jnp.float32)),
        "hq_fraction_degraded": jnp.mean((quality[b:] >= head_b).astype(jnp.float32)),
        "norm_mean": jnp.mean(norms), "norm_std": jnp.std(norms),
        "norm_mean_clean": jnp.mean(norms[:b]),
        "norm_mean_degraded": jnp.mean(norms[b:]),
        "quality_mean": quality_stats.mean, "quality_std": quality_stats.std,
        "queue_fill": queue.count.astype(jnp.float32) / queue.labels.shape[0],
        "con_weight": con_weight,
    }
    metrics.update({f"con_{k}": v for k, v in con_aux.items()
                    if jnp.ndim(v) == 0})
    new = (updates["batch_stats"], quality_stats, queue, margin_state)
    return loss, (new, metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (new, metrics)), grads = grad_fn(state.params)
  batch_stats, quality_stats, queue, margin_state = new
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  ema = state.ema
  if ema is not None:
    mom = config.queue.moco_momentum
    ema = {"params": jax.tree.map(lambda e, p: mom * e + (1 - mom) * p,
                                  ema["params"], params),
           "batch_stats": batch_stats}

  # Numerical guard: a non-finite loss or gradient leaves the state as it was
  # (but for the step and the counters) instead of poisoning it.
  finite = jnp.isfinite(loss) & _all_finite(grads)
  keep = lambda new_tree, old_tree: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new_tree, old_tree)
  new_state = state.replace(
      step=step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      quality=keep(quality_stats, state.quality),
      queue=keep(queue, state.queue),
      margin=keep(margin_state, state.margin),
      ema=keep(ema, state.ema),
      rng=rng,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
  )
  metrics["lr"] = lr_schedule(step)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["nonfinite"] = (~finite).astype(jnp.float32)
  metrics["nonfinite_streak"] = new_state.nonfinite_streak
  return new_state, metrics


def make_train_step(*, model, tx, config, lr_schedule, steps_per_epoch,
                    mesh: Mesh, state_shardings: TrainState):
  """Jits `train_step` once: state donated, batch split over `data`."""
  fn = functools.partial(train_step, model=model, tx=tx, config=config,
                         lr_schedule=lr_schedule,
                         steps_per_epoch=steps_per_epoch, mesh=mesh)
  return jax.jit(fn,
                 in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=0)
