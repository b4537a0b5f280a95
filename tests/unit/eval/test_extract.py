"""Embedding extraction: batching, padding, flip fusion, progress."""

import numpy as np
import pytest

from qgjt_jax.eval import extract

BATCH = 4


class FakeModel:
  """A fixed random projection of the pixels; records the batches it saw."""

  def __init__(self, dim=6, size=8, norm_shape=(-1,)):
    rng = np.random.default_rng(0)
    self.proj = rng.normal(size=(size * size * 3, dim))
    self.norm_shape = norm_shape
    self.batches = []

  def raw(self, images):
    """Un-normalised features, computed here in float64 for the oracle."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255
    return flat @ self.proj

  def __call__(self, images):
    assert images.shape[0] == BATCH, 'embed_fn needs a fixed batch size'
    assert images.dtype == np.uint8
    self.batches.append(images.copy())
    v = self.raw(images)
    n = np.linalg.norm(v, axis=1)
    return v / n[:, None], n.reshape(self.norm_shape)


def _images(n, size=8, seed=1):
  return np.random.default_rng(seed).integers(
      0, 256, (n, size, size, 3), dtype=np.uint8
  )


def _unit(v):
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def _expected(model, images, fusion):
  """The fusion rules written out on raw features v = n * e."""
  v1 = model.raw(images)
  v2 = model.raw(images[:, :, ::-1])  # mirrored left-right
  n1, n2 = np.linalg.norm(v1, axis=1), np.linalg.norm(v2, axis=1)
  if fusion is None:
    return _unit(v1), n1
  if fusion == 'pre_norm_add':
    return _unit(v1 + v2), np.linalg.norm(v1 + v2, axis=1)
  if fusion == 'norm_weighted':
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    return (
        _unit(w1[:, None] * _unit(v1) + w2[:, None] * _unit(v2)),
        (n1 + n2) / 2,
    )
  if fusion == 'mean':
    return _unit(_unit(v1) + _unit(v2)), (n1 + n2) / 2
  if fusion == 'concat':
    return (
        np.concatenate([_unit(v1), _unit(v2)], 1) / np.sqrt(2),
        (n1 + n2) / 2,
    )
  raise AssertionError(fusion)


@pytest.mark.parametrize('fusion', [*extract.FUSIONS, None])
def test_fusions_match_numpy_with_a_padded_last_batch(fusion):
  model = FakeModel()
  images = _images(13)  # 3 full batches of 4 and one padded batch
  feats, norms = extract.extract_embeddings(
      model,
      images,
      batch_size=BATCH,
      fusion=fusion,
      progress=False,
      return_norms=True,
  )
  want_feats, want_norms = _expected(model, images, fusion)
  np.testing.assert_allclose(feats, want_feats, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
  assert feats.dtype == np.float32 and norms.shape == (13,)
  calls = 4 * (1 if fusion is None else 2)
  assert len(model.batches) == calls


def test_pre_norm_add_and_norm_weighted_share_the_direction():
  model = FakeModel()
  images = _images(5)
  a = extract.extract_embeddings(
      model, images, batch_size=BATCH, fusion='pre_norm_add', progress=False
  )
  b = extract.extract_embeddings(
      model, images, batch_size=BATCH, fusion='norm_weighted', progress=False
  )
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_flip_false_equals_no_fusion_and_feeds_unflipped_images():
  model = FakeModel()
  images = _images(6)
  got = extract.extract_embeddings(
      model, images, batch_size=BATCH, flip=False, progress=False
  )
  np.testing.assert_allclose(
      got, _expected(model, images, None)[0], rtol=1e-5, atol=1e-6
  )
  seen = np.concatenate(model.batches)
  np.testing.assert_array_equal(seen[:6], images)
  # The padding repeats the last real image.
  np.testing.assert_array_equal(seen[6:], np.repeat(images[-1:], 2, 0))


def test_array_single_images_and_uneven_chunks_agree():
  images = _images(11)
  want = extract.extract_embeddings(
      FakeModel(), images, batch_size=BATCH, progress=False
  )
  singles = extract.extract_embeddings(
      FakeModel(), list(images), batch_size=BATCH, progress=False
  )
  chunks = extract.extract_embeddings(
      FakeModel(),
      (c for c in np.split(images, [3, 8])),
      batch_size=BATCH,
      progress=False,
  )
  np.testing.assert_array_equal(singles, want)
  np.testing.assert_array_equal(chunks, want)


def test_accepts_column_norms():
  model = FakeModel(norm_shape=(-1, 1))
  images = _images(4)
  got = extract.extract_embeddings(
      model, images, batch_size=BATCH, progress=False
  )
  np.testing.assert_allclose(
      got, _expected(model, images, 'pre_norm_add')[0], rtol=1e-5, atol=1e-6
  )


def test_errors():
  with pytest.raises(ValueError, match='unknown fusion'):
    extract.extract_embeddings(
        FakeModel(), _images(2), batch_size=BATCH, fusion='max', progress=False
    )
  model = FakeModel()

  def short(images):  # drops a row, as a wrongly sharded function might
    e, n = model(images)
    return e[1:], n[1:]

  with pytest.raises(ValueError, match=r'expected \(4, D\)'):
    extract.extract_embeddings(
        short, _images(2), batch_size=BATCH, progress=False
    )
  with pytest.raises(ValueError, match='no images'):
    extract.extract_embeddings(
        FakeModel(), [], batch_size=BATCH, progress=False
    )


def test_progress_line_on_stderr(capsys):
  extract.extract_embeddings(
      FakeModel(), _images(7), batch_size=BATCH, desc='lfw'
  )
  err = capsys.readouterr().err
  assert 'lfw:' in err and '7/7' in err and '100.0%' in err
  extract.extract_embeddings(
      FakeModel(), iter(list(_images(5))), batch_size=BATCH, desc='gen'
  )
  assert '5/5' in capsys.readouterr().err
  # Only the first of several processes shows progress.
  images = _images(7)
  extract.extract_embeddings(
      _OtherProcess(images, 1), images, batch_size=BATCH, flip=False
  )
  assert 'embed:' not in capsys.readouterr().err


class _OtherProcess(extract.ShardedEmbedFn):
  """Process `index` of 2, with the gather done by looking the batch up.

  Checks that each call brings this process's block of the global batch, and
  returns what a real gather would: the whole batch's embeddings.
  """

  def __init__(self, images, index, flip=False):
    super().__init__(FakeModel(), extract.HostShard(index, 2))
    self.images, self.calls, self.flip = images, 0, flip

  def __call__(self, local):
    k = self.calls // (2 if self.flip else 1)
    mirrored = self.flip and self.calls % 2
    self.calls += 1
    rows = np.minimum(
        np.arange(k * BATCH, (k + 1) * BATCH), len(self.images) - 1
    )
    batch = self.images[rows]
    if mirrored:
      batch = np.ascontiguousarray(batch[:, :, ::-1])
    half = BATCH // 2
    block = batch[self.shard.index * half : (self.shard.index + 1) * half]
    np.testing.assert_array_equal(local, block)
    return self.fn(batch)


def test_each_process_reads_its_block_of_every_global_batch():
  # 11 images, global batches of 4 over 2 processes: blocks of 2 rows.
  rows = [extract._local_rows(11, 4, extract.HostShard(p, 2)) for p in range(2)]
  np.testing.assert_array_equal(rows[0], [0, 1, 4, 5, 8, 9])
  np.testing.assert_array_equal(rows[1], [2, 3, 6, 7, 10, 10])  # padded
  one = extract._local_rows(11, 4, extract.HostShard())
  np.testing.assert_array_equal(one, list(range(11)) + [10])


def test_lazy_images_are_read_only_where_this_process_embeds():
  images = _images(11)
  read = []

  def load(i):
    read.append(i)
    return images[i]

  lazy = extract.images_lib.LazyImages(load, len(images), num_threads=1)
  got = extract.extract_embeddings(
      _OtherProcess(images, 1, flip=True),
      lazy,
      batch_size=BATCH,
      progress=False,
  )
  want = extract.extract_embeddings(
      FakeModel(), images, batch_size=BATCH, progress=False
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert sorted(set(read)) == [2, 3, 6, 7, 10]
