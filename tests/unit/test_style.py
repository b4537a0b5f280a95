"""The linter's rules (pyproject.toml [tool.ruff]) hold for the package,
the tests and the launchers."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_linter_passes(tmp_path):
  try:
    import ruff  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    if os.environ.get("CI") == "true":
      raise
    pytest.skip("ruff is not installed: pip install -e '.[test]'")
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache",
       "qgjt_jax", "tests", "launch"], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  # The rules bite: a file with an unused import and an undefined name.
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f():\n  return undefined_name\n")
  caught = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache",
       f"--config={ROOT / 'pyproject.toml'}", str(bad)],
      capture_output=True, text=True, timeout=300)
  assert caught.returncode == 1 and "F401" in caught.stdout and (
      "F821" in caught.stdout), caught.stdout
