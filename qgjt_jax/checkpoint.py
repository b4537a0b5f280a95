"""Orbax checkpoints: the full train state and the model.

Each checkpoint step holds three items:
  state    the whole TrainState (queue, quality statistics, optimiser...) to
           resume training exactly;
  model    {'params', 'batch_stats'} of the backbone alone, what evaluation
           and fine-tuning need: restoring it does not depend on the class
           count, the optimiser or the device count that wrote it;
  quality  {'mean', 'std'}: the running feature-norm statistics, which say
           on which side of the HQ/LQ threshold a new image falls.
The input pipeline needs no item of its own: its batches are a pure function
of the seed and the step (data/pipeline.py), so the restored `state.step` is
its position, whatever the process or worker count of the resumed run.
Orbax writes each step to a temporary folder (`<step>.orbax-checkpoint-tmp-*`)
and renames it when complete, so an interrupted save never becomes the latest
step (and its leftovers are removed by the next manager). A latest step that
fails to restore is reported, renamed to `<step>.damaged-<time>` (kept for
inspection, ignored by orbax) and the one before it is used; when no step is
readable the run stops instead of silently starting over.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from qgjt_jax import errors
from qgjt_jax import records
from qgjt_jax import reporting
from qgjt_jax import workdir as workdir_layout

STATE, MODEL, QUALITY = "state", "model", "quality"


class CheckpointError(errors.UserError, RuntimeError):
  """Checkpoints exist but none can be restored."""


class IncompatibleRunError(errors.UserError, ValueError):
  """The workdir's checkpoints were written with an incompatible config."""


def _absolute(directory: str) -> str:
  return directory if "://" in directory else os.path.abspath(directory)


def _keep_latest(count: int) -> dict[str, Any]:
  """Options keeping the newest `count` steps: a preservation policy where
  orbax has them (its `max_to_keep` is deprecated there), else max_to_keep."""
  managers = getattr(ocp, "checkpoint_managers", None)
  if managers is not None and hasattr(managers, "LatestN"):
    return {"preservation_policy": managers.LatestN(n=count)}
  return {"max_to_keep": count}


def make_manager(
    directory: str, *, max_to_keep: int = 3, asynchronous: bool = True
) -> ocp.CheckpointManager:
  _remove_unfinished_saves(directory)
  options = ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=asynchronous,
      **_keep_latest(max_to_keep),
  )
  return ocp.CheckpointManager(_absolute(directory), options=options)


_UNFINISHED = ".orbax-checkpoint-tmp"


def _remove_unfinished_saves(directory: str) -> None:
  """Deletes the leftovers of saves interrupted before their commit.

  They never count as steps, only as garbage. Done here, before the manager
  exists, rather than by orbax's own clean-up, which runs in the background
  and can still be deleting when the next manager starts its own.
  """
  root = epath.Path(_absolute(directory))
  if jax.process_index() == 0 and root.exists():
    for path in root.iterdir():
      if _UNFINISHED in path.name:
        path.rmtree() if path.is_dir() else path.unlink()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("qgjt_unfinished_saves_removed")


def model_item(state) -> dict[str, Any]:
  return {"params": state.params["backbone"], "batch_stats": state.batch_stats}


def save(manager: ocp.CheckpointManager, state, *, force: bool = False) -> bool:
  """Saves (asynchronously) state and model at state.step.

  Returns False when nothing was saved: `force=False` leaves the decision to
  the manager, and a step that is already saved (a periodic save followed by
  the stop's) is not written twice.
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  _check_free_space(manager, state, step)
  items = {
      STATE: ocp.args.StandardSave(state),
      MODEL: ocp.args.StandardSave(model_item(state)),
      QUALITY: ocp.args.StandardSave(
          {"mean": state.quality.mean, "std": state.quality.std}
      ),
  }
  with _disk_full_is_checkpoint_error(manager, step):
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the pending asynchronous save, whose failure is reported."""
  with _disk_full_is_checkpoint_error(manager, manager.latest_step()):
    manager.wait_until_finished()


def _check_free_space(manager: ocp.CheckpointManager, state, step: int) -> None:
  """Refuses a save that cannot fit, before writing anything of it.

  Orbax writes a step into a temporary folder and renames it when complete,
  so a full disk never leaves a "latest" step that cannot be restored; but
  its asynchronous writes then fail in background threads. Checking first
  gives one clear error instead. (Local file systems only.)
  """
  directory = str(manager.directory)
  if "://" in directory:
    return
  # The state, and the backbone once more in the `model` item.
  needed = sum(x.nbytes for x in jax.tree.leaves(state)) + sum(
      x.nbytes for x in jax.tree.leaves(model_item(state))
  )
  needed = needed // max(jax.process_count(), 1) + (1 << 20)
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise CheckpointError(
        f"{directory}: {free / 2**20:.1f} MiB free, checkpoint step {step} "
        f"needs about {needed / 2**20:.1f} MiB: free some space or use "
        "another --workdir (the checkpoints written so far are kept)"
    )


@contextlib.contextmanager
def _disk_full_is_checkpoint_error(manager, step):
  """Orbax reports a full disk as a ValueError or RuntimeError of
  tensorstore's; it is a CheckpointError here."""
  try:
    yield
  except (ValueError, RuntimeError) as e:
    text = str(e)
    if "No space left on device" not in text and "os_error_code='28'" not in (
        text
    ):
      raise
    raise CheckpointError(
        f"{manager.directory}: no space left on the device while writing "
        f"checkpoint step {step}: free some space or use another --workdir "
        "(that step was not committed; the ones before it are kept)"
    ) from e


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      shardings,
  )


def restore_latest(
    manager: ocp.CheckpointManager, state, shardings
) -> Optional[Any]:
  """Restores the newest readable step into `state`'s layout, or None.

  A step that fails to restore (damaged or
  partly deleted files) is reported and the one before it is tried; once one
  restores, the damaged newer steps are renamed aside, so the run can save
  those step numbers again. If steps exist but none restores (damage, or a
  layout this code cannot read), CheckpointError is raised: starting over
  would bury the old run's checkpoints under new ones.
  """
  target = _abstract(state, shardings)
  damaged, errors = [], []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(
          step,
          args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)}),
      )
    except Exception as e:  # orbax raises many types for damaged files
      reason = f"{type(e).__name__}: {_first_line(e)}"
      # The full text (tensorstore adds kilobytes of spec) only at INFO.
      logging.info(
          "Checkpoint step %d in %s could not be restored: %r",
          step,
          manager.directory,
          e,
      )
      reporting.note(
          f"WARNING: checkpoint step {step} in {manager.directory} could "
          f"not be restored ({reason}); trying the previous step."
      )
      damaged.append(step)
      errors.append(f"step {step}: {reason}")
      continue
    if damaged:
      _set_aside(manager, damaged)
    return restored[STATE]
  if errors:
    raise CheckpointError(
        f"No checkpoint in {manager.directory} can be restored:\n  "
        + "\n  ".join(errors)
        + "\nMove the folder aside (or use another "
        "--workdir) to start a new run, or fix the code/config mismatch."
    )
  return None


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames unreadable steps to `<step>.damaged-<time>` (orbax ignores it)."""
  if jax.process_index() == 0:
    root = epath.Path(manager.directory)
    for step in steps:
      target = root / f"{step}.damaged-{int(time.time())}"
      (root / str(step)).rename(target)
      reporting.note(f"Checkpoint step {step} was moved to {target}.")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("qgjt_set_aside_damaged_steps")
  manager.reload()


def restore_model(
    directory: str, abstract_model: Any, step: Optional[int] = None
) -> tuple[Any, int]:
  """Backbone {'params', 'batch_stats'} of a step (default the latest).

  `abstract_model` carries the target shapes and shardings, so a checkpoint
  written on any device count restores onto the current one. Without `step`,
  a damaged latest step is reported and an older one used.

  Raises:
    CheckpointError: no checkpoint, no such step, or none readable.
  """
  steps = sorted(committed_steps(directory), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(
          f"No checkpoint step {step} in {directory}; available: "
          f"{sorted(steps) or 'none'}."
      )
    steps = [step]
  if not steps:
    raise CheckpointError(f"No checkpoint in {directory}.")
  errors = []
  for s in steps:
    difference = _model_difference(directory, s, abstract_model)
    if difference:
      workdir = os.path.dirname(os.path.abspath(directory))
      how = (
          "leave out --config to use the model the workdir records"
          if records.has_record(workdir)
          else "pass the --config.model.* and --config.data.image_size of "
          "the model that wrote it: the workdir records none (neither "
          f"{workdir_layout.CONFIG_RECORD} nor "
          f"{workdir_layout.CONVERTED_RECORD})"
      )
      raise CheckpointError(
          f"{directory}/{s} holds another model than the "
          f"config builds ({difference}); {how}"
      )
    try:
      return restore_item(directory, s, MODEL, abstract_model), s
    except Exception as e:  # damaged step: report, try an older one
      errors.append(f"step {s}: {type(e).__name__}: {_first_line(e)}")
      logging.info("Could not restore the model of step %d: %r", s, e)
      reporting.note(
          f"WARNING: the model of checkpoint step {s} in {directory} could "
          f"not be restored ({errors[-1]})."
      )
  raise CheckpointError(
      f"No readable checkpoint in {directory}:\n  " + "\n  ".join(errors)
  )


def committed_steps(directory: str) -> list[int]:
  """The steps saved whole in `directory` (none while it does not exist),
  found without a CheckpointManager: a reader must never clean up or
  otherwise touch the folder of a run that may still be writing it."""
  root = epath.Path(_absolute(directory))
  if not root.is_dir():
    return []
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(root))


def _item_path(directory: str, step: int, item: str) -> epath.Path:
  return epath.Path(_absolute(directory)) / str(step) / item


def stored_tree(directory: str, step: int, item: str) -> Any:
  """The metadata tree (shape and dtype of every array) of an item saved at
  `step`, read from the item itself (nothing restored)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(_item_path(directory, step, item))
  finally:
    handler.close()


def restore_item(
    directory: str,
    step: int,
    item: str,
    target: Any = None,
    sharding: Any = None,
) -> Any:
  """An item of a step, into `target` (ShapeDtypeStructs with shardings).

  Without a target, one is made from the item's own metadata with every
  array on `sharding` (default: replicated on this process's first device),
  so an item written on any device count restores on the devices present:
  orbax alone restores only onto the topology that wrote it.
  """
  if target is None:
    sharding = sharding or jax.sharding.SingleDeviceSharding(
        jax.local_devices()[0]
    )
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        stored_tree(directory, step, item),
    )
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.restore(
        _item_path(directory, step, item), args=ocp.args.StandardRestore(target)
    )
  finally:
    handler.close()


def _leaf_name(path) -> str:
  """A leaf's path as "params/backbone/...": the same for the saved tree
  (dicts) and the live one (dataclasses, named tuples)."""
  return "/".join(
      str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
      for k in path
  )


_KEY, _EMPTY = "a PRNG key", "an empty node"


def _is_empty(node: Any) -> bool:
  return node is None or jax.tree_util.tree_structure(node).num_leaves == 0


def _shapes(tree: Any) -> dict[str, Any]:
  """{leaf name: shape} of the arrays, and _EMPTY where the tree has an
  empty node (an optimiser part without state: orbax restores only into
  the same structure); a PRNG key's is _KEY (its stored form is the raw
  key data, whatever the config)."""

  def shape(v):
    if _is_empty(v):
      return _EMPTY
    if jax.dtypes.issubdtype(
        getattr(v, "dtype", None) or jnp.float32, jax.dtypes.prng_key
    ):
      return _KEY
    return tuple(v.shape)

  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty)
  return {_leaf_name(p): shape(v) for p, v in leaves}


def _stored_shapes(
    directory: str, step: int, item: str
) -> Optional[dict[str, tuple[int, ...]]]:
  """{leaf name: shape} of an item saved at `step`, from the checkpoint's
  metadata (nothing restored); None when the metadata cannot be read (then
  the restore itself reports what is wrong)."""
  try:
    return _shapes(stored_tree(directory, step, item)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def _differences(stored: dict, wanted: dict) -> list[str]:
  return [
      f"{name}: stored {stored.get(name, 'nothing')}, this run has "
      f"{wanted.get(name, 'nothing')}"
      for name in sorted(set(stored) | set(wanted))
      if stored.get(name) != wanted.get(name)
      and _KEY not in (stored.get(name), wanted.get(name))
  ]


def _model_difference(
    directory: str, step: int, abstract_model: Any
) -> Optional[str]:
  """How the model saved at `step` differs from `abstract_model` (the first
  array whose name or shape differs), from the checkpoint's metadata: so a
  checkpoint of another model is named before orbax starts (and fails in)
  a restore. None when they agree, or the metadata cannot be read."""
  stored = _stored_shapes(directory, step, MODEL)
  if stored is None:
    return None
  found = _differences(stored, _shapes(abstract_model))
  return found[0] if found else None


def restore_quality(directory: str, step: int) -> Optional[dict[str, float]]:
  """{'mean', 'std'} of the running norm statistics at `step`, or None for
  a checkpoint without them (a converted model) or with a damaged item
  (said in a warning: the model still embeds; its quality is not rated)."""
  if not _item_path(directory, step, QUALITY).exists():
    return None
  try:
    restored = restore_item(directory, step, QUALITY)
    stats = {k: float(restored[k]) for k in ("mean", "std")}
    if not (
        math.isfinite(stats["mean"])
        and stats["mean"] > 0
        and math.isfinite(stats["std"])
        and stats["std"] >= 0
    ):
      raise ValueError(f"mean {stats['mean']}, std {stats['std']}")
  except Exception as e:  # orbax raises many types for damaged files
    reporting.note(
        f"WARNING: the norm statistics of step {step} in {directory} are "
        f"unreadable ({type(e).__name__}: {_first_line(e)[:120]}); faces "
        "are embedded, their quality is not rated"
    )
    return None
  return stats


def save_model_only(
    directory: str,
    model: dict[str, Any],
    step: int = 0,
    quality: Optional[dict[str, float]] = None,
) -> None:
  """Writes a checkpoint with just the `model` item (converted weights),
  and the `quality` item when the statistics are known (an exported
  model's)."""
  items = {MODEL: ocp.args.StandardSave(model)}
  if quality is not None:
    items[QUALITY] = ocp.args.StandardSave(
        {k: jnp.float32(quality[k]) for k in ("mean", "std")}
    )
  manager = make_manager(directory, asynchronous=False)
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()
  manager.close()


def check_resumable(
    workdir: str, record: dict[str, Any], abstract_state: Any
) -> None:
  """Stops before training when no checkpoint of the workdir holds a state
  of the structure and shapes this run builds (a damaged step, whose
  metadata says something else, is left to the restore to set aside).

  Decided from the saved state itself (its metadata, nothing restored)
  against `abstract_state`, so any change of structure is caught, whichever
  key caused it; the message names the differing arrays and the config
  keys that differ from the recorded run, which explain them.

  Raises:
    IncompatibleRunError: naming both.
  """
  directory = str(workdir_layout.Workdir(workdir).checkpoints)
  steps = sorted(committed_steps(directory), reverse=True)
  wanted, found = _shapes(abstract_state), None
  for step in steps:  # a damaged newest step is the restore's to set aside
    stored = _stored_shapes(directory, step, STATE)
    if stored is None:
      continue
    differences = _differences(stored, wanted)
    if not differences:
      return
    found = found or differences
  if not found:
    return
  path = workdir_layout.Workdir(workdir).config_record
  recorded = records.read_record(path, "config") if path.exists() else {}
  keys = [
      f"{'config.' if key != 'num_classes' else ''}{key}: recorded "
      f"{old!r}, now {new!r}"
      for key, old, new in records.changed_keys(
          recorded.get("config", {}), record
      )
  ]
  raise IncompatibleRunError(
      f"The checkpoints in {workdir} were written by an incompatible run "
      f"(qgjt_jax {recorded.get('version', '?')}): the saved state differs "
      f"from this run's in {len(found)} array(s), e.g.\n  "
      + "\n  ".join(found[:3])
      + "\nConfig keys that differ from the "
      "recorded run (num_classes: identities in the training data):\n  "
      + ("\n  ".join(keys[:12]) or "none recorded")
      + "\nUse another --workdir, or set the recorded values again "
      f"(all of them are in {path})."
  )
