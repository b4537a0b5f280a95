"""The linter's rules and the formatter's layout (pyproject.toml
[tool.ruff], [tool.pyink]) hold for the package, the tests and the
launchers."""

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
      [
          sys.executable,
          "-m",
          "ruff",
          "check",
          "--no-cache",
          "qgjt_jax",
          "tests",
          "launch",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  # The rules bite: a file with an unused import and an undefined name.
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f():\n  return undefined_name\n")
  caught = subprocess.run(
      [
          sys.executable,
          "-m",
          "ruff",
          "check",
          "--no-cache",
          f"--config={ROOT / 'pyproject.toml'}",
          str(bad),
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert (
      caught.returncode == 1
      and "F401" in caught.stdout
      and ("F821" in caught.stdout)
  ), caught.stdout


def test_the_formatter_leaves_the_code_as_it_is(tmp_path):
  try:
    import pyink  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    if os.environ.get("CI") == "true":
      raise
    pytest.skip("pyink is not installed: pip install -e '.[test]'")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "pyink",
          "--check",
          "--quiet",
          "qgjt_jax",
          "tests",
          "launch",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, (
      "run `pyink qgjt_jax tests launch`:\n" + result.stdout + result.stderr
  )
  # The check bites: four-space indents are not the layout.
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n    return 1\n")
  caught = subprocess.run(
      [
          sys.executable,
          "-m",
          "pyink",
          "--check",
          f"--config={ROOT / 'pyproject.toml'}",
          str(bad),
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert caught.returncode == 1, caught.stdout + caught.stderr
