"""Hostile and damaged files, made by the tests themselves.

Each maker writes one file into a folder and returns its path; nothing here
is a stored blob. `commands.run` runs a command on them as a user would and
measures what it cost.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import struct
import zipfile
import zlib

import numpy as np

from tests.helpers import insightface_model
from tests.helpers import torch_writer

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def valid_state() -> dict:
  """A narrow insightface r18 state dict: a file convert accepts."""
  return {
      k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v
      for k, v in insightface_model.random_state().items()
  }


class _RunsCode:
  """What a malicious pickle does: call os.system on load."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _code_pickle(marker) -> bytes:
  """A protocol-2 pickle calling os.system, then dropping its result
  (no STOP: what follows in the stream comes next)."""
  data = pickle.dumps(_RunsCode(marker), protocol=2)
  assert data.endswith(b".")
  return data[:-1] + b"0"  # POP


def legacy_code_header(folder: pathlib.Path, marker) -> pathlib.Path:
  """torch < 1.6 layout whose first (magic-number) pickle runs a command."""
  path = folder / "code_header.pth"
  path.write_bytes(_code_pickle(marker) + b"N.")
  return path


def legacy_code_then_magic(folder: pathlib.Path, marker) -> pathlib.Path:
  """A valid legacy r18 whose magic-number pickle runs a command first and
  then pushes the real magic number: it converted with exit 0."""
  valid = folder / "valid_legacy.pth"
  torch_writer.write_torch_file(valid, valid_state(), legacy=True)
  magic = pickle.dumps(LEGACY_MAGIC, protocol=2)
  data = valid.read_bytes()
  assert data.startswith(magic)
  path = folder / "code_then_magic.pth"
  path.write_bytes(_code_pickle(marker) + magic[2:] + data[len(magic) :])
  return path


def zip_with_pickle(
    folder: pathlib.Path,
    name: str,
    data_pkl: bytes,
    members: dict | None = None,
) -> pathlib.Path:
  """A torch.save zip archive whose data.pkl is `data_pkl`."""
  path = folder / name
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("model/data.pkl", data_pkl)
    archive.writestr("model/byteorder", "little")
    for member, content in (members or {}).items():
      archive.writestr(f"model/data/{member}", content)
  return path


def views(folder: pathlib.Path, name: str, **tensors) -> pathlib.Path:
  """A zip file of the r18 plus the tensors given (TensorView geometry)."""
  path = folder / name
  torch_writer.write_torch_file(path, {**valid_state(), **tensors})
  return path


def storage_cut_short(folder: pathlib.Path) -> pathlib.Path:
  """A valid r18 whose largest storage member was cut to 8 bytes."""
  valid = folder / "valid.pth"
  torch_writer.write_torch_file(valid, valid_state())
  with zipfile.ZipFile(valid) as archive:
    members = {n: archive.read(n) for n in archive.namelist()}
  largest = max(
      (n for n in members if "/data/" in n), key=lambda n: len(members[n])
  )
  members[largest] = members[largest][:8]
  path = folder / "cut_storage.pth"
  with zipfile.ZipFile(path, "w") as archive:
    for member, content in members.items():
      archive.writestr(member, content)
  return path


def deflate_bomb(folder: pathlib.Path, gib: int = 1) -> pathlib.Path:
  """A 1 MB file whose one storage member inflates to `gib` GiB of zeros."""
  count = (gib << 30) // 4
  data_pkl, _ = torch_writer._torch_pickle(  # pylint: disable=protected-access
      {
          "weight": torch_writer.TensorView(
              np.zeros(1, np.float32), 0, (count,), (1,)
          )
      }
  )
  path = folder / "deflated.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("model/data.pkl", data_pkl)
    info = zipfile.ZipInfo("model/data/0")
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(64 << 20)
    with archive.open(info, "w", force_zip64=True) as member:
      for _ in range((gib << 30) // len(chunk)):
        member.write(chunk)
  return path


def legacy_storage_count(folder: pathlib.Path, count: int) -> pathlib.Path:
  """A legacy file whose storage declares `count` elements (it holds 4)."""
  data, storages = torch_writer._torch_pickle(  # pylint: disable=protected-access
      {"weight": np.zeros(3, np.float32)}, legacy=True
  )
  path = folder / f"legacy_count_{count}.pth"
  with open(path, "wb") as f:
    for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001}):
      pickle.dump(header, f, protocol=2)
    f.write(data)
    pickle.dump(sorted(storages), f, protocol=2)
    for key in sorted(storages):
      f.write(struct.pack("<q", count))
      f.write(storages[key].tobytes())
  return path


def memo_bomb(folder: pathlib.Path) -> pathlib.Path:
  """12 bytes of pickle that make the C unpickler allocate 2 GiB."""
  return zip_with_pickle(
      folder, "memo.pth", b"\x80\x02Nr" + struct.pack("<I", 1 << 28) + b"."
  )


def deep_nesting(folder: pathlib.Path, depth: int = 100_000) -> pathlib.Path:
  return zip_with_pickle(
      folder, "deep.pth", b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
  )


def odd_call(folder: pathlib.Path) -> pathlib.Path:
  """collections.OrderedDict(5): an allowed name called as no file does."""
  return zip_with_pickle(
      folder, "odd_call.pth", b"\x80\x02ccollections\nOrderedDict\nK\x05\x85R."
  )


def lying_npz(folder: pathlib.Path) -> pathlib.Path:
  """An .npz whose array header declares 4 TiB over 12 bytes of data
  (numpy allocates the declared shape before reading)."""
  buffer = io.BytesIO()
  np.save(buffer, np.zeros(3, np.float32))
  data = buffer.getvalue().replace(b"(3,)", b"(1099511627776,)", 1)
  path = folder / "lying.npz"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("weight.npy", data)
  return path


def safetensors_file(
    folder: pathlib.Path,
    name: str,
    header,
    data: bytes = b"",
    header_length=None,
) -> pathlib.Path:
  """A .safetensors file: little-endian header length, JSON header, data."""
  text = json.dumps(header).encode()
  path = folder / name
  path.write_bytes(
      struct.pack("<Q", len(text) if header_length is None else header_length)
      + text
      + data
  )
  return path


def nan_weights(folder: pathlib.Path) -> pathlib.Path:
  state = valid_state()
  state["layer2.0.conv1.weight"][0, 0, 0, 0] = np.nan
  path = folder / "nan.pth"
  torch_writer.write_torch_file(path, state)
  return path


# ---------------------------------------------------------------------------
# Images.


def png_bomb(path: pathlib.Path, side: int) -> pathlib.Path:
  """A valid 1-bit grey PNG of side x side pixels, a few tens of KB."""

  def chunk(kind, data):
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data))
    )

  row = b"\0" * (1 + (side + 7) // 8)
  squeeze = zlib.compressobj(9)
  idat = b"".join(squeeze.compress(row) for _ in range(side)) + (
      squeeze.flush()
  )
  path.write_bytes(
      b"\x89PNG\r\n\x1a\n"
      + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
      + chunk(b"IDAT", idat)
      + chunk(b"IEND", b"")
  )
  return path


def bin_set(path: pathlib.Path, images: list[bytes], issame) -> pathlib.Path:
  with open(path, "wb") as f:
    pickle.dump((images, list(issame)), f, protocol=2)
  return path


def face_jpeg(size: int = 32, seed: int = 0) -> bytes:
  import cv2  # pylint: disable=g-import-not-at-top
  from qgjt_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  return cv2.imencode(".jpg", synthetic.render_photo(seed, 0, 0, size))[
      1
  ].tobytes()


# ---------------------------------------------------------------------------
# Second round: a few bytes that ask for gigabytes, crash or hang a reader.


def shared_lists(depth: int = 40) -> bytes:
  """A pickle of `depth` lists, each holding the one before twice (through
  the memo): 2**depth leaves to anything that walks it as a tree."""
  program = b"\x80\x02]q\x00"
  for i in range(1, depth + 1):
    program += (
        b"](h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"eq" + (bytes([i]))
    )
  return program + b"."


def shared_tuples(use: str, depth: int = 60) -> bytes:
  """A pickle of `depth` tuples, each holding the one before twice
  (through the memo), the last one hashed as `use` says: "key" (SETITEM),
  "keys" (DICT), "member" (ADDITEMS), "frozenset" (FROZENSET), or "set"
  and "ordered_dict" (builtins.set and collections.OrderedDict called on
  a list, as protocol 2 pickles them). A few hundred bytes; hashing the
  last tuple visits 2**depth."""
  program = b"\x80\x04)q\x00"
  for i in range(1, depth + 1):
    program += (
        b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + (bytes([i]))
    )
  last = b"h" + bytes([depth])
  program += {
      "key": b"}" + last + b"NsX\x01\x00\x00\x00a" + last + b"s",
      "keys": b"(" + last + b"Nd",
      "member": b"\x8f(" + last + b"\x90",
      "frozenset": b"(" + last + b"\x91",
      "set": b"cbuiltins\nset\n]" + last + b"a\x85R",
      "ordered_dict": b"ccollections\nOrderedDict\n]" + last + b"N\x86a\x85R",
  }[use]
  return program + b"."


def bytearray8(count: int = 1 << 32) -> bytes:
  """12 bytes of pickle whose BYTEARRAY8 declares `count` bytes."""
  return b"\x80\x05\x96" + struct.pack("<Q", count) + b"."


def deep_tuple_key(depth: int = 300_000) -> bytes:
  """A dict keyed by a tuple nested `depth` deep: hashing it recurses."""
  return b"\x80\x02})" + b"\x85" * depth + b"Ns."


def numpy_object_array() -> bytes:
  """numpy.ndarray((5e8,), 'O'): 35 bytes asking for 4 GB."""
  return (
      b"\x80\x02cnumpy\nndarray\nJ\x00e\xcd\x1d\x85X\x01\x00\x00\x00O" b"\x86R."
  )


def many_small_members(
    folder: pathlib.Path,
    name: str,
    count: int = 1500,
    member_mib: int = 1,
    npz: bool = False,
) -> pathlib.Path:
  """A zip of `count` deflated members of `member_mib` MiB of zeros each:
  every member under the per-member floor, together gigabytes."""
  path = folder / name
  zeros = bytes(member_mib << 20)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    if not npz:
      archive.writestr("model/data.pkl", b"\x80\x02}.")
    for i in range(count):
      archive.writestr(f"model/data/{i}" if not npz else f"w{i}.npy", zeros)
  return path


def pickle_file(
    folder: pathlib.Path, name: str, program: bytes
) -> pathlib.Path:
  path = folder / name
  path.write_bytes(program)
  return path


def fifo(path: pathlib.Path) -> pathlib.Path:
  """A named pipe: opening it for reading waits for a writer forever."""
  os.mkfifo(path)
  return path


def odd_npz(folder: pathlib.Path, name: str, **changes) -> pathlib.Path:
  """The reference-layout r18 of `valid_state` with tensors replaced."""
  path = folder / name
  np.savez(
      path,
      **{**{k: np.asarray(v) for k, v in _adaface_state().items()}, **changes},
  )
  return path


def _adaface_state() -> dict:
  """A narrow AdaFace-layout IR-18 state dict, as the converter reads it."""
  from qgjt_jax.interop import state_dicts  # pylint: disable=g-import-not-at-top
  from qgjt_jax.models import build_backbone  # pylint: disable=g-import-not-at-top
  from qgjt_jax.models import layers  # pylint: disable=g-import-not-at-top

  model = build_backbone("ir18", base_width=4, embedding_size=8)
  shapes = layers.init_shapes(model, (32, 32))
  variables = {c: _zeros_like(shapes[c]) for c in ("params", "batch_stats")}
  return state_dicts.to_torch(variables, model, 32)


def _zeros_like(tree):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _zeros_like(v) for k, v in tree.items()}
  return np.ones(tree.shape, np.float32)
