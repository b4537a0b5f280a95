"""The package's layers: no module imports one above its own, and there
are no import cycles (imports inside functions count too: they run).

  0 foundation   errors, config_keys, progress, reporting, parallel,
                 version, workdir (the layout), files/ (the readers of
                 users' files)
  1 core         models/, method/, optim, state, step, stack, base_config
  2 artifacts    records, checkpoint, outputs, workdir_lock
  3 services     data/, align/, eval/, inference/, interop/, config_checks
                 (it checks configs against the services' own registries),
                 train, finetune
  4 commands     main, convert, export, bench, export_check, data.bench,
                 launch_local (each the module its `python -m` name says,
                 flags and printing only), recipe_flags, notebook_utils,
                 tools/, configs/ (the recipes)
  5 the root     qgjt_jax (`load_model`, the public face)

A new module must be given a layer here; moving one down is a change of
design and is made here on purpose.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "qgjt_jax"

LAYERS = {
    "errors": 0,
    "config_keys": 0,
    "progress": 0,
    "reporting": 0,
    "parallel": 0,
    "version": 0,
    "workdir": 0,
    "files": 0,
    "models": 1,
    "method": 1,
    "optim": 1,
    "state": 1,
    "step": 1,
    "stack": 1,
    "base_config": 1,
    "records": 2,
    "checkpoint": 2,
    "outputs": 2,
    "workdir_lock": 2,
    "data": 3,
    "align": 3,
    "eval": 3,
    "inference": 3,
    "interop": 3,
    "config_checks": 3,
    "train": 3,
    "finetune": 3,
    "main": 4,
    "convert": 4,
    "export": 4,
    "bench": 4,
    "export_check": 4,
    "data.bench": 4,
    "launch_local": 4,
    "recipe_flags": 4,
    "notebook_utils": 4,
    "tools": 4,
    "configs": 4,
    "": 5,
}


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    found[".".join(parts)] = path
  return found


def _layer(module: str) -> int:
  """The most specific entry of LAYERS: "data.bench", then "data"."""
  name = module
  while name not in LAYERS:
    if not name:
      raise KeyError(module)
    name = name.rpartition(".")[0]
  return LAYERS[name]


def _imports(modules) -> dict[str, set[str]]:
  """module -> the package modules it imports, anywhere in its code."""

  def resolve(dotted):
    while dotted and dotted not in modules:
      dotted = dotted.rpartition(".")[0]
    return dotted

  edges = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if (
          isinstance(node, ast.ImportFrom)
          and node.level == 0
          and (node.module or "").startswith("qgjt_jax")
      ):
        base = node.module[len("qgjt_jax") :].lstrip(".")
        for alias in node.names:
          targets.add(resolve(f"{base}.{alias.name}".lstrip(".")))
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] == "qgjt_jax":
            targets.add(resolve(alias.name[len("qgjt_jax") :].lstrip(".")))
    edges[name] = targets - {name}
  return edges


@pytest.fixture(scope="module")
def edges():
  return _imports(_modules())


def test_every_module_has_a_layer(edges):
  unplaced = []
  for module in edges:
    try:
      _layer(module)
    except KeyError:
      unplaced.append(module)
  assert not unplaced, f"give these a layer in LAYERS: {unplaced}"


def _upward(edges) -> list[str]:
  return sorted(
      f"{a} ({_layer(a)}) imports {b} ({_layer(b)})"
      for a, targets in edges.items()
      for b in targets
      if _layer(b) > _layer(a)
  )


def _cycles(edges) -> list[list[str]]:
  """Tarjan's strongly connected components of more than one module."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(module):
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for target in edges.get(module, ()):
      if target not in index:
        visit(target)
        low[module] = min(low[module], low[target])
      elif target in on_stack:
        low[module] = min(low[module], index[target])
    if low[module] == index[module]:
      component = []
      while True:
        top = stack.pop()
        on_stack.discard(top)
        component.append(top)
        if top == module:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for module in list(edges):
    if module not in index:
      visit(module)
  return cycles


def test_no_module_imports_one_above_its_layer(edges):
  upward = _upward(edges)
  assert not upward, "\n".join(upward)


def test_no_import_cycles(edges):
  assert not _cycles(edges)


def test_the_checks_catch_what_they_are_for():
  """A core module importing a command, and a cycle through three."""
  assert _upward({"step": {"main"}, "main": {"step"}}) == [
      "step (1) imports main (4)"
  ]
  assert _cycles(
      {
          "eval.a": {"eval.b"},
          "eval.b": {"eval.c"},
          "eval.c": {"eval.a"},
          "files": set(),
      }
  ) == [["eval.a", "eval.b", "eval.c"]]
  assert _layer("data.bench") == 4 and _layer("data.prepare") == 3


def _argv_writes(tree: ast.AST) -> bool:
  """Whether the code assigns sys.argv or one of its items."""

  def is_argv(node):
    node = node.value if isinstance(node, ast.Subscript) else node
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "argv"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )

  for node in ast.walk(tree):
    targets = (
        node.targets
        if isinstance(node, ast.Assign)
        else [node.target]
        if isinstance(node, ast.AugAssign)
        else []
    )
    if any(is_argv(t) for t in targets):
      return True
  return False


def test_one_flag_library_and_argv_left_alone():
  """Every command reads its flags with absl (config_flags for a recipe):
  no module builds an argparse parser, and none assigns sys.argv."""
  found = []
  for name, path in _modules().items():
    tree = ast.parse(path.read_text())
    if any(
        isinstance(n, ast.Attribute) and n.attr == "ArgumentParser"
        for n in ast.walk(tree)
    ):
      found.append(f"{name} builds an argparse parser")
    if _argv_writes(tree):
      found.append(f"{name} assigns sys.argv")
  assert not found, "\n".join(found)
  # The check bites.
  assert _argv_writes(ast.parse("import sys\nsys.argv[1:] = []\n"))
  assert _argv_writes(ast.parse("import sys\nsys.argv = ['x']\n"))
