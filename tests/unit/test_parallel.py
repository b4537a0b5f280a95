"""The classifier split over the `model` axis equals the unsharded computation.

In-process tests use one device (the single-block case and the sampler);
the multi-device ones run in a subprocess with 8 fake CPU devices and compare
data 4 x model 2 and data 2 x model 4 against the dense, unsharded loss,
gradients and train step, read the compiled HLO for gathers of W or of the
logits, and restore a checkpoint onto other device counts.
"""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import parallel
from qgjt_jax import stack as stack_lib
from qgjt_jax import state as state_lib
from qgjt_jax import step as step_lib
from qgjt_jax.method import heads as margin
from qgjt_jax.method import queue_buffer as queue_lib
from qgjt_jax.method import queues
from qgjt_jax.method import settings as settings_lib
from tests.helpers import tiny_runs

ROOT = str(tiny_runs.ROOT)


def _problem(seed, num_rows=12, dim=16, num_classes=37, width=None):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(num_rows, dim)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  kernel = rng.normal(size=(dim, num_classes)).astype(np.float32)
  if width is not None:
    kernel = np.pad(kernel, ((0, 0), (0, width - num_classes)))
  labels = rng.integers(0, num_classes, num_rows).astype(np.int32)
  scaler = rng.uniform(-1, 1, num_rows).astype(np.float32)
  return emb, labels, kernel, scaler


class TinyEncoder(nn.Module):
  """Conv, BatchNorm, dropout, Dense: the backbone's interface, compiled in
  seconds. The layout questions here are the classifier's and the queue's;
  the IResNet itself runs sharded in tests/unit/test_step.py."""

  embedding_size: int = 32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, images, train):
    x = nn.Conv(8, (3, 3), strides=2)(images)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    z = nn.Dense(self.embedding_size)(x.reshape(x.shape[0], -1))
    norms = jnp.sqrt(jnp.sum(z * z, axis=-1))
    return z / norms[:, None], norms


def setup_step(config, mesh, num_classes, model=None, steps_per_epoch=4.0):
  """State, shardings and jitted step of `config` on `mesh`."""
  stack = stack_lib.build_stack(
      config,
      num_classes=num_classes,
      steps_per_epoch=steps_per_epoch,
      mesh=mesh,
      model=model,
  )
  return (
      stack.init_state(jax.random.key(0)),
      stack.state_shardings,
      stack.train_step,
  )


def sharded_loss(
    mesh,
    embeddings,
    labels,
    kernel,
    scaler,
    b,
    *,
    num_classes,
    head="adaface",
    s=64.0,
    m=0.4,
    eps=1e-3,
    sample_rate=None,
    positives=None,
    rng=None,
    logits_dtype=jnp.float32,
):
  """`step.classification_loss` with these head settings; the gate reads
  the margin scaler."""
  settings = settings_lib.StepSettings.from_config(tiny_runs.tiny_config(), 4.0)
  settings = dataclasses.replace(
      settings,
      head=dataclasses.replace(
          settings.head,
          kind=head,
          s=s,
          m=m,
          sample_rate=1.0 if sample_rate is None else sample_rate,
          logits_dtype=jnp.dtype(logits_dtype).name,
      ),
      quality=dataclasses.replace(settings.quality, eps=eps),
  )
  if positives is None:
    positives = labels
  return step_lib.classification_loss(
      mesh,
      settings,
      embeddings,
      labels,
      kernel,
      scaler,
      scaler,
      b,
      num_classes=num_classes,
      positives=positives,
      rng=rng,
  )


def _one_device_mesh():
  return parallel.make_mesh(1, jax.devices()[:1])


@pytest.mark.parametrize("head", margin.HEADS)
@pytest.mark.parametrize("b", [0.0, 0.3])
def test_one_block_equals_classification_loss(head, b):
  emb, labels, kernel, scaler = _problem(0)
  mesh = _one_device_mesh()

  def dense(e, w):
    return margin.classification_loss(e, labels, w, scaler, head=head, b=b)[0]

  def sharded(e, w):
    return sharded_loss(
        mesh,
        e,
        labels,
        w,
        scaler,
        b,
        num_classes=37,
        head=head,
        s=64.0,
        m=0.4,
        eps=1e-3,
    )

  want, want_grads = jax.jit(jax.value_and_grad(dense, (0, 1)))(emb, kernel)
  got, got_grads = jax.jit(jax.value_and_grad(sharded, (0, 1)))(emb, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_padding_columns_take_no_part():
  emb, labels, kernel, scaler = _problem(1, width=40)
  mesh = _one_device_mesh()
  want = jax.jit(
      lambda w: margin.classification_loss(emb, labels, w, scaler, b=0.2)[0]
  )(kernel[:, :37])

  def sharded(w):
    return sharded_loss(
        mesh,
        emb,
        labels,
        w,
        scaler,
        0.2,
        num_classes=37,
        head="adaface",
        s=64.0,
        m=0.4,
        eps=1e-3,
    )

  got, grad = jax.jit(jax.value_and_grad(sharded))(kernel)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(grad[:, 37:], 0.0)


def test_label_outside_the_classes_gives_nan():
  emb, labels, kernel, scaler = _problem(2, width=40)
  labels[3] = 37  # a padding column, not a class
  loss = jax.jit(
      lambda w: sharded_loss(
          _one_device_mesh(),
          emb,
          labels,
          w,
          scaler,
          0.0,
          num_classes=37,
          head="adaface",
          s=64.0,
          m=0.4,
          eps=1e-3,
      )
  )(kernel)
  assert np.isnan(loss)


def test_bfloat16_logits_stay_close_and_keep_the_exact_target():
  emb, labels, kernel, scaler = _problem(3)
  mesh = _one_device_mesh()
  kwargs = dict(num_classes=37, head="adaface", s=64.0, m=0.4, eps=1e-3)
  loss = jax.jit(
      lambda w, dtype: sharded_loss(
          mesh, emb, labels, w, scaler, 0.0, logits_dtype=dtype, **kwargs
      ),
      static_argnums=1,
  )
  full = loss(kernel, jnp.float32)
  fast = loss(kernel, jnp.bfloat16)
  # bf16 cosines are off by ~4e-3 at most, times s = 64 in the logits.
  np.testing.assert_allclose(fast, full, rtol=2e-2)
  assert float(fast) != float(full)


def test_sampler_keeps_positives_and_draws_real_classes_only():
  positives = jnp.array([3, 3, 17, 30, 45, 2], jnp.int32)
  # Block [16, 32) of a 37-class W padded to 48, split in 3 blocks of 16.
  picked = margin.sample_classes(
      jax.random.key(0), 16, 8, positives, class_offset=16, num_classes=37
  )
  picked = np.asarray(picked)
  assert picked.shape == (8,)
  assert len(set(picked.tolist())) == 8 and np.all(np.diff(picked) > 0)
  assert {17 - 16, 30 - 16} <= set(picked.tolist())
  # The last block holds classes 32..36 and padding 37..47.
  last = np.asarray(
      margin.sample_classes(jax.random.key(1), 16, 8, positives, 32, 37)
  )
  assert set(range(5)) <= set(last.tolist())  # all 5 real ones first
  draws = [
      set(
          np.asarray(
              margin.sample_classes(jax.random.key(s), 16, 4, positives, 16, 37)
          ).tolist()
      )
      for s in range(20)
  ]
  assert len({frozenset(d) for d in draws}) > 1  # random beyond positives


def test_num_sampled_classes_leaves_room_for_positives():
  assert margin.num_sampled_classes(1000, 0.1, 8) == 100
  assert margin.num_sampled_classes(1000, 0.001, 8) == 8
  assert margin.num_sampled_classes(10, 0.5, 64) == 10
  assert margin.num_sampled_classes(1000, 1.0, 8) == 1000


def test_proxy_lookup_and_update_on_one_block():
  emb, labels, kernel, _ = _problem(4)
  mesh = _one_device_mesh()
  got = queues.class_proxies(mesh, kernel, labels, 37)
  np.testing.assert_array_equal(got, queue_lib.class_proxies(kernel, labels))
  bad = queues.class_proxies(mesh, kernel, jnp.array([37, -1]), 37)
  assert np.all(np.isnan(bad))

  queue = queue_lib.init_queue(20, 16)
  queue = queue_lib.enqueue(
      queue, emb, labels, queue_lib.class_proxies(kernel, labels)
  )
  moved = kernel * 1.5 + 0.1
  current = queues.class_proxies(
      mesh, moved, jnp.where(queue_lib.valid_mask(queue), queue.labels, 0), 37
  )
  np.testing.assert_array_equal(
      queue_lib.corrected_negatives(queue, current),
      queue_lib.proxy_update(queue, moved),
  )


def test_classifier_width():
  assert state_lib.classifier_width(85742, 1) == 85742
  assert state_lib.classifier_width(85742, 4) == 85744
  assert state_lib.classifier_width(2059906, 8) == 2059912
  with pytest.raises(ValueError):
    state_lib.classifier_width(10, 0)


def _run_eight_devices(script):
  # Unoptimised CPU code: these programs run a step or two, and compiling
  # dominates.
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=8 "
      "--xla_backend_optimization_level=0",
  )
  result = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(script)],
      capture_output=True,
      text=True,
      timeout=900,
      cwd=ROOT,
      env=env,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


_LOSS_SCRIPT = """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from qgjt_jax import parallel, step as step_lib
    from qgjt_jax.method import queues
    from qgjt_jax.method import heads as margin
    from tests.unit import test_parallel as t
    assert jax.device_count() == 8
    C = 37
    for model in (2, 4):
      mesh = parallel.make_mesh(model)
      width = -(-C // model) * model
      emb, labels, kernel, scaler = t._problem(model, num_rows=16, width=width)
      put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
      emb_s = put(emb, P(parallel.BATCH_AXES))
      kernel_s = put(kernel, P(None, parallel.MODEL_AXIS))
      for head in margin.HEADS:
        def dense(e, w):
          return margin.classification_loss(e, labels, w[:, :C], scaler,
                                            head=head, b=0.2)[0]
        def sharded(e, w, rate=None):
          return t.sharded_loss(
              mesh, e, labels, w, scaler, 0.2, num_classes=C, head=head,
              s=64.0, m=0.4, eps=1e-3, sample_rate=rate,
              positives=labels, rng=jax.random.key(5))
        want, (ge, gw) = jax.value_and_grad(dense, (0, 1))(emb, kernel)
        got, (se, sw) = jax.jit(jax.value_and_grad(sharded, (0, 1)))(
            emb_s, kernel_s)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(se, ge, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sw, gw, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(sw)[:, C:], 0.0)
        # Sampling at rate 1 keeps every class: the same loss and gradient.
        one = jax.jit(jax.value_and_grad(
            lambda e, w: sharded(e, w, 1.0), (0, 1)))(emb_s, kernel_s)
        np.testing.assert_allclose(one[0], got, rtol=1e-6)
        np.testing.assert_allclose(one[1][1], sw, rtol=1e-5, atol=1e-7)
      print("LOSS_EQUAL", model)

      # Rate 0.5 of 150 classes: fewer negatives, so a smaller loss; only the
      # sampled columns (every positive among them) get a gradient.
      wide = -(-150 // model) * model
      emb2, labels2, kernel2, scaler2 = t._problem(9, num_rows=16,
                                                   num_classes=150, width=wide)
      def sampled(w, rate):
        return t.sharded_loss(
            mesh, put(emb2, P(parallel.BATCH_AXES)), labels2, w, scaler2, 0.2,
            num_classes=150, head="adaface", s=64.0, m=0.4, eps=1e-3,
            sample_rate=rate, positives=labels2, rng=jax.random.key(7))
      kernel2_s = put(kernel2, P(None, parallel.MODEL_AXIS))
      full = jax.jit(lambda w: sampled(w, None))(kernel2_s)
      half, gw = jax.jit(jax.value_and_grad(lambda w: sampled(w, 0.5)))(
          kernel2_s)
      assert float(half) < float(full), (half, full)
      touched = np.any(np.asarray(gw) != 0, axis=0)
      block = wide // model
      per_block = touched.reshape(model, block).sum(axis=1)
      k = margin.num_sampled_classes(block, 0.5, labels2.shape[0])
      assert k < block and np.all(per_block == k), (per_block, k, block)
      assert touched[np.unique(labels2)].all()
      print("SAMPLED", model, per_block.tolist())

      got_p = queues.class_proxies(
          mesh, kernel_s, jnp.asarray(labels), C)
      np.testing.assert_array_equal(got_p, kernel[:, labels].T)
      print("PROXIES_EQUAL", model)
"""


@pytest.mark.slow
def test_sharded_loss_gradients_and_proxies_on_eight_devices():
  out = _run_eight_devices(_LOSS_SCRIPT)
  for model in (2, 4):
    assert f"LOSS_EQUAL {model}" in out
    assert f"SAMPLED {model}" in out
    assert f"PROXIES_EQUAL {model}" in out


_STEP_SCRIPT = """
    import re, tempfile
    from jax.sharding import PartitionSpec as P
    import jax, numpy as np
    from qgjt_jax import checkpoint as ckpt, parallel, state as state_lib
    from tests.helpers import step_helpers, tiny_runs
    from tests.unit import test_parallel as t
    C = 1001
    config = tiny_runs.tiny_config()
    batches = [step_helpers.random_batch(s, config, num_classes=C)
               for s in range(2)]

    def setup(data, model):
      config.model_parallelism = model
      mesh = parallel.make_mesh(model, jax.devices()[:data * model])
      state, shardings, fn = t.setup_step(config, mesh, C,
                                          model=t.TinyEncoder())
      return state, shardings, fn, mesh

    def host(tree):
      return jax.tree.map(
          lambda x: np.asarray(jax.random.key_data(x)
                               if jax.dtypes.issubdtype(x.dtype,
                                                        jax.dtypes.prng_key)
                               else x), tree)

    results = {}
    for data, model in ((1, 1), (4, 2), (2, 4)):
      state, _, fn, mesh = setup(data, model)
      assert state.classifier_width == -(-C // model) * model
      device_batches = [parallel.host_to_global(b, mesh) for b in batches]
      compiled = fn.lower(state, device_batches[0]).compile()
      for batch in device_batches:
        state, metrics = compiled(state, batch)
      results[(data, model)] = (host(state), host(metrics), state, mesh)
      if (data, model) == (4, 2):
        hlo = compiled.as_text()

    ref, ref_metrics, _, _ = results[(1, 1)]
    for key in ((4, 2), (2, 4)):
      got, metrics, _, _ = results[key]
      flat_ref = jax.tree_util.tree_leaves_with_path(ref)
      flat_got = jax.tree.leaves(got)
      for (path, a), b in zip(flat_ref, flat_got):
        if "classifier" in jax.tree_util.keystr(path) and b.ndim == 2:
          assert b.shape[1] == -(-C // key[1]) * key[1]
          np.testing.assert_array_equal(b[:, C:], 0.0)  # padding stays 0
          b = b[:, :C]
        np.testing.assert_allclose(np.asarray(a, np.float64),
                                   np.asarray(b, np.float64),
                                   rtol=1e-3, atol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
      for name in ("loss", "loss_cls", "loss_con"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name],
                                   rtol=1e-5, err_msg=name)
      print("STEP_EQUAL", key)

    # Data 4 x model 2: W is (32, 1002), a block (32, 501), a device's rows
    # of the logits (4, 501). Nothing of the full width crosses devices, and
    # of the block width only W's gradient (the all-reduce over `data` of
    # every data-parallel run); per-row numbers are all the rest.
    width, block, dim = -(-C // 2) * 2, -(-C // 2), config.model.embedding_size
    assert not t.collectives_with_dim(hlo, width)
    block_sized = [(line, shapes) for line, shapes in t.collective_shapes(hlo)
                   if any(block in s for s in shapes)]
    assert block_sized, "expected W's gradient all-reduce"
    for line, shapes in block_sized:
      assert "all-reduce" in line, line
      assert [s for s in shapes if block in s] == [(dim, block)], line
    print("NO_GATHER", len(t.collective_shapes(hlo)))

    # Resume on other device counts: shardings come from the new mesh. (A
    # different `model` size changes W's zero padding here, 1001 -> 1002 or
    # 1004 columns, and needs the padding re-cut; the data axis is free.)
    _, _, state, _ = results[(4, 2)]
    with tempfile.TemporaryDirectory() as tmp:
      manager = ckpt.make_manager(tmp, asynchronous=False)
      ckpt.save(manager, state, force=True)
      manager.wait_until_finished()
      saved = host(state)
      for data, model in ((1, 2), (2, 2)):
        fresh, shardings, fn, mesh = setup(data, model)
        restored = ckpt.restore_latest(manager, fresh, shardings)
        kernel = restored.params["classifier"]["kernel"]
        assert kernel.sharding.mesh.devices.size == data * model
        assert kernel.sharding.spec == P(None, "model"), kernel.sharding
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(host(restored))):
          np.testing.assert_array_equal(a, b)
        print("RESUMED", data, model)
"""


def collective_shapes(hlo_text):
  """[(HLO line, [result shapes])] of every collective op of a module."""
  found = []
  pattern = (
      r"=\s*(\(?[^=]*?\)?)\s*(all-gather|all-reduce|all-to-all|"
      r"collective-permute|reduce-scatter)(-start)?\("
  )
  for line in hlo_text.splitlines():
    # Long tuple results carry "/*index=5*/" markers, whose "=" would end
    # the match early.
    line = re.sub(r"/\*index=\d+\*/", "", line)
    m = re.search(pattern, line)
    if m:
      shapes = [
          tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"\[([\d,]*)\]", m.group(1))
      ]
      found.append((line.strip()[:200], shapes))
  return found


def collectives_with_dim(hlo_text, dim):
  """Collective ops with a dimension of size `dim` (None: all of them).

  A gather of W (D, C) or of the (N, C) logits shows up as a collective whose
  result has the full width C.
  """
  return [
      line
      for line, shapes in collective_shapes(hlo_text)
      if dim is None or any(dim in s for s in shapes)
  ]


@pytest.mark.slow
def test_gather_detector_sees_a_gathered_kernel():
  """The HLO check below can fail: a replicated copy of W is caught."""
  out = _run_eight_devices("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from qgjt_jax import parallel
    from tests.unit import test_parallel as t
    mesh = parallel.make_mesh(2)
    w = jax.device_put(np.ones((8, 38), np.float32),
                       NamedSharding(mesh, P(None, "model")))
    hlo = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P())
                  ).lower(w).compile().as_text()
    print("FOUND", len(t.collectives_with_dim(hlo, 38)))
  """)
  assert "FOUND 0" not in out and "FOUND" in out


@pytest.mark.slow
def test_train_step_sharded_equals_unsharded_and_resumes_elsewhere():
  out = _run_eight_devices(_STEP_SCRIPT)
  assert "STEP_EQUAL (4, 2)" in out and "STEP_EQUAL (2, 4)" in out
  assert "NO_GATHER" in out
  for data, model in ((1, 2), (2, 2)):
    assert f"RESUMED {data} {model}" in out
