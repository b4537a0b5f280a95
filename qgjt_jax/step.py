"""The pure QGFace train step.

`train_step(state, batch) -> (state, metrics)` is all of docs/METHOD.md for
one global batch; `make_train_step` jits it once with explicit shardings,
and everything it changes is in the state. Every config value it reads is
read once, outside the trace, into `method.settings.StepSettings`. (The
evaluation forward pass is `inference.model.make_embed_fn`.)

One step, as the authors' `FaceModel.training_step`, in the words of the
queue variant it runs with (`method/queues.py`):
1. `prepare`: work outside the gradient (MoCo: the momentum encoder turns
   the degraded view into keys);
2. `encode`: the online encoder on the views, the quality statistics
   updated over them and read (two views: all 2B images; MoCo: the clean
   view only);
3. the gated margin classifier scores the online rows;
4. `negatives`: the step's keys, labels and class proxies are enqueued, and
   the queue gives the negatives (proxy-corrected or as stored);
5. the contrastive loss pairs q with k against them;
6. `next_state`: the variant's own state moves (MoCo: momentum weights).

Layout (see parallel.py): the backbone is data-parallel over every device; the
classifier W is split over the mesh's `model` axis. The two places that touch
W by class, the margin softmax and the proxy lookup of the queue, run under an
explicit `shard_map` rather than being left to GSPMD's propagation:

* each device scores its rows against its own block of classes and only
  per-row numbers (target cosine, max, sum of exponentials) cross devices,
  as in insightface's PartialFC; the proxy lookup copies the columns a device
  holds and sums over `model`. W and the (2B, C) logits are never gathered,
  whatever the compiler version decides (tests/unit/test_parallel.py reads the
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
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from qgjt_jax import parallel
from qgjt_jax.method import contrastive
from qgjt_jax.method import heads
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.method import queue_buffer
from qgjt_jax.method.batch import Batch
from qgjt_jax.method.encoder import StepContext
from qgjt_jax.method.settings import StepSettings
from qgjt_jax.state import TrainState

_DATA, _MODEL = parallel.DATA_AXIS, parallel.MODEL_AXIS


# ---------------------------------------------------------------------------
# What the step's schedule says at a given step (all traced).


def thresholds(
    settings: StepSettings, step: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(head, contrastive) quality thresholds b at `step`, after warm-up.

  "epoch" is the authors' rule: b x min(1, e / J) with e the whole epoch and
  J = b_warmup_epochs, one threshold (the contrastive one) for both gates.
  "step" ramps each gate's own b linearly per step.
  """
  con = settings.contrastive
  head_b, con_b = settings.head.b, con.b
  if con.b_warmup_epochs <= 0:
    return jnp.float32(head_b), jnp.float32(con_b)
  if con.b_warmup == "epoch":
    epoch = jnp.floor(step / settings.steps_per_epoch)
    shared = con_b * jnp.minimum(1.0, epoch / con.b_warmup_epochs)
    return shared, shared
  ramp = jnp.minimum(
      1.0,
      step.astype(jnp.float32)
      / (con.b_warmup_epochs * settings.steps_per_epoch),
  )
  return head_b * ramp, con_b * ramp


def contrastive_weight(settings: StepSettings, step: jax.Array) -> jax.Array:
  """lambda at `step`: nonzero in [start_epoch, end_epoch) (0 = no end)."""
  con = settings.contrastive
  epoch = step.astype(jnp.float32) / settings.steps_per_epoch
  active = epoch >= con.start_epoch
  if con.end_epoch > 0:
    active &= epoch < con.end_epoch
  return jnp.where(active, con.weight, 0.0)


def _schedule(settings: StepSettings, step: jax.Array) -> dict[str, Any]:
  head_b, con_b = thresholds(settings, step)
  return {
      "head_b": head_b,
      "con_b": con_b,
      "con_weight": contrastive_weight(settings, step),
  }


# ---------------------------------------------------------------------------
# The two terms of the loss.


def classification_loss(
    mesh: Mesh,
    settings: StepSettings,
    embeddings: jax.Array,
    labels: jax.Array,
    kernel: jax.Array,
    scaler: jax.Array,
    gate_scaler: jax.Array,
    threshold: jax.Array,
    *,
    num_classes: int,
    positives: jax.Array,
    rng: Optional[jax.Array],
) -> jax.Array:
  """Mean gated margin cross-entropy over N rows, W split over `model`.

  The rows are split over `data` (each `model` group sees its group's rows)
  and W's columns over `model`; see `heads.sharded_classification_loss`.
  Equal to `heads.classification_loss(..., reduction="mean")` on W's first
  `num_classes` columns when there is no class sampling.
  """
  num_rows = embeddings.shape[0]
  head = settings.head

  def per_shard(emb, lab, w, scal, gate_q, thr, pos, key):
    per_example, _ = heads.sharded_classification_loss(
        emb,
        lab,
        w,
        scal,
        axis_name=_MODEL,
        num_classes=num_classes,
        head=head.kind,
        s=head.s,
        m=head.m,
        eps=settings.quality.eps,
        b=thr,
        sample_rate=head.sampled_share,
        positives=pos,
        rng=key,
        logits_dtype=jnp.dtype(head.logits_dtype),
        gate_quality=gate_q,
    )
    return jax.lax.psum(jnp.sum(per_example), _DATA) / num_rows

  if head.sampled_share is None:
    positives = jnp.zeros((1,), jnp.int32)
    rng = jax.random.key(0)
  fn = jax.shard_map(
      per_shard,
      mesh=mesh,
      in_specs=(
          P(_DATA),
          P(_DATA),
          P(None, _MODEL),
          P(_DATA),
          P(_DATA),
          P(),
          P(),
          P(),
      ),
      out_specs=P(),
  )
  return fn(
      embeddings,
      labels,
      kernel,
      scaler,
      quality_lib.quality_from_scaler(gate_scaler),
      jnp.asarray(threshold, jnp.float32),
      positives,
      rng,
  )


def contrastive_term(
    settings: StepSettings,
    queue: queue_buffer.QueueState,
    negatives: jax.Array,
    margin_state,
    q: jax.Array,
    k: jax.Array,
    labels: jax.Array,
    q_scaler: jax.Array,
    k_scaler: jax.Array,
    threshold: jax.Array,
    copies: int,
):
  """The contrastive loss of (q, k) pairs against the queue's negatives.

  `copies` is how many of each pair's views this step enqueued (2: k's then
  q's rows; 1: the MoCo keys), for the "own" mask.
  """
  batch_size = labels.shape[0]
  own_slots = (
      queue_buffer.last_slots(queue, copies * batch_size)
      .reshape(copies, batch_size)
      .T
  )
  options = {
      f: getattr(settings.contrastive, f)
      for f in (
          "s",
          "m",
          "gate",
          "gate_range",
          "pair_quality",
          "margin",
          "mask",
          "rescale",
          "rescale_reference",
          "coupling",
          "detach_pos",
      )
  }
  return contrastive.contrastive_loss(
      q,
      k,
      labels,
      negatives,
      queue.labels,
      queue_buffer.valid_mask(queue),
      q_scaler,
      k_scaler,
      margin_state,
      b=threshold,
      alpha=settings.quality.alpha,
      own_slots=own_slots,
      **options,
  )


def _loss(
    ctx: StepContext,
    state: TrainState,
    batch: Batch,
    rngs: dict[str, Any],
    schedule: dict[str, Any],
    prepared: Any,
    params: Any,
):
  """The step's two loss terms of `params` (margin, weighted contrastive),
  and (the new state fields, metrics)."""
  variant = ctx.settings.queue.variant
  views = variant.encode(ctx, state, batch, rngs, params, prepared)
  online, labels = views.online, batch["label"].astype(jnp.int32)
  kernel = params["classifier"]["kernel"]
  loss_cls = classification_loss(
      ctx.mesh,
      ctx.settings,
      online.embeddings,
      views.labels,
      kernel,
      online.scaler,
      online.gate_scaler,
      schedule["head_b"],
      num_classes=ctx.num_classes,
      positives=labels,
      rng=rngs.get("sample"),
  )
  new = {
      "batch_stats": online.batch_stats,
      "quality": online.quality,
      "queue": state.queue,
      "margin": state.margin,
  }
  loss_con, con_aux = jnp.zeros((), jnp.float32), {}
  if variant.contrastive:
    new["queue"], negatives = variant.negatives(
        ctx, state.queue, views.keys, views.key_labels, kernel, state.step
    )
    loss_con, new["margin"], con_aux = contrastive_term(
        ctx.settings,
        new["queue"],
        negatives,
        state.margin,
        q=views.q,
        k=views.k,
        labels=labels,
        q_scaler=views.q_scaler,
        k_scaler=views.k_scaler,
        threshold=schedule["con_b"],
        copies=views.keys.shape[0] // labels.shape[0],
    )
  terms = jnp.stack([loss_cls, schedule["con_weight"] * loss_con])
  return terms, (
      new,
      _loss_metrics(
          terms.sum(),
          loss_cls,
          loss_con,
          con_aux,
          views,
          online.quality,
          schedule,
      ),
  )


def _loss_metrics(
    loss, loss_cls, loss_con, con_aux, views, quality, schedule
) -> dict[str, jax.Array]:
  """Scalars of the step, from the encoder's `views` (queues.Views).

  `quality_auc` compares the online encoder's norms of the clean views with
  its norms of the degraded views that really were degraded; it is left out
  where the online encoder sees no degraded view (the `moco` queue) and is
  NaN in a batch whose recipe degraded none (the `adaface` recipe skips the
  low resolution step for about half of the views)."""
  by_view = views.by_view
  hq = lambda scaler: (
      quality_lib.quality_from_scaler(scaler) >= schedule["head_b"]
  ).astype(jnp.float32)
  norms = jnp.concatenate([n for n, _ in by_view.values()])
  metrics = {
      "loss": loss,
      "loss_cls": loss_cls,
      "loss_con": loss_con,
      "hq_fraction": jnp.mean(
          jnp.concatenate([hq(s) for _, s in by_view.values()])
      ),
      "norm_mean": jnp.mean(norms),
      "norm_std": jnp.std(norms),
      "quality_mean": quality.mean,
      "quality_std": quality.std,
      "con_weight": schedule["con_weight"],
      "head_b": schedule["head_b"],
      "con_b": schedule["con_b"],
  }
  for view, (view_norms, scaler) in by_view.items():
    metrics[f"hq_fraction_{view}"] = jnp.mean(hq(scaler))
    metrics[f"norm_mean_{view}"] = jnp.mean(view_norms)
  if views.truly_degraded is not None:
    metrics["quality_auc"] = quality_lib.separation_auc(
        by_view["clean"][0], by_view["degraded"][0], views.truly_degraded
    )
  metrics.update(
      {f"con_{k}": v for k, v in con_aux.items() if jnp.ndim(v) == 0}
  )
  return metrics


# ---------------------------------------------------------------------------
# The step.


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def _guarded(state: TrainState, finite: jax.Array, **new) -> TrainState:
  """The state with `new` fields where the step was finite, else the old
  ones: a non-finite loss or gradient must not poison the state. The step
  counter, the rng and the non-finite counters move either way."""
  keep = lambda field, value: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), value, getattr(state, field)
  )
  guarded = {k: keep(k, v) for k, v in new.items() if k not in ("step", "rng")}
  return state.replace(
      **guarded,
      step=new["step"],
      rng=new["rng"],
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
  )


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    settings: StepSettings,
    lr_schedule: Callable[[jax.Array], jax.Array],
    mesh: Optional[Mesh] = None,
) -> tuple[TrainState, dict[str, Any]]:
  """One update on a global batch; pure, shapes fixed, no host sync.

  `mesh` is the one the state is sharded over (default: one device).
  """
  mesh = mesh or parallel.make_mesh(1, jax.devices()[:1])
  ctx = StepContext(
      model, mesh, settings, state.num_classes or state.classifier_width
  )
  names = ("next", "dropout", "moco_dropout", "sample")
  rngs = dict(zip(names, jax.random.split(state.rng, len(names))))
  if settings.head.sampled_share is None:
    del rngs["sample"]
  variant = settings.queue.variant
  prepared = variant.prepare(ctx, state, batch, rngs)
  loss_terms = functools.partial(
      _loss, ctx, state, batch, rngs, _schedule(settings, state.step), prepared
  )
  terms, pullback, (new, metrics) = jax.vjp(
      loss_terms, state.params, has_aux=True
  )
  loss = terms.sum()
  if settings.loss_clip_norm:
    # Each term's gradient clipped on its own, then added: a backward pass
    # for each (one alone without the contrastive branch, whose term is 0).
    per_term = [
        pullback(jnp.zeros_like(terms).at[i].set(1.0))[0]
        for i in range(2 if variant.contrastive else 1)
    ]
    norms = [optax.tree.norm(g) for g in per_term]
    metrics.update(
        grad_norm_cls=norms[0],
        grad_norm_con=norms[1] if variant.contrastive else jnp.zeros(()),
    )
    clip = optax.clip_by_global_norm(settings.loss_clip_norm)
    clipped = [clip.update(g, optax.EmptyState())[0] for g in per_term]
    grads = jax.tree.map(lambda *g: sum(g[1:], g[0]), *clipped)
  else:
    (grads,) = pullback(jnp.ones_like(terms))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & _all_finite(grads)
  new_state = _guarded(
      state,
      finite,
      step=state.step + 1,
      rng=rngs["next"],
      params=params,
      opt_state=opt_state,
      variant_state=variant.next_state(ctx, state, prepared),
      **new,
  )
  metrics.update(
      queue_fill=(
          new_state.queue.count.astype(jnp.float32) / new_state.queue.capacity
      ),
      lr=lr_schedule(state.step),
      grad_norm=optax.tree.norm(grads),
      nonfinite=(~finite).astype(jnp.float32),
      nonfinite_streak=new_state.nonfinite_streak,
  )
  return new_state, metrics


def make_train_step(
    *,
    model,
    tx,
    settings: StepSettings,
    lr_schedule,
    mesh: Mesh,
    state_shardings: TrainState,
):
  """Jits `train_step` once: state donated, batch split over `data`."""
  fn = functools.partial(
      train_step,
      model=model,
      tx=tx,
      settings=settings,
      lr_schedule=lr_schedule,
      mesh=mesh,
  )
  return jax.jit(
      fn,
      in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
      out_shardings=(state_shardings, parallel.replicated(mesh)),
      donate_argnums=0,
  )
