"""The train step: parity with the method core, sharding, compile-once."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import optim
from qgjt_jax import parallel
from qgjt_jax import queue as queue_lib
from qgjt_jax import state as state_lib
from qgjt_jax import step as step_lib
from qgjt_jax.losses import contrastive
from qgjt_jax.losses import margin
from qgjt_jax.models import normalize_images
from tests import step_helpers

STEPS_PER_EPOCH = 4.0


def _setup(config, mesh=None):
  mesh = mesh or parallel.make_mesh(1, jax.devices()[:1])
  schedule = optim.make_lr_schedule(config.optim, STEPS_PER_EPOCH,
                                    config.num_epochs)
  tx = optim.make_optimizer(config.optim, schedule)
  model = state_lib.build_model(config)
  state, shardings = state_lib.create_sharded_state(
      config, model, tx, step_helpers.NUM_CLASSES, jax.random.key(0), mesh)
  fn = step_lib.make_train_step(model=model, tx=tx, config=config,
                                lr_schedule=schedule,
                                steps_per_epoch=STEPS_PER_EPOCH, mesh=mesh,
                                state_shardings=shardings)
  return model, state, fn, mesh


@pytest.mark.parametrize("queue_kind", ["proxy", "realtime"])
def test_reported_loss_is_the_core_losses_on_the_same_features(queue_kind):
  config = step_helpers.tiny_config()
  config.queue.kind = queue_kind
  config.contrastive.margin = "dynamic"
  model, state, fn, mesh = _setup(config)
  # Fill part of the queue first so the negatives are not only this batch.
  state, _ = fn(state, parallel.host_to_global(
      step_helpers.random_batch(1, config), mesh))
  before = jax.tree.map(jnp.array, state)  # a copy: the step donates `state`
  batch = step_helpers.random_batch(2, config)
  new_state, metrics = fn(state, parallel.host_to_global(batch, mesh))

  # The same forward pass, outside the step (dropout is 0 in this config).
  b = config.global_batch_size
  images = normalize_images(np.concatenate([batch["image_h"],
                                            batch["image_l"]]))
  (emb, norms), _ = model.apply(
      {"params": before.params["backbone"], "batch_stats": before.batch_stats},
      images, train=True, mutable=["batch_stats"])
  labels = jnp.asarray(np.concatenate([batch["label"]] * 2))
  kernel = before.params["classifier"]["kernel"]
  qc, hc, cc = config.quality, config.head, config.contrastive
  loss_cls, stats, scaler = margin.adaface_loss(
      emb, norms, labels, kernel, before.quality, s=hc.s, m=hc.m, h=qc.h,
      alpha=qc.alpha, eps=qc.eps, b=hc.b)
  queue = queue_lib.enqueue(before.queue, emb, labels,
                            queue_lib.class_proxies(kernel, labels))
  negatives = (queue_lib.proxy_update(queue, kernel) if queue_kind == "proxy"
               else queue_lib.realtime_negatives(queue))
  loss_con, margin_state, _ = contrastive.contrastive_loss(
      emb[b:], emb[:b], labels[:b], negatives, queue.labels,
      queue_lib.valid_mask(queue), scaler[b:], scaler[:b], before.margin,
      s=cc.s, m=cc.m, b=cc.b, alpha=qc.alpha, gate=cc.gate,
      gate_range=cc.gate_range, pair_quality=cc.pair_quality,
      margin=cc.margin, mask=cc.mask)

  np.testing.assert_allclose(metrics["loss_cls"], loss_cls, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_con"], loss_con, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"],
                             loss_cls + cc.weight * loss_con, rtol=1e-5)
  np.testing.assert_allclose(new_state.quality.mean, stats.mean, rtol=1e-5)
  np.testing.assert_allclose(new_state.margin.value, margin_state.value,
                             rtol=1e-5, atol=1e-7)
  assert int(new_state.queue.count) == int(queue.count) == 4 * b
  assert int(new_state.step) == 2


def test_step_compiles_once_and_moves_the_parameters():
  config = step_helpers.tiny_config()
  _, state, fn, mesh = _setup(config)
  kernel0 = np.asarray(state.params["classifier"]["kernel"])
  for seed in range(3):
    state, metrics = fn(state, parallel.host_to_global(
        step_helpers.random_batch(seed, config), mesh))
  assert fn._cache_size() == 1
  assert np.isfinite(float(metrics["loss"]))
  assert not np.allclose(kernel0, state.params["classifier"]["kernel"])


def test_nonfinite_batch_is_skipped():
  config = step_helpers.tiny_config()
  _, state, fn, mesh = _setup(config)
  state, _ = fn(state, parallel.host_to_global(
      step_helpers.random_batch(0, config), mesh))
  before = jax.device_get(state)
  # An out-of-range label makes the margin loss NaN.
  batch = step_helpers.random_batch(1, config)
  batch["label"][0] = 10**6
  state, metrics = fn(state, parallel.host_to_global(batch, mesh))
  after = jax.device_get(state)
  assert float(metrics["nonfinite"]) == 1.0
  assert int(after.nonfinite_total) == 1 and int(after.nonfinite_streak) == 1
  assert int(after.step) == int(before.step) + 1
  for old, new in zip(jax.tree.leaves(before.params),
                      jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(old, new)
  np.testing.assert_array_equal(before.queue.embeds, after.queue.embeds)
  state, _ = fn(state, parallel.host_to_global(
      step_helpers.random_batch(2, config), mesh))
  assert int(state.nonfinite_streak) == 0


_EQUIVALENCE_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8")
    sys.path[:0] = [{root!r}]
    import jax, numpy as np
    from qgjt_jax import parallel
    from tests import step_helpers, test_step
    assert jax.device_count() == 8
    config = step_helpers.tiny_config()
    results = []
    for devices, model_parallel in ((1, 1), (8, 1), (8, 2)):
      config.model_parallelism = model_parallel
      mesh = parallel.make_mesh(model_parallel, jax.devices()[:devices])
      _, state, fn, mesh = test_step._setup(config, mesh)
      for seed in range(2):
        state, metrics = fn(state, parallel.host_to_global(
            step_helpers.random_batch(seed, config), mesh))
      state = state.replace(rng=jax.random.key_data(state.rng))
      results.append((jax.device_get(state), jax.device_get(metrics)))
    # Reduction order differs between layouts; two SGD steps at lr 0.1 carry
    # those float32 roundings into the weights, hence the tolerance.
    (ref, ref_m), others = results[0], results[1:]
    for state, metrics in others:
      for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state)):
        np.testing.assert_allclose(np.asarray(a, np.float64),
                                   np.asarray(b, np.float64),
                                   rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(ref_m["loss"], metrics["loss"], rtol=1e-5)
    print("EQUIVALENT", len(jax.tree.leaves(ref)))
""")


def test_one_and_eight_devices_give_the_same_state():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-c", _EQUIVALENCE_SCRIPT.format(root=root)],
      capture_output=True, text=True, timeout=600, cwd=root)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "EQUIVALENT" in result.stdout
