"""PyTorch checkpoints (.pth, .pt, Lightning .ckpt) read without torch.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle in which every
tensor is a call of `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and every storage a persistent id ('storage', storage class,
key, location, numel) whose bytes are the member `<name>/data/<key>`. Files
from torch < 1.6 are instead a run of pickles (magic number, protocol, system
info, the object, the storage keys) followed by the raw storages.

`load` rebuilds the tensors as numpy arrays (float16/32/64, bfloat16,
integers, bool) in nested dicts, lists and tuples, with a restricted
unpickler: it resolves only the names a tensor file needs (the rebuild
functions, storage classes, OrderedDict, argparse.Namespace). Any other name
(a Lightning module's hyper-parameter objects, or something worse) becomes an
inert `Opaque` placeholder, never imported or called; `state_dict` refuses
one where tensors are expected, naming it.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

# Storage class -> element dtype (torch.<Name>Storage; UntypedStorage holds
# bytes, reinterpreted by the tensor's own dtype in newer files).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class TorchFileError(ValueError):
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


@dataclasses.dataclass
class _Storage:
  """A storage's elements; `array` is filled when its bytes are read (after
  the pickle, in files of torch < 1.6)."""
  dtype: Any
  array: Any = None


@dataclasses.dataclass
class _Tensor:
  """A tensor to rebuild once its storage is read."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple

  def numpy(self) -> np.ndarray:
    data = self.storage.array
    if not self.size:
      return np.array(data[self.offset])
    itemsize = data.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=tuple(self.size),
        strides=tuple(s * itemsize for s in self.stride)).copy()


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """`torch._utils._rebuild_tensor_v2`: what to cut from which storage."""
  del unused  # requires_grad, backward hooks, metadata
  return _Tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


def _materialise(obj):
  """The object with every `_Tensor` rebuilt as a numpy array."""
  if isinstance(obj, _Tensor):
    return obj.numpy()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialise(v))
                                   for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialise(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  if isinstance(obj, argparse.Namespace):
    return argparse.Namespace(**_materialise(vars(obj)))
  return obj


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
}


class _Unpickler(pickle.Unpickler):
  """Resolves the allowed names; storages come from `load_storage`."""

  def __init__(self, file, load_storage):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    if module == "torch" and name in ("float32", "float16", "bfloat16",
                                      "float64", "int64", "int32", "uint8",
                                      "int8", "int16", "bool"):
      return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    return _opaque_class(f"{module}.{name}")

  def persistent_load(self, saved_id):
    if not (isinstance(saved_id, tuple) and saved_id and
            saved_id[0] == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {saved_id!r}")
    storage_type, key, _, numel = saved_id[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(
          f"a storage of an unknown type {storage_type!r}")
    return self._load_storage(str(key), storage_type.dtype, int(numel),
                              saved_id[5:])


def _load_zip(path: str, archive: zipfile.ZipFile) -> Any:
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("data.pkl")]
  if len(pickles) != 1:
    raise TorchFileError(f"{path}: a zip archive without one data.pkl, so "
                         "not a torch.save file")
  root = pickles[0][:-len("data.pkl")]
  order = "little"
  if f"{root}byteorder" in names:
    order = archive.read(f"{root}byteorder").decode().strip()

  byteorder = "<" if order == "little" else ">"

  def load_storage(key, dtype, numel, unused):
    del numel, unused  # the member's size says it
    raw = archive.read(f"{root}data/{key}")
    return _Storage(dtype, np.frombuffer(raw, dtype.newbyteorder(byteorder)))

  with archive.open(pickles[0]) as f:
    return _materialise(_Unpickler(io.BytesIO(f.read()), load_storage).load())


def _load_legacy(path: str, f) -> Any:
  """torch < 1.6: pickles, then each storage as (int64 count, bytes)."""
  magic = pickle.load(f)
  if magic != _LEGACY_MAGIC:
    raise TorchFileError(f"{path}: a pickle, but not a PyTorch checkpoint "
                         "(no torch.save magic number)")
  pickle.load(f)  # protocol version
  pickle.load(f)  # system info
  storages = {}

  def load_storage(key, dtype, numel, view_metadata):
    del numel
    if view_metadata and view_metadata[0] is not None:
      raise TorchFileError(f"{path}: storage views (torch < 1.0 files) are "
                           "not supported; re-save it with a newer torch")
    return storages.setdefault(key, _Storage(dtype))

  obj = _Unpickler(f, load_storage).load()
  for key in pickle.load(f):
    count = struct.unpack("<q", f.read(8))[0]
    storage = storages[key]
    raw = f.read(count * storage.dtype.itemsize)
    if len(raw) < count * storage.dtype.itemsize:
      raise EOFError(f"storage {key} is cut short")
    storage.array = np.frombuffer(raw, storage.dtype)
  return _materialise(obj)


def load(path: str | os.PathLike) -> Any:
  """The object a `torch.save` file holds, tensors as numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as archive:
        return _load_zip(path, archive)
    except (zipfile.BadZipFile, KeyError, pickle.UnpicklingError, EOFError,
            struct.error, ValueError) as e:
      if isinstance(e, TorchFileError):
        raise
      raise TorchFileError(f"{path}: a damaged torch.save archive "
                           f"({type(e).__name__}: {e})") from e
  if tarfile.is_tarfile(path):
    raise TorchFileError(f"{path}: the tar layout of torch < 0.4 is not "
                         "read; load and save it again with a newer torch")
  with open(path, "rb") as f:
    head = f.read(2)
    if not head or head[0] != 0x80:  # every pickle protocol >= 2
      raise TorchFileError(f"{path} is not a PyTorch checkpoint (neither a "
                           "torch.save zip archive nor a pickle)")
    f.seek(0)
    try:
      return _load_legacy(path, f)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as e:
      raise TorchFileError(f"{path}: a damaged PyTorch checkpoint "
                           f"({type(e).__name__}: {e})") from e


def _opaque_inside(value, where: str):
  """(path, class name) of the first placeholder inside `value`, or None."""
  if isinstance(value, Opaque):
    return where, value.name
  if isinstance(value, Mapping):
    items = value.items()
  elif isinstance(value, (list, tuple)):
    items = enumerate(value)
  else:
    return None
  for key, item in items:
    found = _opaque_inside(item, f"{where}[{key!r}]")
    if found:
      return found
  return None


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
    raise TorchFileError(f"{path} holds a {obj.name} object, not a state "
                         "dict of tensors; save model.state_dict() instead")
  if not isinstance(obj, Mapping):
    raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state "
                         "dict of tensors")
  found = _opaque_inside(obj, where)
  if found:
    raise TorchFileError(
        f"{path}: {found[0]} is a {found[1]} object, which this reader does "
        "not load (only tensors and plain containers, for safety)")
  out = {}
  for key, value in obj.items():
    if isinstance(value, np.ndarray):
      floating = np.issubdtype(value.dtype, np.floating) or (
          value.dtype == ml_dtypes.bfloat16)
      out[str(key)] = value.astype(np.float32) if floating else value
  if not out:
    raise TorchFileError(f"{path}: {where} holds no tensors")
  return out
