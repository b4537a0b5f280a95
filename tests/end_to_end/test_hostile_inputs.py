"""Files from strangers and careless hands: never run, never read out of
bounds, never a traceback, never an unbounded allocation, nothing lost.

Every case is a file the test makes (tests/helpers/hostile.py), handed to the
command a user would run. Each asserts exit status 1 (not 0, not a crash
signal), one `ERROR:` line naming the file, no traceback, that no payload
ran (its marker file is absent) and the child's peak memory.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

from tests.helpers import commands
from tests.helpers import hostile
from tests.helpers import tiny_runs
from tests.helpers import torch_writer

pytestmark = pytest.mark.slow

# Peak memory allowed to a refusing command. Failing on a small file,
# convert peaks near 230 MiB here and main (with a tiny model) near 350 MiB;
# each file below used to cost from 1 GiB to 16 GiB, or crashed.
CONVERT_MIB = 600
MAIN_MIB = 800


def _convert(src, workdir, *extra):
  return commands.run(*["qgjt_jax.convert", f"--src={src}",
                               f"--workdir={workdir}", *extra])


# ---------------------------------------------------------------------------
# PyTorch checkpoints (convert; init_from reads them the same way).

_TORCH_CASES = {
    # name: (maker(folder, marker), words the ERROR line must hold)
    "legacy header runs code": (hostile.legacy_code_header, "posix.system"),
    "legacy code, then the magic number": (hostile.legacy_code_then_magic,
                                           "posix.system"),
    "storage cut to 8 bytes": (lambda f, m: hostile.storage_cut_short(f),
                               "reaches past its storage"),
    "size past the storage": (lambda f, m: hostile.views(
        f, "size.pth", big=torch_writer.TensorView(
            np.zeros(4, np.float32), 0, (1 << 40,), (1,))),
                              "reaches past its storage"),
    "stride past the storage": (lambda f, m: hostile.views(
        f, "stride.pth", big=torch_writer.TensorView(
            np.zeros(4, np.float32), 0, (2, 2), (1 << 40, 1))),
                                "reaches past its storage"),
    "offset past the storage": (lambda f, m: hostile.views(
        f, "offset.pth", big=torch_writer.TensorView(
            np.zeros(4, np.float32), 1 << 62, (1,), (1,))),
                                "reaches past its storage"),
    "negative stride": (lambda f, m: hostile.views(
        f, "negative.pth", big=torch_writer.TensorView(
            np.zeros(4, np.float32), 3, (4,), (-1,))),
                        "non-negative integers"),
    "offset not a number": (lambda f, m: hostile.views(
        f, "text_offset.pth", big=torch_writer.TensorView(
            np.zeros(4, np.float32), "abc", (1,), (1,))),
                            "non-negative integers"),
    "stride-0 view of one element": (lambda f, m: hostile.views(
        f, "stride0.pth", big=torch_writer.TensorView(
            np.zeros(1, np.float32), 0, (1 << 16, 1 << 16), (0, 0))),
                                     "reaches past its storage"),
    "deflated member of 1 GiB": (lambda f, m: hostile.deflate_bomb(f),
                                 "max_inflation"),
    "legacy storage count 2**62": (
        lambda f, m: hostile.legacy_storage_count(f, 1 << 62), "cut short"),
    "legacy storage count negative": (
        lambda f, m: hostile.legacy_storage_count(f, -5), "cut short"),
    "memo index 2**28": (lambda f, m: hostile.memo_bomb(f), "memo.pth"),
    "nesting 100000 deep": (lambda f, m: hostile.deep_nesting(f),
                            "max_pickle_depth"),
    "OrderedDict(5)": (lambda f, m: hostile.odd_call(f), "TypeError"),
    "NaN weights": (lambda f, m: hostile.nan_weights(f), "NaN"),
    ".npz declaring 4 TiB": (lambda f, m: hostile.lying_npz(f),
                             "declares an array"),
    "safetensors header of 2**62 bytes": (
        lambda f, m: hostile.safetensors_file(f, "long.safetensors", {},
                                              header_length=1 << 62),
        "as safetensors"),
    "safetensors tensor of 4 TiB over 16 bytes": (
        lambda f, m: hostile.safetensors_file(
            f, "vast.safetensors", {"w": {"dtype": "F32", "shape": [1 << 40],
                                          "data_offsets": [0, 4 << 40]}},
            b"\0" * 16), "as safetensors"),
    "safetensors tensors overlapping": (
        lambda f, m: hostile.safetensors_file(
            f, "overlap.safetensors", {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
            b"\0" * 24), "as safetensors"),
}


@pytest.mark.parametrize("case", sorted(_TORCH_CASES))
def test_convert_refuses(tmp_path, case):
  maker, words = _TORCH_CASES[case]
  marker = tmp_path / "payload_ran"
  src = maker(tmp_path, marker)
  result = _convert(src, tmp_path / "run")
  commands.assert_refused(result, src, words, max_rss_mib=CONVERT_MIB)
  assert not marker.exists()
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_never_runs_code(tmp_path):
  marker = tmp_path / "payload_ran"
  src = hostile.legacy_code_then_magic(tmp_path, marker)
  result = commands.run(*tiny_runs.cli_command(
      tmp_path / "run", f"--config.init_from={src}")[2:])
  commands.assert_refused(result, "config.init_from", src, "posix.system",
                         max_rss_mib=MAIN_MIB)
  assert not marker.exists()


def test_a_trusted_large_file_passes_with_a_raised_limit(tmp_path):
  """The limits are a default, not a wall: a flag raises them."""
  src = hostile.views(tmp_path, "ok.pth")  # the valid r18
  result = _convert(src, tmp_path / "a", "--max_tensor_bytes=100")
  commands.assert_refused(result, src, "max_tensor_bytes",
                         max_rss_mib=CONVERT_MIB)
  result = _convert(src, tmp_path / "b")
  assert result.returncode == 0, result.output


# ---------------------------------------------------------------------------
# Images and sets: decoded only after their declared size is checked.


def _main(workdir, *extra, **changes):
  return commands.run(*
      tiny_runs.cli_command(workdir, *extra, **changes)[2:])


def _faces(folder: pathlib.Path, count: int = 3) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    (folder / f"face{i}.jpg").write_bytes(hostile.face_jpeg(seed=i))
  return folder


@pytest.mark.parametrize("side, words, align", [
    (20000, "max_image_pixels", "none"), (50000, "max_image_pixels", "none"),
    (50000, "max_image_pixels", "detect")])
def test_embed_refuses_an_image_declaring_vast_size(reference_run, tmp_path,
                                                    side, words, align):
  if align == "detect":
    pytest.importorskip("dlib")
  folder = _faces(tmp_path / "faces")
  bomb = hostile.png_bomb(folder / "bomb.png", side)
  assert bomb.stat().st_size < 400_000  # a few hundred KB for gigabytes
  result = _main(reference_run[0], "--mode=embed", f"--images={folder}",
                 f"--out={tmp_path / 'out.npz'}", f"--align={align}")
  commands.assert_refused(result, bomb, words, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("content, words", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64, "not UTF-8 text"),
    (b"a.jpg" + b",1e308" * 9 + b",inf\n", "must be finite"),
])
def test_a_hostile_landmarks_file(reference_run, tmp_path, content, words):
  folder = _faces(tmp_path / "faces")
  table = _write(tmp_path / "points.csv", content)
  result = _main(reference_run[0], "--mode=embed", f"--images={folder}",
                 f"--out={tmp_path / 'out.npz'}", f"--landmarks={table}")
  commands.assert_refused(result, table, words, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "out.npz").exists()


def _bins(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Broken verification sets, by what is wrong with them."""
  folder.mkdir(parents=True, exist_ok=True)
  face = hostile.face_jpeg()
  good = hostile.bin_set(folder / "good.bin", [face] * 4, [True, False])
  data = good.read_bytes()
  return {
      "pair count": hostile.bin_set(folder / "pairs.bin", [face] * 3,
                                    [True, False]),
      "garbage": _write(folder / "garbage.bin", b"\x80\x02" + bytes(range(
          256)) * 4),
      "truncated": _write(folder / "truncated.bin", data[:len(data) // 2]),
      "code": _write(folder / "code.bin", hostile._code_pickle(  # pylint: disable=protected-access
          folder / "payload_ran") + b"N."),
      "memo": _write(folder / "memo.bin", b"\x80\x02Nr" + (1 << 28).to_bytes(
          4, "little") + b"."),
  }


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
  path.write_bytes(data)
  return path


@pytest.mark.parametrize("case", ["pair count", "garbage", "truncated",
                                  "code", "memo"])
def test_a_broken_bin_set_stops_evaluation_and_training_at_once(
    reference_run, tmp_path, case):
  path = _bins(tmp_path / "sets")[case]
  result = _main(reference_run[0], "--mode=eval",
                 f"--config.eval.bin_sets=('{path}',)")
  commands.assert_refused(result, path, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "sets" / "payload_ran").exists()
  if case == "truncated":  # before training, not after it
    result = _main(tmp_path / "run", f"--config.eval.bin_sets=('{path}',)")
    commands.assert_refused(result, path, max_rss_mib=MAIN_MIB)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bin_set_with_a_vast_image(reference_run, tmp_path):
  bomb = hostile.png_bomb(tmp_path / "bomb.png", 20000).read_bytes()
  path = hostile.bin_set(tmp_path / "bomb.bin",
                         [hostile.face_jpeg(), bomb] * 2, [True, False])
  result = _main(reference_run[0], "--mode=eval",
                 f"--config.eval.bin_sets=('{path}',)")
  commands.assert_refused(result, path, "image 1", "max_image_pixels",
                         max_rss_mib=MAIN_MIB)


def _prepare(*args):
  return commands.run(*["qgjt_jax.data.prepare", *args])


def _rec(folder: pathlib.Path, images, labels=None) -> pathlib.Path:
  from qgjt_jax.tools import pipeline_bench  # pylint: disable=g-import-not-at-top
  labels = labels or [i % 2 for i in range(len(images))]
  pipeline_bench.write_insightface_rec(folder, images, labels, 32)
  return folder


def test_a_rec_set_with_a_vast_image(tmp_path):
  bomb = hostile.png_bomb(tmp_path / "bomb.png", 20000).read_bytes()
  src = _rec(tmp_path / "src", [hostile.face_jpeg(seed=i) for i in range(3)]
             + [bomb])
  result = _prepare("--format=insightface_rec", f"--src={src}",
                    f"--data_dir={tmp_path / 'tfds'}", "--name=mine")
  commands.assert_refused(result, src / "train.rec", "max_image_pixels",
                         max_rss_mib=MAIN_MIB)


def test_training_from_a_rec_with_a_vast_image(tmp_path):
  """In the grain workers of a training run, the same refusal."""
  bomb = hostile.png_bomb(tmp_path / "bomb.png", 20000).read_bytes()
  src = _rec(tmp_path / "src", [bomb] * 16)
  result = _main(tmp_path / "run", **{"data.kind": "rec",
                                      "data.rec_dir": str(src),
                                      "data.worker_count": 1})
  commands.assert_refused(result, src / "train.rec", "max_image_pixels",
                         max_rss_mib=MAIN_MIB)


def test_an_image_folder_with_a_vast_image(tmp_path):
  src = tmp_path / "src"
  _faces(src / "alice")
  bomb = hostile.png_bomb(src / "alice" / "bomb.png", 20000)
  result = _prepare("--format=image_folder", f"--src={src}",
                    f"--data_dir={tmp_path / 'tfds'}", "--name=mine")
  commands.assert_refused(result, bomb, "max_image_pixels", "--skip_bad",
                         max_rss_mib=MAIN_MIB)


@pytest.mark.parametrize("case", ["truncated", "offset 2**63", "NaN header"])
def test_damaged_rec_sets(tmp_path, case):
  from tests.unit.data import test_recordio  # pylint: disable=g-import-not-at-top
  src = _rec(tmp_path / "src", [hostile.face_jpeg(seed=i) for i in range(4)])
  rec, idx = src / "train.rec", src / "train.idx"
  if case == "truncated":
    rec.write_bytes(rec.read_bytes()[:200])
    named = [rec, "is shorter", "cut short"]
  elif case == "offset 2**63":
    lines = idx.read_text().splitlines()
    lines[1] = lines[1].split("\t")[0] + f"\t{2**63 - 5}"
    idx.write_text("\n".join(lines) + "\n")
    named = [rec, f"{2**63 - 5:,}"]
  else:
    records = [(0, test_recordio.pack([float("nan"), 3.0], b"", 0)),
               (1, test_recordio.pack(0, hostile.face_jpeg(), 1))]
    test_recordio.write_rec(src, records, "1,32,32")
    named = [rec, "record 0", "nan"]
  result = _prepare("--format=insightface_rec", f"--src={src}",
                    f"--data_dir={tmp_path / 'tfds'}", "--name=mine")
  commands.assert_refused(result, *named, max_rss_mib=MAIN_MIB)


# ---------------------------------------------------------------------------
# One writer per workdir; outputs complete, never replaced unasked.


def test_two_runs_on_one_workdir(tmp_path):
  """Started together: one trains to the end, the other stops at once in
  one line naming the first; checkpoints and metrics are whole."""
  import subprocess  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  command = tiny_runs.cli_command(workdir)
  procs = [subprocess.Popen(command, cwd=tiny_runs.ROOT, text=True,
                            env=tiny_runs.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for _ in range(2)]
  results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
  codes = sorted(code for _, _, code in results)
  assert codes == [0, 1], [r[1][-2000:] for r in results]
  out, err, _ = next(r for r in results if r[2] == 1)
  errors = [l for l in (out + err).splitlines() if l.startswith("ERROR")]
  assert len(errors) == 1 and "Traceback" not in out + err, err[-2000:]
  assert "is in use by another run" in errors[0] and "pid" in errors[0]
  steps = [json.loads(l)["step"] for l in
           (workdir / "metrics.jsonl").read_text().splitlines()
           if '"loss"' in l]
  assert steps == sorted(set(steps)) and steps[-1] == tiny_runs.STEPS
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
      str(s) for s in sorted(range(8, tiny_runs.STEPS + 1, 8), key=str)]
  assert not list(workdir.rglob("*orbax-checkpoint-tmp*"))
  assert not (workdir / "run.lock").exists()


def test_embed_output_is_that_file_checked_first(reference_run, tmp_path):
  folder = _faces(tmp_path / "faces")
  named = tmp_path / "keep.txt"
  result = _main(reference_run[0], "--mode=embed", f"--images={folder}",
                 f"--out={named}")
  assert result.returncode == 0, result.output
  assert str(named) in result.stdout and named.exists()
  assert not (tmp_path / "keep.txt.npz").exists()
  assert sorted(np.load(named)["paths"]) == ["face0.jpg", "face1.jpg",
                                            "face2.jpg"]
  before = named.read_bytes()
  again = _main(reference_run[0], "--mode=embed", f"--images={folder}",
                f"--out={named}")
  commands.assert_refused(again, named, "--overwrite", max_rss_mib=MAIN_MIB)
  assert named.read_bytes() == before
  missing = tmp_path / "no" / "such" / "out.npz"
  result = _main(reference_run[0], "--mode=embed", f"--images={folder}",
                 f"--out={missing}")
  commands.assert_refused(result, tmp_path / "no" / "such", "does not exist",
                         max_rss_mib=MAIN_MIB)
  assert "Embedded" not in result.output  # refused before the work


def test_skip_bad_lists_each_bad_image_once(reference_run, tmp_path):
  folder = _faces(tmp_path / "faces", count=5)
  (folder / "garbage.jpg").write_bytes(b"not an image")
  (folder / "x.jpg").mkdir()  # a folder with an image's name
  (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
  result = _main(reference_run[0], "--mode=embed", f"--images={folder}",
                 f"--out={tmp_path / 'a.npz'}")
  commands.assert_refused(result, "--skip_bad", max_rss_mib=MAIN_MIB)
  result = _main(reference_run[0], "--mode=embed", f"--images={folder}",
                 f"--out={tmp_path / 'b.npz'}", "--skip_bad")
  assert result.returncode == 0, result.output
  assert "3 left out" in result.output
  for name in ("garbage.jpg", "loop.jpg", "x.jpg"):  # each named, with why
    assert f"  left out {name}: " in result.output
  saved = np.load(tmp_path / "b.npz")
  assert sorted(saved["skipped"]) == ["garbage.jpg", "loop.jpg", "x.jpg"]
  assert all(saved["skipped_reasons"])
  assert len(saved["paths"]) == 5


def test_compare_names_the_image_without_suggesting_skip_bad(reference_run,
                                                             tmp_path):
  good = _faces(tmp_path / "faces", count=1) / "face0.jpg"
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  result = _main(reference_run[0], "--mode=compare", f"--images={good},{bad}")
  commands.assert_refused(result, bad, max_rss_mib=MAIN_MIB)
  assert "--skip_bad" not in result.output


def test_prepare_refuses_an_identity_linked_to_the_set(tmp_path):
  src = tmp_path / "src"
  _faces(src / "alice")
  (src / "loop").symlink_to(src)
  result = _prepare("--format=image_folder", f"--src={src}",
                    f"--data_dir={tmp_path / 'tfds'}", "--name=mine")
  commands.assert_refused(result, src / "loop", "holds the whole set",
                         max_rss_mib=MAIN_MIB)


def _export(workdir, out, *extra):
  return commands.run(*["qgjt_jax.export", f"--workdir={workdir}",
                               "--format=stablehlo", f"--out={out}", *extra])


def test_export_never_replaces_or_empties_a_file(reference_run, tmp_path,
                                                 monkeypatch):
  from qgjt_jax.interop import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / "model.stablehlo"
  out.write_text("my notes\n")
  result = _export(reference_run[0], out)
  commands.assert_refused(result, out, "--overwrite", max_rss_mib=MAIN_MIB)
  assert out.read_text() == "my notes\n"
  assert _export(reference_run[0], out, "--overwrite").returncode == 0
  exported = out.read_bytes()
  assert exported != b"my notes\n"

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(export, "stablehlo_bytes", interrupted)
  with pytest.raises(KeyboardInterrupt):
    export.export(str(reference_run[0]), "stablehlo", str(out),
                  overwrite=True)
  assert out.read_bytes() == exported  # not emptied
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "model.stablehlo", "model.stablehlo.json"]  # nothing half-written


def test_convert_overwrite_leaves_a_coherent_workdir(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  src = hostile.views(tmp_path, "r18.pth")
  result = _convert(src, workdir)
  commands.assert_refused(result, workdir, "--overwrite",
                         max_rss_mib=CONVERT_MIB)
  assert (workdir / "config.json").exists()
  result = _convert(src, workdir, "--overwrite")
  assert result.returncode == 0, result.output
  assert not (workdir / "config.json").exists()
  assert not (workdir / "eval").exists()
  assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["0"]
  result = _export(workdir, tmp_path / "r18.stablehlo")
  assert result.returncode == 0, result.output
  assert "r18" in (tmp_path / "r18.stablehlo.json").read_text()


# ---------------------------------------------------------------------------
# Recipes and values: Python run as code (said in the README), but a recipe
# that fails says so in one line, and so does a value that is no number.

_RECIPES = {
    "raises": ("def get_config():\n  raise RuntimeError('boom')\n",
               ["line 2", "RuntimeError", "boom"]),
    "imports what is missing": ("import no_such_module\n",
                                ["line 1", "no_such_module"]),
    "returns an int": ("def get_config():\n  return 5\n",
                       ["returned int", "ConfigDict"]),
    "has no get_config": ("x = 1\n", ["defines no get_config()"]),
}


@pytest.mark.parametrize("case", sorted(_RECIPES))
def test_a_recipe_that_fails(tmp_path, case):
  text, words = _RECIPES[case]
  recipe = tmp_path / "recipe.py"
  recipe.write_text(text)
  result = commands.run(*["qgjt_jax.main", f"--config={recipe}",
                                 f"--workdir={tmp_path / 'run'}"])
  commands.assert_refused(result, recipe, *words, max_rss_mib=MAIN_MIB)


@pytest.mark.parametrize("flag, words", [
    ("--config.optim.milestones=abc", ["config.optim.milestones"]),
    ("--config.num_epochs=nan", ["config.num_epochs=nan", "finite"]),
    ("--config.optim.lr=inf", ["config.optim.lr=inf", "finite"]),
    ("--config.limits.max_image_pixels=-3", ["max_image_pixels=-3"]),
])
def test_values_that_are_no_numbers(tmp_path, flag, words):
  result = commands.run(*["qgjt_jax.main",
                                 "--config=configs/synthetic.py",
                                 f"--workdir={tmp_path / 'run'}", flag])
  commands.assert_refused(result, *words, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_checkpoint_of_another_model_without_its_record(tmp_path):
  """One line, naming the first differing array, not orbax's tracebacks."""
  workdir = tmp_path / "run"
  src = hostile.views(tmp_path, "r18.pth")
  assert _convert(src, workdir).returncode == 0
  (workdir / "converted_from.json").unlink()
  result = commands.run(*["qgjt_jax.main", "--config=configs/ms1m.py",
                                 f"--workdir={workdir}", "--mode=eval"])
  commands.assert_refused(result, workdir / "checkpoints",
                         "holds another model", "--config.model",
                         max_rss_mib=MAIN_MIB)
  assert len(result.output.splitlines()) < 10
