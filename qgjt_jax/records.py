"""What a workdir says about its model: config.json or converted_from.json.

A training run writes the whole config it ran with to WORKDIR/config.json
(`record_config`); `python -m qgjt_jax.convert` writes the settings that
rebuild a converted model to WORKDIR/converted_from.json. Everything that
uses a model afterwards (evaluation, embedding, decisions, export, the
notebooks, fine-tuning from it) reads the model from here rather than from a
recipe typed again: `recorded_config` is the workdir's own config, and
`adopt_model_settings` puts the recorded model into a config given by hand.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

from etils import epath
import ml_collections

from qgjt_jax import errors
from qgjt_jax import reporting
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.files import regular
from qgjt_jax.config_keys import MISSING, lookup

# What feeding a model right depends on, beside its variables
# (`model_keys`): the channel order its weights expect.
MODEL_INPUT_KEYS = ("model.input_order",)


def model_keys() -> tuple[str, ...]:
  """What rebuilding the backbone alone (evaluation, fine-tuning) depends
  on: the registry's `recorded_model_keys`."""
  from qgjt_jax import models  # pylint: disable=g-import-not-at-top

  return models.recorded_model_keys()


_MAX_RECORD_BYTES = 16 << 20


class RecordError(errors.UserError):
  """A workdir's record is missing, damaged or contradicted."""


def record_config(
    workdir: str, config_dict: dict[str, Any], version: str
) -> None:
  """Keeps the config and package version that wrote the workdir (written
  by process 0)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    return
  layout = workdir_layout.Workdir(workdir)
  layout.root.mkdir(parents=True, exist_ok=True)
  text = json.dumps(
      {"version": version, "config": config_dict},
      indent=2,
      sort_keys=True,
      default=str,
  )
  # Written beside and renamed, so a crash never leaves half a record.
  record = layout.config_record
  tmp = record.with_name(record.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(record)


def read_record(path: epath.Path, key: str) -> dict[str, Any]:
  """A workdir's JSON record, which must hold a mapping under `key`: a
  regular file of bounded size (a link to /dev/zero or a FIFO is refused,
  not read or waited on; gs:// paths hold neither).

  Raises:
    RecordError: the file is damaged or no file (naming it).
  """
  try:
    if "://" in os.fspath(path):
      if path.stat().length > _MAX_RECORD_BYTES:
        raise ValueError(f"over {_MAX_RECORD_BYTES:,} bytes")
      text = path.read_text()
    else:
      text = regular.read_text(
          path, _MAX_RECORD_BYTES, "a workdir record", RecordError
      )
    record = json.loads(text)
    if not isinstance(record, dict) or not isinstance(record.get(key), dict):
      raise ValueError(f"no {key!r} mapping")
  except regular.NotAFileError as e:
    raise RecordError(f"{e}; restore the record from a copy") from None
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise RecordError(
        f"{path} is damaged ({type(e).__name__}: {str(e)[:100]}); restore it "
        "from a copy, or use another --workdir"
    ) from None
  return record


def recorded_model_settings(workdir: str) -> dict[str, Any]:
  """{dotted key: value} of `model_keys()` and MODEL_INPUT_KEYS as the workdir
  recorded them: config.json of a training run, or converted_from.json of a
  converted model; {} without either."""
  layout = workdir_layout.Workdir(workdir)
  keys = model_keys() + MODEL_INPUT_KEYS
  if layout.config_record.exists():
    recorded = read_record(layout.config_record, "config")["config"]
    values = {k: lookup(recorded, k) for k in keys}
  elif layout.converted_record.exists():
    values = read_record(layout.converted_record, "config_overrides")[
        "config_overrides"
    ]
  else:
    return {}
  return {k: v for k, v in values.items() if k in keys and v is not MISSING}


# The quality settings an exported model carries (`interop.carried`) and a
# converted record keeps: {name in the export: config key}.
QUALITY_SETTINGS = {"h": "quality.h", "eps": "quality.eps", "b": "head.b"}


def _quality_settings(path: epath.Path) -> dict[str, float]:
  """The quality settings a converted record carries from an exported
  model: {config key: value}, each a finite number."""
  found = read_record(path, "config_overrides").get("quality_settings", {})
  allowed = set(QUALITY_SETTINGS.values())
  if not isinstance(found, dict) or not all(
      k in allowed
      and isinstance(v, (int, float))
      and not isinstance(v, bool)
      and math.isfinite(v)
      for k, v in found.items()
  ):
    raise RecordError(
        f"{path}: quality_settings is damaged; restore it "
        "from a copy, or convert the model again"
    )
  return found


def has_record(workdir: str) -> bool:
  layout = workdir_layout.Workdir(workdir)
  return layout.config_record.exists() or layout.converted_record.exists()


def recorded_config(
    workdir: str,
    *,
    advice: str = (
        "name a training run's workdir or one qgjt_jax.convert wrote"
    ),
) -> ml_collections.ConfigDict:
  """The config a workdir's model was made with: the shared defaults with
  everything config.json recorded, or with a converted model's settings.

  Raises:
    RecordError: the workdir records no model or does not exist (the
      message ends in `advice`, what the caller can pass instead).
  """
  from qgjt_jax import base_config  # pylint: disable=g-import-not-at-top

  config = base_config.get_base_config()
  layout = workdir_layout.Workdir(workdir)
  if layout.config_record.exists():
    recorded = read_record(layout.config_record, "config")["config"]
    recorded.pop("num_classes", None)  # the data's, not a config key
    # Limits are the user's, from their flags and config: a workdir from
    # others never raises them (and one's own keeps the defaults).
    recorded.pop("limits", None)
    _merge(config, recorded, layout.config_record)
  elif layout.converted_record.exists():
    for key, value in recorded_model_settings(workdir).items():
      _set(config, key, value, str(layout.converted_record))
    for key, value in _quality_settings(layout.converted_record).items():
      _set(config, key, value, str(layout.converted_record))
  elif not layout.root.exists():
    raise RecordError(f"--workdir={workdir} does not exist: {advice}")
  else:
    raise RecordError(
        f"--workdir={workdir} holds neither {workdir_layout.CONFIG_RECORD} "
        f"(a training run's) nor {workdir_layout.CONVERTED_RECORD} "
        "(qgjt_jax.convert's), so it does not say which model it holds: "
        f"{advice}"
    )
  return config


def _merge(
    node: ml_collections.ConfigDict,
    values: dict[str, Any],
    path,
    prefix: str = "",
) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(
        node.get(key), ml_collections.ConfigDict
    ):
      _merge(node[key], value, path, f"{prefix}{key}.")
    else:
      _set_leaf(node, key, value, f"{path}: config.{prefix}{key}")


def _set(
    config: ml_collections.ConfigDict, dotted: str, value: Any, where: str
) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  _set_leaf(node, leaf, value, f"{where}: config.{dotted}")


def _set_leaf(
    node: ml_collections.ConfigDict, leaf: str, value: Any, where: str
) -> None:
  """node[leaf] = value, typed as the default is (JSON turns tuples into
  lists); a key the defaults lack (a recipe's own) is added."""
  if isinstance(node.get(leaf), tuple) and isinstance(value, list):
    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
  try:
    with node.unlocked():
      node[leaf] = value
  except (TypeError, ValueError) as e:
    raise RecordError(
        f"{where}={value!r} does not fit the defaults "
        f"({errors.one_line(e)[:120]})"
    ) from None


def adopt_model_settings(
    config: ml_collections.ConfigDict,
    workdir: str,
    explicit: Iterable[str] = (),
) -> ml_collections.ConfigDict:
  """`config` with the model the workdir records (a copy, when it changes).

  A recipe's own model settings give way to the record, saying so in one
  line; a key in `explicit` (a `--config.KEY=` the user typed) that
  contradicts the record is refused.

  Raises:
    RecordError: naming the key and both values.
  """
  return adopt_settings(
      config, recorded_model_settings(workdir), explicit, workdir
  )


def adopt_settings(
    config: ml_collections.ConfigDict,
    recorded: dict[str, Any],
    explicit: Iterable[str],
    where: str,
) -> ml_collections.ConfigDict:
  """`config` with the model settings `recorded` (those of the model in
  `where`), as `adopt_model_settings`."""
  explicit = set(explicit)
  changed = {}
  for key, value in recorded.items():
    current = lookup(config, key)
    if current == value:
      continue
    if key in explicit:
      raise RecordError(
          f"--config.{key}={current!r} contradicts the model in {where} "
          f"({key} = {value!r} in its record): leave the flag out"
      )
    changed[key] = value
  if not changed:
    return config
  config = config.copy_and_resolve_references()
  for key, value in changed.items():
    _set(config, key, value, f"{where}'s record")
  reporting.note(
      f"The model in {where} is used as recorded: "
      + ", ".join(f"{k}={v!r}" for k, v in changed.items())
      + " (not the recipe's)."
  )
  return config


def with_input_order(
    config: ml_collections.ConfigDict, order: Any, whose: str
) -> ml_collections.ConfigDict:
  """`config` with model.input_order `order` (None: unchanged), saying so:
  the channel order is the weights' property, whatever a recipe says."""
  if not order or order == config.model.input_order:
    return config
  reporting.note(
      f"{whose} reads {order} images: config.model.input_order="
      f"{config.model.input_order!r} is overridden."
  )
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.input_order = order
  return config


def changed_keys(
    old: dict, new: dict, prefix: str = ""
) -> list[tuple[str, Any, Any]]:
  """(dotted key, old, new) of every leaf value that differs."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, MISSING), new.get(key, MISSING)
    if isinstance(a, dict) and isinstance(b, dict):
      out += changed_keys(a, b, f"{prefix}{key}.")
    elif a is not MISSING and b is not MISSING and _jsonish(a) != _jsonish(b):
      out.append((f"{prefix}{key}", a, b))
  return out


def _jsonish(value: Any) -> Any:
  """Tuples and lists compare alike (the record is JSON)."""
  return list(value) if isinstance(value, tuple) else value
