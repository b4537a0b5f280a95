"""Files written for the user: complete or absent, never replaced unasked.

Every file a command writes for the user (exports, embeddings, records of
converted models, evaluation results) is written under a temporary name in
its own folder and renamed into place once complete and synced, so an
interrupt or a full disk leaves the previous file (or none), never part of
one. An existing file is refused with one line unless the command was given
its `--overwrite`, and the target is checked before the work starts, so a
missing folder fails in a second, not after an hour of embedding.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

from qgjt_jax import errors


class OutputExistsError(errors.UserError):
  """The output exists and replacing it was not asked for."""


def check_output(
    path: str, *, overwrite: bool, flag: str = "--overwrite"
) -> None:
  """Refuses, before any work, an output that could not be written.

  Raises:
    UserError: its folder is missing or not writable, or it is a folder.
    OutputExistsError: it exists and not `overwrite`.
  """
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise errors.UserError(
        f"{path}: the folder {parent} does not exist; "
        "create it first or write elsewhere"
    )
  if not os.access(parent, os.W_OK | os.X_OK):
    raise errors.UserError(
        f"{path}: the folder {parent} is not writable; "
        "write elsewhere or fix its permissions"
    )
  if os.path.isdir(path):
    raise errors.UserError(f"{path} is a folder; name a file to write")
  if os.path.lexists(path) and not overwrite:
    raise OutputExistsError(
        f"{path} already exists; pass {flag} to replace "
        "it, or choose another name"
    )


@contextlib.contextmanager
def atomic_file(
    path: str, *, overwrite: bool, flag: str = "--overwrite"
) -> Iterator[IO[bytes]]:
  """A binary file that becomes `path` only when the block completes.

  Without `overwrite` the rename cannot replace a file that appeared
  meanwhile (it is a hard link, which fails if the name is taken).
  """
  check_output(path, overwrite=overwrite, flag=flag)
  with _staged(path) as (f, tmp):
    yield f
    f.flush()
    os.fsync(f.fileno())
    _land(tmp, path, overwrite, flag)


@contextlib.contextmanager
def _staged(path: str):
  """(an open binary file, its temporary name) beside `path`; the file is
  removed unless it was landed, and a failure to write names `path`."""
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
      dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".partial"
  )
  try:
    with os.fdopen(fd, "wb") as f:
      try:
        yield f, tmp
      except OSError as e:
        if e.filename is None and e.errno is not None:
          raise type(e)(e.errno, e.strerror, path) from e
        raise
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)


def _land(tmp: str, path: str, overwrite: bool, flag: str) -> None:
  """Moves a complete temporary file to `path`. Without `overwrite` the
  move cannot replace a file that appeared meanwhile (it is a hard link,
  which fails if the name is taken)."""
  os.chmod(tmp, 0o666 & ~_umask())
  if overwrite:
    os.replace(tmp, path)
    return
  try:
    os.link(tmp, path)
  except FileExistsError:
    raise OutputExistsError(
        f"{path} appeared while it was being "
        f"written; pass {flag} to replace it"
    ) from None
  except OSError:  # a file system without hard links
    check_output(path, overwrite=False, flag=flag)
    os.rename(tmp, path)


def write(
    path: str, data: bytes | str, *, overwrite: bool, flag: str = "--overwrite"
) -> None:
  """`data` (text as UTF-8) to `path`, atomically (see `atomic_file`)."""
  write_together({path: data}, overwrite=overwrite, flag=flag)


def write_together(
    files: dict[str, bytes | str], *, overwrite: bool, flag: str = "--overwrite"
) -> None:
  """Several files that land together or not at all (a model and the
  sidecar describing it): each is written whole under a temporary name
  first, and only then are they moved into place; if a move fails, the
  ones already moved are taken back and any file they replaced is put
  back, so no new file ever sits beside an old one it does not match.
  """
  for path in files:
    check_output(path, overwrite=overwrite, flag=flag)
  with contextlib.ExitStack() as stack:
    staged = {}
    for path, data in files.items():
      f, tmp = stack.enter_context(_staged(path))
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
      staged[path] = tmp
    kept, landed = {}, []
    try:
      for path, tmp in staged.items():
        if os.path.lexists(path):  # only with overwrite (checked above)
          kept[path] = tmp + ".old"
          os.link(path, kept[path])
        _land(tmp, path, overwrite, flag)
        landed.append(path)
    except BaseException:
      for path in landed:
        if path in kept:
          os.replace(kept.pop(path), path)
        else:
          os.unlink(path)
      raise
    finally:
      for old in kept.values():
        if os.path.lexists(old):
          os.unlink(old)


def _umask() -> int:
  """The process's umask, read without changing it (threads may write)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return 0o022
