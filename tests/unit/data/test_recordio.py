"""Tests of the insightface RecordIO reader and the .rec grain source.

The oracle for the real layout is the MXNet-written fixture, read here a
second way (a sequential scan of the frames, no index); split records, vector
labels and every kind of damage are made with the small writer below, which
follows dmlc-core's writer rather than our reader.
"""

import concurrent.futures
import pathlib
import pickle
import shutil
import struct

import cv2
import numpy as np
from PIL import Image
import pytest

from qgjt_jax.data import recordio
from qgjt_jax.data import sources
from qgjt_jax.files import images as images_lib

MAGIC = b"\x0a\x23\xd7\xce"  # 0xced7230a little-endian


# -- an independent writer and scanner ----------------------------------------


def frames_of(payload: bytes) -> bytes:
  """dmlc-core framing: cut at 4-aligned magics, flags 0 or 1/2/3, pad to 4."""
  cuts = [
      i
      for i in range(0, len(payload) - len(payload) % 4, 4)
      if payload[i : i + 4] == MAGIC
  ]
  pieces, start = [], 0
  for cut in cuts:
    pieces.append(payload[start:cut])
    start = cut + 4
  pieces.append(payload[start:])
  out = bytearray()
  for n, piece in enumerate(pieces):
    if len(pieces) == 1:
      flag = 0
    else:
      flag = 1 if n == 0 else (3 if n == len(pieces) - 1 else 2)
    out += MAGIC + struct.pack("<I", (flag << 29) | len(piece)) + piece
    out += b"\0" * (-len(piece) % 4)
  return bytes(out)


def pack(label, image: bytes = b"", key: int = 0) -> bytes:
  """MXNet IRHeader packing: a scalar label, or a vector after the header."""
  if np.ndim(label) == 0:
    return struct.pack("<IfQQ", 0, float(label), key, 0) + image
  vec = np.asarray(label, "<f4")
  return struct.pack("<IfQQ", len(vec), 0.0, key, 0) + vec.tobytes() + image


def write_rec(
    directory: pathlib.Path, records, property_text=None, idx_order=None
) -> pathlib.Path:
  """Writes train.rec/train.idx (+ property) from [(key, payload)]."""
  directory.mkdir(parents=True, exist_ok=True)
  offsets, blob = {}, bytearray()
  for key, payload in records:
    offsets[key] = len(blob)
    blob += frames_of(payload)
  (directory / "train.rec").write_bytes(bytes(blob))
  keys = idx_order if idx_order is not None else [k for k, _ in records]
  (directory / "train.idx").write_text(
      "".join(f"{k}\t{offsets[k]}\n" for k in keys)
  )
  if property_text is not None:
    (directory / "property").write_text(property_text)
  return directory / "train.rec"


def scan_rec(path: pathlib.Path) -> dict[int, tuple[object, bytes]]:
  """Reads every record in file order: {IRHeader id: (label, image bytes)}."""
  data = path.read_bytes()
  out, pos, parts = {}, 0, []
  while pos < len(data):
    magic, word = struct.unpack_from("<4sI", data, pos)
    assert magic == MAGIC
    flag, length = word >> 29, word & ((1 << 29) - 1)
    parts.append(data[pos + 8 : pos + 8 + length])
    pos += 8 + length + (-length % 4)
    if flag in (0, 3):
      payload, parts = MAGIC.join(parts), []
      flag_n, label, rid, _ = struct.unpack_from("<IfQQ", payload)
      if flag_n:
        label = np.frombuffer(payload, "<f4", flag_n, 24)
      out[rid] = (label, payload[24 + 4 * flag_n :])
  return out


def jpeg(seed: int, size: int = 16) -> bytes:
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (size, size, 3), np.uint8)
  return cv2.imencode(".jpg", image)[1].tobytes()


def face_set(
    directory: pathlib.Path, labels, *, header=True, property_=True, images=None
):
  """An insightface-layout set: images 1..N, identity records, header 0."""
  labels = list(labels)
  num_classes = max(labels) + 1
  images = images or [jpeg(i) for i in range(len(labels))]
  records = [
      (i + 1, pack(lab, img, i + 1))
      for i, (lab, img) in enumerate(zip(labels, images))
  ]
  if header:
    first = len(labels) + 1
    for c in range(num_classes):
      keys = [i + 1 for i, lab in enumerate(labels) if lab == c]
      records.append(
          (first + c, pack([min(keys), max(keys) + 1], b"", first + c))
      )
    records.append((0, pack([first, first + num_classes], b"", 0)))
  return write_rec(
      directory, records, f"{num_classes},16,16" if property_ else None
  )


def copy_fixture(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir()
  for name in ("train.rec", "train.idx", "property"):
    shutil.copy(src / name, dst / name)
    (dst / name).chmod(0o644)
  return dst


# -- the MXNet-written fixture -------------------------------------------------


@pytest.fixture(scope="module")
def fixture_record(insightface_rec_dir):
  return recordio.InsightFaceRecord(insightface_rec_dir / "train.rec")


@pytest.fixture(scope="module")
def scanned(insightface_rec_dir):
  return scan_rec(insightface_rec_dir / "train.rec")


def test_fixture_counts_match_its_description(fixture_record):
  # fixtures/README.md: 20 identities x 8 images, 112x112 in the property.
  assert len(fixture_record) == 160
  assert fixture_record.num_classes == 20
  assert fixture_record.image_size == (112, 112)
  assert list(fixture_record.image_keys) == list(range(1, 161))


def test_fixture_every_label_and_payload(fixture_record, scanned):
  for i, key in enumerate(fixture_record.image_keys):
    label, image = scanned[key]
    assert fixture_record.label(i) == int(label)
    assert fixture_record.image_bytes(i) == image
    assert image[:3] == b"\xff\xd8\xff"  # JPEG, as pack_img writes


def test_fixture_identity_ranges_agree_with_labels(fixture_record, scanned):
  ranges = fixture_record.identity_ranges()
  assert ranges.shape == (20, 2)
  # Contiguous, covering every image key once.
  assert ranges[0, 0] == 1 and ranges[-1, 1] == 161
  np.testing.assert_array_equal(ranges[1:, 0], ranges[:-1, 1])
  for c, (lo, hi) in enumerate(ranges):
    assert {int(scanned[k][0]) for k in range(lo, hi)} == {c}
    # ... and matches the identity record as scanned without the index.
    np.testing.assert_array_equal(
        scanned[fixture_record.identity_keys[c]][0], [lo, hi]
    )


def test_fixture_decode_is_plain_cv2_and_bgr(fixture_record):
  for i in range(len(fixture_record)):
    payload = fixture_record.image_bytes(i)
    expected = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    decoded = fixture_record.decode(i)
    assert decoded.dtype == np.uint8 and decoded.shape == (112, 112, 3)
    np.testing.assert_array_equal(decoded, expected)
  # Channel order checked against another decoder: Pillow gives RGB, so BGR
  # is Pillow's array reversed (up to IDCT rounding differences).
  payload = fixture_record.image_bytes(0)
  import io  # pylint: disable=g-import-not-at-top

  rgb = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), np.int16)
  bgr = fixture_record.decode(0).astype(np.int16)
  same = np.abs(bgr - rgb[..., ::-1]).mean()
  swapped = np.abs(bgr - rgb).mean()
  assert same < 1.0 < swapped


def test_rec_source_records(insightface_rec_dir, fixture_record, scanned):
  src = sources.RecSource(insightface_rec_dir)
  assert len(src) == 160 and src.num_classes == 20
  assert src.name == insightface_rec_dir.name
  for i in (0, 7, 8, 159):
    rec = src[np.int64(i)]
    assert set(rec) == {"image", "label"}
    assert rec["label"].dtype == np.int32
    assert rec["label"] == int(scanned[i + 1][0])
    assert rec["image"] == scanned[i + 1][1]
  with pytest.raises(IndexError):
    src[160]
  assert isinstance(
      sources.open_source(insightface_rec_dir / "train.rec"), sources.RecSource
  )


def test_pickled_copy_opens_its_own_file(insightface_rec_dir, monkeypatch):
  src = sources.RecSource(insightface_rec_dir)
  first = src[3]
  clone = pickle.loads(pickle.dumps(src))
  assert clone.record._fd is None  # nothing opened until used
  assert clone[3] == first
  # A worker process (another pid) opens its own descriptor.
  fd = clone.record._fd
  monkeypatch.setattr(recordio.os, "getpid", lambda: -1)
  assert clone[5]["label"] == src[5]["label"]
  assert clone.record._fd != fd


def test_threads_share_one_reader(fixture_record):
  expected = [fixture_record.image_bytes(i) for i in range(len(fixture_record))]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(
        pool.map(
            fixture_record.image_bytes, list(range(len(fixture_record))) * 3
        )
    )
  assert got == expected * 3


# -- layouts the fixture does not have -----------------------------------------


def test_split_records_are_joined(tmp_path):
  # Payloads with the magic at 4-aligned positions: the writer splits them
  # into 2, 3 and more frames (flags 1, 2, 3); also magic first and last.
  image = bytearray(jpeg(1))
  image[4:8] = MAGIC  # payload offset 28: aligned
  image[40:44] = MAGIC
  image[44:48] = MAGIC  # two in a row: an empty middle piece
  tail = bytes(image) + b"\0" * (-len(image) % 4) + MAGIC
  payloads = [bytes(image), tail, jpeg(2)]
  labels = [0, 1, 1]
  rec = write_rec(
      tmp_path,
      [
          (i + 1, pack(lab, img, i + 1))
          for i, (lab, img) in enumerate(zip(labels, payloads))
      ],
      "2,16,16",
  )
  assert rec.read_bytes().count(MAGIC) > 3 + 4  # really split
  r = recordio.InsightFaceRecord(rec)
  assert [r.image_bytes(i) for i in range(3)] == payloads
  assert [r.label(i) for i in range(3)] == labels
  # An index entry pointing at a middle piece is refused.
  middle = rec.read_bytes().index(MAGIC, 8 + 28)
  (tmp_path / "train.idx").write_text(f"1\t{middle}\n")
  with pytest.raises(recordio.RecordIOError, match=r"record 1: .*middle"):
    recordio.InsightFaceRecord(rec)


def test_vector_labels_and_no_identity_header(tmp_path):
  # Images carrying [class, extra] label vectors, no record-0 header, keys
  # listed out of order: every key is an image, in .idx order.
  records = [
      (k, pack([lab, 7.0], jpeg(k), k))
      for k, lab in [(0, 2), (1, 0), (2, 1), (5, 2)]
  ]
  rec = write_rec(tmp_path, records, "3,16,16", idx_order=[5, 0, 2, 1])
  r = recordio.InsightFaceRecord(rec)
  assert r.identity_keys is None
  assert list(r.image_keys) == [5, 0, 2, 1]
  assert [r.label(i) for i in range(4)] == [2, 2, 1, 0]
  assert r.header(1).flag == 2
  np.testing.assert_array_equal(r.header(1).label, [0.0, 7.0])
  with pytest.raises(recordio.RecordIOError, match="no identity header"):
    r.identity_ranges()


def test_class_count_without_property(tmp_path):
  face_set(tmp_path / "a", [0, 0, 1, 2, 2], property_=False)
  assert recordio.InsightFaceRecord(tmp_path / "a/train.rec").num_classes == 3
  face_set(tmp_path / "b", [0, 3, 1], header=False, property_=False)
  assert recordio.InsightFaceRecord(tmp_path / "b/train.rec").num_classes == 4


def test_written_set_reads_back(tmp_path):
  labels = [0, 0, 1, 2, 2, 2]
  images = [jpeg(10 + i) for i in range(6)]
  face_set(tmp_path, labels, images=images)
  src = sources.RecSource(tmp_path)
  assert len(src) == 6 and src.num_classes == 3
  assert [int(src[i]["label"]) for i in range(6)] == labels
  assert [src[i]["image"] for i in range(6)] == images
  np.testing.assert_array_equal(
      src.record.identity_ranges(), [[1, 3], [3, 4], [4, 7]]
  )


# -- bad input: every case names the file and the record -----------------------


def test_missing_index(insightface_rec_dir, tmp_path):
  d = copy_fixture(insightface_rec_dir, tmp_path / "set")
  (d / "train.idx").unlink()
  with pytest.raises(recordio.RecordIOError, match=r"train\.idx.*missing"):
    sources.RecSource(d)


def test_truncated_rec(insightface_rec_dir, tmp_path):
  d = copy_fixture(insightface_rec_dir, tmp_path / "set")
  data = (d / "train.rec").read_bytes()
  # Cut inside the last record (the record-0 header sits at the end here).
  (d / "train.rec").write_bytes(data[:-10])
  with pytest.raises(
      recordio.RecordIOError, match=r"train\.rec: record 0: truncated"
  ):
    recordio.InsightFaceRecord(d / "train.rec")
  # Cut so early that index entries point past the end: the .rec is named
  # as the damaged file, with what to do.
  (d / "train.rec").write_bytes(data[:20000])
  with pytest.raises(
      recordio.RecordIOError,
      match=r"train\.rec is shorter \(20,000 bytes\) than its "
      r"index .*train\.idx says .* cut short \(copy",
  ):
    recordio.InsightFaceRecord(d / "train.rec")


def test_wrong_magic(insightface_rec_dir, tmp_path):
  d = copy_fixture(insightface_rec_dir, tmp_path / "set")
  offsets = dict(
      line.split("\t") for line in (d / "train.idx").read_text().splitlines()
  )
  data = bytearray((d / "train.rec").read_bytes())
  data[int(offsets["7"])] ^= 0xFF
  (d / "train.rec").write_bytes(bytes(data))
  r = recordio.InsightFaceRecord(d / "train.rec")
  assert r.label(5) == 0
  with pytest.raises(
      recordio.RecordIOError, match=r"train\.rec: record 7: wrong magic"
  ):
    r.label(6)


@pytest.mark.parametrize(
    "line, error",
    [
        (
            "3\t99999999",
            r"train\.rec is shorter .*\(record 3 at offset " r"99,999,999\)",
        ),
        # Near 2**63, where adding the frame size would overflow.
        (
            f"3\t{2**63 - 5}",
            r"train\.rec is shorter .*\(record 3 at offset "
            f"{2**63 - 5:,}\\)",
        ),
        ("3 15164 x", r"train\.idx: line 3 "),
    ],
)
def test_damaged_index_line(insightface_rec_dir, tmp_path, line, error):
  """An index line whose offset no record could be at, or that is no
  "key<TAB>offset" line: the file at fault is named."""
  d = copy_fixture(insightface_rec_dir, tmp_path / "set")
  text = (d / "train.idx").read_text().replace("3\t15164", line)
  (d / "train.idx").write_text(text)
  with pytest.raises(recordio.RecordIOError, match=error):
    recordio.InsightFaceRecord(d / "train.rec")


def test_duplicate_index_key(tmp_path):
  rec = face_set(tmp_path, [0, 1])
  idx = tmp_path / "train.idx"
  idx.write_text(idx.read_text() + idx.read_text().splitlines()[0] + "\n")
  with pytest.raises(recordio.RecordIOError, match=r"record 1: key listed"):
    recordio.InsightFaceRecord(rec)


def test_label_outside_class_range(tmp_path):
  # Relabel image key 3 as class 5 and keep the identity header consistent
  # with the property (2 classes): only the image label is wrong.
  labels = [0, 1, 5]
  records = [(i + 1, pack(lab, jpeg(i), i + 1)) for i, lab in enumerate(labels)]
  records += [
      (4, pack([1, 2], b"", 4)),
      (5, pack([2, 4], b"", 5)),
      (0, pack([4, 6], b"", 0)),
  ]
  rec = write_rec(tmp_path, records, "2,16,16")
  src = sources.RecSource(rec)
  assert src[1]["label"] == 1
  with pytest.raises(
      recordio.RecordIOError,
      match=r"train\.rec: record 3: label 5 is outside " r"\[0, 2\)",
  ):
    src[2]
  with pytest.raises(recordio.RecordIOError, match="record 3: label 5"):
    src.record.label(2)
  negative = write_rec(tmp_path / "neg", [(1, pack(-1, jpeg(0), 1))], "1,16,16")
  with pytest.raises(recordio.RecordIOError, match="record 1: label -1"):
    sources.RecSource(negative)[0]


def test_non_integer_label(tmp_path):
  rec = write_rec(tmp_path, [(1, pack(0.5, jpeg(0), 1))], "1,16,16")
  with pytest.raises(recordio.RecordIOError, match="record 1: label 0.5"):
    sources.RecSource(rec)[0]


def test_undecodable_image(tmp_path):
  images = [jpeg(0), b"\xff\xd8\xff not really a jpeg", jpeg(2)]
  face_set(tmp_path, [0, 1, 1], images=images)
  src = sources.RecSource(tmp_path)
  record = src[1]  # reading is fine; decoding is where it fails
  with pytest.raises(images_lib.ImageError, match="not a decodable image"):
    images_lib.decode_image(record["image"])
  with pytest.raises(
      images_lib.ImageError, match=r"train\.rec: record 2: .*not a decodable"
  ):
    src.record.decode(1)
  with pytest.raises(images_lib.ImageError):
    images_lib.decode_image(b"")


def test_property_disagrees_with_identity_header(tmp_path):
  face_set(tmp_path, [0, 1, 2])
  (tmp_path / "property").write_text("4,16,16")
  with pytest.raises(
      recordio.RecordIOError,
      match=r"property: says 4 classes .* lists 3 identities",
  ):
    sources.RecSource(tmp_path)
  (tmp_path / "property").write_text("three,16")
  with pytest.raises(recordio.RecordIOError, match=r"property: expected"):
    sources.RecSource(tmp_path)


def test_header_naming_missing_keys(tmp_path):
  records = [
      (1, pack(0, jpeg(1), 1)),
      (0, pack([3, 4], b"", 0)),
      (3, pack([1, 2], b"", 3)),
  ]  # image key 2 is missing
  rec = write_rec(tmp_path, records, "1,16,16")
  with pytest.raises(recordio.RecordIOError, match="not all in the index"):
    recordio.InsightFaceRecord(rec)


def test_short_payload(tmp_path):
  rec = write_rec(tmp_path, [(1, b"tiny")], "1,16,16")
  with pytest.raises(
      recordio.RecordIOError, match=r"record 1: payload of 4 bytes"
  ):
    recordio.InsightFaceRecord(rec).label(0)


def test_not_a_rec_path(tmp_path):
  with pytest.raises(recordio.RecordIOError, match="expected a .rec"):
    sources.RecSource(tmp_path / "data.bin")
  with pytest.raises(recordio.RecordIOError, match="cannot open"):
    recordio.InsightFaceRecord(tmp_path / "absent.rec")


def test_train_source_from_config(insightface_rec_dir):
  ml_collections = pytest.importorskip("ml_collections")
  config = ml_collections.ConfigDict(
      dict(
          data=dict(
              kind="rec",
              rec_dir=str(insightface_rec_dir),
              image_size=32,
              synthetic=dict(num_identities=3, images_per_identity=2, seed=0),
          )
      )
  )
  src = sources.train_source(config)
  assert isinstance(src, sources.RecSource) and len(src) == 160
  config.data.kind = "synthetic"
  synthetic = sources.train_source(config)
  assert (len(synthetic), synthetic.num_classes) == (6, 3)
  config.data.kind = "lmdb"
  with pytest.raises(ValueError, match="lmdb"):
    sources.train_source(config)
