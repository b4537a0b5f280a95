"""The accelerator programs, built on a CPU: the real configs/ms1m.py step
and evaluation forward pass exported for TPU and GPU on a (data, model)
mesh; XLA's estimate of the QGFace extras' cost; a profile of a run."""

import json

import pytest

from tests.helpers import commands
from tests.helpers import tiny_runs

pytestmark = pytest.mark.slow


def _run(module, *args, devices=None):
  result = commands.run(module, *args, devices=devices, timeout=900, check=True)
  return [
      json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")
  ]


def test_the_ms1m_step_and_forward_lower_for_tpu_and_gpu():
  records = _run(
      "qgjt_jax.export_check",
      "--config=configs/ms1m.py",
      "--platforms=tpu,cuda",
      "--config.model_parallelism=2",
      devices=8,
  )
  assert [r["program"] for r in records] == ["train_step", "eval_forward"]
  for record in records:
    assert record["platforms"] == ["tpu", "cuda"]
    assert record["mesh"] == {"data": 4, "model": 2}
    assert (
        record["arch"],
        record["classes"],
        record["queue"],
        record["dtype"],
    ) == ("ir50", 85742, 8192, "bfloat16")
    assert record["stablehlo_bytes"] > 10_000


def test_the_qgface_extras_cost_little_by_xla_estimate():
  """The CPU-side check of the <= 5% target: the queue, the contrastive
  loss and the gates add little to the IR-50 step's FLOPs and bytes."""
  (record,) = _run(
      "qgjt_jax.bench", "--extras_cost", "--config.global_batch_size=256"
  )
  assert record["qgface_flops"] > record["plain_flops"] > 1e12
  assert 1.0 < record["extras_flops_ratio"] < 1.05
  assert 1.0 < record["extras_bytes_accessed_ratio"] < 1.05


def test_a_run_writes_the_profile_it_was_asked_for(tmp_path):
  workdir = tmp_path / "run"
  _, output = tiny_runs.run_in_process(
      tiny_runs.tiny_config(profile_steps=(2, 4), num_epochs=1.0), workdir
  )
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert f"Wrote a profile of steps 2..3 to {workdir / 'profile'}" in output
