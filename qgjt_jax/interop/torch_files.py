"""PyTorch checkpoints (.pth, .pt, Lightning .ckpt) read without torch.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle in which every
tensor is a call of `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and every storage a persistent id ('storage', storage class,
key, location, numel) whose bytes are the member `<name>/data/<key>`. Files
from torch < 1.6 are instead a run of pickles (magic number, protocol, system
info, the object, the storage keys) followed by the raw storages.

`load` rebuilds the tensors as numpy arrays (float16/32/64, bfloat16,
integers, bool) in nested dicts, lists and tuples. What it guarantees for
any file, however made:

* Nothing from the file is imported or run. Every pickle of both layouts
  (the legacy header pickles too) goes through a restricted unpickler that
  resolves only the names a tensor file needs (the rebuild functions,
  storage classes, OrderedDict, argparse.Namespace). A name of a module
  that runs code (os, subprocess, builtins...) refuses the file; any other
  name (a Lightning module's hyper-parameter objects) becomes an inert
  `Opaque` placeholder, and `state_dict` refuses one where tensors are
  expected, naming it.
* Nothing is read out of bounds: every tensor's offset, sizes and strides
  are checked against its storage before an array is made.
* Nothing is allocated beyond what the file holds and `qgjt_jax.files.limits`
  allow: members and storages are checked against their declared and
  actual sizes before they are read, views may not be larger than their
  storage, and nesting is bounded.
* Whatever is wrong ends in `TorchFileError` or `limits.LimitError`,
  naming the file.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import io
import os
import math
import pickle
import reprlib
import struct
import tarfile
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from qgjt_jax import errors
from qgjt_jax.files import limits
from qgjt_jax.files import pickles
from qgjt_jax.files import regular

# Storage class -> element dtype (torch.<Name>Storage; UntypedStorage holds
# bytes, reinterpreted by the tensor's own dtype in newer files).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class TorchFileError(errors.UserError, ValueError):
  """A file that is not a readable PyTorch checkpoint (the message names it)."""


class Opaque:
  """Stand-in for an object of a class this reader does not resolve.

  Each unknown class name gets its own subclass (`name` says which); it
  holds whatever the pickle passed (`args`, `state`). Nothing of the real
  class is imported or run.
  """

  name = "?"

  def __new__(cls, *args, **kwargs):
    del kwargs
    obj = super().__new__(cls)
    obj.args, obj.state = args, None
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):  # pickle's BUILD
    self.state = state

  def __repr__(self):
    return f"<{self.name} (not loaded)>"


@functools.lru_cache(maxsize=None)
def _opaque_class(name: str) -> type:
  return type(name.rsplit(".", 1)[-1], (Opaque,), {"name": name})


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


@dataclasses.dataclass(eq=False)
class _Storage:
  """A storage's elements; `array` is filled when its bytes are read (after
  the pickle, in files of torch < 1.6)."""

  dtype: Any
  key: str
  array: Any = None


@dataclasses.dataclass(eq=False)
class _Tensor:
  """A tensor to rebuild once its storage is read."""

  storage: Any
  offset: Any
  size: Any
  stride: Any


_MAX_DIMS = 64


def _checked_view(tensor: _Tensor, where: str, budget: list[int]) -> np.ndarray:
  """The tensor as a numpy array, after checking its view against its storage.

  The offset, sizes and strides come from the file: each must be a
  non-negative integer, every element they address must lie inside the
  storage's bytes, and the tensor may not hold more elements than the
  storage has from its offset on (a stride-0 or overlapping view could
  otherwise ask for any amount of memory). `budget` is the bytes left for
  all tensors of the file together.
  """
  storage = tensor.storage
  if not isinstance(storage, _Storage):
    raise TorchFileError(
        f"{where}: a tensor built on a "
        f"{type(storage).__name__}, not a storage"
    )
  data = storage.array
  if data is None:
    raise TorchFileError(
        f"{where}: storage {storage.key} has no data in the "
        "file (cut short?)"
    )

  def integers(values, what):
    if (
        not isinstance(values, (tuple, list))
        or len(values) > _MAX_DIMS
        or (not all(type(v) is int and v >= 0 for v in values))
    ):  # pylint: disable=unidiomatic-typecheck
      raise TorchFileError(
          f"{where}: tensor {what} {reprlib.repr(values)} "
          "are not up to 64 non-negative integers"
      )
    return tuple(values)

  size = integers(tensor.size, "sizes")
  stride = integers(tensor.stride, "strides")
  (offset,) = integers((tensor.offset,), "offset")
  if not size:
    stride = ()  # a scalar: torch writes no strides, some writers one
  if len(size) != len(stride):
    raise TorchFileError(
        f"{where}: tensor of {len(size)} sizes but {len(stride)} strides"
    )
  numel = math.prod(size)
  available = len(data) - offset
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if numel and (last >= len(data) or numel > available):
    raise TorchFileError(
        f"{where}: tensor of size {size}, stride {stride}, offset {offset} "
        f"reaches past its storage {storage.key} of {len(data)} elements "
        "(a damaged file, or one made to read memory it does not hold)"
    )
  nbytes = numel * data.dtype.itemsize
  if nbytes > budget[0]:
    raise TorchFileError(
        f"{where}: its tensors would take more bytes than "
        "its storages hold (views repeated or overlapping)"
    )
  budget[0] -= nbytes
  if not numel:
    return np.zeros(size, data.dtype)
  itemsize = data.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      data[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
  ).copy()


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """`torch._utils._rebuild_tensor_v2`: what to cut from which storage
  (checked when the tensor is made, see `_checked_view`)."""
  del unused  # requires_grad, backward hooks, metadata
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


def _materialise(obj, where: str, budget: list[int]):
  """The object with every `_Tensor` rebuilt as a numpy array, each shared
  object once (`pickles.walk`)."""

  def visit(value, inner):
    if isinstance(value, _Tensor):
      return _checked_view(value, where, budget)
    if isinstance(value, collections.OrderedDict):
      return collections.OrderedDict((k, inner(v)) for k, v in value.items())
    if isinstance(value, dict):
      return {k: inner(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return type(value)(inner(v) for v in value)
    if isinstance(value, argparse.Namespace):
      return argparse.Namespace(**inner(vars(value)))
    return value

  return pickles.walk(obj, visit, where)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}
# Allowed too, but they hash what they are given: called through the
# unpickler's budget (`pickles.RestrictedUnpickler.hashing`).
_HASHING = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_DTYPE_NAMES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "uint8",
    "int8",
    "int16",
    "bool",
)
# Names no checkpoint needs and an attack does: a file that asks for one is
# refused outright (its other unknown names only become placeholders).
_HOSTILE_MODULES = {
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "builtins",
    "__builtin__",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "code",
    "codeop",
    "pty",
    "ctypes",
    "pickle",
    "_pickle",
    "marshal",
    "webbrowser",
    "io",
    "_io",
    "pathlib",
    "tempfile",
    "multiprocessing",
    "signal",
    "asyncio",
    "types",
    "functools",
    "operator",
    "pydoc",
    "timeit",
    "cProfile",
    "profile",
    "pdb",
    "bdb",
    "trace",
    "ensurepip",
    "venv",
    "numpy.testing",
    "torch.hub",
}


class _Unpickler(pickles.RestrictedUnpickler):
  """A pickle reader that never imports or calls anything from the file.

  Names resolve to the few functions above or to inert `Opaque`
  placeholders (`plain=True`: to nothing, for the headers of the legacy
  layout); BUILD only sets the state of placeholders and plain containers;
  storages come from `load_storage`. The rest of what a file can make it
  do is bounded by `files.pickles`.
  """

  def __init__(
      self, file, size: int, where: str, load_storage=None, plain=False
  ):
    super().__init__(file, size, where, encoding="utf-8")
    self._load_storage = load_storage
    self._plain = plain

  def find_class(self, module, name):
    full = f"{module}.{name}"
    if self._plain:
      raise pickle.UnpicklingError(
          f"its header refers to {full}; a "
          "PyTorch header holds plain values only"
      )
    if (module, name) in _HASHING:
      make = _HASHING[(module, name)]
      return self.hashing(make, pairs=make is collections.OrderedDict)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    if module == "torch" and name in _DTYPE_NAMES:
      return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    if module.split(".")[0] in _HOSTILE_MODULES or full in _HOSTILE_MODULES:
      raise pickle.UnpicklingError(
          f"it refers to {full}, which no checkpoint needs: the file may be "
          "hostile (nothing from it was run)"
      )
    return _opaque_class(full)

  def persistent_load(self, saved_id):
    if self._load_storage is None or not (
        isinstance(saved_id, tuple)
        and len(saved_id) >= 5
        and saved_id[0] == "storage"
    ):
      raise pickle.UnpicklingError(
          f"unknown persistent id {reprlib.repr(saved_id)}"
      )
    storage_type, key, _, numel = saved_id[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(
          f"a storage of an unknown type {reprlib.repr(storage_type)}"
      )
    if not isinstance(key, (str, int)) or type(numel) is not int:  # pylint: disable=unidiomatic-typecheck
      raise pickle.UnpicklingError(
          f"a storage id {reprlib.repr(saved_id)} without a key and a count"
      )
    return self._load_storage(str(key), storage_type.dtype, numel, saved_id[5:])

  def build(self, target, state):
    """BUILD: the state of placeholders and plain containers only."""
    if isinstance(target, Opaque):
      target.state = state
      return
    if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
      state = state[0]  # (dict state, no slot state)
    if not (
        isinstance(target, (collections.OrderedDict, argparse.Namespace))
        and isinstance(state, dict)
        and all(isinstance(k, str) for k in state)
    ):
      raise pickle.UnpicklingError(
          f"it sets the state of a {type(target).__name__} object, which a "
          "checkpoint never does"
      )
    vars(target).update(state)


def _read_member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
  """A member of the archive, refused before inflating if too large."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise TorchFileError(
        f"{path}: the archive has no member {name}; the file is damaged"
    ) from None
  return archive.read(info)


def _load_zip(path: str, archive: zipfile.ZipFile) -> Any:
  names = archive.namelist()
  names_pkl = [n for n in names if n.endswith("data.pkl")]
  if len(names_pkl) != 1:
    raise TorchFileError(
        f"{path}: a zip archive without one data.pkl, so "
        "not a torch.save file"
    )
  root = names_pkl[0][: -len("data.pkl")]
  order = "little"
  if f"{root}byteorder" in names:
    order = (
        _read_member(archive, f"{root}byteorder", path)[:16]
        .decode("ascii", "replace")
        .strip()
    )
  if order not in ("little", "big"):
    raise TorchFileError(
        f"{path}: byte order {order!r} is neither little nor big"
    )
  byteorder = "<" if order == "little" else ">"
  storages = {}

  def load_storage(key, dtype, numel, unused):
    del numel, unused  # the member's size says it
    if key not in storages:
      raw = _read_member(archive, f"{root}data/{key}", path)
      if len(raw) % dtype.itemsize:
        raise TorchFileError(
            f"{path}: storage {key} has {len(raw)} bytes, not a whole number "
            f"of {dtype.name} elements"
        )
      storages[key] = _Storage(
          dtype, key, np.frombuffer(raw, dtype.newbyteorder(byteorder))
      )
    if storages[key].dtype != dtype:
      raise TorchFileError(f"{path}: storage {key} is read as two types")
    return storages[key]

  data = _read_member(archive, names_pkl[0], path)
  obj = _Unpickler(io.BytesIO(data), len(data), path, load_storage).load()
  return _materialise(obj, path, [_tensor_budget(storages.values())])


def _tensor_budget(storages) -> int:
  """Bytes all tensors of a file may take: twice what its storages hold
  (tied weights share a storage), and a little more for tiny files."""
  return 2 * sum(s.array.nbytes for s in storages if s.array is not None) + (
      1 << 20
  )


def _load_legacy(path: str, f, size: int) -> Any:
  """torch < 1.6: pickles, then each storage as (int64 count, bytes)."""
  f = limits.BoundedReader(f, size)
  header = lambda: _Unpickler(f, f.left, path, plain=True).load()
  if header() != _LEGACY_MAGIC:
    raise TorchFileError(
        f"{path}: a pickle, but not a PyTorch checkpoint "
        "(no torch.save magic number)"
    )
  header()  # protocol version
  header()  # system info
  storages = {}

  def load_storage(key, dtype, numel, view_metadata):
    del numel
    if view_metadata and view_metadata[0] is not None:
      raise TorchFileError(
          f"{path}: storage views (torch < 1.0 files) are "
          "not supported; re-save it with a newer torch"
      )
    storage = storages.setdefault(key, _Storage(dtype, key))
    if storage.dtype != dtype:
      raise TorchFileError(f"{path}: storage {key} is read as two types")
    return storage

  obj = _Unpickler(f, f.left, path, load_storage).load()
  keys = header()
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise TorchFileError(f"{path}: the storage list is not a list of keys")
  for key in keys:
    if key not in storages:
      raise TorchFileError(
          f"{path}: storage {key!r} is listed but no tensor uses it"
      )
    storage = storages[key]
    raw = f.read(8)
    if len(raw) < 8:
      raise TorchFileError(f"{path}: storage {key} is cut short")
    (count,) = struct.unpack("<q", raw)
    nbytes = count * storage.dtype.itemsize
    where = f"{path}: storage {key}"
    if count < 0 or nbytes > f.left:
      raise TorchFileError(
          f"{where} declares {count:,} elements ({nbytes:,} bytes) but the "
          f"file has {f.left:,} bytes left: it is cut short or damaged"
      )
    if nbytes > limits.current().max_tensor_bytes:
      raise limits.exceeded(
          where, "its size in bytes", nbytes, "max_tensor_bytes"
      )
    storage.array = np.frombuffer(f.read(nbytes), storage.dtype)
  return _materialise(obj, path, [_tensor_budget(storages.values())])


def load(path: str | os.PathLike) -> Any:
  """The object a `torch.save` file holds, tensors as numpy arrays.

  Nothing in the file is imported or called, every tensor view is checked
  against its storage, and no more is allocated than the file holds and
  `qgjt_jax.files.limits` allow.

  Raises:
    FileNotFoundError: no such file.
    TorchFileError, limits.LimitError: naming the file and what is wrong.
  """
  path = os.fspath(path)
  regular.require_regular(path)
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        limits.check_zip(archive, path)
        return _load_zip(path, archive)
    if tarfile.is_tarfile(path):
      raise TorchFileError(
          f"{path}: the tar layout of torch < 0.4 is not "
          "read; load and save it again with a newer torch"
      )
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      head = f.read(2)
      if not head or head[0] != 0x80:  # every pickle protocol >= 2
        raise TorchFileError(
            f"{path} is not a PyTorch checkpoint (neither a "
            "torch.save zip archive nor a pickle)"
        )
      f.seek(0)
      return _load_legacy(path, f, size)
  except (TorchFileError, limits.LimitError):
    raise
  except OSError as e:
    if errors.describe_os_error(e) and not isinstance(e, zipfile.BadZipFile):
      raise
    raise TorchFileError(
        f"{path}: a damaged PyTorch checkpoint "
        f"({type(e).__name__}: {_short(e)})"
    ) from e
  except Exception as e:  # pylint: disable=broad-except
    # Only this module's functions run while reading, so whatever fails
    # (a bad opcode, a call with the wrong arguments, a truncated member,
    # a nesting too deep) is the file's doing.
    raise TorchFileError(
        f"{path}: a damaged or malformed PyTorch checkpoint"
        f" ({type(e).__name__}: {_short(e)})"
    ) from e


def _short(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:200] + ("..." if len(text) > 200 else "")


def _opaque_inside(value, where: str):
  """(path, class name) of the first placeholder inside `value`, or None
  (each shared object looked at once)."""

  def visit(item, inner):
    if isinstance(item, Opaque):
      return "", item.name
    pairs = (
        item.items()
        if isinstance(item, Mapping)
        else enumerate(item)
        if isinstance(item, (list, tuple))
        else ()
    )
    for key, member in pairs:
      found = inner(member)
      if found:
        return f"[{key!r}]{found[0]}", found[1]
    return None

  found = pickles.walk(value, visit, where)
  return (where + found[0], found[1]) if found else None


def state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The name -> array mapping of a checkpoint (float tensors as float32).

  A Lightning `.ckpt` keeps it under 'state_dict' (its other entries, which
  may hold any object, are not needed); a `.pth` is one, or holds one under
  'state_dict'.

  Raises:
    FileNotFoundError, TorchFileError: naming the file, and the entry and
      class of anything but tensors and plain containers where tensors are.
  """
  path = os.fspath(path)
  obj = load(path)
  where = "the file"
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj, where = obj["state_dict"], "its 'state_dict'"
  if isinstance(obj, Opaque):
    raise TorchFileError(
        f"{path} holds a {obj.name} object, not a state "
        "dict of tensors; save model.state_dict() instead"
    )
  if not isinstance(obj, Mapping):
    raise TorchFileError(
        f"{path} holds a {type(obj).__name__}, not a state dict of tensors"
    )
  found = _opaque_inside(obj, where)
  if found:
    raise TorchFileError(
        f"{path}: {found[0]} is a {found[1]} object, which this reader does "
        "not load (only tensors and plain containers, for safety)"
    )
  out = {}
  for key, value in obj.items():
    if isinstance(value, np.ndarray):
      floating = np.issubdtype(value.dtype, np.floating) or (
          value.dtype == ml_dtypes.bfloat16
      )
      out[str(key)] = value.astype(np.float32) if floating else value
  if not out:
    raise TorchFileError(f"{path}: {where} holds no tensors")
  return out
