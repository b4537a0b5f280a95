"""The workdir's layout: `workdir.Workdir` names its files and folders, and
no other module of the package spells them."""

import ast
import pathlib

from qgjt_jax import workdir as workdir_layout

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "qgjt_jax"
# The names a module could spell instead of asking the layout ("eval" and
# "profile" are also words the commands use for other things).
_NAMES = (
    workdir_layout.CONFIG_RECORD,
    workdir_layout.CONVERTED_RECORD,
    workdir_layout.LOCK,
    workdir_layout.METRICS,
    workdir_layout.CHECKPOINTS,
    workdir_layout.LOGS,
)


def test_paths_of_a_local_and_an_object_store_workdir(tmp_path):
  local = workdir_layout.Workdir(tmp_path)
  assert local.config_record == tmp_path / "config.json"
  assert local.checkpoints == tmp_path / "checkpoints"
  assert local.process_log(3) == tmp_path / "logs" / "process_3.log"
  remote = workdir_layout.Workdir("gs://bucket/runs/a/")
  assert str(remote.checkpoints) == "gs://bucket/runs/a/checkpoints"
  assert str(remote.metrics) == "gs://bucket/runs/a/metrics.jsonl"


def test_evaluation_results_oldest_first_repeats_after(tmp_path):
  layout = workdir_layout.Workdir(tmp_path)
  assert not layout.eval_results()  # no eval folder yet
  layout.eval.mkdir()
  for name in ("step_10.json", "step_2.json", "step_10.2.json"):
    (layout.eval / name).write_text("{}")
  (layout.eval / "step_3.json").mkdir()  # a folder is no result
  for name in ("step_2.roc.png", "step_2.1.searches.npy", "notes.json"):
    (layout.eval / name).write_text("")
  found = [(key, path.name) for key, path in layout.eval_results()]
  assert found == [
      ((2, 1), "step_2.json"),
      ((10, 1), "step_10.json"),
      ((10, 2), "step_10.2.json"),
  ]


def _spelled_layout_names(source: str, where: str) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      if node.value.lstrip("/") in _NAMES:
        found.append(f"{where}:{node.lineno} {node.value}")
  return found


def test_no_other_module_spells_the_layout():
  own = PACKAGE / "workdir.py"
  found = [
      hit
      for path in sorted(PACKAGE.rglob("*.py"))
      if path != own
      for hit in _spelled_layout_names(path.read_text(), path.name)
  ]
  assert not found, found
  # The check bites: a module joining a record's name itself.
  assert _spelled_layout_names("def f(w):\n  return f'{w}/config.json'\n", "m")
