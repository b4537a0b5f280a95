"""`--config=RECIPE` and `--config.KEY=VALUE`, the same in every program.

The recipe is a configs/*.py file (Python, run as code) whose get_config()
returns the ConfigDict; any key can be overridden on the command line. Every
mistake ends in one ERROR line that names the flag, the recipe's failing
line or the unknown key with the nearest names. Every command that reads
a recipe (main, bench, export_check) defines `--config` with
ml_collections' config_flags beside its other absl flags and parses them
with `parse`.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback

from absl import flags
import ml_collections
from ml_collections import config_flags

from qgjt_jax import base_config
from qgjt_jax import errors


def flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv (before absl parses it)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def define_config(default: str | None, help_text: str):
  """The `--config` flag of a command (its FlagHolder), locked against
  changes after parsing. A `default` recipe is read, and the `--config.KEY`
  overrides of the command line applied to it, when the flag is defined
  (config_flags' way): a mistake there is the one ERROR line `parse` gives."""
  try:
    return config_flags.DEFINE_config_file(
        "config", default, help_text, lock_config=True
    )
  except errors.UserError as e:  # a workdir's record, as the recipe
    _exit_with(e, "--traceback" in sys.argv)
  except Exception as e:  # pylint: disable=broad-except
    recipe = flag_value(sys.argv, "config") or default
    failure = recipe_failure(recipe, e) or unknown_key(sys.argv, recipe)
    if failure:
      sys.exit(failure)
    raise


def parse(
    parser: flags.FlagValues,
    argv: list[str],
    show_traceback: bool | None = None,
    default_recipe: str | None = None,
) -> list[str]:
  """`parser(argv)` (absl's parsing into those flag values, `--config`
  among them), every mistake one ERROR line: a flag absl refuses, a recipe
  that does not load (it is Python: its own failure is named with its
  line), an unknown `--config.KEY`. The traceback too with --traceback in
  argv (or `show_traceback`). `default_recipe`: the file of a `--config`
  defined with a default, for the messages when argv names none."""
  if show_traceback is None:
    show_traceback = "--traceback" in argv
  recipe = flag_value(argv, "config") or default_recipe
  if recipe:
    path = recipe.split(":", 1)[0]
    if not os.path.isfile(path):
      sys.exit(
          f"ERROR: --config={recipe}: No such file: give a recipe "
          "file such as configs/synthetic.py"
      )
    base_config.make_siblings_importable(path)
  try:
    return parser(argv)
  except errors.UserError as e:  # the workdir's record, as the recipe
    _exit_with(e, show_traceback)
  except SyntaxError as e:
    sys.exit(
        f"ERROR: --config={e.filename}: {e.msg} at line {e.lineno}: "
        "fix the recipe file"
    )
  except Exception as e:  # pylint: disable=broad-except
    failure = recipe_failure(recipe, e) or unknown_key(argv, recipe)
    if failure:
      if errors.traceback_requested(show_traceback):
        traceback.print_exc()
      sys.exit(failure)
    if isinstance(e, flags.Error):
      sys.exit(errors.flag_mistake(e))
    raise


def _exit_with(e: errors.UserError, show_traceback: bool):
  """Stops with the one ERROR line of a user's mistake (the traceback
  first where asked)."""
  if errors.traceback_requested(show_traceback):
    traceback.print_exc()
  sys.exit(f"ERROR: {errors.one_line(e)}")


def recipe_failure(recipe: str | None, e: Exception) -> str | None:
  """The line for a recipe file whose own code failed (it is Python, run
  as the program's own code): None when the failure is not the file's."""
  if not recipe:
    return None
  path = os.path.abspath(recipe.split(":", 1)[0])
  lines = [
      line
      for f, line in traceback.walk_tb(e.__traceback__)
      if os.path.abspath(f.f_code.co_filename) == path
  ]
  if lines:
    return (
        f"ERROR: --config={recipe}: running it raised "
        f"{type(e).__name__} at line {lines[-1]}: "
        f"{errors.one_line(e)[:200]}: fix the recipe file (it is Python, "
        "run as code)"
    )
  if not base_config.defines_get_config(path):
    return (
        f"ERROR: --config={recipe} defines no get_config(): a recipe "
        "file returns its ConfigDict from get_config() (see "
        "configs/synthetic.py)"
    )
  return None


def unknown_key(argv: list[str], recipe: str | None) -> str | None:
  """The line naming the first `--config.KEY` override that the recipe's
  config has no key for (found by walking the config, with the nearest
  names), or None."""
  if not recipe:
    return None
  try:
    config = base_config.load_recipe(recipe)
  except Exception:  # pylint: disable=broad-except
    return None  # the recipe fails by itself: not an override's fault
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config.") :].split("=", 1)[0]
    node = config
    for depth, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict):
        break
      if part not in node:
        near = difflib.get_close_matches(part, list(node.keys()), n=1)
        where = ".".join(key.split(".")[:depth]) or "the config"
        return (
            f"ERROR: {arg}: unknown config key {part!r} in {where}"
            + (
                f': Did you mean "{near[0]}" instead of "{part}"?'
                if near
                else ""
            )
            + ": the keys are listed in the --config file and "
            "qgjt_jax/base_config.py"
        )
      node = node[part]
  return None
