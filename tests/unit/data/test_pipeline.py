"""Tests of the grain training pipeline (qgjt_jax.data.pipeline)."""

import numpy as np
import pytest

from qgjt_jax.data import degrade, pipeline, sources, synthetic
from qgjt_jax.tools import pipeline_bench

SIZE = 16


def _source(n):
  # One image per identity: a record's label is its index, so batches show
  # exactly which records they hold.
  return synthetic.SyntheticFaces(n, 1, SIZE, seed=0, cache=True)


def _batches(src, steps=None, **kwargs):
  kwargs.setdefault("seed", 3)
  it = iter(pipeline.make_train_dataset(src, **kwargs))
  out = []
  for batch in it:
    out.append(batch)
    if steps is not None and len(out) == steps:
      break
  return out


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout_and_one_epoch_coverage():
  batches = _batches(_source(24), global_batch_size=8, num_epochs=1)
  assert len(batches) == 3
  for b in batches:
    assert b["image_h"].shape == b["image_l"].shape == (8, SIZE, SIZE, 3)
    assert b["image_h"].dtype == b["image_l"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
    assert b["degrade_h"].dtype == b["degrade_l"].dtype == np.float32
    np.testing.assert_array_equal(b["degrade_h"], 1.0)
    assert (b["degrade_l"] > 0).all() and (b["degrade_l"] <= 0.5).all()
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels) == list(range(24))


def test_every_epoch_covers_the_records_in_a_new_order():
  batches = _batches(_source(16), global_batch_size=8, num_epochs=3)
  labels = np.concatenate([b["label"] for b in batches]).reshape(3, 16)
  for epoch in labels:
    assert sorted(epoch) == list(range(16))
  assert not np.array_equal(labels[0], labels[1])
  assert not np.array_equal(labels[1], labels[2])


def test_finite_stream_drops_the_partial_global_batch():
  batches = _batches(_source(20), global_batch_size=8, num_epochs=1)
  assert len(batches) == 2  # 20 // 8


def test_same_seed_same_batches_other_seed_other_batches():
  src = _source(16)
  a = _batches(src, 2, global_batch_size=8, seed=5)
  b = _batches(src, 2, global_batch_size=8, seed=5)
  c = _batches(src, 2, global_batch_size=8, seed=6)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])


@pytest.mark.parametrize("n", [24, 20])
def test_process_shards_are_disjoint_and_make_the_global_batch(n):
  src = _source(n)
  whole = _batches(src, global_batch_size=8, num_epochs=1)
  shards = [
      _batches(
          src,
          global_batch_size=8,
          num_epochs=1,
          process_index=i,
          process_count=2,
      )
      for i in range(2)
  ]
  assert len(shards[0]) == len(shards[1]) == len(whole) == n // 8
  for step, batch in enumerate(whole):
    a, b = shards[0][step]["label"], shards[1][step]["label"]
    assert len(a) == len(b) == 4
    assert not set(a) & set(b)
    assert set(a) | set(b) == set(batch["label"])


def test_views_depend_only_on_seed_epoch_and_record():
  # The same record in the same epoch gets the same views whichever process
  # and position it lands on.
  src = _source(16)
  whole = _batches(src, global_batch_size=8, num_epochs=1)
  shard = _batches(
      src, global_batch_size=8, num_epochs=1, process_index=1, process_count=2
  )
  views = {
      int(l): (b["image_l"][i], b["degrade_l"][i])
      for b in whole
      for i, l in enumerate(b["label"])
  }
  for b in shard:
    for i, l in enumerate(b["label"]):
      np.testing.assert_array_equal(b["image_l"][i], views[int(l)][0])
      assert b["degrade_l"][i] == views[int(l)][1]


def test_image_size_resizes():
  batches = _batches(_source(8), 1, global_batch_size=4, image_size=8)
  assert batches[0]["image_h"].shape == (4, 8, 8, 3)


def test_view_config_reaches_the_views():
  cfg = degrade.ViewConfig(min_scale=0.25, max_scale=0.25)
  batches = _batches(_source(8), 2, global_batch_size=4, view_config=cfg)
  for b in batches:
    np.testing.assert_allclose(b["degrade_l"], 0.25)


def test_iterator_state_resumes_mid_epoch():
  ds = pipeline.make_train_dataset(_source(24), global_batch_size=4, seed=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses the epoch boundary
  fresh = iter(ds)
  fresh.set_state(state)
  _assert_same([next(fresh) for _ in range(4)], expected)


@pytest.mark.parametrize("process_count", [1, 2])
def test_starting_at_a_step_continues_the_stream(process_count):
  # What a resumed run does: the batches from global step 3 on, across the
  # epoch boundary, are those an uninterrupted iterator gives after 3 steps.
  kwargs = dict(global_batch_size=4, seed=1, process_count=process_count)
  for index in range(process_count):
    it = iter(
        pipeline.make_train_dataset(_source(24), process_index=index, **kwargs)
    )
    for _ in range(3):
      next(it)
    expected = [next(it) for _ in range(5)]
    resumed = iter(
        pipeline.make_train_dataset(
            _source(24), process_index=index, start_step=3, **kwargs
        )
    )
    _assert_same([next(resumed) for _ in range(5)], expected)


def test_iterator_survives_an_orbax_checkpoint(tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = pipeline.make_train_dataset(_source(16), global_batch_size=4, seed=2)
  it = iter(ds)
  next(it)
  next(it)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(3)]
  restored = ckpt.restore(
      tmp_path / "data", args=grain.checkpoint.CheckpointRestore(iter(ds))
  )
  _assert_same([next(restored) for _ in range(3)], expected)


def test_worker_processes_give_the_same_batches():
  src = _source(16)
  inline = _batches(src, 5, global_batch_size=4, seed=4)
  ds = pipeline.make_train_dataset(
      src, global_batch_size=4, seed=4, worker_count=2
  )
  it = iter(ds)
  try:
    _assert_same([next(it) for _ in range(5)], inline)
  finally:
    it.close()


def test_bad_sharding_is_refused():
  with pytest.raises(ValueError):
    pipeline.make_train_dataset(
        _source(8), global_batch_size=6, seed=0, process_count=4
    )
  with pytest.raises(ValueError):
    pipeline.make_train_dataset(
        _source(8),
        global_batch_size=8,
        seed=0,
        process_index=2,
        process_count=2,
    )


def test_pipeline_over_a_written_rec_matches_the_source(tmp_path):
  src = _source(16)
  records = [src[i] for i in range(16)]
  pipeline_bench.write_insightface_rec(
      tmp_path,
      [r["image"] for r in records],
      [int(r["label"]) for r in records],
      SIZE,
  )
  rec = sources.RecSource(tmp_path)
  assert len(rec) == 16 and rec.num_classes == 16
  _assert_same(
      _batches(rec, 2, global_batch_size=8),
      _batches(src, 2, global_batch_size=8),
  )


def test_rec_writer_splits_records_at_the_magic(tmp_path):
  magic = (0xCED7230A).to_bytes(4, "little")
  # The 24-byte record header puts image offset 0 at a 4-aligned payload
  # position; the writer must cut there, the reader join the pieces again.
  images = [b"abcd" + magic + b"efgh" + magic + b"xy", magic + b"12", b"plain"]
  pipeline_bench.write_insightface_rec(tmp_path, images, [0, 1, 1], SIZE)
  raw = (tmp_path / "train.rec").read_bytes()
  # Frames: header 1, images 3 + 2 + 1, identity records 2; no magic is
  # left inside a payload.
  assert raw.count(magic) == 9
  rec = sources.RecSource(tmp_path)
  got = [rec.record.read_image(i) for i in range(3)]
  assert got == [(images[0], 0), (images[1], 1), (images[2], 1)]
