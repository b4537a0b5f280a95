r"""Throughput of the two-view training pipeline, per dataset.

  python -m qgjt_jax.data.bench --workers=2 [--rec=DIR] [--seconds=20]
  python -m qgjt_jax.data.bench --write_rec=DIR [--rec_images=2000]

Prints one JSON line per dataset (the generated set, pre-rendered in memory,
and the `.rec` given with --rec): two-view samples per second in total and per
worker, and samples per CPU-second, counting this process and all its
children (the grain workers). The authors' pipeline is the yardstick; compare
samples per CPU-second measured in the same session (see the shared bench
README; docs/PERFORMANCE.md has a measured comparison). --write_rec writes
an insightface-layout `.rec` of generated faces (readable by MXNet too) for
such comparisons.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import struct
import time

from absl import app
from absl import flags
import cv2
import numpy as np

from qgjt_jax import errors
from qgjt_jax.data import degrade
from qgjt_jax.data import pipeline
from qgjt_jax.data import sources
from qgjt_jax.data import synthetic

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined on demand: importing the writer or the
  timing helpers must not claim global flag names)."""
  flags.DEFINE_integer("workers", 0, "grain worker processes")
  flags.DEFINE_string("rec", None, "insightface .rec directory to time")
  flags.DEFINE_float("seconds", 20.0, "timed window per dataset")
  flags.DEFINE_float("warmup", 3.0, "untimed seconds after the first batch")
  flags.DEFINE_integer("batch", 64, "batch size")
  flags.DEFINE_integer("image_size", 112, "image side")
  flags.DEFINE_float(
      "aug_prob", 0.2, "crop, jitter and rotation probability of the L view"
  )
  flags.DEFINE_integer(
      "synthetic_images", 2000, "size of the generated set (0 skips it)"
  )
  flags.DEFINE_string(
      "write_rec", None, "write a generated .rec set here and exit"
  )
  flags.DEFINE_integer("rec_images", 2000, "images in the --write_rec set")
  flags.DEFINE_integer(
      "rec_per_identity", 20, "images per identity in the --write_rec set"
  )


# -- an insightface .rec writer ------------------------------------------------

_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", _MAGIC)
_IR_HEADER = struct.Struct("<IfQQ")


def _frames(payload: bytes) -> list[tuple[int, bytes]]:
  """Cuts a payload at 4-aligned copies of the magic, as dmlc-core does.

  Returns (continuation flag, piece): 0 = whole, 1 first, 2 middle, 3 last.
  """
  cuts, start = [], 0
  pos = payload.find(_MAGIC_BYTES)
  while pos >= 0:
    if pos % 4 == 0:
      cuts.append(payload[start:pos])
      start = pos + 4
    pos = payload.find(_MAGIC_BYTES, pos + 1)
  if not cuts:
    return [(0, payload)]
  pieces = cuts + [payload[start:]]
  return [
      (1 if i == 0 else 3 if i == len(pieces) - 1 else 2, p)
      for i, p in enumerate(pieces)
  ]


def _record(flag_labels: list[float] | float, image: bytes, key: int) -> bytes:
  if isinstance(flag_labels, list):
    head = _IR_HEADER.pack(len(flag_labels), 0.0, key, 0)
    return head + np.asarray(flag_labels, "<f4").tobytes() + image
  return _IR_HEADER.pack(0, float(flag_labels), key, 0) + image


def write_insightface_rec(
    directory: str | os.PathLike,
    images: list[bytes],
    labels: list[int],
    image_size: int,
) -> None:
  """Writes train.rec/train.idx/property in the insightface face-set layout.

  Record 0 is the identity header, records 1..N the images (grouped by
  label), then one identity record per class with its [first, end) keys.
  """
  order = np.argsort(np.asarray(labels), kind="stable")
  labels = [int(labels[i]) for i in order]
  images = [images[i] for i in order]
  num_classes = max(labels) + 1
  n = len(images)
  first_id = n + 1
  records = [
      (0, _record([float(first_id), float(first_id + num_classes)], b"", 0))
  ]
  for k, (img, lab) in enumerate(zip(images, labels), start=1):
    records.append((k, _record(float(lab), img, k)))
  starts = np.searchsorted(labels, np.arange(num_classes + 1)) + 1
  for c in range(num_classes):
    key = first_id + c
    records.append(
        (key, _record([float(starts[c]), float(starts[c + 1])], b"", key))
    )
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  index = []
  with open(directory / "train.rec", "wb") as f:
    for key, payload in records:
      index.append(f"{key}\t{f.tell()}\n")
      for flag, piece in _frames(payload):
        f.write(struct.pack("<II", _MAGIC, (flag << 29) | len(piece)))
        f.write(piece)
        f.write(b"\0" * (-len(piece) % 4))
  (directory / "train.idx").write_text("".join(index))
  (directory / "property").write_text(
      f"{num_classes},{image_size},{image_size}"
  )


def write_synthetic_rec(
    directory,
    num_images: int,
    per_identity: int,
    image_size: int = 112,
    seed: int = 0,
) -> None:
  src = synthetic.SyntheticFaces(
      -(-num_images // per_identity), per_identity, image_size, seed
  )
  recs = [src[i] for i in range(num_images)]
  write_insightface_rec(
      directory,
      [r["image"] for r in recs],
      [int(r["label"]) for r in recs],
      image_size,
  )


# -- CPU accounting -----------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float] | None:
  """(parent pid, CPU seconds) of a process, from /proc (Linux)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  tick = os.sysconf("SC_CLK_TCK")
  return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick


def descendants_cpu_seconds() -> dict[int, float]:
  """CPU seconds of every live descendant of this process, by pid."""
  stats = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      s = _proc_stat(int(name))
      if s is not None:
        stats[int(name)] = s
  children: dict[int, list[int]] = {}
  for pid, (ppid, _) in stats.items():
    children.setdefault(ppid, []).append(pid)
  out, todo = {}, list(children.get(os.getpid(), []))
  while todo:
    pid = todo.pop()
    out[pid] = stats[pid][1]
    todo.extend(children.get(pid, []))
  return out


def machine_busy_seconds() -> float:
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:9]]
  return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def measure(
    iterator, batch: int, seconds: float, warmup: float
) -> dict[str, float]:
  """Pulls batches for `warmup` then `seconds`; rates over the second span."""
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < warmup:
    next(iterator)
  kids0, own0 = descendants_cpu_seconds(), time.process_time()
  busy0, t0, n = machine_busy_seconds(), time.perf_counter(), 0
  while True:
    next(iterator)
    n += batch
    wall = time.perf_counter() - t0
    if wall >= seconds:
      break
  own = time.process_time() - own0
  kids1 = descendants_cpu_seconds()
  kids = sum(v - kids0.get(pid, 0.0) for pid, v in kids1.items())
  cpu = own + kids
  busy = machine_busy_seconds() - busy0
  return {
      "samples": n,
      "wall_s": round(wall, 2),
      "cpu_s": round(cpu, 2),
      "main_cpu_s": round(own, 2),
      "workers_cpu_s": round(kids, 2),
      "samples_per_s": round(n / wall, 1),
      "samples_per_cpu_s": round(n / cpu, 1),
      "cpu_util": round(cpu / wall, 3),
      "foreign_cpu_util": round(max(busy - cpu, 0.0) / wall, 3),
  }


def bench_source(
    source,
    name: str,
    *,
    workers: int,
    batch: int,
    image_size: int,
    aug_prob: float,
    seconds: float,
    warmup: float,
) -> dict[str, object]:
  """Times `make_train_dataset` over `source`; returns one JSON-able row."""
  p = aug_prob
  cfg = degrade.ViewConfig(crop_p=p, jitter_p=p, rotate_p=p)
  ds = pipeline.make_train_dataset(
      source,
      global_batch_size=batch,
      seed=0,
      view_config=cfg,
      worker_count=workers,
      image_size=image_size,
  )
  it = iter(ds)
  try:
    next(it)  # worker start-up (process spawn, imports) is not throughput
    rates = measure(it, batch, seconds, warmup)
  finally:
    if hasattr(it, "close"):
      it.close()
  per_worker = rates["samples_per_s"] / max(1, workers)
  return {
      "bench": "qgjt_pipeline",
      "dataset": name,
      "images": len(source),
      "image_size": image_size,
      "aug_prob": p,
      "workers": workers,
      "batch": batch,
      **rates,
      "samples_per_s_per_worker": round(per_worker, 1),
  }


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv):
  del argv
  cv2.setNumThreads(1)
  if FLAGS.write_rec:
    write_synthetic_rec(
        FLAGS.write_rec,
        FLAGS.rec_images,
        FLAGS.rec_per_identity,
        FLAGS.image_size,
    )
    print(json.dumps({"wrote": FLAGS.write_rec, "images": FLAGS.rec_images}))
    return
  run = dict(
      workers=FLAGS.workers,
      batch=FLAGS.batch,
      image_size=FLAGS.image_size,
      aug_prob=FLAGS.aug_prob,
      seconds=FLAGS.seconds,
      warmup=FLAGS.warmup,
  )
  print(
      json.dumps(
          {
              "bench": "qgjt_pipeline",
              "mode": "env",
              "python": platform.python_version(),
              "numpy": np.__version__,
              "opencv": cv2.__version__,
              "nproc": os.cpu_count(),
              "cpu": _cpu_model(),
          }
      ),
      flush=True,
  )
  if FLAGS.synthetic_images:
    per = 20
    src = synthetic.SyntheticFaces(
        -(-FLAGS.synthetic_images // per),
        per,
        FLAGS.image_size,
        seed=0,
        cache=True,
    )
    src.prerender()
    print(json.dumps(bench_source(src, src.name, **run)), flush=True)
  if FLAGS.rec:
    with errors.expected_failures():
      src = sources.RecSource(FLAGS.rec)
    print(json.dumps(bench_source(src, f"rec:{src.name}", **run)), flush=True)


def cli() -> None:
  """`python -m qgjt_jax.data.bench`."""
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)


if __name__ == "__main__":
  cli()
