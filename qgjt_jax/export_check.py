r"""`python -m qgjt_jax.export_check`: a recipe's programs lowered for
accelerators from any machine.

  python -m qgjt_jax.export_check --config=configs/ms1m.py \
      --platforms=tpu,cuda [--config.model_parallelism=2]

Builds the train step exactly as training does (`stack.build_stack`: the
recipe's model, batch, classifier and queue, on a (data, model) mesh of this
machine's devices) and the evaluation forward pass, and exports both with
`jax.export` for the platforms named, without running or compiling them.
An operation that has no lowering for TPU or GPU, or a sharding that does
not partition, fails here in minutes on a laptop instead of on a pod.
Prints one JSON line per program (platforms, mesh, StableHLO size, time).
For a mesh with several devices on a CPU host, start it with
XLA_FLAGS=--xla_force_host_platform_device_count=8.

The code is qgjt_jax/tools/export_check.py.
"""

import json

from absl import app
from absl import flags

from qgjt_jax import errors
from qgjt_jax import recipe_flags
from qgjt_jax.tools import step_bench

_CONFIG = recipe_flags.define_config(
    str(step_bench.DEFAULT_CONFIG),
    "The recipe whose programs are lowered (default: configs/ms1m.py).",
)
_PLATFORMS = flags.DEFINE_list(
    "platforms", ["tpu", "cuda"], "Comma-separated: tpu, cuda, rocm, cpu."
)
_CLASSES = flags.DEFINE_integer(
    "classes",
    step_bench.MS1MV2_CLASSES,
    "Identities of the classifier (default: MS1MV2's).",
    lower_bound=1,
)
errors.define_traceback_flag()


def main(argv: list[str]) -> None:
  from qgjt_jax import config_checks  # pylint: disable=g-import-not-at-top
  from qgjt_jax import parallel  # pylint: disable=g-import-not-at-top
  from qgjt_jax.tools import export_check  # pylint: disable=g-import-not-at-top

  verbose = errors.start_absl_command(argv)
  with errors.expected_failures(verbose=verbose):
    config = _CONFIG.value
    config_checks.check_values(config)
    try:
      mesh = parallel.make_mesh(config.model_parallelism)
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
    config_checks.check_mesh(config, mesh)
    records = export_check.export_programs(
        config, _CLASSES.value, _PLATFORMS.value
    )
  for record in records:
    print(json.dumps(record), flush=True)


def cli() -> None:
  """The `qgjt-export-check` console script."""
  app.run(
      main,
      flags_parser=lambda argv: recipe_flags.parse(
          flags.FLAGS, argv, default_recipe=str(step_bench.DEFAULT_CONFIG)
      ),
  )


if __name__ == "__main__":
  cli()
