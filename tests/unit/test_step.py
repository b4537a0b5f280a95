"""The train step: parity with the method core, sharding, compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import parallel
from qgjt_jax import stack as stack_lib
from qgjt_jax import step as step_lib
from qgjt_jax.method import contrastive
from qgjt_jax.method import heads as margin
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.method import queue_buffer as queue_lib
from qgjt_jax.method import queues
from qgjt_jax.method import settings as settings_lib
from qgjt_jax.models import normalize_images
from tests.helpers import step_helpers
from tests.helpers import tiny_runs

STEPS_PER_EPOCH = 4.0


def _setup(config, mesh=None):
  stack = stack_lib.build_stack(
      config,
      num_classes=step_helpers.NUM_CLASSES,
      steps_per_epoch=STEPS_PER_EPOCH,
      mesh=mesh or parallel.make_mesh(1, jax.devices()[:1]),
  )
  return (
      stack.model,
      stack.init_state(jax.random.key(0)),
      stack.train_step,
      stack.mesh,
  )


def _both_views_outside_the_step(model, state, batch):
  """(embeddings, norms, labels) of both views through the step's model,
  in train mode, from `state`'s weights."""
  images = normalize_images(
      np.concatenate([batch["image_h"], batch["image_l"]])
  )
  (emb, norms), _ = model.apply(
      {"params": state.params["backbone"], "batch_stats": state.batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
  )
  return emb, norms, jnp.asarray(np.concatenate([batch["label"]] * 2))


@pytest.mark.parametrize(
    "queue_kind", ["proxy", pytest.param("realtime", marks=pytest.mark.slow)]
)
def test_reported_loss_is_the_core_losses_on_the_same_features(queue_kind):
  config = tiny_runs.tiny_config()
  config.queue.kind = queue_kind
  config.contrastive.margin = "dynamic"
  model, state, fn, mesh = _setup(config)
  # Fill part of the queue first so the negatives are not only this batch.
  state, _ = fn(
      state, parallel.host_to_global(step_helpers.random_batch(1, config), mesh)
  )
  before = jax.tree.map(jnp.array, state)  # a copy: the step donates `state`
  batch = step_helpers.random_batch(2, config)
  new_state, metrics = fn(state, parallel.host_to_global(batch, mesh))

  # The same forward pass, outside the step (dropout is 0 in this config).
  b = config.global_batch_size
  emb, norms, labels = _both_views_outside_the_step(model, before, batch)
  kernel = before.params["classifier"]["kernel"]
  qc, hc, cc = config.quality, config.head, config.contrastive
  loss_cls, stats, scaler = margin.adaface_loss(
      emb,
      norms,
      labels,
      kernel,
      before.quality,
      s=hc.s,
      m=hc.m,
      h=qc.h,
      alpha=qc.alpha,
      eps=qc.eps,
      b=hc.b,
  )
  queue = queue_lib.enqueue(
      before.queue, emb, labels, queue_lib.class_proxies(kernel, labels)
  )
  negatives = (
      queue_lib.proxy_update(queue, kernel)
      if queue_kind == "proxy"
      else queue_lib.realtime_negatives(queue)
  )
  loss_con, margin_state, _ = contrastive.contrastive_loss(
      emb[b:],
      emb[:b],
      labels[:b],
      negatives,
      queue.labels,
      queue_lib.valid_mask(queue),
      scaler[b:],
      scaler[:b],
      before.margin,
      s=cc.s,
      m=cc.m,
      b=cc.b,
      alpha=qc.alpha,
      gate=cc.gate,
      gate_range=cc.gate_range,
      pair_quality=cc.pair_quality,
      margin=cc.margin,
      mask=cc.mask,
  )

  np.testing.assert_allclose(metrics["loss_cls"], loss_cls, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_con"], loss_con, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["loss"], loss_cls + cc.weight * loss_con, rtol=1e-5
  )
  np.testing.assert_allclose(new_state.quality.mean, stats.mean, rtol=1e-5)
  np.testing.assert_allclose(
      new_state.margin.value, margin_state.value, rtol=1e-5, atol=1e-7
  )
  assert int(new_state.queue.count) == int(queue.count) == 4 * b
  assert int(new_state.step) == 2


def test_step_compiles_once_and_moves_the_parameters():
  config = tiny_runs.tiny_config()
  _, state, fn, mesh = _setup(config)
  kernel0 = np.asarray(state.params["classifier"]["kernel"])
  for seed in range(3):
    state, metrics = fn(
        state,
        parallel.host_to_global(step_helpers.random_batch(seed, config), mesh),
    )
  assert fn._cache_size() == 1
  assert np.isfinite(float(metrics["loss"]))
  assert not np.allclose(kernel0, state.params["classifier"]["kernel"])


@pytest.mark.slow  # four step programs: the full suite's
def test_each_loss_clipped_on_its_own_then_added():
  """optim.clip_each_loss: the update is the margin loss's gradient and the
  contrastive loss's, each clipped to the norm, added; each is read from
  a step that has only that loss (weight 0) or both (unclipped)."""
  plain = {
      "optim.momentum": 0.0,
      "optim.weight_decay": 0.0,
      # Some pairs below the gate (the stats centred on the tiny model's
      # norms), and a scale at which a random model's contrastive softmax
      # is not saturated (at 64 its gradient is about 1e-9).
      "quality.init_mean": 5.6,
      "quality.init_std": 0.6,
      "contrastive.s": 4.0,
  }

  def one_step(**changes):
    config = tiny_runs.tiny_config(**plain, **changes)
    with tiny_runs.compile_cache():  # three programs: the cheap compiles
      _, state, fn, mesh = _setup(config)
      before = jax.device_get(state.params)
      batch = step_helpers.random_batch(0, config)
      state, metrics = fn(state, parallel.host_to_global(batch, mesh))
    gradient = jax.tree.map(
        lambda old, new: (old - new) / float(metrics["lr"]),
        before,
        jax.device_get(state.params),
    )
    return gradient, metrics

  margin_only, _ = one_step(**{"contrastive.weight": 0.0})
  both, _ = one_step()
  contrastive_only = jax.tree.map(np.subtract, both, margin_only)
  norms = [
      float(np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(t))))
      for t in (margin_only, contrastive_only)
  ]
  limit = min(norms) / 2  # both are clipped
  clipped, metrics = one_step(
      **{"optim.clip_each_loss": True, "optim.grad_clip_norm": limit}
  )
  np.testing.assert_allclose(
      [metrics["grad_norm_cls"], metrics["grad_norm_con"]], norms, rtol=1e-3
  )
  want = jax.tree.map(
      lambda a, b: limit * (a / norms[0] + b / norms[1]),
      margin_only,
      contrastive_only,
  )
  for got, expected in zip(jax.tree.leaves(clipped), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5 * limit)
  # Without the branch (the AdaFace-only baseline) one backward pass: the
  # margin loss's gradient clipped, as the optimiser clips it without the
  # flag.
  alone, metrics = one_step(
      **{
          "optim.clip_each_loss": True,
          "optim.grad_clip_norm": limit,
          "queue.kind": "none",
          "contrastive.weight": 0.0,
      }
  )
  assert float(metrics["grad_norm_con"]) == 0.0
  for got, want_one in zip(
      jax.tree.leaves(alone), jax.tree.leaves(margin_only)
  ):
    np.testing.assert_allclose(
        got, limit * want_one / norms[0], rtol=2e-3, atol=1e-5 * limit
    )


def test_nonfinite_batch_is_skipped():
  config = tiny_runs.tiny_config()
  _, state, fn, mesh = _setup(config)
  state, _ = fn(
      state, parallel.host_to_global(step_helpers.random_batch(0, config), mesh)
  )
  before = jax.device_get(state)
  # An out-of-range label makes the margin loss NaN.
  batch = step_helpers.random_batch(1, config)
  batch["label"][0] = 10**6
  state, metrics = fn(state, parallel.host_to_global(batch, mesh))
  after = jax.device_get(state)
  assert float(metrics["nonfinite"]) == 1.0
  assert int(after.nonfinite_total) == 1 and int(after.nonfinite_streak) == 1
  assert int(after.step) == int(before.step) + 1
  for old, new in zip(
      jax.tree.leaves(before.params), jax.tree.leaves(after.params)
  ):
    np.testing.assert_array_equal(old, new)
  np.testing.assert_array_equal(before.queue.embeds, after.queue.embeds)
  state, _ = fn(
      state, parallel.host_to_global(step_helpers.random_batch(2, config), mesh)
  )
  assert int(state.nonfinite_streak) == 0


@pytest.mark.slow
def test_partition_by_degradation_moves_the_gates_not_the_margin():
  """Only the HQ/LQ split follows the known downscale factor: the AdaFace
  margin still reads the feature-norm scaler."""
  config = tiny_runs.tiny_config()
  config.quality.partition = "degradation"
  config.queue.kind = "none"
  model, state, fn, mesh = _setup(config)
  before = jax.tree.map(jnp.array, state)
  batch = step_helpers.random_batch(3, config)
  _, metrics = fn(state, parallel.host_to_global(batch, mesh))

  emb, norms, labels = _both_views_outside_the_step(model, before, batch)
  qc, hc = config.quality, config.head
  stats = quality_lib.update_quality_stats(before.quality, norms, qc.alpha)
  norm_scaler = quality_lib.margin_scaler(norms, stats, qc.h, qc.eps)
  r = np.concatenate([batch["degrade_h"], batch["degrade_l"]])
  gate = margin.hq_gate(jnp.asarray(r), hc.b, hc.s)  # q = r
  cos = margin.cosine_logits(emb, before.params["classifier"]["kernel"], qc.eps)
  logits = (
      margin.margin_logits(cos, labels, norm_scaler, s=hc.s, m=hc.m, eps=qc.eps)
      * gate[:, None]
  )
  target = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  want = jnp.mean(jax.nn.logsumexp(logits, axis=1) - target)
  np.testing.assert_allclose(metrics["loss_cls"], want, rtol=1e-5)
  # Every clean view (r = 1) is HQ; a degraded one when r >= b.
  assert float(metrics["hq_fraction_clean"]) == 1.0
  np.testing.assert_allclose(
      metrics["hq_fraction_degraded"], np.mean(batch["degrade_l"] >= hc.b)
  )


def _settings(**changes):
  config = tiny_runs.tiny_config()
  for dotted, value in changes.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return settings_lib.StepSettings.from_config(config, steps_per_epoch=10.0)


def test_the_authors_threshold_warm_up_is_per_epoch_and_shared():
  settings = _settings(
      **{
          "contrastive.b_warmup_epochs": 4.0,
          "contrastive.b": 0.4,
          "head.b": 0.4,
      }
  )
  for step, epoch in (
      (0, 0),
      (9, 0),
      (10, 1),
      (25, 2),
      (39, 3),
      (40, 4),
      (95, 9),
  ):
    head_b, con_b = step_lib.thresholds(settings, jnp.int32(step))
    want = 0.4 * min(1.0, epoch / 4.0)  # b x min(1, e / joint point)
    np.testing.assert_allclose([head_b, con_b], [want, want], rtol=1e-6)
  per_step = _settings(
      **{
          "contrastive.b_warmup_epochs": 4.0,
          "contrastive.b_warmup": "step",
          "contrastive.b": 0.4,
          "head.b": 0.2,
      }
  )
  head_b, con_b = step_lib.thresholds(per_step, jnp.int32(25))
  np.testing.assert_allclose(
      [head_b, con_b], [0.2 * 25 / 40, 0.4 * 25 / 40], rtol=1e-6
  )


def test_the_contrastive_weight_joins_later_and_detaches_later():
  joint = _settings(
      **{"contrastive.start_epoch": 2.0, "contrastive.weight": 0.5}
  )
  detach = _settings(**{"contrastive.end_epoch": 3.0})
  for step in (0, 19, 20, 29, 30, 90):
    epoch = step / 10.0
    assert float(step_lib.contrastive_weight(joint, jnp.int32(step))) == (
        0.5 if epoch >= 2.0 else 0.0
    )
    assert float(step_lib.contrastive_weight(detach, jnp.int32(step))) == (
        1.0 if epoch < 3.0 else 0.0
    )


@pytest.mark.parametrize("start_epoch", [0.0, 3.0])
def test_the_progressive_queue_grows_as_the_authors_schedule(start_epoch):
  settings = _settings(
      **{
          "queue.progressive": True,
          "queue.capacity": 48,
          "contrastive.start_epoch": start_epoch,
      }
  )
  epochs = settings.num_epochs  # 2 in the tiny config
  batch = settings.global_batch_size
  for epoch in range(int(epochs)):
    # Theirs: contrast_apply_epoch is 0, or the last epoch before the joint
    # point while it is ahead; then (K - B) / (E - e0) x (e - e0) + B.
    apply_epoch = 0 if start_epoch == 0 else min(epoch, start_epoch - 1)
    want = int(
        (48 - batch) / (epochs - apply_epoch) * (epoch - apply_epoch) + batch
    )
    got = queues.queue_size(settings, jnp.int32(epoch * 10 + 3))
    assert int(got) == want, (epoch, int(got), want)


def test_separation_auc_is_the_roc_area_of_the_norm():
  from sklearn.metrics import roc_auc_score

  rng = np.random.default_rng(0)
  clean, degraded = rng.normal(20, 3, 64), rng.normal(17, 3, 64)
  degraded[:5] = clean[:5]  # ties count half
  want = roc_auc_score(np.r_[np.ones(64), np.zeros(64)], np.r_[clean, degraded])
  got = quality_lib.separation_auc(jnp.asarray(clean), jnp.asarray(degraded))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  apart = quality_lib.separation_auc(jnp.arange(8.0) + 100, jnp.arange(8.0))
  same = quality_lib.separation_auc(jnp.ones(8), jnp.ones(8))
  assert float(apart) == 1.0 and float(same) == 0.5
  # Only the views that really were degraded count (the adaface recipe
  # leaves about half undegraded): the AUC against those alone.
  counted = rng.random(64) < 0.5
  want = roc_auc_score(
      np.r_[np.ones(64), np.zeros(counted.sum())],
      np.r_[clean, degraded[counted]],
  )
  got = quality_lib.separation_auc(clean, degraded, counted)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert np.isnan(
      float(quality_lib.separation_auc(clean, degraded, np.zeros(64, bool)))
  )
