"""Reads insightface RecordIO face sets (`train.rec`/`train.idx`/`property`).

This is the layout of the public insightface training sets (faces_emore =
MS1MV2, ms1m-retinaface = MS1MV3, faces_webface_112x112 = CASIA-WebFace,
faces_vgg_112x112 = VGGFace2, Glint360K, WebFace42M, ...). It is read here with
the standard library and numpy alone, so neither MXNet nor TensorFlow is needed.

File layout (dmlc-core RecordIO, as written by MXNet's `MXIndexedRecordIO`):

* `.idx`: text, one "key<TAB>byte_offset" line per record, in any order.
* `.rec`: a sequence of frames. Each frame is a little-endian uint32 magic
  0xced7230a, a uint32 "length word" (low 29 bits: payload length, high 3 bits:
  continuation flag), the payload, and zero padding up to a multiple of 4 bytes.
  The writer cuts a record wherever its payload holds the magic at a 4-aligned
  position: the pieces are stored as frames with flag 1 (first), 2 (middle) and
  3 (last), the magic itself dropped; flag 0 is a record in one piece. Reading
  joins the pieces with the magic between them.
* Record payload: an `IRHeader` packed as `<IfQQ` (flag, label, id, id2). When
  flag > 0, `flag` float32 values follow and form the label (the class id is
  the first of them). The encoded image (JPEG, sometimes PNG) is the rest.
* insightface face sets start with record 0, an "identity header" whose label
  vector is [first_identity_key, end_identity_key). Image records are keys
  1 .. first_identity_key - 1, their label the class id; identity record
  first_identity_key + c holds, as its label vector, the [first, end) range of
  image keys of class c. Sets without that header (flag 0 on record 0) are
  plain lists of image records.
* `property`: text "num_classes,height,width".

The images are ordinary JPEGs (sometimes PNGs), decoded by the project's one
decoder, `files.images.decode_image` (which says why in BGR).

All problems with the files raise `RecordIOError`, which names the file and,
where there is one, the record key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import struct
import threading
import warnings
from typing import Sequence

import numpy as np

from qgjt_jax import errors
from qgjt_jax.files import images
from qgjt_jax.files import regular

MAGIC = 0xCED7230A
_MAX_PROPERTY_BYTES = 256
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")  # magic, length word
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1

# Continuation flags of a frame.
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3

PathLike = str | os.PathLike


class RecordIOError(errors.UserError, ValueError):
  """A RecordIO set or one of its records is missing, malformed or corrupt."""


@dataclasses.dataclass(frozen=True)
class IRHeader:
  """The header MXNet packs in front of every record payload.

  Attributes:
    flag: number of float32 label values stored after the header (0: the
      label is the scalar `label` field).
    label: the scalar label (flag == 0) or the float32 label vector (flag > 0).
    id: record id as written by the packer (usually the record key).
    id2: second id, unused by insightface sets.
  """

  flag: int
  label: float | np.ndarray
  id: int
  id2: int


def unpack_record(
    record: bytes, where: str = "<record>"
) -> tuple[IRHeader, bytes]:
  """Splits a joined record payload into its header and the image bytes."""
  if len(record) < _IR_HEADER.size:
    raise RecordIOError(
        f"{where}: payload of {len(record)} bytes is shorter than the "
        f"{_IR_HEADER.size}-byte record header"
    )
  flag, label, id1, id2 = _IR_HEADER.unpack_from(record)
  start = _IR_HEADER.size
  if flag > 0:
    end = start + 4 * flag
    if end > len(record):
      raise RecordIOError(
          f"{where}: header announces {flag} label values but the payload "
          f"has only {len(record)} bytes"
      )
    label = np.frombuffer(record, "<f4", count=flag, offset=start).copy()
    start = end
  return IRHeader(flag, label, id1, id2), record[start:]


def class_id(header: IRHeader, where: str = "<record>") -> int:
  """The integer class id of an image record's header."""
  value = header.label if header.flag == 0 else header.label[0]
  value = float(value)
  if not np.isfinite(value) or value != int(value):
    raise RecordIOError(f"{where}: label {value!r} is not an integer class id")
  return int(value)


def read_property(path: PathLike) -> tuple[int, int, int]:
  """Parses an insightface `property` file into (num_classes, height, width)."""
  path = pathlib.Path(path)
  try:
    with regular.open_regular(path) as f:
      text = f.read(_MAX_PROPERTY_BYTES + 1).decode("ascii", "replace").strip()
  except OSError as e:
    raise RecordIOError(f"{path}: cannot read the property file: {e}") from e
  if len(text) > _MAX_PROPERTY_BYTES:
    raise RecordIOError(
        f"{path}: over {_MAX_PROPERTY_BYTES} bytes; a "
        "property file is 'num_classes,height,width'"
    )
  fields = [f.strip() for f in text.split(",")]
  try:
    values = tuple(int(f) for f in fields)
  except ValueError:
    values = ()
  if len(values) != 3 or min(values) <= 0:
    raise RecordIOError(
        f"{path}: expected 'num_classes,height,width', got {text[:80]!r}"
    )
  return values


def _parse_index_text(text: bytes, path: pathlib.Path) -> np.ndarray:
  """Parses "key<TAB>offset" lines into an (N, 2) int64 array."""
  text = text.rstrip()
  num_lines = text.count(b"\n") + 1 if text else 0
  values = None
  try:
    # One C-level parse (a few seconds for MS1M's 5.8M lines, where splitting
    # into Python objects takes several times longer). A parse that stops
    # early warns, which is turned into an error here.
    with warnings.catch_warnings():
      warnings.simplefilter("error", DeprecationWarning)
      values = np.fromstring(text, dtype=np.int64, sep=" ")
  except (ValueError, DeprecationWarning):
    values = None
  if values is None or values.size != 2 * num_lines:
    # Find the offending line for the message.
    for number, line in enumerate(text.split(b"\n"), 1):
      fields = line.split()
      if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise RecordIOError(
            f"{path}: line {number} is {line[:60]!r}, not 'key<TAB>offset'"
        )
    raise RecordIOError(f"{path}: unreadable index")
  return values.reshape(-1, 2)


def _read_index(
    path: pathlib.Path, rec: pathlib.Path, rec_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Reads a `.idx` file into (keys, offsets) int64 arrays in file order."""
  try:
    with regular.open_regular(path) as f:
      text = f.read()
  except FileNotFoundError as e:
    raise RecordIOError(
        f"{path}: index file missing (the .rec needs the .idx written beside "
        "it for random access)"
    ) from e
  except OSError as e:
    raise RecordIOError(f"{path}: cannot read the index: {e}") from e
  pairs = _parse_index_text(text, path)
  if not len(pairs):
    raise RecordIOError(f"{path}: the index is empty")
  keys, offsets = pairs[:, 0], pairs[:, 1]
  if (keys < 0).any():
    raise RecordIOError(f"{path}: record {keys[keys < 0][0]}: negative key")
  if (offsets < 0).any():
    i = np.flatnonzero(offsets < 0)[0]
    raise RecordIOError(
        f"{path}: record {keys[i]}: negative offset "
        f"{offsets[i]}; the index is damaged"
    )
  # Compared without adding (an offset near 2**63 would overflow).
  bad = np.flatnonzero(offsets > rec_size - _FRAME.size)
  if bad.size:
    i = bad[np.argmin(offsets[bad])]
    raise RecordIOError(
        f"{rec} is shorter ({rec_size:,} bytes) than its index {path} says "
        f"(record {keys[i]} at offset {offsets[i]:,}): the .rec is cut short "
        "(copy or download it again), or the .idx is damaged or belongs to "
        "another .rec"
    )
  return keys, offsets


class InsightFaceRecord:
  """Random access to an insightface `.rec`/`.idx` pair, without MXNet.

  Reads use `os.pread` on a descriptor opened lazily in each process, so one
  instance may be shared by threads and pickled to worker processes (the
  descriptor is not pickled; the parsed index is).

  Image indices `i` (0 <= i < len(self)) number the image records in
  `image_keys` order; record keys are the `.idx` keys.
  """

  def __init__(
      self,
      rec_path: PathLike,
      idx_path: PathLike | None = None,
      property_path: PathLike | None = None,
  ):
    """Opens the set and checks its index, framing ends and header.

    Args:
      rec_path: the `.rec` file.
      idx_path: its index; defaults to the `.rec` path with suffix `.idx`.
      property_path: the "num_classes,h,w" file; defaults to `property`
        beside the `.rec`. It may be absent (then the class count comes from
        the identity header, or from a scan of the labels).

    Raises:
      RecordIOError: a file is missing, truncated or malformed.
    """
    self.rec_path = pathlib.Path(rec_path)
    self.idx_path = pathlib.Path(
        idx_path if idx_path is not None else self.rec_path.with_suffix(".idx")
    )
    self.property_path = pathlib.Path(
        property_path
        if property_path is not None
        else self.rec_path.parent / "property"
    )
    try:
      self._rec_size = self.rec_path.stat().st_size
    except OSError as e:
      raise RecordIOError(f"{self.rec_path}: cannot open: {e}") from e
    if not self.rec_path.is_file():
      raise RecordIOError(f"{self.rec_path}: not a regular file")
    self._fd: int | None = None
    self._fd_pid: int | None = None
    self._lock = threading.Lock()

    keys, offsets = _read_index(self.idx_path, self.rec_path, self._rec_size)
    order = np.argsort(keys, kind="stable")
    self._sorted_keys = keys[order]
    self._sorted_offsets = offsets[order]
    dup = np.flatnonzero(np.diff(self._sorted_keys) == 0)
    if dup.size:
      raise RecordIOError(
          f"{self.idx_path}: record "
          f"{self._sorted_keys[dup[0]]}: key listed twice"
      )
    self._check_last_record()

    self._property = (
        read_property(self.property_path)
        if self.property_path.exists()
        else None
    )
    self._identity_keys: range | None = None
    first = self._read_identity_header()
    if first is not None:
      self._image_keys: Sequence[int] = range(1, first.start)
      self._identity_keys = first
      if not (
          self._contains_all(self._image_keys) and self._contains_all(first)
      ):
        raise RecordIOError(
            f"{self.idx_path}: the identity header of {self.rec_path} names "
            f"image keys [1, {first.start}) and identity keys "
            f"[{first.start}, {first.stop}) that are not all in the index"
        )
    else:
      self._image_keys = keys  # file order, as MXNet lists them
    self._num_classes = self._resolve_num_classes()

  # -- pickling: each process opens its own descriptor ------------------------

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fd"] = None
    state["_fd_pid"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __del__(self):
    self.close()

  def close(self) -> None:
    """Closes this process's descriptor (reads reopen it)."""
    fd, pid = getattr(self, "_fd", None), getattr(self, "_fd_pid", None)
    if fd is not None and pid == os.getpid():
      try:
        os.close(fd)
      except OSError:
        pass
    self._fd = None

  def __enter__(self) -> "InsightFaceRecord":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _descriptor(self) -> int:
    pid = os.getpid()
    if self._fd is None or self._fd_pid != pid:
      with self._lock:
        if self._fd is None or self._fd_pid != pid:
          try:
            self._fd = os.open(self.rec_path, os.O_RDONLY)
          except OSError as e:
            raise RecordIOError(f"{self.rec_path}: cannot open: {e}") from e
          self._fd_pid = pid
    return self._fd

  # -- low-level reads ---------------------------------------------------------

  def _pread(self, size: int, offset: int, key: int) -> bytes:
    fd = self._descriptor()
    chunks = []
    while size > 0:
      chunk = os.pread(fd, size, offset)
      if not chunk:
        raise RecordIOError(
            f"{self.rec_path}: record {key}: truncated file (needs {size} more "
            f"bytes at offset {offset}, file has {self._rec_size})"
        )
      chunks.append(chunk)
      size -= len(chunk)
      offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

  def _frame_at(self, offset: int, key: int) -> tuple[int, int]:
    """Returns (continuation flag, payload length) of the frame at `offset`."""
    magic, word = _FRAME.unpack(self._pread(_FRAME.size, offset, key))
    if magic != MAGIC:
      raise RecordIOError(
          f"{self.rec_path}: record {key}: wrong magic 0x{magic:08x} at offset "
          f"{offset} (expected 0x{MAGIC:08x}; is the .idx for this .rec?)"
      )
    return word >> _LENGTH_BITS, word & _LENGTH_MASK

  def _offset(self, key: int) -> int:
    pos = int(np.searchsorted(self._sorted_keys, key))
    if pos >= len(self._sorted_keys) or self._sorted_keys[pos] != key:
      raise RecordIOError(
          f"{self.idx_path}: record {key}: key not in the index"
      )
    return int(self._sorted_offsets[pos])

  def _contains_all(self, keys: range) -> bool:
    if len(keys) == 0:
      return True
    lo = np.searchsorted(self._sorted_keys, keys.start)
    hi = np.searchsorted(self._sorted_keys, keys.stop)
    return hi - lo == len(keys)  # keys are unique, so the range is all there

  def _check_last_record(self) -> None:
    """Catches a truncated .rec at open time: the last record must fit."""
    last = int(np.argmax(self._sorted_offsets))
    self.read_raw(int(self._sorted_keys[last]))

  def has_key(self, key: int) -> bool:
    pos = int(np.searchsorted(self._sorted_keys, key))
    return pos < len(self._sorted_keys) and self._sorted_keys[pos] == key

  def read_raw(self, key: int) -> bytes:
    """The joined payload of record `key` (IRHeader + labels + image bytes)."""
    key = int(key)
    offset = self._offset(key)
    parts = []
    flag, length = self._frame_at(offset, key)
    if flag not in (_WHOLE, _FIRST):
      raise RecordIOError(
          f"{self.rec_path}: record {key}: offset {offset} points into the "
          f"middle of a split record (continuation flag {flag})"
      )
    while True:
      padded = (length + 3) & ~3
      if offset + _FRAME.size + padded > self._rec_size:
        raise RecordIOError(
            f"{self.rec_path}: record {key}: truncated file (frame at "
            f"{offset} needs {_FRAME.size + padded} bytes, only "
            f"{self._rec_size - offset} left)"
        )
      parts.append(
          self._pread(length, offset + _FRAME.size, key) if length else b""
      )
      if flag in (_WHOLE, _LAST):
        break
      offset += _FRAME.size + padded
      if offset + _FRAME.size > self._rec_size:
        raise RecordIOError(
            f"{self.rec_path}: record {key}: truncated file "
            "inside a split record"
        )
      flag, length = self._frame_at(offset, key)
      if flag not in (_MIDDLE, _LAST):
        raise RecordIOError(
            f"{self.rec_path}: record {key}: split record interrupted by a "
            f"frame with continuation flag {flag} at offset {offset}"
        )
    return parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)

  def read(self, key: int) -> tuple[IRHeader, bytes]:
    """(header, image bytes) of record `key`."""
    return unpack_record(self.read_raw(key), self._where(key))

  def header(self, key: int) -> IRHeader:
    """The IRHeader of record `key`."""
    return self.read(key)[0]

  def _where(self, key: int) -> str:
    return f"{self.rec_path}: record {key}"

  # -- the face-set view -------------------------------------------------------

  def _read_identity_header(self) -> range | None:
    """Returns the identity-key range if record 0 is an identity header."""
    if not self.has_key(0):
      return None
    header, rest = self.read(0)
    # An identity header carries a label range and no image; a set without
    # one may still start with an ordinary image at key 0.
    if header.flag < 2 or rest:
      return None
    lo, hi = float(header.label[0]), float(header.label[1])
    if not (
        math.isfinite(lo)
        and math.isfinite(hi)
        and lo == int(lo)
        and hi == int(hi)
        and 1 <= lo <= hi
    ):
      raise RecordIOError(
          f"{self.rec_path}: record 0: identity header range [{lo}, {hi}) is "
          "not a valid key range"
      )
    return range(int(lo), int(hi))

  def _resolve_num_classes(self) -> int | None:
    num_ids = (
        len(self._identity_keys) if self._identity_keys is not None else None
    )
    if self._property is not None:
      n = self._property[0]
      if num_ids is not None and num_ids != n:
        raise RecordIOError(
            f"{self.property_path}: says {n} classes but the identity header "
            f"of {self.rec_path} lists {num_ids} identities"
        )
      if n > len(self._image_keys):  # a class count no file could back
        raise RecordIOError(
            f"{self.property_path}: says {n:,} classes, but {self.rec_path} "
            f"holds {len(self._image_keys):,} images: fix the property file"
        )
      return n
    return num_ids  # None: counted from the labels on first use

  @property
  def num_records(self) -> int:
    """Number of records in the index (images, identities and header)."""
    return len(self._sorted_keys)

  @property
  def image_keys(self) -> Sequence[int]:
    """Record keys of the images (a `range` for sets with identity headers)."""
    return self._image_keys

  @property
  def identity_keys(self) -> range | None:
    """Record keys of the identity records, or None without the header."""
    return self._identity_keys

  @property
  def image_size(self) -> tuple[int, int] | None:
    """(height, width) from the property file, if there is one."""
    return None if self._property is None else self._property[1:]

  @property
  def num_classes(self) -> int:
    """Number of classes: the property file, checked against the header.

    Without either, the labels are scanned once (slow on large sets) and the
    count is max(label) + 1.
    """
    if self._num_classes is None:
      logging.warning(
          "%s has neither a property file nor an identity header; "
          "scanning %d labels to count the classes",
          self.rec_path,
          len(self),
      )
      top = max(self._raw_label(k) for k in self._image_keys)
      self._num_classes = top + 1
    return self._num_classes

  def __len__(self) -> int:
    return len(self._image_keys)

  def key(self, i: int) -> int:
    """Record key of image index `i`."""
    if not 0 <= i < len(self._image_keys):
      raise IndexError(f"image index {i} out of range [0, {len(self)})")
    return int(self._image_keys[i])

  def _raw_label(self, key: int) -> int:
    header = self.header(key)
    label = class_id(header, self._where(key))
    if label < 0:
      raise RecordIOError(f"{self._where(key)}: negative label {label}")
    return label

  def check_label(self, label: int, key: int) -> int:
    """Returns `label`, or raises if it is outside [0, num_classes)."""
    if not 0 <= label < self.num_classes:
      raise RecordIOError(
          f"{self._where(key)}: label {label} is outside [0, "
          f"{self.num_classes}) (num_classes from {self.property_path})"
      )
    return label

  def read_image(self, i: int) -> tuple[bytes, int]:
    """(encoded image bytes, checked label) of image index `i`, one read."""
    key = self.key(i)
    header, image = self.read(key)
    label = self.check_label(class_id(header, self._where(key)), key)
    if not image:
      raise RecordIOError(f"{self._where(key)}: image record without image")
    return image, label

  def label(self, i: int) -> int:
    """Class id of image index `i`, checked against `num_classes`."""
    key = self.key(i)
    return self.check_label(self._raw_label(key), key)

  def image_bytes(self, i: int) -> bytes:
    """Encoded image bytes of image index `i`."""
    return self.read_image(i)[0]

  def decode(self, i: int) -> np.ndarray:
    """Decoded BGR uint8 image of image index `i` (`images.decode_image`)."""
    return images.decode_image(self.image_bytes(i), self._where(self.key(i)))

  def identity_ranges(self) -> np.ndarray:
    """(num_classes, 2) int64 [first, end) image-key ranges per class.

    Row c comes from identity record first_identity_key + c. Raises if the set
    has no identity header.
    """
    if self._identity_keys is None:
      raise RecordIOError(f"{self.rec_path}: no identity header (record 0)")
    ranges = np.empty((len(self._identity_keys), 2), np.int64)
    for c, key in enumerate(self._identity_keys):
      header = self.header(key)
      if header.flag < 2:
        raise RecordIOError(
            f"{self._where(key)}: identity record without a [first, end) range"
        )
      lo, hi = (float(v) for v in header.label[:2])
      if (
          not (math.isfinite(lo) and math.isfinite(hi))
          or lo != int(lo)
          or (hi != int(hi))
          or not 1 <= lo <= hi <= self._identity_keys.start
      ):
        raise RecordIOError(
            f"{self._where(key)}: identity range [{lo}, {hi}) is not inside "
            f"the image keys [1, {self._identity_keys.start})"
        )
      ranges[c] = int(lo), int(hi)
    return ranges
