"""No deprecated calls: warnings reported against our modules are errors.

setup.cfg turns DeprecationWarning and FutureWarning attributed to a
`qgjt_jax` module into errors for the whole suite, so every in-process run
(training, evaluation, the data pipeline, the converters) is checked.
"""

import shutil
import warnings

import pytest

from qgjt_jax.eval import runner
from tests.helpers import tiny_runs


def test_a_deprecation_reported_against_our_code_fails():
  namespace = {"__name__": "qgjt_jax.some_module", "warnings": warnings}
  code = (
      "warnings.warn('old call', DeprecationWarning)\n"
      "warnings.warn('changing', FutureWarning)\n"
  )
  with pytest.raises(DeprecationWarning):
    exec(compile(code, "qgjt_jax/some_module.py", "exec"), namespace)


def test_a_training_and_an_eval_run_make_no_deprecated_call(
    reference_run, tmp_path
):
  """The reference run trained and evaluated in this process under the
  filter; `--mode=eval` does the same here."""
  workdir, steps = reference_run
  assert len(steps) == tiny_runs.STEPS
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  with tiny_runs.compile_cache():
    results = runner.evaluate_checkpoint(str(copy))
  assert "synthetic_lq_lq" in results
