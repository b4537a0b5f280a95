r"""`python -m qgjt_jax.bench`: the throughput of a recipe's train step.

  python -m qgjt_jax.bench --config.global_batch_size=256
  python -m qgjt_jax.bench --config.global_batch_size=256 --no_qgface
  python -m qgjt_jax.bench --config.model.name=ir100 \
      --config.global_batch_size=256
  python -m qgjt_jax.bench --extras_cost --config.global_batch_size=256

Times the train step of a recipe (`--config`, default configs/ms1m.py, and
any `--config.KEY=VALUE` as for qgjt_jax.main: the backbone, batch, dtypes,
queue, mesh and classifier are the recipe's keys) exactly as training
builds and jits it (`stack.build_stack`: both views, 2 x batch images; a
classifier of --classes identities; the recipe's queue; the optimiser
update; state donated) on synthetic, device-resident data, after --warmup
steps, with no host synchronisation inside the timed loop, and prints one
JSON line: device kind, arch, batch, dtype, step_ms, samples/s, images/s,
the XLA cost analysis's FLOPs per step, the model FLOPs utilisation against
the device's peak bf16 rate (null for devices not in
`step_bench.PEAK_BF16_FLOPS`), compile time, XLA's memory analysis of the
compiled step (argument, output and temporary bytes, known on any host
before running) and the peak device memory. `--no_qgface` times the same
step without the QGFace extras (no queue, no contrastive loss, no quality
gate: queue kind "none", b = 0), so the extras' overhead is the ratio of two
runs of one process. The contrastive branch is live from the first step
(the joint phase is what is timed).

The code is qgjt_jax/tools/step_bench.py; it needs jax, flax, optax, numpy
and ml_collections, not TensorFlow, grain, clu or orbax.
"""

import json

from absl import app
from absl import flags

from qgjt_jax import errors
from qgjt_jax import recipe_flags
from qgjt_jax.tools import step_bench

_CONFIG = recipe_flags.define_config(
    str(step_bench.DEFAULT_CONFIG),
    "The recipe whose step is timed (default: configs/ms1m.py).",
)
_CLASSES = flags.DEFINE_integer(
    "classes",
    step_bench.MS1MV2_CLASSES,
    "Identities of the classifier (default: MS1MV2's).",
    lower_bound=1,
)
_STEPS = flags.DEFINE_integer(
    "steps", 20, "Timed steps per window.", lower_bound=1
)
_WARMUP = flags.DEFINE_integer(
    "warmup", 3, "Steps run before timing.", lower_bound=1
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Timed windows; step_ms is their median.", lower_bound=1
)
_NO_QGFACE = flags.DEFINE_bool(
    "no_qgface", False, "No queue, contrastive loss or quality gate."
)
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "Also write a jax.profiler trace of 3 steps here."
)
_DUMP_HLO = flags.DEFINE_string(
    "dump_hlo", None, "Write the compiled step's HLO text to this file."
)
_EXTRAS_COST = flags.DEFINE_bool(
    "extras_cost",
    False,
    "Instead of timing: XLA's FLOPs and bytes of the "
    "step with and without the QGFace extras (lowered only).",
)
errors.define_traceback_flag()


def main(argv: list[str]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from qgjt_jax import parallel  # pylint: disable=g-import-not-at-top

  verbose = errors.start_absl_command(argv)
  parallel.maybe_initialize_distributed()
  with errors.expected_failures(verbose=verbose):
    if _EXTRAS_COST.value:
      record = step_bench.extras_cost(_CONFIG.value, _CLASSES.value)
    else:
      record = step_bench.run(
          _CONFIG.value,
          classes=_CLASSES.value,
          steps=_STEPS.value,
          warmup=_WARMUP.value,
          repeats=_REPEATS.value,
          qgface=not _NO_QGFACE.value,
          trace_dir=_TRACE_DIR.value,
          dump_hlo=_DUMP_HLO.value,
      )
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)


def cli() -> None:
  """The `qgjt-bench` console script."""
  app.run(
      main,
      flags_parser=lambda argv: recipe_flags.parse(
          flags.FLAGS, argv, default_recipe=str(step_bench.DEFAULT_CONFIG)
      ),
  )


if __name__ == "__main__":
  cli()
