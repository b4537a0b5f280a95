"""Limits on what a file a user hands us may make us allocate or do.

Checkpoints come from strangers, images from the web: every reader of such
a file (PyTorch checkpoints of both layouts, `.bin` and `.rec` sets, image
folders, the images of --mode=embed/compare) checks what the file declares
against these limits *before* allocating for it, and refuses it with one
line that names the file, the limit and how to raise it:

  max_image_pixels      width x height an encoded image may declare (a
                        48 KB PNG can declare 20000 x 20000, 1.2 GB decoded)
  max_image_file_bytes  bytes of one image file
  max_tensor_bytes      bytes of one tensor, storage or archive member
  max_inflation         how many times its compressed size a zip member may
                        inflate to, and an archive's members all together
                        the archive's size (torch.save stores them
                        uncompressed)
  max_pickle_depth      nesting of containers in a checkpoint's pickle

`python -m qgjt_jax.main` takes them as `--config.limits.NAME=VALUE`,
`convert` and `data.prepare` as `--NAME=VALUE`. The input pipeline hands the
values in force to its worker processes when it starts them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from qgjt_jax import errors


@dataclasses.dataclass(frozen=True)
class Limits:
  max_image_pixels: int = 50_000_000  # a 50 MP photo; faces are far smaller
  max_image_file_bytes: int = 256 << 20
  max_tensor_bytes: int = 4 << 30  # a WebFace12M AdaFace head is 1.3 GB
  max_inflation: int = 100
  max_pickle_depth: int = 200


HELP = {
    "max_image_pixels": "Most pixels (width x height) an image may declare.",
    "max_image_file_bytes": "Most bytes of one image file.",
    "max_tensor_bytes": "Most bytes of one tensor, storage or archive member "
    "of a checkpoint.",
    "max_inflation": "Most times its compressed size a checkpoint's archive "
    "member may inflate to.",
    "max_pickle_depth": "Deepest nesting of containers in a checkpoint.",
}
DEFAULTS = dataclasses.asdict(Limits())


class LimitError(errors.UserError, ValueError):
  """A file declares more than a limit allows (the message names both)."""

  def __init__(self, where: str, detail: str):
    super().__init__(f"{where}: {detail}")
    self.where, self.detail = where, detail

  def __reduce__(self):  # worker processes send it back pickled
    return type(self), (self.where, self.detail)


def exceeded(where: str, what: str, value: int, name: str) -> LimitError:
  """The error for `what` (= `value`) of `where` over the limit `name`."""
  limit = getattr(current(), name)
  return LimitError(
      where,
      (
          f"{what} ({value:,}) is over the limit {name}={limit:,} (set to stop "
          "damaged or hostile files); if you trust the file, raise it with "
          f"--config.limits.{name}=N (main) or --{name}=N (convert, prepare)"
      ),
  )


_HIGHEST = 1 << 48  # 256 TiB: past any real file, still a safe size_t
# Hashing a tuple nested deeper overflows the interpreter's C stack.
_HIGHEST_DEPTH = 10_000


def _validated(values: Mapping[str, Any], where: str) -> Limits:
  unknown = sorted(set(values) - set(DEFAULTS))
  if unknown:
    raise errors.UserError(
        f"{where}: unknown limit {unknown[0]!r}; the "
        f"limits are {', '.join(DEFAULTS)}"
    )
  checked = {}
  for name, value in values.items():
    try:
      number = int(value)
    except (TypeError, ValueError, OverflowError):
      number = 0
    highest = _HIGHEST_DEPTH if name == "max_pickle_depth" else _HIGHEST
    if number <= 0 or number != value or number > highest:
      raise errors.UserError(
          f"{where}: {name}={value!r} must be a positive "
          f"integer up to {highest:,}"
      )
    checked[name] = number
  return Limits(**{**DEFAULTS, **checked})


_current = Limits()


def current() -> Limits:
  return _current


def configure(
    values: Optional[Mapping[str, Any]] = None, where: str = "limits"
) -> Limits:
  """Puts `values` (name -> int; missing names keep their defaults) in force
  in this process."""
  return use(_validated(dict(values or {}), where))


def use(limits: Limits) -> Limits:
  """Puts checked `limits` in force in this process (a worker's start)."""
  global _current
  _current = limits
  return _current


def define_flags() -> None:
  """--max_image_pixels ... for the absl commands (convert, prepare)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  for name, default in DEFAULTS.items():
    flags.DEFINE_integer(name, default, HELP[name])


def configure_from_flags() -> Limits:
  from absl import flags  # pylint: disable=g-import-not-at-top

  return configure({n: flags.FLAGS[n].value for n in DEFAULTS}, "flags")


class BoundedReader:
  """A file's next `size` bytes, for the pure-Python unpickler (the C one
  grows its memo to whatever index a few bytes name): no read asks the
  file for more than is left, whatever length a pickle declares."""

  def __init__(self, file, size: int):
    self._file, self.left = file, size

  def read(self, n=-1):
    n = self.left if n is None or n < 0 else min(n, self.left)
    data = self._file.read(n)
    self.left -= len(data)
    return data

  def readline(self, size=-1):
    size = self.left if size is None or size < 0 else min(size, self.left)
    data = self._file.readline(size)
    self.left -= len(data)
    return data


_INFLATION_FLOOR = 1 << 20  # what any member may inflate to, ratio or not


def check_zip(archive, path: str) -> None:
  """Refuses, before anything is read, a zip archive whose members declare
  more than the limits allow: one member more than max_tensor_bytes, or
  inflating more than max_inflation times its compressed size, or all of
  them together more than max_inflation times the archive (many small
  members are no way around the ratio)."""
  import zipfile  # pylint: disable=g-import-not-at-top

  allowed = current()
  total = 0
  for info in archive.infolist():
    where = f"{path}: member {info.filename}"
    if info.file_size > allowed.max_tensor_bytes:
      raise exceeded(
          where, "its size in bytes", info.file_size, "max_tensor_bytes"
      )
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
        _INFLATION_FLOOR, allowed.max_inflation * info.compress_size
    ):
      raise exceeded(
          where,
          f"{info.compress_size:,} compressed bytes inflating to "
          f"{info.file_size:,}: a ratio",
          info.file_size // max(info.compress_size, 1),
          "max_inflation",
      )
    total += info.file_size
  size = max(1, os.path.getsize(path))
  if total > max(_INFLATION_FLOOR, allowed.max_inflation * size):
    raise exceeded(
        path,
        f"members inflating to {total:,} bytes from a "
        f"{size:,}-byte archive: a ratio",
        total // size,
        "max_inflation",
    )
