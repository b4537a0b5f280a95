"""The recipe `--config` stands for when a command that uses a workdir's
model is run without one: the workdir's own record (records.py), so that
`--config.KEY=VALUE` overrides apply to the config the model was made with.

  python -m qgjt_jax.main --workdir=runs/demo --mode=eval \
      --config.eval.bin_sets="('/data/lfw.bin',)"
"""

from qgjt_jax import records


def get_config(workdir: str):
  return records.recorded_config(
      workdir,
      advice="name a training run's workdir or one qgjt_jax.convert "
      "wrote, or pass --config=configs/NAME.py with the model's settings",
  )
