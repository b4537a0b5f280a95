r"""Entry point: train a recipe, or use the model of a workdir.

  python -m qgjt_jax.main --config=configs/synthetic.py --workdir=runs/demo
  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --config.data.rec_dir=/data/faces_emore

  python -m qgjt_jax.main --workdir=runs/ms1m --mode=eval [--step=N]
  python -m qgjt_jax.main --workdir=runs/ms1m --mode=embed \
      --images=/data/my_faces --out=my_faces.npz
  python -m qgjt_jax.main --workdir=runs/ms1m --mode=compare \
      --images=a.jpg,b.jpg [--align=detect] [--far=1e-4]
  python -m qgjt_jax.main --workdir=runs/ms1m --mode=identify \
      --gallery=/data/people --images=/data/probes --out=who.csv \
      [--align=detect | --landmarks=points.csv] [--fpir=0.01]

  python -m qgjt_jax.main --config=configs/ms1m.py --mode=keys

Training needs --config. The other modes take the model and its settings
from the workdir's record (config.json of a training run, converted_from.json
of a converted model), so --config is optional there; --config.KEY=VALUE
overrides apply to the recorded config, and one that contradicts the
recorded model is refused. Any config key can be overridden; an unknown key,
an impossible value, an incompatible workdir or an unreadable file stops the
program with one line naming the key or file (exit status 1; the traceback
with --traceback or QGJT_TRACEBACK=1; absl logging with --verbosity=0).
A run stopped by SIGTERM or SIGINT checkpoints and exits 0; the same command
resumes it.
"""

import os
import sys

from absl import app
from absl import flags
import ml_collections

from qgjt_jax import errors
from qgjt_jax import parallel
from qgjt_jax import recipe_flags
from qgjt_jax.files import limits

# --config, defined when the command line is parsed (`_parse_flags`): its
# default depends on --mode and --workdir.
_CONFIG: flags.FlagHolder | None = None
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and evaluation results go."
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "embed", "compare", "identify", "keys"],
    "train (and evaluate at the end); eval: evaluate a checkpoint of the "
    "workdir; embed: embeddings of --images (a folder) into --out; compare: "
    "the cosine of two --images and the decision; identify: who each face "
    "of --images is among the people of --gallery, into --out (.csv); "
    "keys: every config key of --config (with its overrides), its value, "
    "allowed values and meaning (no --workdir needed).",
)
_STEP = flags.DEFINE_integer(
    "step",
    None,
    "eval/embed/compare: the checkpoint step "
    "(default: the latest readable one).",
    lower_bound=0,
)
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "embed, identify: a folder of face images; compare: two, A.jpg,B.jpg.",
)
_OUT = flags.DEFINE_string(
    "out", None, "embed: the .npz to write; identify: the .csv."
)
_GALLERY = flags.DEFINE_string(
    "gallery",
    None,
    "identify: a folder with one sub-folder of photos per person.",
)
_ALIGN = flags.DEFINE_enum(
    "align",
    "none",
    ["none", "detect"],
    "embed, compare, identify: none "
    "(the images are aligned crops) or detect (find the face and its five "
    "points in raw photos and align them; the `.[align]` extra).",
)
_LANDMARKS = flags.DEFINE_string(
    "landmarks",
    None,
    "embed, compare, identify: a CSV of image path and "
    "the x,y of five points per face (eyes, nose tip, mouth corners), to "
    "align raw photos with points from any detector.",
)
_ALL_FACES = flags.DEFINE_bool(
    "all_faces",
    False,
    "With --align or "
    "--landmarks: every face of a photo, not "
    "only the largest.",
)
_FAR = flags.DEFINE_float(
    "far",
    1e-4,
    "compare: the 1:1 false accept rate whose threshold, "
    "measured on photos by the evaluation of the model's step, decides; "
    "identify: a 1:1 threshold instead of --fpir's.",
)
_FPIR = flags.DEFINE_float(
    "fpir",
    0.01,
    "identify: the false-positive identification rate (the "
    "share of unknown faces given a name) whose threshold the calibration's "
    "open-set searches measured.",
)
_THRESHOLD = flags.DEFINE_float(
    "threshold",
    None,
    "compare, identify: the cosine threshold, instead of --far/--fpir.",
)
_THRESHOLD_SET = flags.DEFINE_string(
    "threshold_set",
    None,
    "compare, identify: the evaluated set to take "
    "the threshold from (default: calibration folders, then your folders "
    "and pairs files, then .bin sets; generated faces and IJB templates "
    "only when named here).",
)
_TEMPLATE = flags.DEFINE_enum(
    "template",
    "mean",
    ["mean", "quality"],
    "identify: a person's template is the mean of "
    "its unit embeddings, or weighted by quality.",
)
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad",
    False,
    "embed, identify: leave "
    "unreadable "
    "images out (listed in the .npz) instead of "
    "stopping at the first.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "embed, identify: replace an existing --out."
)
_FORCE_LOCK = flags.DEFINE_bool(
    "force_lock",
    False,
    "train: take the workdir's lock even when its note "
    "says another run holds it (a run on another host that is gone).",
)
errors.define_traceback_flag()


def _loaded_config():
  """The --config recipe; a file that does not load is one clear line."""
  recipe = recipe_flags.flag_value(sys.argv, "config") or "the record"
  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.UserError(
        f"--config={recipe}: get_config() returned {type(config).__name__}, "
        "not an ml_collections.ConfigDict: fix the recipe file (see "
        "configs/synthetic.py)"
    )
  limits.configure(config.get("limits", {}), "config.limits")
  return config


def main(argv):
  verbose = errors.start_absl_command(argv)
  parallel.maybe_initialize_distributed()
  # Imported here so that --help stays fast.
  from qgjt_jax import reporting
  from qgjt_jax import train

  if _WORKDIR.value:
    reporting.open_process_log(_WORKDIR.value)
  show = lambda line: reporting.note(line, error=True)
  with errors.expected_failures(verbose=verbose, show=show):
    if _MODE.value == "keys":
      _print_keys()
      return
    if not _WORKDIR.value:
      raise errors.UserError(
          f"--mode={_MODE.value} needs --workdir (where "
          "the run's checkpoints and results are)"
      )
    if _MODE.value == "train" and _CONFIG.value is None:
      raise errors.UserError(
          "--mode=train needs --config, the recipe to "
          "train (e.g. --config=configs/synthetic.py)"
      )
    config = _loaded_config()
    if _MODE.value == "train":
      train.train_and_evaluate(
          config,
          _WORKDIR.value,
          force_lock=_FORCE_LOCK.value,
          explicit=_explicit_keys(sys.argv),
      )
    else:
      _use_a_checkpoint(config)


def _print_keys() -> None:
  """--mode=keys: the recipe's every key, as `config_checks.keys_table`."""
  from qgjt_jax import base_config
  from qgjt_jax import config_checks

  if _CONFIG.value is None:
    raise errors.UserError(
        "--mode=keys needs --config, the recipe whose "
        "keys to print (e.g. --config=configs/ms1m.py), "
        "or --workdir, a run whose recorded config to "
        "print"
    )
  print(
      "\n".join(
          config_checks.keys_table(_loaded_config(), base_config.meanings())
      )
  )


def _explicit_keys(argv: list[str]) -> list[str]:
  """The config keys typed as --config.KEY=VALUE."""
  return [
      a[len("--config.") :].split("=", 1)[0]
      for a in argv
      if a.startswith("--config.")
  ]


def _use_a_checkpoint(config) -> None:
  """--mode=eval, embed, compare or identify: the model of a workdir's
  checkpoint, loaded once."""
  from qgjt_jax import config_checks
  from qgjt_jax.eval import runner
  from qgjt_jax.inference import model as model_lib

  config_checks.check_eval_config(config)
  explicit = _explicit_keys(sys.argv)
  if _MODE.value == "eval":
    runner.evaluate_checkpoint(
        _WORKDIR.value, _STEP.value, config=config, explicit=explicit
    )
    return
  if not _IMAGES.value:
    raise errors.UserError(
        f"--mode={_MODE.value} needs --images (a folder "
        "for embed and identify, A.jpg,B.jpg for compare)"
    )
  if _MODE.value != "compare" and not _OUT.value:
    raise errors.UserError(
        f"--mode={_MODE.value} needs --out, the file to write (e.g. --out="
        + ("faces.npz)" if _MODE.value == "embed" else "who.csv)")
    )
  if _MODE.value == "identify" and not _GALLERY.value:
    raise errors.UserError(
        "--mode=identify needs --gallery, a folder with "
        "one sub-folder of photos per person"
    )
  model = model_lib.load_model(
      _WORKDIR.value, _STEP.value, config=config, explicit=explicit
  )
  _embed_mode(model)


def _embed_mode(model) -> None:
  """--mode=embed, compare or identify."""
  from qgjt_jax.inference import embed
  from qgjt_jax.inference import identify
  from qgjt_jax.align import faces

  mode = _MODE.value
  alignment = faces.Alignment.from_flags(
      _ALIGN.value, _LANDMARKS.value, _ALL_FACES.value
  )
  decision = dict(
      threshold=_THRESHOLD.value, threshold_set=_THRESHOLD_SET.value
  )
  if mode == "compare":
    embed.run_compare(
        model,
        _IMAGES.value.split(","),
        alignment=alignment,
        far=_FAR.value,
        **decision,
    )
    return
  common = dict(
      alignment=alignment, skip_bad=_SKIP_BAD.value, overwrite=_OVERWRITE.value
  )
  if mode == "embed":
    embed.run_embed(model, _IMAGES.value, _OUT.value, **common)
    return
  identify.run_identify(
      model,
      _GALLERY.value,
      _IMAGES.value,
      _OUT.value,
      template=_TEMPLATE.value,
      fpir=_FPIR.value,
      far=_FAR.value if flags.FLAGS["far"].present else None,
      **decision,
      **common,
  )


_RECORDED_RECIPE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "inference",
    "recorded_recipe.py",
)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing of argv as typed, every mistake one ERROR line
  (`recipe_flags.parse`).

  --config is defined here, because a mode that uses a workdir's model
  defaults it to that workdir's own record (inference/recorded_recipe.py):
  its --config.KEY overrides then apply to the config the model was made
  with."""
  global _CONFIG
  mode = recipe_flags.flag_value(argv, "mode")
  workdir = recipe_flags.flag_value(argv, "workdir")
  recorded = mode not in (None, "train") and workdir
  default = f"{_RECORDED_RECIPE}:{workdir}" if recorded else None
  _CONFIG = recipe_flags.define_config(
      default,
      "The recipe (a configs/*.py file): needed to train; other modes "
      "default to the workdir's record.",
  )
  return recipe_flags.parse(flags.FLAGS, argv, default_recipe=default)


def cli() -> None:
  """The `qgjt` console script: `python -m qgjt_jax.main`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
