"""Shared test fixtures: where the reference data lives.

The numbers our code must reproduce sit in `../shared/fixtures` beside the
project (CI lays it there too). An environment variable can point at another
copy; when it is set the data is required, so a missing folder fails instead of
skipping.
"""
import json
import os
import pathlib

import pytest

# The suite compiles far more than it computes (tiny models, a few steps each):
# XLA's CPU backend without its LLVM optimisations compiles the train step in
# about half the time. Set before jax is imported; subprocesses inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                             _FAST_COMPILE).strip()

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


def _fixture_dir(env_var: str, default: pathlib.Path) -> pathlib.Path:
  override = os.environ.get(env_var)
  if override:
    path = pathlib.Path(override)
    if not path.is_dir():
      pytest.fail(f"{env_var}={override} is not a directory")
    return path
  if not default.is_dir():
    pytest.skip(f"{default} is absent; set {env_var} to a copy of it")
  return default


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  """The authors' PyTorch outputs (QGJT_REFERENCE_FIXTURES overrides)."""
  return _fixture_dir("QGJT_REFERENCE_FIXTURES", SHARED_FIXTURES / "reference")


@pytest.fixture(scope="session")
def insightface_rec_dir() -> pathlib.Path:
  """The MXNet-written .rec/.idx/.bin set (QGJT_INSIGHTFACE_FIXTURES overrides)."""
  return _fixture_dir("QGJT_INSIGHTFACE_FIXTURES",
                      SHARED_FIXTURES / "insightface_rec")


def reference_cases(prefix: str) -> list[str]:
  """Names of the index.json cases starting with `prefix`, for parametrize.

  Read at collection time so every case in the folder gets a test; when the
  folder is absent this returns a single placeholder that skips in
  `load_case`.
  """
  root = pathlib.Path(os.environ.get("QGJT_REFERENCE_FIXTURES")
                      or SHARED_FIXTURES / "reference")
  index = root / "index.json"
  if not index.is_file():
    return ["<fixtures absent>"]
  names = sorted(n for n in json.loads(index.read_text()) if n.startswith(prefix))
  return names or ["<no such case>"]


def load_case(reference_dir: pathlib.Path, name: str):
  """Returns (settings, inputs, outputs) of one index.json case."""
  import numpy as np
  if name.startswith("<"):
    pytest.skip(f"reference fixtures unavailable: {name}")
  settings = json.loads((reference_dir / "index.json").read_text())[name]
  with np.load(reference_dir / f"{name}.npz") as data:
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in/")}
    outputs = {k[4:]: data[k] for k in data.files if k.startswith("out/")}
  return settings, inputs, outputs
