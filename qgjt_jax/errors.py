"""How every command ends on a bad input: one line, exit status 1.

Each entry point runs its body under `expected_failures()`: the failures a
user can cause and fix (a bad config key, a missing or unreadable file, a
workdir of another run, a full disk), every one a `UserError` or an
OSError with a fix, end in

  ERROR: <what, naming the file or key>: <what to do>

on stderr and exit status 1, with the traceback only when asked for
(`--traceback`, or `QGJT_TRACEBACK=1`). Anything else is a bug and keeps its
traceback.

Logging is absl's, as across the JAX ecosystem: `--verbosity=0` shows INFO
(restore details, the parameter table), `--verbosity=1` debug lines,
`--alsologtostderr` and `--log_dir` as usual. Without --verbosity only
warnings are logged, and orbax's notes on how this project's read-only
restores are set up are left out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import traceback
from typing import Callable, Optional

TRACEBACK_ENV = "QGJT_TRACEBACK"

# OSErrors a user causes, and what to do about them.
_OS_ADVICE = {
    errno.ENOSPC: "free some space there, or use another location",
    errno.EDQUOT: "free some of your quota, or use another location",
    errno.EACCES: "use a location you can write to, or fix its permissions",
    errno.EPERM: "use a location you can write to, or fix its permissions",
    errno.EROFS: "use a location on a writable file system",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "name a file, not a folder",
}


class UserError(Exception):
  """An expected failure whose message says what went wrong and what to do."""


# Control characters but the line break: a terminal acts on them (ESC
# sequences retitle the window, clear the screen or move the cursor, BEL
# rings), so a file name holding them is shown, not obeyed.
_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def displayable(text: str) -> str:
  """`text` as valid UTF-8 a terminal shows and does not act on: the bytes
  of a file name that is no UTF-8 (made on another system; Python keeps
  them as surrogates) and control characters (ESC, BEL, tab... but not the
  line break) shown as \\xNN."""
  text = os.fsencode(text).decode("utf-8", "backslashreplace")
  return _CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def describe_os_error(e: OSError) -> Optional[str]:
  """One line for an OSError a user can fix, or None for other ones.

  An OSError without an errno was raised with a message of ours (a missing
  folder, say): that message is the line.
  """
  if e.errno is None:
    return " ".join(str(e).split()) or None
  advice = _OS_ADVICE.get(e.errno)
  if advice is None:
    return None
  where = f" ({e.filename})" if e.filename else ""
  return f"{e.strerror or type(e).__name__}{where}: {advice}"


def one_line(e: BaseException) -> str:
  """The message of `e` on one line."""
  if isinstance(e, OSError) and not isinstance(e, UserError):
    described = describe_os_error(e)
    if described:
      return described
  text = str(e).strip() or type(e).__name__
  return " ".join(part.strip() for part in text.splitlines() if part.strip())


def start_absl_command(argv: list[str]) -> bool:
  """The start of every absl command's main: no stray arguments, the
  logging described above; returns whether tracebacks were asked for."""
  from absl import app  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_absl_logging()
  return absl_traceback_asked()


def setup_absl_logging() -> None:
  """For absl commands, after flag parsing: the logging described above."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  if flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OrbaxRestoreNotes) for f in handler.filters):
    handler.addFilter(_OrbaxRestoreNotes())


class _OrbaxRestoreNotes:
  """Drops orbax's warnings about read-only managers and absent metadata
  files: every evaluation, embedding or export restores that way."""

  def filter(self, record) -> bool:
    return not (record.levelno <= 30 and "orbax" in record.pathname)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for the absl commands, a flag mistake one ERROR
  line (absl itself prints two, a FATAL and a pointer to --helpshort)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(flag_mistake(e))


def flag_mistake(e: Exception) -> str:
  """The ERROR line of a flag absl refused."""
  return f"ERROR: {one_line(e)} (--helpshort lists the flags)"


def define_traceback_flag() -> None:
  """--traceback for an absl command (once per process)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if "traceback" not in flags.FLAGS:
    flags.DEFINE_bool(
        "traceback",
        False,
        "Show the traceback of an "
        f"expected failure too (or set {TRACEBACK_ENV}=1).",
    )


def absl_traceback_asked() -> bool:
  """Whether --traceback (or the environment) asked for tracebacks."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  return traceback_requested(
      "traceback" in flags.FLAGS and flags.FLAGS.traceback
  )


def traceback_requested(verbose: bool = False) -> bool:
  return verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


@contextlib.contextmanager
def expected_failures(
    verbose: bool = False, show: Optional[Callable[[str], None]] = None
):
  """Turns a UserError (every error a user can cause and fix subclasses
  it), or an OSError a user can fix, into one line and exit status 1.

  `show` prints the line (default: stderr); multi-process programs pass one
  that prints on process 0 only.
  """
  try:
    yield
  except (UserError, OSError) as e:
    if not isinstance(e, UserError) and describe_os_error(e) is None:
      raise
    if traceback_requested(verbose):
      traceback.print_exc()
    line = displayable(f"ERROR: {one_line(e)}")
    if show is None:
      print(line, file=sys.stderr, flush=True)
    else:
      show(line)
    sys.exit(1)
