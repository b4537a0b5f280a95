"""Tests of the data benchmark: its .rec writer and one timed row."""

import struct

from qgjt_jax.data import sources
from qgjt_jax.data import synthetic
from qgjt_jax.tools import pipeline_bench


def test_written_rec_reads_back(tmp_path):
  pipeline_bench.write_synthetic_rec(
      tmp_path, num_images=7, per_identity=3, image_size=16, seed=2
  )
  assert (tmp_path / "property").read_text() == "3,16,16"
  rec = sources.RecSource(tmp_path)
  generated = synthetic.SyntheticFaces(3, 3, image_size=16, seed=2)
  assert len(rec) == 7 and rec.num_classes == 3
  for i in range(7):
    assert rec[i]["image"] == generated[i]["image"], i
    assert rec[i]["label"] == generated[i]["label"], i
  # Record 0 names the identity records, each holding its [first, end) keys.
  assert rec.record.identity_ranges().tolist() == [[1, 4], [4, 7], [7, 8]]


def test_writer_splits_payloads_holding_the_magic(tmp_path):
  # A 4-aligned copy of the magic number inside a payload must be cut out
  # (dmlc-core's continuation frames), or a reader would resync there.
  magic = struct.pack("<I", 0xCED7230A)
  payloads = [
      b"\xff\xd8" + b"ab" + magic + b"cdef" + magic + magic + b"z",
      b"\xff\xd8" + b"abc" + magic + b"unaligned",
      magic + b"end",
  ]
  pipeline_bench.write_insightface_rec(
      tmp_path, payloads, [1, 0, 1], image_size=8
  )
  data = (tmp_path / "train.rec").read_bytes()
  frames, flags, pos = [], set(), 0
  while pos < len(data):
    word, lrec = struct.unpack_from("<II", data, pos)
    assert word == 0xCED7230A, pos
    frames.append(pos)
    flags.add(lrec >> 29)
    length = lrec & ((1 << 29) - 1)
    pos += 8 + length + (-length % 4)
  aligned = [i for i in range(0, len(data), 4) if data[i : i + 4] == magic]
  assert aligned == frames  # the magic only where a frame starts
  assert flags == {0, 1, 2, 3}  # whole, first, middle and last frames
  rec = sources.RecSource(tmp_path)
  got = sorted((rec[i]["image"], int(rec[i]["label"])) for i in range(3))
  assert got == sorted(zip(payloads, [1, 0, 1]))


def test_bench_row_counts_samples_and_cpu():
  source = synthetic.SyntheticFaces(4, 4, image_size=24, cache=True)
  row = pipeline_bench.bench_source(
      source,
      "tiny",
      workers=0,
      batch=8,
      image_size=24,
      aug_prob=0.2,
      seconds=0.3,
      warmup=0.0,
  )
  assert row["samples"] > 0 and row["samples"] % 8 == 0
  assert row["wall_s"] >= 0.3
  # The rates are of the exact totals, which the row rounds to 0.01 s.
  for rate, total in (
      ("samples_per_s", "wall_s"),
      ("samples_per_cpu_s", "cpu_s"),
  ):
    assert (
        row["samples"] / (row[total] + 0.005) - 0.05
        <= row[rate]
        <= row["samples"] / max(row[total] - 0.005, 1e-9) + 0.05
    ), rate
  assert row["cpu_s"] > 0 and row["workers_cpu_s"] == 0
  assert row["aug_prob"] == 0.2 and row["dataset"] == "tiny"
