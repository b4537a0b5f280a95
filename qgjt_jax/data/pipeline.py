"""The grain input pipeline: shuffled, sharded batches of two views per face.

The record stream is a pure function of (seed, step): position p of the
endless (or `num_epochs` long) stream is record `perm_e(p mod N)` of epoch
`e = p // N`, with a fresh permutation per epoch. Global batch k is positions
[kG, (k+1)G); process i of P takes every P-th of them (positions i, i+P, ...),
so the processes' batches are disjoint and together make the global batch.
The views of a record are drawn from a generator keyed by (seed, epoch,
record), never from global state, and the batch is the unit of work of the
worker processes, so the batches are identical whatever the worker count.
The stream from global batch s on is `make_train_dataset(...,
start_step=s)`: a resumed run restarts its input at the restored step, with
any process or worker count (an iterator's `get_state()` also works, but
only for the same counts).

Batches: {"image_h", "image_l": (b, H, W, 3) uint8 BGR, "label": (b,) int32,
"degrade_h": (b,) float32 (1.0), "degrade_l": (b,) float32 (the L view's
resolution factor r)}. Normalisation happens on the device.
"""

from __future__ import annotations

import functools
import signal
import threading
from typing import Any

import cv2
import grain
import numpy as np

from qgjt_jax.data import degrade
from qgjt_jax.files import images
from qgjt_jax.files import limits
from qgjt_jax.method.batch import make_batch

# Seeds are folded into Philox's 128-bit key; the (epoch, record) pair is its
# counter. Resetting a cached generator's state costs a fraction of building
# a new one (or of SeedSequence hashing in np.random.default_rng).
_KEY_MASK = (1 << 64) - 1
_KEY_TAG = 0x5147465F  # separates these streams from other Philox users
_rngs = threading.local()


def record_rng(seed: int, epoch: int, record: int) -> np.random.Generator:
  """The generator behind the views of `record` in `epoch` (per thread).

  The returned generator is reused by the next call in the same thread: draw
  from it before asking for another.
  """
  rng = getattr(_rngs, "generator", None)
  if rng is None:
    rng = _rngs.generator = np.random.Generator(np.random.Philox(0))
    _rngs.state = rng.bit_generator.state
  state = _rngs.state
  state["state"]["counter"] = np.array([0, 0, epoch, record], np.uint64)
  state["state"]["key"] = np.array([seed & _KEY_MASK, _KEY_TAG], np.uint64)
  state["buffer_pos"] = 4  # buffer empty: the next draw starts at the counter
  state["has_uint32"] = 0
  state["uinteger"] = 0
  rng.bit_generator.state = state
  return rng


def fit_size(img: np.ndarray, size: int | None) -> np.ndarray:
  """Resizes a square face crop to `size` (no-op when it already fits)."""
  if size is None or img.shape[0] == size and img.shape[1] == size:
    return img
  interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
  return cv2.resize(img, (size, size), interpolation=interp)


def ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app (pytest,
  plain scripts, notebooks) nobody parsed them, so accept the defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(
    worker_index: int,
    worker_count: int,
    in_force: limits.Limits = limits.Limits(),
) -> None:
  """Set-up of each grain worker process.

  SIGINT and SIGTERM are ignored: the main process owns the workers and
  stops them itself after its checkpoint. (A Ctrl-C reaches the whole
  process group; without this every worker would die with a traceback
  while the main process still needs its batches.) One OpenCV thread per
  worker: the workers are the parallelism, and OpenCV's pool only adds
  contention on images this small. The limits in force in the main
  process hold in each worker too.
  """
  del worker_index, worker_count
  limits.use(in_force)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  cv2.setNumThreads(1)


def worker_init():
  """Each grain worker's set-up (`_init_worker`), with the limits in force
  now."""
  return functools.partial(_init_worker, in_force=limits.current())


class TwoViews:
  """Maps (epoch, record index) to that record's two views (picklable)."""

  def __init__(
      self,
      source,
      seed: int,
      view_config: degrade.ViewConfig,
      image_size: int | None = None,
      flip_p: float = 0.5,
  ):
    self.source = source
    self.seed = seed
    self.view_config = view_config
    self.image_size = image_size
    self.flip_p = flip_p

  def __call__(self, item: tuple[int, int]) -> dict[str, Any]:
    epoch, index = item
    record = self.source[index]
    try:
      img = images.decode_image(record["image"])
    except ValueError:  # ImageError, LimitError: again, naming the record
      where = (
          self.source.where(index)
          if hasattr(self.source, "where")
          else f"{self.source.name}: image {index}"
      )
      img = images.decode_image(record["image"], where)
    img = fit_size(img, self.image_size)
    rng = record_rng(self.seed, epoch, index)
    high = degrade.clean_view(img, rng, self.flip_p)
    low, r = degrade.degraded_view(img, rng, self.view_config)
    return make_batch(
        high, low, np.int32(record["label"]), np.float32(1.0), np.float32(r)
    )


class ShuffledStream:
  """Stream position -> (epoch, record index), a new permutation per epoch.

  The permutation of epoch e is a seeded shuffle of all record indices, built
  on first use in each process and kept until the next epoch's replaces it
  (4 bytes per record). A table lookup is much cheaper per record than
  grain's O(1)-memory index shuffle (about 40 us per record on a 2-core VM,
  40% of a 112x112 JPEG decode).
  """

  def __init__(self, num_records: int, seed: int):
    if num_records < 1:
      raise ValueError("empty source")
    self.num_records = num_records
    self.seed = seed
    self._dtype = np.int32 if num_records < 2**31 else np.int64
    self._epoch, self._perm = None, None
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    state.update(_epoch=None, _perm=None)  # rebuilt in each process
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if self._epoch != epoch:
        perm = np.arange(self.num_records, dtype=self._dtype)
        np.random.default_rng((self.seed, epoch, _KEY_TAG)).shuffle(perm)
        self._epoch, self._perm = epoch, perm
      return self._perm

  def __call__(self, position: int, unused_value=None) -> tuple[int, int]:
    epoch, i = divmod(int(position), self.num_records)
    return epoch, int(self.permutation(epoch)[i])


def record_stream(
    num_records: int, seed: int, num_epochs: int | None, global_batch_size: int
) -> grain.MapDataset:
  """(epoch, record index) at every stream position, whole global batches."""
  ds = grain.MapDataset.range(num_records).repeat(num_epochs)
  if num_epochs is not None:  # every process must see the same step count
    ds = ds[: len(ds) // global_batch_size * global_batch_size]
  return ds.map_with_index(ShuffledStream(num_records, seed))


def make_train_dataset(
    source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    view_config: degrade.ViewConfig = degrade.ViewConfig(),
    worker_count: int = 0,
    num_epochs: int | None = None,
    image_size: int | None = None,
    read_threads: int = 0,
    worker_buffer_size: int = 2,
    start_step: int = 0,
) -> grain.IterDataset:
  """The training batches of this process, as a grain IterDataset.

  `iter()` of the result is a grain DatasetIterator: `get_state()` /
  `set_state()` (JSON-serialisable), and orbax saves it with
  `grain.checkpoint.CheckpointSave(iterator)` /
  `grain.checkpoint.CheckpointRestore(iterator)` (the state of a multi-worker
  iterator records the worker count, so restore with the same count).

  Args:
    source: a random-access source of {"image": encoded bytes, "label"}.
    global_batch_size: images per step summed over processes.
    seed: shuffling and augmentation seed.
    process_index, process_count: this host's shard of every global batch.
    view_config: the L view recipe (degrade.ViewConfig).
    worker_count: grain worker processes (0 = in this process).
    num_epochs: None for an endless stream.
    image_size: resize decoded images to this side (None = as stored).
    read_threads: threads per process computing batches (0 = none; threads
      only help where the GIL is released, i.e. inside OpenCV).
    worker_buffer_size: batches each worker prepares ahead.
    start_step: the first global batch to produce (a resumed run's step).
  """
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch {global_batch_size} does not split over "
        f"{process_count} processes"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in [0, {process_count})"
    )
  batch = global_batch_size // process_count
  ds = record_stream(len(source), seed, num_epochs, global_batch_size)
  ds = ds[start_step * global_batch_size + process_index :: process_count]
  ds = ds.map(TwoViews(source, seed, view_config, image_size))
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=read_threads,
          prefetch_buffer_size=max(1, read_threads * 2),
      )
  )
  if worker_count > 0:
    ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
        ),
        worker_init_fn=worker_init(),
    )
  return ds
