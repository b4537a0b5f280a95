"""`--config=RECIPE` and `--config.KEY=VALUE`, the same in every program.

The recipe is a configs/*.py file (Python, run as code) whose get_config()
returns the ConfigDict; any key can be overridden on the command line. Every
mistake ends in one ERROR line that names the flag, the recipe's failing
line or the unknown key with the nearest names. `python -m qgjt_jax.main`
parses them with its other absl flags (`parse`); the argparse tools
(`bench`, `export_check`) build their parser with `argument_parser` and
read their argv with `parse_tool_args`, which takes the recipe's flags out
first (`recipe_and_rest`).
"""
from __future__ import annotations

import argparse
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


def parse(parser: flags.FlagValues, argv: list[str],
          show_traceback: bool | None = None) -> list[str]:
  """`parser(argv)` (absl's parsing into those flag values, `--config`
  among them), every mistake one ERROR line: a flag absl refuses, a recipe
  that does not load (it is Python: its own failure is named with its
  line), an unknown `--config.KEY`. The traceback too with --traceback in
  argv (or `show_traceback`)."""
  if show_traceback is None:
    show_traceback = "--traceback" in argv
  recipe = flag_value(argv, "config")
  if recipe:
    path = recipe.split(":", 1)[0]
    if not os.path.isfile(path):
      sys.exit(f"ERROR: --config={recipe}: No such file: give a recipe "
               "file such as configs/synthetic.py")
    base_config.make_siblings_importable(path)
  try:
    return parser(argv)
  except errors.UserError as e:  # the workdir's record, as the recipe
    if errors.traceback_requested(show_traceback):
      traceback.print_exc()
    sys.exit(f"ERROR: {errors.one_line(e)}")
  except SyntaxError as e:
    sys.exit(f"ERROR: --config={e.filename}: {e.msg} at line {e.lineno}: "
             "fix the recipe file")
  except Exception as e:  # pylint: disable=broad-except
    failure = recipe_failure(recipe, e) or unknown_key(argv, recipe)
    if failure:
      if errors.traceback_requested(show_traceback):
        traceback.print_exc()
      sys.exit(failure)
    if isinstance(e, flags.Error):
      sys.exit(errors.flag_mistake(e))
    raise


def recipe_failure(recipe: str | None, e: Exception) -> str | None:
  """The line for a recipe file whose own code failed (it is Python, run
  as the program's own code): None when the failure is not the file's."""
  if not recipe:
    return None
  path = os.path.abspath(recipe.split(":", 1)[0])
  lines = [line for f, line in traceback.walk_tb(e.__traceback__)
           if os.path.abspath(f.f_code.co_filename) == path]
  if lines:
    return (f"ERROR: --config={recipe}: running it raised "
            f"{type(e).__name__} at line {lines[-1]}: "
            f"{errors.one_line(e)[:200]}: fix the recipe file (it is Python, "
            "run as code)")
  if not base_config.defines_get_config(path):
    return (f"ERROR: --config={recipe} defines no get_config(): a recipe "
            "file returns its ConfigDict from get_config() (see "
            "configs/synthetic.py)")
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
    key = arg[len("--config."):].split("=", 1)[0]
    node = config
    for depth, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict):
        break
      if part not in node:
        near = difflib.get_close_matches(part, list(node.keys()), n=1)
        where = ".".join(key.split(".")[:depth]) or "the config"
        return (f"ERROR: {arg}: unknown config key {part!r} in {where}" +
                (f': Did you mean "{near[0]}" instead of "{part}"?'
                 if near else "") +
                ": the keys are listed in the --config file and "
                "qgjt_jax/base_config.py")
      node = node[part]
  return None


def recipe_and_rest(argv: list[str], default: str
                    ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(the config of `--config` (else `default`) with its `--config.KEY=`
  overrides applied, the other arguments) of an argparse program's argv
  (without the program name); mistakes as `parse`'s."""
  mine, rest = [], []
  args = iter(argv)
  for arg in args:
    if arg == "--config":  # its value is the next argument
      mine.append(f"--config={next(args, '')}")
    elif arg.startswith(("--config=", "--config.")):
      mine.append(arg)
    else:
      rest.append(arg)
  if not any(a.split("=", 1)[0] == "--config" for a in mine):
    mine.insert(0, f"--config={default}")
  mine = ["program", *mine]
  values = flags.FlagValues()
  # The overrides become flags from `sys_argv` (else sys.argv's).
  config_flags.DEFINE_config_file("config", None, "the recipe",
                                  flag_values=values, lock_config=True,
                                  sys_argv=mine)
  parse(values, mine, show_traceback="--traceback" in rest)
  return values.config, rest


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """The parser of an argparse tool that reads a recipe: its module's
  docstring `doc` as the help, how it takes the recipe, and --traceback."""
  parser = argparse.ArgumentParser(
      prog=prog, description=doc,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="The recipe: --config=RECIPE (default configs/ms1m.py) and "
      "--config.KEY=VALUE as for qgjt_jax.main.")
  parser.add_argument("--traceback", action="store_true",
                      help="show the traceback of an expected failure")
  return parser


def parse_tool_args(parser: argparse.ArgumentParser, argv: list[str],
                    default: str) -> argparse.Namespace:
  """`parser`'s reading of argv (without the program name) after its
  recipe flags, whose config becomes the namespace's `recipe`."""
  recipe, rest = recipe_and_rest(list(argv), default)
  namespace = parser.parse_args(rest)
  namespace.recipe = recipe
  return namespace
