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
                        inflate to (torch.save stores members uncompressed)
  max_pickle_depth      nesting of containers in a checkpoint's pickle

`python -m qgjt_jax.main` takes them as `--config.limits.NAME=VALUE`,
`convert` and `data.prepare` as `--NAME=VALUE`. The values in force travel
to worker processes in the environment (QGJT_LIMITS).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from qgjt_jax import errors

ENV = "QGJT_LIMITS"


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
  return LimitError(where, (
      f"{what} ({value:,}) is over the limit {name}={limit:,} (set to stop "
      "damaged or hostile files); if you trust the file, raise it with "
      f"--config.limits.{name}=N (main) or --{name}=N (convert, prepare)"))


def _validated(values: Mapping[str, Any], where: str) -> Limits:
  unknown = sorted(set(values) - set(DEFAULTS))
  if unknown:
    raise errors.UserError(f"{where}: unknown limit {unknown[0]!r}; the "
                           f"limits are {', '.join(DEFAULTS)}")
  checked = {}
  for name, value in values.items():
    try:
      number = int(value)
    except (TypeError, ValueError, OverflowError):
      number = 0
    if number <= 0 or number != value:
      raise errors.UserError(f"{where}: {name}={value!r} must be a positive "
                             "integer")
    checked[name] = number
  return Limits(**{**DEFAULTS, **checked})


def _from_environment() -> Limits:
  text = os.environ.get(ENV, "")
  if not text:
    return Limits()
  try:
    return _validated(json.loads(text), f"${ENV}")
  except (ValueError, errors.UserError):
    return Limits()  # a mangled variable must not loosen anything


_current = _from_environment()


def current() -> Limits:
  return _current


def configure(values: Optional[Mapping[str, Any]] = None,
              where: str = "limits") -> Limits:
  """Puts `values` (name -> int; missing names keep their defaults) in force
  here and in the worker processes started from now on."""
  global _current
  _current = _validated(dict(values or {}), where)
  os.environ[ENV] = json.dumps(dataclasses.asdict(_current))
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
