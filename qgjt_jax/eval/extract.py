"""Embedding extraction with flip-test fusion, for every evaluation protocol.

The model enters only through `embed_fn`: a callable taking a uint8 BGR batch
(b, H, W, 3) of a fixed size b and returning unit embeddings (b, D) and their
norms (b,) (or (b, 1)), so the same code serves any backbone, sharding or
checkpoint. The batching runs on the host; the fusion is `fuse_flip`, the one
flip-fused scoring there is: evaluation and `Model.embed` call it jitted, and
the exported models trace it (`inference.model.fused_features`).

Flip fusion. Each image is embedded as is (e1, n1) and mirrored left-right
(e2, n2); the two views are combined by one of (the names in parentheses are
the AdaFace/QGFace evaluation scripts' names):

  'pre_norm_add'   (pre_norm_vector_add) f = normalise(n1 e1 + n2 e2),
                   fused norm |n1 e1 + n2 e2|. This is docs/METHOD.md section 7.
  'norm_weighted'  (norm_weighted_avg)   f = normalise((n1 e1 + n2 e2) /
                   (n1 + n2)), fused norm (n1 + n2) / 2. The direction equals
                   'pre_norm_add'; only the fused norm differs, which matters
                   where norms are multiplied back (IJB with norm scores).
  'mean'           (average)             f = normalise(e1 + e2), fused norm
                   (n1 + n2) / 2: plain average that ignores the norms.
  'concat'         (concat)              f = [e1, e2] / sqrt(2) (2D wide),
                   fused norm (n1 + n2) / 2. The reference leaves the
                   concatenation at length sqrt(2); it is scaled to unit length
                   here so that squared-L2 thresholds on 0..4 keep their
                   meaning. Cosine rankings are unchanged by the scale.
  None             no flip: f = e1, norm n1 (same as flip=False).
"""

from collections.abc import Callable, Iterable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qgjt_jax import progress as progress_lib
from qgjt_jax.files import images as images_lib

EmbedFn = Callable[[np.ndarray], tuple[Any, Any]]
FUSIONS = ('pre_norm_add', 'norm_weighted', 'mean', 'concat')
DEFAULT_FUSION = 'pre_norm_add'
# How every decision scores a face (compare, identify, embed, the exported
# graphs): the direction of n1 e1 + n2 e2, as the evaluation's default, and
# the mean of the two views' norms, the norm that training's statistics
# describe (the quality indicator).
DECISION_FUSION = 'norm_weighted'


def scoring_name(fusion: str | None) -> str:
  """What cosine scores were computed on, as results record it: fusions
  of the same direction score alike."""
  if fusion is None:
    return 'one view'
  if fusion in ('pre_norm_add', 'norm_weighted'):
    return 'flip-fused n1 e1 + n2 e2'
  if fusion == 'mean':
    return 'flip-fused e1 + e2'
  return 'flip-concatenated'


DECISION_SCORING = scoring_name(DECISION_FUSION)

_EPS = 1e-12


def _normalise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  norm = jnp.linalg.norm(x, axis=-1)
  return x / jnp.maximum(norm, _EPS)[:, None], norm


def fuse_flip(
    emb: jax.Array,
    norms: jax.Array,
    emb_flip: jax.Array,
    norms_flip: jax.Array,
    fusion: str | None,
) -> tuple[jax.Array, jax.Array]:
  """Combines the embeddings of an image and its mirror (see module doc).

  Plain array operations, traceable with a symbolic batch (the exports).

  Args:
    emb, emb_flip: (b, D) unit embeddings of the images and their mirrors.
    norms, norms_flip: (b,) or (b, 1) their pre-normalisation norms.
    fusion: one of FUSIONS, or None to keep the unflipped view.

  Returns:
    (fused (b, D) or (b, 2D) for 'concat', fused norm (b,)), float32.
  """
  e1 = jnp.asarray(emb, jnp.float32)
  e2 = jnp.asarray(emb_flip, jnp.float32)
  n1 = jnp.asarray(norms, jnp.float32).reshape(-1)
  n2 = jnp.asarray(norms_flip, jnp.float32).reshape(-1)
  if fusion is None:
    return e1, n1
  if fusion == 'pre_norm_add':
    return _normalise(e1 * n1[:, None] + e2 * n2[:, None])
  if fusion == 'norm_weighted':
    total = jnp.maximum(n1 + n2, _EPS)
    fused, _ = _normalise(
        e1 * (n1 / total)[:, None] + e2 * (n2 / total)[:, None]
    )
    return fused, (n1 + n2) / 2
  if fusion == 'mean':
    fused, _ = _normalise(e1 + e2)
    return fused, (n1 + n2) / 2
  if fusion == 'concat':
    return jnp.concatenate([e1, e2], axis=1) / jnp.sqrt(2.0), (n1 + n2) / 2
  raise ValueError(
      f'unknown fusion {fusion!r}; expected one of {FUSIONS} or None'
  )


_fuse_flip_jitted = jax.jit(fuse_flip, static_argnums=4)


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which rows of every global batch this process embeds.

  A global batch of B images is cut into `count` consecutive blocks of
  B / count rows; process `index` reads and embeds block `index` (the mesh
  orders devices by process, so that block lands on this process's
  devices), and the embed function returns the whole batch's embeddings to
  every process. Images are read once in all, and every process ends with
  every embedding, so the scores are computed alike everywhere.
  """

  index: int = 0
  count: int = 1


class ShardedEmbedFn:
  """An embed function over several processes (see HostShard).

  Called with this process's (B / count, H, W, 3) rows of a global batch,
  it returns the (B, D) embeddings and (B,) norms of the whole batch.
  """

  def __init__(self, fn: EmbedFn, shard: HostShard):
    self.fn, self.shard = fn, shard

  def __call__(self, local_images: np.ndarray):
    return self.fn(local_images)


def _local_rows(
    num_images: int, batch_size: int, shard: HostShard
) -> np.ndarray:
  """Indices of the images this process embeds, in global-batch order.

  The last global batch is padded with the last image (repeated rather
  than zeros, so padded rows cannot produce zero norms); its padded rows are
  dropped after the gather.
  """
  num_batches = -(-num_images // batch_size)
  rows = np.arange(num_batches * batch_size).reshape(
      num_batches, shard.count, batch_size // shard.count
  )[:, shard.index]
  return np.minimum(rows.reshape(-1), num_images - 1)


def _as_random_access(images):
  """An array or LazyImages as is; any other iterable collected in memory."""
  if isinstance(images, (np.ndarray, images_lib.LazyImages)):
    return images
  chunks = list(_chunks(images))
  if not chunks:
    raise ValueError('no images to embed')
  return np.concatenate(chunks)


def _chunks(images: Iterable[np.ndarray]):
  """Yields (n, H, W, 3) arrays from an iterable of images or chunks."""
  for item in images:
    item = np.asarray(item)
    if item.ndim == 3:
      item = item[None]
    if item.ndim != 4:
      raise ValueError(
          'each item must be an image (H, W, 3) or a chunk '
          f'(n, H, W, 3), got shape {item.shape}'
      )
    yield item


def _local_batches(images, batch_size: int, shard: HostShard):
  """Yields (this process's rows of a global batch, real rows in it)."""
  if isinstance(images, np.ndarray) and images.ndim != 4:
    raise ValueError(f'images must be (N, H, W, 3), got {images.shape}')
  num_images = len(images)
  if not num_images:
    raise ValueError('no images to embed')
  rows = _local_rows(num_images, batch_size, shard)
  local = batch_size // shard.count
  if isinstance(images, images_lib.LazyImages):
    stream = images.chunks(rows, chunk_size=local)
  else:
    stream = (images[rows[i : i + local]] for i in range(0, len(rows), local))
  for k, batch in enumerate(stream):
    yield batch, min(batch_size, num_images - k * batch_size)


def extract_embeddings(
    embed_fn: EmbedFn | ShardedEmbedFn,
    images: np.ndarray | images_lib.LazyImages | Iterable[np.ndarray],
    *,
    batch_size: int,
    flip: bool = True,
    fusion: str | None = DEFAULT_FUSION,
    progress: bool = True,
    return_norms: bool = False,
    desc: str = 'embed',
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Embeds every image, `batch_size` at a time, with optional flip fusion.

  Args:
    embed_fn: uint8 BGR (batch_size, H, W, 3) -> (unit (b, D), norms (b,)),
      or a ShardedEmbedFn, which each process calls with its share of every
      batch. It may return device arrays: the next batch is dispatched before
      the previous result is read, so an asynchronous embed_fn overlaps with
      the host work.
    images: a uint8 array (N, H, W, 3), images_lib.LazyImages (read on
      demand, only the rows this process embeds), or an iterable of single
      images (H, W, 3) and/or chunks (n, H, W, 3), which is read whole first.
      N need not be a multiple of batch_size.
    batch_size: the fixed (global) batch size embed_fn works on.
    flip: also embed the mirrored images and fuse (see module doc).
    fusion: one of FUSIONS; None is the same as flip=False.
    progress: print a progress line on stderr every 10 s and at the end (on
      the first process only).
    return_norms: also return the fused norms.
    desc: label of the progress line.

  Returns:
    float32 embeddings (N, D) (2D for 'concat'), and (N,) norms if
    return_norms; the same on every process.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if fusion is not None and fusion not in FUSIONS:
    raise ValueError(
        f'unknown fusion {fusion!r}; expected one of {FUSIONS} or None'
    )
  shard = (
      embed_fn.shard if isinstance(embed_fn, ShardedEmbedFn) else HostShard()
  )
  if batch_size % shard.count:
    raise ValueError(
        f'batch_size {batch_size} does not split over '
        f'{shard.count} processes'
    )
  use_flip = flip and fusion is not None
  images = _as_random_access(images)
  bar = progress_lib.Progress(
      len(images), desc, enabled=progress and shard.index == 0
  )
  feats, norms = [], []

  def collect(outputs, n_valid):
    (e1, n1), flipped = outputs
    e1, n1 = _check_output(e1, n1, batch_size)
    if flipped is None:
      fused, fused_norm = e1, n1
    else:
      e2, n2 = _check_output(*flipped, batch_size)
      fused, fused_norm = _fuse_flip_jitted(e1, n1, e2, n2, fusion)
    feats.append(np.asarray(fused)[:n_valid])
    norms.append(np.asarray(fused_norm)[:n_valid])
    bar.update(n_valid)

  in_flight = None
  for batch, n_valid in _local_batches(images, batch_size, shard):
    outputs = (
        embed_fn(batch),
        embed_fn(np.ascontiguousarray(batch[:, :, ::-1])) if use_flip else None,
    )
    if in_flight is not None:
      collect(*in_flight)
    in_flight = (outputs, n_valid)
  collect(*in_flight)
  bar.close()
  feats = np.concatenate(feats).astype(np.float32, copy=False)
  norms = np.concatenate(norms).astype(np.float32, copy=False)
  return (feats, norms) if return_norms else feats


def _check_output(emb, norms, batch_size: int):
  emb = np.asarray(emb, np.float32)
  norms = np.asarray(norms, np.float32)
  if emb.ndim != 2 or emb.shape[0] != batch_size:
    raise ValueError(
        f'embed_fn returned embeddings of shape {emb.shape}; '
        f'expected ({batch_size}, D)'
    )
  if norms.size != batch_size:
    raise ValueError(
        f'embed_fn returned norms of shape {norms.shape}; '
        f'expected ({batch_size},) or ({batch_size}, 1)'
    )
  return emb, norms.reshape(batch_size)
