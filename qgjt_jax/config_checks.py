"""Start-up checks of a config: one message naming the key and the fix.

Run before anything expensive, so a typo or an impossible value fails in
seconds instead of after compiling (or hours into a run). Each check raises
ConfigError with the offending `config.KEY`, its value and what would work.
Unknown keys given on the command line are refused, with the nearest known
key, when the flags are parsed (recipe_flags.py).
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
from jax.sharding import Mesh

from qgjt_jax import config_keys
from qgjt_jax import errors
from qgjt_jax import optim
from qgjt_jax import parallel
from qgjt_jax.align import faces
from qgjt_jax.data import degrade
from qgjt_jax.data import sources
from qgjt_jax.eval import extract
from qgjt_jax.eval import ijb
from qgjt_jax.method import queues
from qgjt_jax.method import settings
from qgjt_jax.models import layers

# Allowed values, from the code that consumes each key where it names them.
_CHOICES = {
    "data.kind": sources.kinds,  # a registry: read when checked
    "data.view.recipe": degrade.RECIPES,
    "model.remat": ("none", "block"),
    "model.input_order": layers.INPUT_ORDERS,
    "model.batch_norm": ("batch", "frozen"),
    "init_classifier": ("random", "class_means"),
    "init_quality": ("config", "measured"),
    "eval.dtype": ("float32", "bfloat16", "float16"),
    "optim.schedule": optim.SCHEDULES,
    "model.dtype": ("float32", "bfloat16", "float16"),
    "eval.fusion": extract.FUSIONS,
    "eval.ijb_target": ijb.SUBSETS,
    "eval.align": faces.MODES,
    "eval.ijb_pooling": ("norm", "unit"),
    "eval.tar_rule": ijb.TAR_RULES,
}

# (key, lowest, highest, what the key is): closed intervals, None = unbounded.
_RANGES = (
    ("optim.momentum", 0.0, 0.999999, "SGD momentum"),
    ("model.dropout_rate", 0.0, 0.999999, "a probability"),
    ("optim.weight_decay", 0.0, None, "a decay factor"),
    ("optim.warmup_epochs", 0.0, None, "a number of epochs"),
    ("optim.grad_clip_norm", 0.0, None, "a norm; 0 disables clipping"),
    ("optim.backbone_lr_scale", 0.0, None, "a factor; 0 freezes the backbone"),
    ("data.worker_count", 0, None, "a process count; 0 reads in-process"),
    ("eval_every_steps", 0, None, "a step count; 0 evaluates at the end only"),
    ("num_train_steps", 0, None, "a step count; 0 trains num_epochs"),
    # Upper bounds where a value read from a workdir's record would
    # otherwise become an allocation (2**40 faces a batch: 8 TiB).
    ("eval.batch_size", 1, 65536, "faces per forward pass"),
    ("data.image_size", 1, 4096, "pixels a side"),
)

# Keys that must be > 0 (counts, sizes, rates). The method's sections
# (quality, head, contrastive, queue) check themselves: method/settings.py.
_POSITIVE = (
    "global_batch_size",
    "num_epochs",
    "optim.lr",
    "optim.gamma",
    "model.base_width",
    "model.embedding_size",
    "data.image_size",
    "eval.batch_size",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "max_consecutive_nonfinite",
    "model_parallelism",
)


class ConfigError(errors.UserError, ValueError):
  pass


def _check_finite(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """No number anywhere in the config is NaN or infinite."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, f"{prefix}{key}.")
      continue
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(
            f"config.{prefix}{key}={value!r} is not a finite number."
        )


def check_train_config(
    config: ml_collections.ConfigDict, num_classes: int | None = None
) -> None:
  """Every check that needs neither data nor devices (and the class count)."""
  check_values(config)
  batch = config.global_batch_size
  if batch % jax.process_count():
    raise ConfigError(
        f"config.global_batch_size={batch} is not divisible by the "
        f"{jax.process_count()} processes; use a multiple of "
        f"{jax.process_count()}."
    )
  keys_per_step = queues.get(config.queue.kind).keys_per_step(batch)
  if config.queue.capacity < keys_per_step:
    raise ConfigError(
        f"config.queue.capacity={config.queue.capacity} is smaller than the "
        f"{keys_per_step} keys the {config.queue.kind!r} queue enqueues per "
        f"step (global_batch_size={batch}); use at least {keys_per_step}, "
        f"e.g. --config.queue.capacity={keys_per_step}."
    )
  cc = config.contrastive
  if (
      cc.b_warmup_epochs > 0
      and cc.b_warmup == "epoch"
      and (config.head.b != cc.b)
  ):
    raise ConfigError(
        f"config.head.b={config.head.b} differs from config.contrastive.b="
        f"{cc.b}, but config.contrastive.b_warmup='epoch' (the authors' "
        "warm-up) gives both gates the one threshold contrastive.b; set "
        f"--config.head.b={cc.b}, or --config.contrastive.b_warmup=step to "
        "ramp each gate's own b."
    )
  if cc.end_epoch and cc.end_epoch <= cc.start_epoch:
    raise ConfigError(
        f"config.contrastive.end_epoch={cc.end_epoch} is not after "
        f"config.contrastive.start_epoch={cc.start_epoch}: the contrastive "
        "loss would never be on; use 0 for no end."
    )
  if config.optim.clip_each_loss and not config.optim.grad_clip_norm > 0:
    raise ConfigError(
        "config.optim.clip_each_loss=True clips each loss's gradient to "
        f"config.optim.grad_clip_norm={config.optim.grad_clip_norm}; set a "
        "positive norm, e.g. --config.optim.grad_clip_norm=5.0."
    )
  milestones = config.optim.milestones
  if (
      not isinstance(milestones, (tuple, list))
      or not all(config_keys.is_number(m) and m > 0 for m in milestones)
      or (list(milestones) != sorted(milestones))
  ):
    raise ConfigError(
        f"config.optim.milestones={milestones!r} must be positive epochs in "
        "increasing order, e.g. --config.optim.milestones='(12, 20, 24)'."
    )
  profile = config.get("profile_steps", ())
  if profile and not (
      isinstance(profile, (tuple, list))
      and len(profile) == 2
      and all(isinstance(s, int) and not isinstance(s, bool) for s in profile)
      and 0 <= profile[0] < profile[1]
  ):
    raise ConfigError(
        f"config.profile_steps={profile!r} must be () or (START, STOP), two "
        "step numbers with 0 <= START < STOP, e.g. "
        "--config.profile_steps='(100, 110)'."
    )
  _check_data(config, files=False)
  if num_classes is not None:
    check_num_classes(num_classes)
  check_data_paths(config)


def check_values(config: ml_collections.ConfigDict) -> None:
  """Enumerations, ranges and positive sizes."""
  _check_finite(config)
  for key in _CHOICES:
    value, allowed = config_keys.lookup(config, key), _allowed_values(key)
    if value not in allowed:
      raise ConfigError(
          f"config.{key}={value!r} is not one of {allowed}; "
          f"e.g. --config.{key}={allowed[0]}."
      )
  from qgjt_jax.models import backbone_names, build_backbone

  try:
    build_backbone(config.model.name)
  except (ValueError, TypeError, AttributeError):
    raise ConfigError(
        f"config.model.name={config.model.name!r} is not a known backbone; "
        f"use one of {', '.join(backbone_names())}."
    ) from None
  for key in _POSITIVE:
    value = config_keys.lookup(config, key)
    if not config_keys.is_number(value) or value <= 0:
      raise ConfigError(
          f"config.{key}={value!r} must be a positive (finite) number."
      )
  for key, low, high, what in _RANGES:
    value = config_keys.lookup(config, key)
    if (
        not config_keys.is_number(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
      interval = f"in [{low}, {high}]" if high is not None else f">= {low}"
      raise ConfigError(f"config.{key}={value!r} must be {interval} ({what}).")
  for section in settings.SECTIONS:
    problems = section.problems(config)
    if problems:
      raise ConfigError(problems[0])
  from qgjt_jax.data import degrade

  try:
    degrade.view_config_from(config.data.view)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.data.view: {e}") from None


def _allowed_values(key: str) -> tuple:
  values = _CHOICES[key]
  return tuple(values() if callable(values) else values)


def allowed(key: str) -> str | None:
  """What config.`key` may hold, in words, as `check_values` checks it
  (None: any value of its type)."""
  if key in _CHOICES:
    return "one of " + ", ".join(map(str, _allowed_values(key)))
  if key == "model.name":
    from qgjt_jax.models import backbone_names

    return "one of " + ", ".join(backbone_names())
  for name, low, high, _ in _RANGES:
    if name == key:
      return f"in [{low}, {'inf' if high is None else high}]"
  if key in _POSITIVE:
    return "> 0"
  section, _, name = key.partition(".")
  for settings_class in settings.SECTIONS:
    if settings_class.NAME == section:
      return settings_class.allowed(name)
  return None


def keys_table(
    config: ml_collections.ConfigDict, meanings: dict[str, str]
) -> list[str]:
  """Every key of `config` with its value, allowed values and meaning, as
  `--mode=keys` prints them."""
  lines = []

  def walk(tree, prefix):
    for name, value in tree.items():
      key = prefix + name
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, key + ".")
        continue
      rule = allowed(key)
      lines.append(f"{key} = {value!r}" + (f"  [{rule}]" if rule else ""))
      lines.append(f"    {meanings.get(key, '(a key of this recipe only)')}")

  walk(config, "")
  return lines


def check_num_classes(num_classes: int) -> None:
  if num_classes < 2:
    raise ConfigError(
        f"The training set has {num_classes} identities; at "
        "least 2 are needed (check config.data)."
    )


def _check_data(config: ml_collections.ConfigDict, files: bool) -> None:
  """The keys `config.data.kind` reads (and with `files`, its files)."""
  try:
    kind = sources.data_kind(config.data.kind)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  problem = kind.problem(config.data, files)
  if problem:
    raise ConfigError(problem)


def check_data_paths(config: ml_collections.ConfigDict) -> None:
  """The training data and every evaluation set the config names exist."""
  _check_data(config, files=True)
  check_eval_paths(config)


def check_eval_paths(config: ml_collections.ConfigDict) -> None:
  """Every evaluation set exists; the .bin sets are read (not decoded), so
  a damaged one stops a run now rather than after its training."""
  from qgjt_jax.eval import bin_sets  # pylint: disable=g-import-not-at-top

  for path in config.eval.bin_sets:
    if "://" not in path and not os.path.isfile(path):
      raise ConfigError(
          f"config.eval.bin_sets lists {path!r}, which does not "
          "exist; fix the path or drop it from the list."
      )
    if "://" not in path:
      bin_sets.load_bin(path)
  for key in ("tinyface_root", "scface_root", "ijb_root"):
    path = config.eval[key]
    if path and "://" not in path and not os.path.isdir(path):
      raise ConfigError(
          f"config.eval.{key}={path!r} does not exist; fix the "
          "path or leave the key unset."
      )
  for dataset in ("tinyface", "scface"):
    root = config.eval[f"{dataset}_root"]
    aligned = config.eval[f"{dataset}_aligned_dir"]
    if (
        root
        and aligned
        and "://" not in root
        and not os.path.isdir(os.path.join(root, aligned))
    ):
      raise ConfigError(
          f"config.eval.{dataset}_aligned_dir={aligned!r}: there is no "
          f"{os.path.join(root, aligned)}. The authors score the aligned "
          "copies there; point the key at them, or set "
          f"--config.eval.{dataset}_aligned_dir='' to score the raw images "
          "(not comparable with the paper)."
      )
  # Own folders and pairs files are read now, so a problem stops the run
  # before its training, not after.
  from qgjt_jax.eval import own_data  # pylint: disable=g-import-not-at-top

  for key in ("folders", "calibration_folders"):
    for folder in config.eval[key]:
      if "://" not in folder:
        own_data.check_folder(folder, f"config.eval.{key}")
  for path in config.eval.pairs_files:
    if "://" not in path:
      own_data.check_pairs_file(path)
  if config.eval.align == "detect" and (
      config.eval.folders
      or config.eval.pairs_files
      or config.eval.calibration_folders
  ):
    from qgjt_jax.align import detector  # pylint: disable=g-import-not-at-top

    try:
      detector.Detector()
    except errors.UserError as e:
      raise ConfigError(f"config.eval.align='detect': {e}") from None
  for size in config.eval.low_res:
    if not config_keys.is_number(size) or size <= 0:
      raise ConfigError(
          f"config.eval.low_res lists {size!r}; use positive "
          "pixel sizes such as (14, 28)."
      )


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  """What --mode=eval needs: valid values and existing evaluation sets."""
  check_values(config)
  check_eval_paths(config)


def check_mesh(
    config: ml_collections.ConfigDict, mesh: Mesh, *, train: bool = True
) -> None:
  """Batch sizes split evenly over the data-parallel devices."""
  data_devices = parallel.data_parallel_size(mesh)
  if train and config.global_batch_size % data_devices:
    raise ConfigError(
        f"config.global_batch_size={config.global_batch_size} is not "
        f"divisible by the {data_devices} data-parallel devices; use a "
        f"multiple of {data_devices}."
    )
  if config.eval.batch_size % data_devices:
    raise ConfigError(
        f"config.eval.batch_size={config.eval.batch_size} is not divisible by "
        f"the {data_devices} data-parallel devices; use a multiple of "
        f"{data_devices}."
    )
