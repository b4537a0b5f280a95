"""Inputs are regular files.

A FIFO named as an image, a pairs file or a checkpoint blocks the reader
forever (`open` waits for a writer); a device streams without end. Every
reader of a user's file opens it here: without blocking, and only if it is
a regular file (a link to one is fine), else one line naming it.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from qgjt_jax import errors

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


class NotAFileError(errors.UserError, ValueError):
  """An input that is not a regular file (the message names it)."""


def _refuse(path, mode: int, what: str) -> NotAFileError:
  kind = next((name for test, name in _KINDS if test(mode)), "not a file")
  return NotAFileError(
      f"{what}{path} is {kind}, not a regular file: name a file"
  )


def open_regular(path: str | os.PathLike, what: str = "") -> BinaryIO:
  """`path` opened for binary reading if it is a regular file.

  Args:
    path: the file.
    what: what names it in the message, e.g. "--landmarks=" (default: the
      path alone).

  Raises:
    NotAFileError: a FIFO, device, socket or folder.
    OSError: as open() raises it (missing, no permission...).
  """
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise _refuse(path, mode, what)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def require_regular(path: str | os.PathLike, what: str = "") -> None:
  """Refuses what is not a regular file, for the readers that open a path
  themselves (zipfile, safetensors).

  Raises:
    NotAFileError, OSError: as `open_regular`.
  """
  mode = os.stat(path).st_mode
  if not stat.S_ISREG(mode):
    raise _refuse(path, mode, what)


def read_bytes(
    path: str | os.PathLike,
    limit: int,
    kind: str,
    error: type[errors.UserError],
    what: str = "",
) -> bytes:
  """The bytes of a regular file of at most `limit` bytes; a bigger one is
  refused before it is read, as `error` naming `what` + path and the file
  as `kind`.

  Raises:
    error: as above; NotAFileError, OSError: as `open_regular`.
  """
  with open_regular(path, what) as f:
    size = os.fstat(f.fileno()).st_size
    if size > limit:
      raise error(
          f"{what}{path}: {size:,} bytes, over the {limit:,} "
          f"{kind} may hold"
      )
    return f.read(limit + 1)


def read_text(
    path: str | os.PathLike,
    limit: int,
    kind: str,
    error: type[errors.UserError],
    what: str = "",
) -> str:
  """The UTF-8 text (a byte-order mark dropped) of a regular file of at
  most `limit` bytes, for the readers of users' text files (pairs files,
  landmarks). A bigger file is refused before it is read, and bytes that
  are not UTF-8 are named by offset; both as `error`, naming the file as
  `what` + path and the file as `kind` ("a pairs file").

  Raises:
    error: as above; NotAFileError, OSError: as `open_regular`.
  """
  data = read_bytes(path, limit, kind, error, what)
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise error(
        f"{what}{path}: not UTF-8 text ({e.reason} at byte {e.start})"
    ) from None
