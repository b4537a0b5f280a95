"""One writer per workdir: the lock a training run (or a conversion) holds.

On a shared cluster a requeued job can start while the old one still runs;
two runs on one workdir would overwrite each other's checkpoints and logs.
So a writer takes WORKDIR/run.lock first: a JSON note of who holds it (host,
pid, the process's start time, the command) on a file that the holder also
keeps `flock`ed for as long as it runs. The file appears only complete and
already locked (written under a temporary name, locked, then hard-linked
into place), so taking it is atomic.

A second writer stops at once with one line naming the holder. A lock whose
holder died on this host (the flock is gone with it, and its pid is gone
or reused) is taken over with a notice. A holder on another host cannot be
checked from here: the lock is kept unless forced (`--force_lock`), which
also takes a lock that looks alive, with a warning. Readers (evaluation,
embed, compare, export) take no lock.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Callable, Optional

from qgjt_jax import errors
from qgjt_jax import workdir as workdir_layout


class WorkdirLockedError(errors.UserError):
  """Another run holds the workdir (the message names it)."""


@dataclasses.dataclass
class Lock:
  """A held lock; `release` gives it up (the holder's exit does too)."""

  path: str
  fd: int

  def release(self) -> None:
    if self.fd < 0:
      return
    try:
      if _same_file(self.fd, self.path):
        os.unlink(self.path)
    finally:
      os.close(self.fd)
      self.fd = -1


def _start_ticks(pid: int) -> Optional[int]:
  """The process's start time in clock ticks since boot (Linux), to tell a
  reused pid from the holder."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[19])
  except (OSError, IndexError, ValueError):
    return None


def _me() -> dict:
  return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "process_start": _start_ticks(os.getpid()),
      "started": datetime.datetime.now()
      .astimezone()
      .isoformat(timespec="seconds"),
      "command": " ".join(sys.argv)[:500],
  }


def _alive_here(holder: dict) -> bool:
  """Whether the holder (on this host) still runs."""
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's live process
  recorded = holder.get("process_start")
  return recorded is None or _start_ticks(pid) in (None, recorded)


def describe(holder: Optional[dict]) -> str:
  if not holder:
    return "a run that left no readable note"
  return (
      f"pid {holder.get('pid')} on {holder.get('host')}, started "
      f"{holder.get('started')} ({holder.get('command')})"
  )


def _write(fd: int, info: dict) -> None:
  data = (json.dumps(info, indent=1) + "\n").encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)


def _read(fd: int) -> Optional[dict]:
  try:
    info = json.loads(os.pread(fd, 1 << 16, 0))
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _flock(fd: int) -> bool:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return False
    return True  # a file system without flock: the note alone decides


def _same_file(fd: int, path: str) -> bool:
  try:
    a, b = os.fstat(fd), os.stat(path)
  except OSError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _create(path: str, info: dict) -> Optional[Lock]:
  """The lock, newly made; None when one exists."""
  tmp = f"{path}.{info['host']}.{info['pid']}.tmp"
  fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    _flock(fd)
    _write(fd, info)
    try:
      os.link(tmp, path)
    except FileExistsError:
      os.close(fd)
      return None
    except OSError:  # no hard links here: an exclusive create instead
      os.close(fd)
      try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return None
      _flock(fd)
      _write(fd, info)
    return Lock(path, fd)
  finally:
    try:
      os.unlink(tmp)
    except OSError:
      pass


def acquire(
    workdir: str, *, force: bool = False, note: Callable[[str], None] = print
) -> Optional[Lock]:
  """Takes WORKDIR/run.lock (see the module docstring).

  Returns None for object-storage workdirs (gs://), which cannot be locked.

  Raises:
    WorkdirLockedError: another run holds it (naming the run).
  """
  if "://" in workdir:
    note(
        f"WARNING: {workdir} is on object storage, where no lock can be "
        "taken: make sure no other run uses it."
    )
    return None
  os.makedirs(workdir, exist_ok=True)
  workdir_layout.check_writes_stay_inside(workdir)
  path = str(workdir_layout.Workdir(workdir).lock)
  mine = _me()
  for _ in range(50):
    lock = _create(path, mine)
    if lock is not None:
      return lock
    try:
      fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
      continue  # released meanwhile
    locked = _flock(fd)
    holder = _read(fd)
    if locked and not _same_file(fd, path):
      os.close(fd)  # released and replaced meanwhile
      continue
    here = bool(holder) and holder.get("host") == mine["host"]
    alive = (not locked) or (here and _alive_here(holder)) or not here
    if alive and not force:
      os.close(fd)
      unknown = (
          ""
          if here or not locked
          else ("; it may have ended, which cannot be checked from this host")
      )
      raise WorkdirLockedError(
          f"{workdir} is in use by another run ({describe(holder)}{unknown})"
          f": wait for it, use another --workdir, or if it is gone pass "
          f"--force_lock (lock file {path})"
      )
    if not locked:  # forced, and its holder still has it locked
      os.close(fd)
      aside = f"{path}.broken-{os.getpid()}"
      try:
        os.rename(path, aside)
      except FileNotFoundError:
        continue
      note(
          f"WARNING: --force_lock: took {path} from {describe(holder)}, "
          f"which still holds it (its note is kept as {aside})."
      )
      continue
    note(
        ("WARNING: --force_lock: took " if alive else "Took over ")
        + f"{path} from {describe(holder)}"
        + ("." if alive else ", which is no longer running.")
    )
    _write(fd, mine)
    return Lock(path, fd)
  raise WorkdirLockedError(
      f"{path}: could not be taken (another run keeps "
      "taking and releasing it); try again"
  )
