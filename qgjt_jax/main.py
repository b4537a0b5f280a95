r"""Entry point: train or evaluate a recipe.

  python -m qgjt_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --config.data.rec_dir=/data/faces_emore
  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --mode=eval [--step=N]

Any config key can be overridden with --config.KEY=VALUE; an unknown key, an
impossible value or an incompatible workdir stops the program at start with
one line naming the key (exit status 1). A run stopped by SIGTERM or SIGINT
checkpoints and exits 0; the same command resumes it.
"""
import re
import sys

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
  import jax
  from qgjt_jax import checkpoint
  from qgjt_jax import config_checks
  from qgjt_jax import evaluate
  from qgjt_jax import reporting
  from qgjt_jax import train
  reporting.open_process_log(_WORKDIR.value)
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      config_checks.check_eval_config(_CONFIG.value)
      config_checks.check_mesh(_CONFIG.value, parallel.make_mesh(1),
                               train=False)
      checkpoint.check_compatible(_WORKDIR.value, _CONFIG.value.to_dict(),
                                  keys=checkpoint.MODEL_KEYS)
      reporting.note(f"Evaluating a checkpoint of {_WORKDIR.value} on "
                     f"{jax.device_count()} device(s).")
      evaluate.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value,
                                   step=_STEP.value)
  except (config_checks.ConfigError, checkpoint.IncompatibleRunError,
          checkpoint.CheckpointError, train.NonFiniteError) as e:
    # Expected failures with a message that says what to do: no traceback,
    # and one copy of it however many processes hit it.
    reporting.note(f"ERROR: {e}", error=True)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a clear message for an unknown config key.

  ml_collections refuses `--config.nope=1` while parsing, but as a bare
  AttributeError/KeyError traceback; this names the flag instead.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    text = (str(e.args[0]) if e.args else str(e)).replace("\\'", "'")
    hint = re.search(r'Did you mean "[^"]+" instead of "([^"]+)"\?', text)
    names = re.findall(r"'([\w-]+)'", text)
    key = hint.group(1) if hint else (names[0] if names else "?")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    culprit = next((a for a in overrides
                    if key in a.split("=", 1)[0].split(".")), None)
    what = culprit or f"--config.{key}"
    sys.exit(f"FATAL Flags parsing error: {what}: unknown config key "
             f"{key!r}." + (f" {hint.group(0)}" if hint else "") +
             " Keys are listed in the --config file and configs/common.py.")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
