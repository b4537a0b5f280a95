"""One writer per workdir (workdir_lock) and outputs written whole (outputs)."""

import json
import os
import subprocess
import sys

import pytest

from qgjt_jax import outputs
from qgjt_jax import workdir as workdir_layout
from qgjt_jax import workdir_lock


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path), note=print)
  try:
    with pytest.raises(
        workdir_lock.WorkdirLockedError,
        match=rf"in use by another run \(pid {os.getpid()} ",
    ):
      workdir_lock.acquire(str(tmp_path), note=print)
  finally:
    lock.release()
  assert not (tmp_path / workdir_layout.LOCK).exists()
  workdir_lock.acquire(str(tmp_path), note=print).release()  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
  """A killed holder leaves its note; its flock died with it."""
  subprocess.run(
      [
          sys.executable,
          "-c",
          "import os, sys\nfrom qgjt_jax import workdir_lock\n"
          "workdir_lock.acquire(sys.argv[1])\nos._exit(0)",
          str(tmp_path),
      ],
      check=True,
      cwd=os.getcwd(),
  )
  left = json.loads((tmp_path / workdir_layout.LOCK).read_text())
  notes = []
  lock = workdir_lock.acquire(str(tmp_path), note=notes.append)
  assert len(notes) == 1 and "no longer running" in notes[0]
  assert f"pid {left['pid']}" in notes[0]
  mine = json.loads((tmp_path / workdir_layout.LOCK).read_text())
  assert mine["pid"] == os.getpid()
  lock.release()


def test_a_lock_of_another_host_is_kept_unless_forced(tmp_path):
  note = {
      "host": "elsewhere",
      "pid": 4242,
      "started": "yesterday",
      "command": "train",
  }
  (tmp_path / workdir_layout.LOCK).write_text(json.dumps(note))
  with pytest.raises(
      workdir_lock.WorkdirLockedError,
      match="on elsewhere.*cannot be checked.*--force_lock",
  ):
    workdir_lock.acquire(str(tmp_path), note=print)
  notes = []
  lock = workdir_lock.acquire(str(tmp_path), force=True, note=notes.append)
  assert "--force_lock" in notes[0] and "elsewhere" in notes[0]
  lock.release()


def test_force_takes_even_a_live_lock(tmp_path):
  held = workdir_lock.acquire(str(tmp_path), note=print)
  notes = []
  forced = workdir_lock.acquire(str(tmp_path), force=True, note=notes.append)
  assert "still holds it" in notes[0]
  forced.release()
  held.release()  # its file was moved aside: nothing of the new one removed
  assert not (tmp_path / workdir_layout.LOCK).exists()


def test_outputs_are_whole_or_absent(tmp_path):
  target = tmp_path / "out.bin"
  with pytest.raises(RuntimeError):
    with outputs.atomic_file(str(target), overwrite=False) as f:
      f.write(b"half")
      raise RuntimeError("interrupted")
  assert list(tmp_path.iterdir()) == []
  outputs.write(str(target), b"whole", overwrite=False)
  with pytest.raises(outputs.OutputExistsError, match="out.bin.*--overwrite"):
    outputs.write(str(target), b"again", overwrite=False)
  outputs.write(str(target), b"again", overwrite=True)
  assert target.read_bytes() == b"again"
  assert oct(target.stat().st_mode & 0o777) != "0o600"  # not mkstemp's mode
  with pytest.raises(outputs.errors.UserError, match="does not exist"):
    outputs.check_output(str(tmp_path / "no" / "x.npz"), overwrite=True)
  with pytest.raises(outputs.errors.UserError, match="is a folder"):
    outputs.check_output(str(tmp_path), overwrite=True)
