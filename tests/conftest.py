"""Shared test fixtures: where the reference data lives.

The numbers our code must reproduce sit in `../shared/fixtures` beside the
project (CI lays it there too). An environment variable can point at another
copy; when it is set the data is required, so a missing folder fails instead of
skipping. Under CI (CI=true) a missing folder fails too: a green CI run has
always checked the authors' numbers.
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
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE
  ).strip()

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
    message = f"{default} is absent; set {env_var} to a copy of it"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(f"{message} (CI=true: fixtures are required)")
    pytest.skip(message)
  return default


@pytest.fixture(scope="session", autouse=True)
def _session_folders(tmp_path_factory):
  """One compilation cache for every run of the session (unless
  JAX_COMPILATION_CACHE_DIR names one to keep), and a folder that hides
  TensorFlow from the command-line runs (they then log without it, as on
  machines that lack it, and start faster)."""
  saved = {
      k: os.environ.get(k)
      for k in ("JAX_COMPILATION_CACHE_DIR", "QGJT_TEST_NO_TENSORFLOW")
  }
  if not saved["JAX_COMPILATION_CACHE_DIR"]:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(
        tmp_path_factory.mktemp("jax_cache")
    )
  shim = tmp_path_factory.mktemp("no_tensorflow")
  (shim / "tensorflow").mkdir()
  (shim / "tensorflow" / "__init__.py").write_text(
      "raise ImportError('TensorFlow is hidden in this test')\n"
  )
  os.environ["QGJT_TEST_NO_TENSORFLOW"] = str(shim)
  yield
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """The uninterrupted tiny run (tests/helpers/tiny_runs.py): (workdir, step
  records). Do not write into the workdir; copy it."""
  from tests.helpers import tiny_runs

  return tiny_runs.make_reference_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory):
  """The tiny run stopped by SIGTERM at tiny_runs.STOP_STEP: (workdir,
  output). Do not write into the workdir; copy it."""
  from tests.helpers import tiny_runs

  return tiny_runs.make_stopped_run(tmp_path_factory.mktemp("stopped"))


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  """The authors' PyTorch outputs (QGJT_REFERENCE_FIXTURES overrides)."""
  return _fixture_dir("QGJT_REFERENCE_FIXTURES", SHARED_FIXTURES / "reference")


@pytest.fixture(scope="session")
def insightface_rec_dir() -> pathlib.Path:
  """The MXNet-written .rec/.idx/.bin set (QGJT_INSIGHTFACE_FIXTURES overrides)."""
  return _fixture_dir(
      "QGJT_INSIGHTFACE_FIXTURES", SHARED_FIXTURES / "insightface_rec"
  )


@pytest.fixture(scope="session")
def faces_dir() -> pathlib.Path:
  """Real photos, 12 people x 10 (QGJT_FACES_FIXTURES overrides)."""
  return _fixture_dir("QGJT_FACES_FIXTURES", SHARED_FIXTURES / "faces" / "orl")


@pytest.fixture(scope="session")
def pretrained_dir() -> pathlib.Path:
  """insightface's buffalo_s recogniser, w600k_mbf.onnx (non-commercial
  research licence: used here, never copied; QGJT_PRETRAINED_FIXTURES
  overrides)."""
  return _fixture_dir(
      "QGJT_PRETRAINED_FIXTURES", SHARED_FIXTURES / "pretrained"
  )


@pytest.fixture(scope="session")
def more_faces_dir() -> pathlib.Path:
  """Real photos of 18 more people, s13-s30 (QGJT_MORE_FACES_FIXTURES
  overrides)."""
  return _fixture_dir(
      "QGJT_MORE_FACES_FIXTURES", SHARED_FIXTURES / "faces" / "orl_more"
  )


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
  """A workdir of the embedded default (configs/synthetic.py: 40 px,
  IR-18 width 16) trained for one epoch on the command line, evaluated.
  Do not write into the workdir; copy it."""
  from tests.helpers import tiny_runs

  return tiny_runs.make_demo_run(tmp_path_factory.mktemp("demo"))


def reference_cases(prefix: str) -> list[str]:
  """Names of the index.json cases starting with `prefix`, for parametrize.

  Read at collection time so every case in the folder gets a test; when the
  folder is absent this returns a single placeholder that skips in
  `load_case`.
  """
  root = pathlib.Path(
      os.environ.get("QGJT_REFERENCE_FIXTURES") or SHARED_FIXTURES / "reference"
  )
  index = root / "index.json"
  if not index.is_file():
    return ["<fixtures absent>"]
  names = sorted(
      n for n in json.loads(index.read_text()) if n.startswith(prefix)
  )
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


def pytest_collection_modifyitems(config, items):
  """The files holding slow tests first, in their own order: the README's
  command hands whole files to two workers in collection order, and a
  minutes-long file handed out last keeps one worker busy while the other
  idles (the longest first is the classic remedy)."""
  del config  # unused
  slow_files = {
      item.path for item in items if item.get_closest_marker("slow") is not None
  }
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (item.path not in slow_files, order[id(item)]))
