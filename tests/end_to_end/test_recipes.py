"""Recipes load from any working directory and from an installed (not
editable) package; logging is absl's, tracebacks sit behind --traceback."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import commands
from tests.helpers import tiny_runs

pytestmark = pytest.mark.slow


def _run(args, *, cwd, env=None):
  return commands.main(*args, cwd=cwd, env=env, timeout=900)


def test_a_recipe_that_builds_on_another_loads_from_elsewhere(tmp_path):
  """configs/ms1m_ir100.py imports configs.ms1m: from a folder outside the
  checkout, named by its absolute path. Without --verbosity the failure is
  the only line (no orbax notes about read-only restores); --verbosity=0
  shows absl's INFO lines; --traceback the traceback."""
  args = [
      f"--config={tiny_runs.ROOT / 'configs' / 'ms1m_ir100.py'}",
      f"--workdir={tmp_path / 'run'}",
      "--mode=eval",
  ]
  quiet = _run(args, cwd=tmp_path)
  assert quiet.returncode == 1, quiet.stderr
  assert quiet.stderr.strip().splitlines() == [
      f"ERROR: No checkpoint in {tmp_path / 'run' / 'checkpoints'}."
  ], quiet.stderr
  verbose = _run(args + ["--verbosity=0"], cwd=tmp_path)
  assert any(line.startswith("I") for line in verbose.stderr.splitlines())
  assert "Traceback" not in verbose.stderr
  traced = _run(args + ["--traceback"], cwd=tmp_path)
  assert "Traceback (most recent call last)" in traced.stderr
  assert traced.stderr.strip().splitlines()[-1].startswith("ERROR: ")


@pytest.mark.parametrize(
    "folder",
    sorted(
        {
            p.parent.relative_to(tiny_runs.ROOT).as_posix()
            for p in (tiny_runs.ROOT / "qgjt_jax").rglob("*.py")
            if "__pycache__" not in p.parts
        }
    ),
)
def test_every_package_folder_is_in_the_wheel(folder):
  """setuptools' find: ships only folders with an __init__.py; one without
  works from the checkout and is missing from `pip install .`."""
  assert (tiny_runs.ROOT / folder / "__init__.py").is_file(), folder


def test_a_non_editable_install_trains_a_recipe(tmp_path):
  """`pip install .` (a built wheel, not a link to the checkout), then the
  recipe named by path from another folder trains and evaluates."""
  site, source = tmp_path / "site", tmp_path / "source"
  shutil.copytree(
      tiny_runs.ROOT,
      source,
      ignore=shutil.ignore_patterns(
          ".*", "build", "runs", "*.egg-info", "__pycache__"
      ),
  )  # builds there
  build = subprocess.run(
      [
          sys.executable,
          "-m",
          "pip",
          "install",
          "--quiet",
          "--no-deps",
          f"--target={site}",
          str(source),
      ],
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert build.returncode == 0, build.stdout + build.stderr
  assert (site / "qgjt_jax" / "base_config.py").is_file()
  env = tiny_runs.subprocess_env()
  shim = os.environ["QGJT_TEST_NO_TENSORFLOW"]
  env["PYTHONPATH"] = os.pathsep.join([shim, str(site)])  # not the checkout
  recipe = tmp_path / "recipes"
  shutil.copytree(tiny_runs.ROOT / "configs", recipe / "configs")
  args = [
      f"--config={recipe / 'configs' / 'synthetic.py'}",
      f"--workdir={tmp_path / 'run'}",
  ] + tiny_runs.cli_command("x", **{"num_epochs": 0.25})[5:]
  result = _run(args, cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / "run" / "eval").is_dir()
  where = subprocess.run(
      [sys.executable, "-c", "import qgjt_jax; print(qgjt_jax.__file__)"],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env=env,
  )
  assert where.stdout.startswith(str(site)), where.stdout
  # The bench's default recipe is found inside the installed package.
  bench = subprocess.run(
      [
          sys.executable,
          "-c",
          "from qgjt_jax.tools import step_bench; "
          "print(step_bench.DEFAULT_CONFIG, step_bench.default_recipe()."
          "model.name)",
      ],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env=env,
  )
  assert bench.stdout.startswith(str(site)) and bench.stdout.split()[-1] == (
      "ir50"
  ), (bench.stdout + bench.stderr)
  # Every command is a console script too, each running its own code
  # (started together: each is an interpreter importing jax).
  # (absl lists a console script's flags with --helpfull.)
  asked = {
      "qgjt": "--workdir",
      "qgjt-convert": "--src",
      "qgjt-export": "--format",
      "qgjt-export-check": "--platforms",
      "qgjt-bench": "--warmup",
      "qgjt-prepare": "--data_dir",
      "qgjt-launch-local": "--processes",
  }
  running = {
      script: subprocess.Popen(
          [site / "bin" / script, "--helpfull"],
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          cwd=tmp_path,
          env=env,
      )
      for script in asked
  }
  for script, process in running.items():
    out, err = process.communicate(timeout=300)
    # (absl's --helpfull exits 1.)
    assert (
        process.returncode == 1
        and "Traceback" not in err
        and (asked[script] in out + err)
    ), (script, out[-2000:], err[-2000:])
