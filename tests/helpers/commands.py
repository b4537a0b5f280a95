"""Running the project's commands as a user does: the tests' one way.

`run("qgjt_jax.main", "--workdir=...", ...)` starts `python -m MODULE ARGS`
in the checkout with the tests' environment (`tiny_runs.subprocess_env`:
CPU, the shared compilation cache, TensorFlow hidden, `devices` XLA host
devices), and returns its exit status, output and its own peak memory.
`assert_refused` is the one-line-error contract every command keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Optional

import pytest

from tests.helpers import tiny_runs


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str
  max_rss_mib: float

  @property
  def output(self) -> str:
    return self.stdout + self.stderr


# The command is started by a small launcher that forks it and reports its
# wait4 figures. A process's peak memory (ru_maxrss) keeps, across exec, the
# peak of the process it was forked from: started from the test process
# (gigabytes, after a training run), every child would seem that large.
# A cap on the address space (bytes, 0 for none) is set in the child alone.
_LAUNCHER = """
import json, os, resource, sys
pid = os.fork()
if pid == 0:
  cap = int(sys.argv[2])
  if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
  json.dump({"status": os.waitstatus_to_exitcode(status),
             "maxrss_kib": usage.ru_maxrss}, f)
"""


def run(
    module: Optional[str],
    *args,
    devices: Optional[int] = None,
    env: Optional[dict] = None,
    cwd=tiny_runs.ROOT,
    timeout: float = 600,
    check: bool = False,
    address_space_gib: float = 0,
) -> Result:
  """`python -m module args...` (module None: `python args...`): its exit
  status (negative: killed by that signal), output and peak resident
  memory. `check`: it must exit 0 without a traceback. `address_space_gib`:
  the command runs under that cap on its address space (ulimit -v)."""
  command = (["-m", module] if module else []) + [str(a) for a in args]
  env = env or tiny_runs.subprocess_env(devices)
  with tempfile.TemporaryDirectory() as tmp:
    report = pathlib.Path(tmp) / "report.json"
    with open(report.with_suffix(".out"), "w+b") as out, open(
        report.with_suffix(".err"), "w+b"
    ) as err:
      proc = subprocess.Popen(
          [
              sys.executable,
              "-c",
              _LAUNCHER,
              str(report),
              str(int(address_space_gib * (1 << 30))),
              *command,
          ],
          stdout=out,
          stderr=err,
          cwd=cwd,
          env=env,
          stdin=subprocess.DEVNULL,
          start_new_session=True,
      )
      try:
        proc.wait(timeout)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
      out.seek(0)
      err.seek(0)
      stdout = out.read().decode(errors="replace")
      stderr = err.read().decode(errors="replace")
    figures = (
        json.loads(report.read_text())
        if report.exists()
        else {"status": -9, "maxrss_kib": 0}
    )  # killed at the time limit
  result = Result(
      figures["status"], stdout, stderr, figures["maxrss_kib"] / 1024
  )
  if check:
    assert result.returncode == 0, (command, result.output[-5000:])
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
  return result


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # all but tab, line break


def main(*args, **kwargs) -> Result:
  """`python -m qgjt_jax.main args...` (see `run`)."""
  return run("qgjt_jax.main", *args, **kwargs)


def assert_refused(result: Result, *named, max_rss_mib: float = 1e9):
  """The contract of every command on a bad input: exit 1 (never 0, never a
  signal), one ERROR line, the last, naming `named`, no traceback, no raw
  control byte a terminal would act on, and a bounded peak memory."""
  output = result.output
  assert not _CONTROL.search(output), output[-3000:]
  assert result.returncode == 1, (result.returncode, output[-3000:])
  assert "Traceback" not in output, output[-3000:]
  errors = [l for l in output.splitlines() if "ERROR" in l]
  assert len(errors) == 1, output[-3000:]
  assert errors[0].startswith("ERROR: "), errors[0]
  assert result.stderr.strip().splitlines()[-1] == errors[0], output[-3000:]
  for name in named:
    assert str(name) in errors[0], (name, errors[0])
  assert result.max_rss_mib < max_rss_mib, (result.max_rss_mib, errors[0])


@contextlib.contextmanager
def small_disk(path: pathlib.Path, options: str):
  """A small tmpfs at `path` (root only: the way to fill or lock a disk);
  skips the test where it cannot be mounted."""
  path.mkdir(parents=True, exist_ok=True)
  mount = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
      capture_output=True,
      text=True,
  )
  if mount.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)
