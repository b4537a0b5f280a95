r"""Entry point: train or evaluate a recipe.

  python -m qgjt_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --config.data.rec_dir=/data/faces_emore
  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --mode=eval [--step=N]

Any config key can be overridden with --config.KEY=VALUE.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from qgjt_jax import parallel

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training recipe (a configs/*.py file).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and evaluation results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (and evaluate at the end) or evaluate a "
                          "checkpoint of the workdir.")
_STEP = flags.DEFINE_integer("step", None,
                             "--mode=eval: the checkpoint step (default: the "
                             "latest readable one).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  parallel.maybe_initialize_distributed()
  # Imported here so that --help stays fast.
  from qgjt_jax import evaluate
  from qgjt_jax import train
  if _MODE.value == "train":
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    evaluate.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value,
                                 step=_STEP.value)


if __name__ == "__main__":
  app.run(main)
