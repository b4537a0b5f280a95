"""The linter's rules and the formatter's layout (pyproject.toml
[tool.ruff], [tool.pyink]) hold for the package, the tests and the
launchers."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CODE = ("qgjt_jax", "tests", "launch")


def _tool(name: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
  """`python -m NAME ARGS...`; skipped where the tool is not installed
  (required under CI=true)."""
  try:
    importlib.import_module(name)
  except ImportError:
    if os.environ.get("CI") == "true":
      raise
    pytest.skip(f"{name} is not installed: pip install -e '.[test]'")
  return subprocess.run(
      [sys.executable, "-m", name, *args],
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_the_linter_passes(tmp_path):
  result = _tool("ruff", "check", "--no-cache", *CODE)
  assert result.returncode == 0, result.stdout + result.stderr
  # The rules bite: a file with an unused import and an undefined name.
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f():\n  return undefined_name\n")
  caught = _tool(
      "ruff",
      "check",
      "--no-cache",
      f"--config={ROOT / 'pyproject.toml'}",
      str(bad),
  )
  assert caught.returncode == 1 and "F401" in caught.stdout, caught.stdout
  assert "F821" in caught.stdout, caught.stdout


def test_the_formatter_leaves_the_code_as_it_is(tmp_path):
  result = _tool("pyink", "--check", "--quiet", *CODE)
  assert result.returncode == 0, (
      f"run `pyink {' '.join(CODE)}`:\n" + result.stdout + result.stderr
  )
  # The check bites: four-space indents are not the layout.
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n    return 1\n")
  caught = _tool(
      "pyink", "--check", f"--config={ROOT / 'pyproject.toml'}", str(bad)
  )
  assert caught.returncode == 1, caught.stdout + caught.stderr
