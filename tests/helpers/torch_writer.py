"""Files in torch.save's layouts, written without torch (for the tests).

Protocol-2 pickles whose tensors are `torch._utils._rebuild_tensor_v2`
calls on persistent storage ids; the storages as zip members, or after the
pickles in the format of torch < 1.6.
"""

import collections
import dataclasses
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.bool_): "BoolStorage",
}
_HERE = __name__.encode()


def _rebuild_tensor_v2(*args):  # pickled by name, renamed to torch's below
  raise AssertionError("never called")


class _Storage:  # likewise: torch.<Name>Storage
  pass


_STORAGE_CLASSES = {}
for _dtype, _name in _STORAGE_NAMES.items():
  _STORAGE_CLASSES[_dtype] = type(_name, (_Storage,), {})
  globals()[_name] = _STORAGE_CLASSES[_dtype]


@dataclasses.dataclass(eq=False)
class TensorView:
  """A tensor written with the geometry given, whatever its storage holds
  (for files that lie about it)."""

  storage: np.ndarray
  offset: object
  size: object
  stride: object


class _TensorPickler(pickle.Pickler):
  """Pickles numpy arrays as torch.save pickles tensors."""

  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.storages, self.legacy = {}, legacy

  def persistent_id(self, obj):
    if isinstance(obj, tuple) and obj and obj[0] == "_storage":
      _, key, array = obj
      self.storages[key] = array
      ident = ("storage", _STORAGE_CLASSES[array.dtype], key, "cpu", array.size)
      return ident + ((None,) if self.legacy else ())
    return None

  def reducer_override(self, obj):
    if isinstance(obj, TensorView):
      return (
          _rebuild_tensor_v2,
          (
              ("_storage", str(len(self.storages)), obj.storage),
              obj.offset,
              obj.size,
              obj.stride,
              False,
              collections.OrderedDict(),
          ),
      )
    if not isinstance(obj, np.ndarray):
      return NotImplemented
    # A strided view on a storage larger than the tensor, offset by one
    # element, so offsets and strides are really read.
    base = np.ascontiguousarray(obj.T if obj.ndim == 2 else obj)
    storage = np.concatenate([np.zeros(1, obj.dtype), base.reshape(-1)])
    key = str(len(self.storages))
    strides = (
        (1, obj.shape[0])
        if obj.ndim == 2
        else tuple(s // obj.itemsize for s in base.strides)
    )
    return (
        _rebuild_tensor_v2,
        (
            ("_storage", key, storage),
            1,
            obj.shape,
            strides,
            False,
            collections.OrderedDict(),
        ),
    )


def _torch_pickle(obj, legacy=False):
  buffer = io.BytesIO()
  pickler = _TensorPickler(buffer, legacy)
  pickler.dump(obj)
  data = buffer.getvalue()
  data = data.replace(
      _HERE + b"\n_rebuild_tensor_v2\n", b"torch._utils\n_rebuild_tensor_v2\n"
  )
  for name in _STORAGE_NAMES.values():
    data = data.replace(
        _HERE + f"\n{name}\n".encode(), f"torch\n{name}\n".encode()
    )
  assert _HERE not in data
  return data, pickler.storages


def write_torch_file(path, obj, legacy=False):
  """`obj` (numpy arrays as tensors) as torch.save would write it."""
  data, storages = _torch_pickle(obj, legacy)
  if legacy:
    with open(path, "wb") as f:
      for header in (
          0x1950A86A20F9469CFC6C,
          1001,
          {"protocol_version": 1001, "little_endian": True},
      ):
        pickle.dump(header, f, protocol=2)
      f.write(data)
      pickle.dump(sorted(storages), f, protocol=2)
      for key in sorted(storages):
        f.write(struct.pack("<q", storages[key].size))
        f.write(storages[key].tobytes())
    return
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("model/data.pkl", data)
    archive.writestr("model/byteorder", "little")
    archive.writestr("model/version", "3\n")
    for key, array in storages.items():
      archive.writestr(f"model/data/{key}", array.tobytes())
