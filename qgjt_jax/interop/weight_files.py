"""Weight files read without PyTorch and without running anything from them:
`.pth`/`.pt`/`.ckpt` (`torch_files`), `.safetensors` and `.npz`."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from qgjt_jax.files import limits
from qgjt_jax.files import regular
from qgjt_jax.interop import torch_files


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict as name -> numpy array, without torch.

  `.npz` files hold name -> array; `.ckpt` (PyTorch Lightning: the weights
  sit under 'state_dict') and `.pth`/`.pt` (a state dict, or a dict holding
  one under 'state_dict') are read by `torch_files`, which rebuilds tensors
  only and never runs code from the file.

  Returns:
    name -> array; floating tensors become float32 numpy arrays.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file cannot be read as a state dict (the message names
      it, and what stands where tensors should).
  """
  path = os.fspath(path)
  regular.require_regular(path)
  if path.endswith(".safetensors"):
    return read_safetensors(path)[0]
  if not path.endswith(".npz"):
    return torch_files.state_dict(path)
  try:
    _check_npz(path)
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (limits.LimitError, torch_files.TorchFileError):
    raise
  except Exception as e:  # zipfile, zlib and numpy format errors alike
    raise torch_files.TorchFileError(
        f"cannot read {path} as an .npz of name -> array "
        f"({type(e).__name__}: {e})"
    ) from e


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(name -> array, the header's metadata) of a .safetensors file.

  The format is a JSON header and raw tensor bytes, so nothing in it runs;
  the safetensors package checks the header against the file (offsets in
  bounds, no overlaps), and each tensor's size is checked against
  max_tensor_bytes before it is read.
  """
  import safetensors  # pylint: disable=g-import-not-at-top

  limit = limits.current().max_tensor_bytes
  try:
    with safetensors.safe_open(path, framework="np") as f:
      metadata = dict(f.metadata() or {})
      tensors = {}
      for name in f.keys():
        piece = f.get_slice(name)
        dtype = piece.get_dtype()
        if dtype not in _SAFETENSORS_DTYPES:
          raise torch_files.TorchFileError(
              f"{path}: {name} holds {dtype} values, which this reader "
              "does not take: save the weights as float32 (or F16/F64)"
          )
        size = math.prod(piece.get_shape()) * _SAFETENSORS_DTYPES[dtype]
        if size > limit:
          raise limits.exceeded(
              f"{path}: {name}", "a tensor of", size, "max_tensor_bytes"
          )
        tensors[name] = f.get_tensor(name)
  except (limits.LimitError, torch_files.TorchFileError):
    raise
  except Exception as e:  # the package's own errors: a damaged header
    raise torch_files.TorchFileError(
        f"cannot read {path} as safetensors ({_first_line(e)})"
    ) from e
  return tensors, metadata


_SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def _check_npz(path: str) -> None:
  """Every array of an .npz holds the bytes its header declares, within the
  limits: numpy allocates the declared shape before reading the data."""
  import zipfile  # pylint: disable=g-import-not-at-top

  with zipfile.ZipFile(path) as archive:
    limits.check_zip(archive, path)
    for info in archive.infolist():
      with archive.open(info) as member:
        read_header = (
            np.lib.format.read_array_header_1_0
            if np.lib.format.read_magic(member) == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(member)
      declared = math.prod(shape) * dtype.itemsize
      if declared > info.file_size:
        raise torch_files.TorchFileError(
            f"{path}: {info.filename} declares an array of {shape} "
            f"{dtype} ({declared:,} bytes) but holds {info.file_size:,}: "
            "the file is damaged"
        )


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


def read_with_record(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The state dict of a file, and what a file exported by this project
  records about its model (input size and channel order; "carried": its
  thresholds and quality statistics, `carried.Carried`)."""
  from qgjt_jax.interop import carried  # pylint: disable=g-import-not-at-top

  if not path.endswith(".safetensors") or not os.path.isfile(path):
    return read_state_dict(path), {}
  state, metadata = read_safetensors(path)
  recorded = {"carried": carried.read(metadata, path)}
  size = metadata.get(IMAGE_SIZE_KEY, "")
  if size.isascii() and size.isdigit() and 0 < int(size) <= 4096:
    recorded["image_size"] = int(size)
  if metadata.get(INPUT_ORDER_KEY) in ("BGR", "RGB"):
    recorded["input_order"] = metadata[INPUT_ORDER_KEY]
  return state, recorded


# What `export --format=safetensors` records in the file's metadata.
IMAGE_SIZE_KEY = "qgjt_jax.image_size"
INPUT_ORDER_KEY = "qgjt_jax.weights_input_order"
