"""Orbax checkpoints: the full train state, the data iterator, and the model.

Each checkpoint step holds three items:
  state  the whole TrainState (queue, quality statistics, optimiser...) to
         resume training exactly;
  model  {'params', 'batch_stats'} of the backbone alone, what evaluation and
         fine-tuning need: restoring it does not depend on the class count,
         the optimiser or the device count that wrote it;
  data   the grain iterator's position (when there is one).
Orbax writes each step to a temporary folder and renames it when complete, so
an interrupted save never becomes the latest step; a latest step that fails to
restore is reported and the one before it is used.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

STATE, MODEL, DATA = "state", "model", "data"


def _grain_checkpoint():
  try:
    import grain.checkpoint as grain_ckpt
    return grain_ckpt
  except ImportError:
    return None


def make_manager(directory: str, *, max_to_keep: int = 3,
                 asynchronous: bool = True) -> ocp.CheckpointManager:
  directory = os.path.abspath(directory) if "://" not in directory else directory
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=asynchronous)
  return ocp.CheckpointManager(directory, options=options)


def model_item(state) -> dict[str, Any]:
  return {"params": state.params["backbone"], "batch_stats": state.batch_stats}


def save(manager: ocp.CheckpointManager, state, data_iterator=None,
         *, force: bool = False) -> bool:
  """Saves (asynchronously) state, model and iterator at state.step."""
  step = int(jax.device_get(state.step))
  items = {STATE: ocp.args.StandardSave(state),
           MODEL: ocp.args.StandardSave(model_item(state))}
  grain_ckpt = _grain_checkpoint()
  if data_iterator is not None and grain_ckpt is not None:
    items[DATA] = grain_ckpt.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def restore_latest(manager: ocp.CheckpointManager, state, shardings,
                   data_iterator=None) -> Optional[Any]:
  """Restores the newest readable step into `state`'s layout, or None.

  The iterator is restored in place. A step that fails to restore (damaged or
  partly deleted files) is reported and skipped in favour of the one before.
  """
  target = _abstract(state, shardings)
  grain_ckpt = _grain_checkpoint()
  for step in sorted(manager.all_steps(), reverse=True):
    items = {STATE: ocp.args.StandardRestore(target)}
    if data_iterator is not None and grain_ckpt is not None and (
        DATA in _item_names(manager, step)):
      items[DATA] = grain_ckpt.CheckpointRestore(data_iterator)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for damaged files
      logging.error("Checkpoint step %d in %s could not be restored (%s: %s); "
                    "trying the previous one.", step, manager.directory,
                    type(e).__name__, e)
      print(f"WARNING: checkpoint step {step} is damaged ({type(e).__name__}); "
            "falling back to the previous step.", flush=True)
      continue
    return restored[STATE]
  return None


def _item_names(manager: ocp.CheckpointManager, step: int) -> list[str]:
  step_dir = os.path.join(str(manager.directory), str(step))
  try:
    return os.listdir(step_dir)
  except OSError:
    return []


def restore_model(directory: str, abstract_model: Any,
                  step: Optional[int] = None) -> tuple[Any, int]:
  """Backbone {'params', 'batch_stats'} of a step (default the latest).

  `abstract_model` carries the target shapes and shardings, so a checkpoint
  written on any device count restores onto the current one.
  """
  manager = ocp.CheckpointManager(
      os.path.abspath(directory) if "://" not in directory else directory,
      options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(
          f"No checkpoint step {step} in {directory}; available: {steps}")
    steps = [step]
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {directory}.")
  errors = []
  for s in steps:
    try:
      restored = manager.restore(s, args=ocp.args.Composite(
          **{MODEL: ocp.args.StandardRestore(abstract_model)}))
      return restored[MODEL], s
    except Exception as e:  # damaged step: report, try an older one
      errors.append(f"step {s}: {type(e).__name__}: {e}")
      logging.error("Could not restore the model of step %d: %s", s, e)
  raise ValueError(f"No readable checkpoint in {directory}:\n" +
                   "\n".join(errors))


def save_model_only(directory: str, model: dict[str, Any], step: int = 0
                    ) -> None:
  """Writes a checkpoint with just the `model` item (converted weights)."""
  manager = make_manager(directory, asynchronous=False)
  manager.save(step, args=ocp.args.Composite(
      **{MODEL: ocp.args.StandardSave(model)}), force=True)
  manager.wait_until_finished()
  manager.close()


CONFIG_RECORD = "config.json"


def record_config(workdir: str, config_dict: dict[str, Any],
                  version: str) -> None:
  """Keeps the config and package version that wrote the workdir."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_RECORD), "w") as f:
    json.dump({"version": version, "config": config_dict}, f, indent=2,
              sort_keys=True, default=str)


# Keys whose change makes an existing checkpoint unusable for resuming.
INCOMPATIBLE_KEYS = (
    ("model", "name"), ("model", "base_width"), ("model", "embedding_size"),
    ("data", "image_size"), ("num_classes",), ("queue", "kind"),
    ("queue", "capacity"))


def check_compatible(workdir: str, config_dict: dict[str, Any]) -> None:
  """Stops with a message naming the keys that differ from the recorded run."""
  path = os.path.join(workdir, CONFIG_RECORD)
  if not os.path.exists(path):
    return
  with open(path) as f:
    recorded = json.load(f)["config"]
  diffs = []
  for key in INCOMPATIBLE_KEYS:
    old, new = recorded, config_dict
    for k in key:
      old = old.get(k) if isinstance(old, dict) else None
      new = new.get(k) if isinstance(new, dict) else None
    if old is not None and new is not None and old != new:
      diffs.append(f"config.{'.'.join(key)}: checkpoint has {old!r}, "
                   f"this run asks for {new!r}")
  if diffs:
    raise ValueError(
        f"The checkpoints in {workdir} were written by an incompatible run:\n  "
        + "\n  ".join(diffs) +
        "\nUse another --workdir, or restore the recorded values.")
