"""Files from strangers and careless hands: never run, never read out of
bounds, never a traceback, never an unbounded allocation, nothing lost.

Every case is a file the test makes (tests/helpers/hostile.py), handed to the
command a user would run. Each asserts exit status 1 (not 0, not a crash
signal), one `ERROR:` line naming the file, no traceback, that no payload
ran (its marker file is absent) and the child's peak memory. Every command
here runs under a 6 GiB cap on its address space, as a shared machine would
hold it.
"""

import csv
import functools
import json
import os
import pathlib
import pickle
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
# Every command: a 6 GiB address space, and done within 3 minutes (a hang
# or a crawl is a failure, not a wait).
_run = functools.partial(commands.run, address_space_gib=6, timeout=180)


def _convert(src, workdir, *extra):
  return _run(
      *["qgjt_jax.convert", f"--src={src}", f"--workdir={workdir}", *extra]
  )


# ---------------------------------------------------------------------------
# PyTorch checkpoints (convert; init_from reads them the same way).

_TORCH_CASES = {
    # name: (maker(folder, marker), words the ERROR line must hold)
    "legacy header runs code": (hostile.legacy_code_header, "posix.system"),
    "legacy code, then the magic number": (
        hostile.legacy_code_then_magic,
        "posix.system",
    ),
    "storage cut to 8 bytes": (
        lambda f, m: hostile.storage_cut_short(f),
        "reaches past its storage",
    ),
    "size past the storage": (
        lambda f, m: hostile.views(
            f,
            "size.pth",
            big=torch_writer.TensorView(
                np.zeros(4, np.float32), 0, (1 << 40,), (1,)
            ),
        ),
        "reaches past its storage",
    ),
    "stride past the storage": (
        lambda f, m: hostile.views(
            f,
            "stride.pth",
            big=torch_writer.TensorView(
                np.zeros(4, np.float32), 0, (2, 2), (1 << 40, 1)
            ),
        ),
        "reaches past its storage",
    ),
    "offset past the storage": (
        lambda f, m: hostile.views(
            f,
            "offset.pth",
            big=torch_writer.TensorView(
                np.zeros(4, np.float32), 1 << 62, (1,), (1,)
            ),
        ),
        "reaches past its storage",
    ),
    "negative stride": (
        lambda f, m: hostile.views(
            f,
            "negative.pth",
            big=torch_writer.TensorView(
                np.zeros(4, np.float32), 3, (4,), (-1,)
            ),
        ),
        "non-negative integers",
    ),
    "offset not a number": (
        lambda f, m: hostile.views(
            f,
            "text_offset.pth",
            big=torch_writer.TensorView(
                np.zeros(4, np.float32), "abc", (1,), (1,)
            ),
        ),
        "non-negative integers",
    ),
    "stride-0 view of one element": (
        lambda f, m: hostile.views(
            f,
            "stride0.pth",
            big=torch_writer.TensorView(
                np.zeros(1, np.float32), 0, (1 << 16, 1 << 16), (0, 0)
            ),
        ),
        "reaches past its storage",
    ),
    "deflated member of 1 GiB": (
        lambda f, m: hostile.deflate_bomb(f),
        "max_inflation",
    ),
    "legacy storage count 2**62": (
        lambda f, m: hostile.legacy_storage_count(f, 1 << 62),
        "cut short",
    ),
    "legacy storage count negative": (
        lambda f, m: hostile.legacy_storage_count(f, -5),
        "cut short",
    ),
    "memo index 2**28": (lambda f, m: hostile.memo_bomb(f), "memo.pth"),
    "nesting 100000 deep": (
        lambda f, m: hostile.deep_nesting(f),
        "max_pickle_depth",
    ),
    "OrderedDict(5)": (lambda f, m: hostile.odd_call(f), "calls OrderedDict"),
    "NaN weights": (lambda f, m: hostile.nan_weights(f), "NaN"),
    ".npz declaring 4 TiB": (
        lambda f, m: hostile.lying_npz(f),
        "declares an array",
    ),
    "safetensors header of 2**62 bytes": (
        lambda f, m: hostile.safetensors_file(
            f, "long.safetensors", {}, header_length=1 << 62
        ),
        "as safetensors",
    ),
    "safetensors tensor of 4 TiB over 16 bytes": (
        lambda f, m: hostile.safetensors_file(
            f,
            "vast.safetensors",
            {
                "w": {
                    "dtype": "F32",
                    "shape": [1 << 40],
                    "data_offsets": [0, 4 << 40],
                }
            },
            b"\0" * 16,
        ),
        "as safetensors",
    ),
    "safetensors tensors overlapping": (
        lambda f, m: hostile.safetensors_file(
            f,
            "overlap.safetensors",
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
        ),
        "as safetensors",
    ),
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
  result = _run(
      *tiny_runs.cli_command(tmp_path / "run", f"--config.init_from={src}")[2:]
  )
  commands.assert_refused(
      result, "config.init_from", src, "posix.system", max_rss_mib=MAIN_MIB
  )
  assert not marker.exists()


def test_a_trusted_large_file_passes_with_a_raised_limit(tmp_path):
  """The limits are a default, not a wall: a flag raises them."""
  src = hostile.views(tmp_path, "ok.pth")  # the valid r18
  result = _convert(src, tmp_path / "a", "--max_tensor_bytes=100")
  commands.assert_refused(
      result, src, "max_tensor_bytes", max_rss_mib=CONVERT_MIB
  )
  result = _convert(src, tmp_path / "b")
  assert result.returncode == 0, result.output


# ---------------------------------------------------------------------------
# Images and sets: decoded only after their declared size is checked.


def _main(workdir, *extra, timeout=180, **changes):
  return _run(
      *tiny_runs.cli_command(workdir, *extra, **changes)[2:], timeout=timeout
  )


def _faces(folder: pathlib.Path, count: int = 3) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    (folder / f"face{i}.jpg").write_bytes(hostile.face_jpeg(seed=i))
  return folder


@pytest.mark.parametrize(
    "side, words, align",
    [
        (20000, "max_image_pixels", "none"),
        (50000, "max_image_pixels", "none"),
        (50000, "max_image_pixels", "detect"),
    ],
)
def test_embed_refuses_an_image_declaring_vast_size(
    reference_run, tmp_path, side, words, align
):
  if align == "detect":
    pytest.importorskip("dlib")
  folder = _faces(tmp_path / "faces")
  bomb = hostile.png_bomb(folder / "bomb.png", side)
  assert bomb.stat().st_size < 400_000  # a few hundred KB for gigabytes
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={tmp_path / 'out.npz'}",
      f"--align={align}",
  )
  commands.assert_refused(result, bomb, words, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64, "not UTF-8 text"),
        (b"a.jpg" + b",1e308" * 9 + b",inf\n", "must be finite"),
    ],
)
def test_a_hostile_landmarks_file(reference_run, tmp_path, content, words):
  folder = _faces(tmp_path / "faces")
  table = _write(tmp_path / "points.csv", content)
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={tmp_path / 'out.npz'}",
      f"--landmarks={table}",
  )
  commands.assert_refused(result, table, words, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "out.npz").exists()


def _bins(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Broken verification sets, by what is wrong with them."""
  folder.mkdir(parents=True, exist_ok=True)
  face = hostile.face_jpeg()
  good = hostile.bin_set(folder / "good.bin", [face] * 4, [True, False])
  data = good.read_bytes()
  return {
      "pair count": hostile.bin_set(
          folder / "pairs.bin", [face] * 3, [True, False]
      ),
      "garbage": _write(
          folder / "garbage.bin", b"\x80\x02" + bytes(range(256)) * 4
      ),
      "truncated": _write(folder / "truncated.bin", data[: len(data) // 2]),
      "code": _write(
          folder / "code.bin",
          hostile._code_pickle(  # pylint: disable=protected-access
              folder / "payload_ran"
          )
          + b"N.",
      ),
      "memo": _write(
          folder / "memo.bin",
          b"\x80\x02Nr" + (1 << 28).to_bytes(4, "little") + b".",
      ),
  }


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
  path.write_bytes(data)
  return path


@pytest.mark.parametrize(
    "case", ["pair count", "garbage", "truncated", "code", "memo"]
)
def test_a_broken_bin_set_stops_evaluation_and_training_at_once(
    reference_run, tmp_path, case
):
  path = _bins(tmp_path / "sets")[case]
  result = _main(
      reference_run[0], "--mode=eval", f"--config.eval.bin_sets=('{path}',)"
  )
  commands.assert_refused(result, path, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "sets" / "payload_ran").exists()
  if case == "truncated":  # before training, not after it
    result = _main(tmp_path / "run", f"--config.eval.bin_sets=('{path}',)")
    commands.assert_refused(result, path, max_rss_mib=MAIN_MIB)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bin_set_with_a_vast_image(reference_run, tmp_path):
  bomb = hostile.png_bomb(tmp_path / "bomb.png", 20000).read_bytes()
  path = hostile.bin_set(
      tmp_path / "bomb.bin", [hostile.face_jpeg(), bomb] * 2, [True, False]
  )
  result = _main(
      reference_run[0], "--mode=eval", f"--config.eval.bin_sets=('{path}',)"
  )
  commands.assert_refused(
      result, path, "image 1", "max_image_pixels", max_rss_mib=MAIN_MIB
  )


def _prepare(*args):
  return _run(*["qgjt_jax.data.prepare", *args])


def _rec(folder: pathlib.Path, images, labels=None) -> pathlib.Path:
  from qgjt_jax.tools import pipeline_bench  # pylint: disable=g-import-not-at-top

  labels = labels or [i % 2 for i in range(len(images))]
  pipeline_bench.write_insightface_rec(folder, images, labels, 32)
  return folder


def test_a_rec_set_with_a_vast_image(tmp_path):
  bomb = hostile.png_bomb(tmp_path / "bomb.png", 20000).read_bytes()
  src = _rec(
      tmp_path / "src", [hostile.face_jpeg(seed=i) for i in range(3)] + [bomb]
  )
  result = _prepare(
      "--format=insightface_rec",
      f"--src={src}",
      f"--data_dir={tmp_path / 'tfds'}",
      "--name=mine",
  )
  commands.assert_refused(
      result, src / "train.rec", "max_image_pixels", max_rss_mib=MAIN_MIB
  )


def test_training_from_a_rec_with_a_vast_image(tmp_path):
  """In the grain workers of a training run, the same refusal."""
  bomb = hostile.png_bomb(tmp_path / "bomb.png", 20000).read_bytes()
  src = _rec(tmp_path / "src", [bomb] * 16)
  result = _main(
      tmp_path / "run",
      **{"data.kind": "rec", "data.rec_dir": str(src), "data.worker_count": 1},
  )
  commands.assert_refused(
      result, src / "train.rec", "max_image_pixels", max_rss_mib=MAIN_MIB
  )


def test_an_image_folder_with_a_vast_image(tmp_path):
  src = tmp_path / "src"
  _faces(src / "alice")
  bomb = hostile.png_bomb(src / "alice" / "bomb.png", 20000)
  result = _prepare(
      "--format=image_folder",
      f"--src={src}",
      f"--data_dir={tmp_path / 'tfds'}",
      "--name=mine",
  )
  commands.assert_refused(
      result, bomb, "max_image_pixels", "--skip_bad", max_rss_mib=MAIN_MIB
  )


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
    records = [
        (0, test_recordio.pack([float("nan"), 3.0], b"", 0)),
        (1, test_recordio.pack(0, hostile.face_jpeg(), 1)),
    ]
    test_recordio.write_rec(src, records, "1,32,32")
    named = [rec, "record 0", "nan"]
  result = _prepare(
      "--format=insightface_rec",
      f"--src={src}",
      f"--data_dir={tmp_path / 'tfds'}",
      "--name=mine",
  )
  commands.assert_refused(result, *named, max_rss_mib=MAIN_MIB)


# ---------------------------------------------------------------------------
# One writer per workdir; outputs complete, never replaced unasked.


def test_two_runs_on_one_workdir(tmp_path):
  """Started together: one trains to the end, the other stops at once in
  one line naming the first; checkpoints and metrics are whole."""
  import subprocess  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  command = tiny_runs.cli_command(workdir)
  procs = [
      subprocess.Popen(
          command,
          cwd=tiny_runs.ROOT,
          text=True,
          env=tiny_runs.subprocess_env(),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
      )
      for _ in range(2)
  ]
  results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
  codes = sorted(code for _, _, code in results)
  assert codes == [0, 1], [r[1][-2000:] for r in results]
  out, err, _ = next(r for r in results if r[2] == 1)
  errors = [l for l in (out + err).splitlines() if l.startswith("ERROR")]
  assert len(errors) == 1 and "Traceback" not in out + err, err[-2000:]
  assert "is in use by another run" in errors[0] and "pid" in errors[0]
  steps = [
      json.loads(l)["step"]
      for l in (workdir / "metrics.jsonl").read_text().splitlines()
      if '"loss"' in l
  ]
  assert steps == sorted(set(steps)) and steps[-1] == tiny_runs.STEPS
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
      str(s) for s in sorted(range(8, tiny_runs.STEPS + 1, 8), key=str)
  ]
  assert not list(workdir.rglob("*orbax-checkpoint-tmp*"))
  assert not (workdir / "run.lock").exists()


def test_embed_output_is_that_file_checked_first(reference_run, tmp_path):
  folder = _faces(tmp_path / "faces")
  named = tmp_path / "keep.txt"
  result = _main(
      reference_run[0], "--mode=embed", f"--images={folder}", f"--out={named}"
  )
  assert result.returncode == 0, result.output
  assert str(named) in result.stdout and named.exists()
  assert not (tmp_path / "keep.txt.npz").exists()
  assert sorted(np.load(named)["paths"]) == [
      "face0.jpg",
      "face1.jpg",
      "face2.jpg",
  ]
  before = named.read_bytes()
  again = _main(
      reference_run[0], "--mode=embed", f"--images={folder}", f"--out={named}"
  )
  commands.assert_refused(again, named, "--overwrite", max_rss_mib=MAIN_MIB)
  assert named.read_bytes() == before
  missing = tmp_path / "no" / "such" / "out.npz"
  result = _main(
      reference_run[0], "--mode=embed", f"--images={folder}", f"--out={missing}"
  )
  commands.assert_refused(
      result, tmp_path / "no" / "such", "does not exist", max_rss_mib=MAIN_MIB
  )
  assert "Embedded" not in result.output  # refused before the work


def test_skip_bad_lists_each_bad_image_once(reference_run, tmp_path):
  folder = _faces(tmp_path / "faces", count=5)
  (folder / "garbage.jpg").write_bytes(b"not an image")
  (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
  (folder / "all").symlink_to("/")  # a linked folder: named, not walked
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={tmp_path / 'a.npz'}",
  )
  commands.assert_refused(result, "--skip_bad", max_rss_mib=MAIN_MIB)
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={tmp_path / 'b.npz'}",
      "--skip_bad",
  )
  assert result.returncode == 0, result.output
  assert "2 left out" in result.output
  for name in ("garbage.jpg", "loop.jpg"):  # each named, with why
    assert f"  left out {name}: " in result.output
  assert "1 linked folder(s) inside not followed" in result.output
  saved = np.load(tmp_path / "b.npz")
  assert sorted(saved["skipped"]) == ["garbage.jpg", "loop.jpg"]
  assert all(saved["skipped_reasons"])
  assert len(saved["paths"]) == 5


def test_compare_names_the_image_without_suggesting_skip_bad(
    reference_run, tmp_path
):
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
  result = _prepare(
      "--format=image_folder",
      f"--src={src}",
      f"--data_dir={tmp_path / 'tfds'}",
      "--name=mine",
  )
  commands.assert_refused(
      result, src / "loop", "holds the whole set", max_rss_mib=MAIN_MIB
  )


def _export(workdir, out, *extra):
  return _run(
      *[
          "qgjt_jax.export",
          f"--workdir={workdir}",
          "--format=stablehlo",
          f"--out={out}",
          *extra,
      ]
  )


def test_export_never_replaces_or_empties_a_file(
    reference_run, tmp_path, monkeypatch
):
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
    export.export(str(reference_run[0]), "stablehlo", str(out), overwrite=True)
  assert out.read_bytes() == exported  # not emptied
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "model.stablehlo",
      "model.stablehlo.json",
  ]  # nothing half-written


def test_convert_overwrite_leaves_a_coherent_workdir(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  src = hostile.views(tmp_path, "r18.pth")
  result = _convert(src, workdir)
  commands.assert_refused(
      result, workdir, "--overwrite", max_rss_mib=CONVERT_MIB
  )
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
    "raises": (
        "def get_config():\n  raise RuntimeError('boom')\n",
        ["line 2", "RuntimeError", "boom"],
    ),
    "imports what is missing": (
        "import no_such_module\n",
        ["line 1", "no_such_module"],
    ),
    "returns an int": (
        "def get_config():\n  return 5\n",
        ["returned int", "ConfigDict"],
    ),
    "has no get_config": ("x = 1\n", ["defines no get_config()"]),
}


@pytest.mark.parametrize("case", sorted(_RECIPES))
def test_a_recipe_that_fails(tmp_path, case):
  text, words = _RECIPES[case]
  recipe = tmp_path / "recipe.py"
  recipe.write_text(text)
  result = _run(
      *["qgjt_jax.main", f"--config={recipe}", f"--workdir={tmp_path / 'run'}"]
  )
  commands.assert_refused(result, recipe, *words, max_rss_mib=MAIN_MIB)


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--config.optim.milestones=abc", ["config.optim.milestones"]),
        ("--config.num_epochs=nan", ["config.num_epochs=nan", "finite"]),
        ("--config.optim.lr=inf", ["config.optim.lr=inf", "finite"]),
        ("--config.limits.max_image_pixels=-3", ["max_image_pixels=-3"]),
    ],
)
def test_values_that_are_no_numbers(tmp_path, flag, words):
  result = _run(
      *[
          "qgjt_jax.main",
          "--config=configs/synthetic.py",
          f"--workdir={tmp_path / 'run'}",
          flag,
      ]
  )
  commands.assert_refused(result, *words, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_checkpoint_of_another_model_without_its_record(tmp_path):
  """One line, naming the first differing array, not orbax's tracebacks."""
  workdir = tmp_path / "run"
  src = hostile.views(tmp_path, "r18.pth")
  assert _convert(src, workdir).returncode == 0
  (workdir / "converted_from.json").unlink()
  result = _run(
      *[
          "qgjt_jax.main",
          "--config=configs/ms1m.py",
          f"--workdir={workdir}",
          "--mode=eval",
      ]
  )
  commands.assert_refused(
      result,
      workdir / "checkpoints",
      "holds another model",
      "--config.model",
      max_rss_mib=MAIN_MIB,
  )
  assert len(result.output.splitlines()) < 10


# ---------------------------------------------------------------------------
# Second round: a few bytes that take the machine, crash or hang a reader,
# or give a silent wrong face. Each ends within seconds: exit 0 with a
# correct result, or one ERROR line naming the file, within a memory cap.

_PICKLES = {
    # name: (pickle program, words the ERROR line of a .pth must hold)
    "lists sharing lists, 2**40 leaves": (
        hostile.shared_lists(40),
        "not a state dict",
    ),
    "BYTEARRAY8 of 4 GiB in 12 bytes": (hostile.bytearray8(), "BYTEARRAY8"),
    "a dict keyed by a tuple 300,000 deep": (
        hostile.deep_tuple_key(),
        "max_pickle_depth",
    ),
}
_SECONDS = 120  # a hang is a failure, not a wait


def _legacy(folder: pathlib.Path, program: bytes) -> pathlib.Path:
  """torch < 1.6's layout: the magic number, protocol and system pickles,
  `program` as the object, then its (empty) list of storages."""
  header = b"".join(
      pickle.dumps(v, protocol=2)
      for v in (hostile.LEGACY_MAGIC, 1001, {"little_endian": True})
  )
  return _write(
      folder / "legacy.pth", header + program + pickle.dumps([], protocol=2)
  )


@pytest.mark.parametrize("layout", ["zip", "legacy", "bin"])
@pytest.mark.parametrize("case", sorted(_PICKLES))
def test_pickles_that_ask_for_the_machine(
    reference_run, tmp_path, case, layout
):
  program, words = _PICKLES[case]
  if layout == "zip":
    src = hostile.zip_with_pickle(tmp_path, "model.pth", program)
  elif layout == "legacy":
    src = _legacy(tmp_path, program)
  if layout != "bin":
    result = _convert(src, tmp_path / "run")
    commands.assert_refused(result, src, words, max_rss_mib=CONVERT_MIB)
    return
  path = _write(tmp_path / "set.bin", program)
  result = _main(
      reference_run[0],
      "--mode=eval",
      f"--config.eval.bin_sets=('{path}',)",
      timeout=_SECONDS,
  )
  commands.assert_refused(result, path, max_rss_mib=MAIN_MIB)


def test_a_bin_set_holds_bytes_lists_and_booleans_only(reference_run, tmp_path):
  path = _write(tmp_path / "array.bin", hostile.numpy_object_array())
  result = _main(
      reference_run[0], "--mode=eval", f"--config.eval.bin_sets=('{path}',)"
  )
  commands.assert_refused(result, path, "numpy.ndarray", max_rss_mib=MAIN_MIB)


@pytest.mark.parametrize("npz", [False, True], ids=["pth", "npz"])
def test_many_small_members_inflating_to_gigabytes(tmp_path, npz):
  src = hostile.many_small_members(
      tmp_path, "w.npz" if npz else "w.pth", npz=npz
  )
  assert src.stat().st_size < 4 << 20  # 1.5 GiB of zeros in a few MB
  result = _convert(src, tmp_path / "run")
  commands.assert_refused(result, src, "max_inflation", max_rss_mib=CONVERT_MIB)


def test_fifos_are_refused_not_waited_on(reference_run, tmp_path):
  """A named pipe where a file belongs: an image in a folder (with and
  without --skip_bad), an evaluation folder's image, a pairs file, a
  landmarks file, a .bin set, a checkpoint."""
  run = reference_run[0]
  folder = _faces(tmp_path / "faces")
  pipe = hostile.fifo(folder / "pipe.jpg")
  out = tmp_path / "out.npz"
  result = _main(
      run,
      "--mode=embed",
      f"--images={folder}",
      f"--out={out}",
      timeout=_SECONDS,
  )
  commands.assert_refused(result, pipe, "named pipe", max_rss_mib=MAIN_MIB)
  result = _main(
      run,
      "--mode=embed",
      f"--images={folder}",
      f"--out={out}",
      "--skip_bad",
      timeout=_SECONDS,
  )
  assert result.returncode == 0, result.output
  assert "left out pipe.jpg: " in result.output and "named pipe" in (
      result.output
  )
  people = tmp_path / "people"
  for person in ("ann", "bob"):
    _faces(people / person)
  hostile.fifo(people / "bob" / "pipe.jpg")
  pairs = hostile.fifo(tmp_path / "pairs.txt")
  table = hostile.fifo(tmp_path / "points.csv")
  bin_set = hostile.fifo(tmp_path / "set.bin")
  for flags, named in (
      ([f"--config.eval.folders=('{people}',)"], people / "bob" / "pipe.jpg"),
      ([f"--config.eval.pairs_files=('{pairs}',)"], pairs),
      ([f"--config.eval.bin_sets=('{bin_set}',)"], bin_set),
  ):
    result = _main(run, "--mode=eval", *flags, timeout=_SECONDS)
    commands.assert_refused(result, named, max_rss_mib=MAIN_MIB)
  result = _main(
      run,
      "--mode=embed",
      f"--images={tmp_path / 'people'}",
      f"--out={tmp_path / 'new.npz'}",
      f"--landmarks={table}",
      timeout=_SECONDS,
  )
  commands.assert_refused(result, table, "named pipe", max_rss_mib=MAIN_MIB)
  result = _convert(hostile.fifo(tmp_path / "model.pth"), tmp_path / "w")
  commands.assert_refused(
      result, "model.pth", "named pipe", max_rss_mib=CONVERT_MIB
  )


def test_a_class_count_no_rec_could_back(tmp_path):
  """A 17-byte property declaring 2e9 classes, for 4 images."""
  src = _rec(tmp_path / "src", [hostile.face_jpeg(seed=i) for i in range(4)])
  (src / "property").write_text("2000000000,32,32")
  result = _main(
      tmp_path / "run",
      "--config.data.kind=rec",
      f"--config.data.rec_dir={src}",
      timeout=_SECONDS,
  )
  commands.assert_refused(
      result, src / "property", "2000000000 classes", max_rss_mib=MAIN_MIB
  )
  assert not (tmp_path / "run" / "checkpoints").exists()


_PAIRS_FILES = {
    "a bad label": (b"a.jpg b.jpg 2\n", ":1: expected"),
    "four columns": (b"a.jpg b.jpg c.jpg 1\n", ":1: expected"),
    "binary content": (bytes(range(256)) * 8, "not UTF-8"),
    "one label only": (b"a.jpg b.jpg 1\nc.jpg d.jpg 1\n", "needs both"),
    "a path that is no text": (b"\xff\xfe.jpg b.jpg 1\n", "not UTF-8"),
    "a NUL in a path": (
        b"a\x00.jpg b.jpg 1\nc.jpg d.jpg 0\n",
        "control characters",
    ),
    "an image that is not there": (b"a.jpg b.jpg 1\nc.jpg d.jpg 0\n", "a.jpg"),
}


@pytest.mark.parametrize("case", sorted(_PAIRS_FILES))
def test_a_bad_pairs_file_stops_a_run_before_training(tmp_path, case):
  content, words = _PAIRS_FILES[case]
  path = _write(tmp_path / "pairs.txt", content)
  result = _main(tmp_path / "run", f"--config.eval.pairs_files=('{path}',)")
  commands.assert_refused(result, "pairs.txt", words, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", ["one person", "an empty image"])
def test_a_bad_evaluation_folder_stops_a_run_before_training(tmp_path, case):
  people = tmp_path / "people"
  _faces(people / "ann")
  if case == "an empty image":
    _faces(people / "bob")
    _write(people / "bob" / "empty.jpg", b"")
  result = _main(tmp_path / "run", f"--config.eval.folders=('{people}',)")
  commands.assert_refused(result, people, max_rss_mib=MAIN_MIB)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_big_pairs_file_costs_a_bounded_multiple_of_itself(tmp_path):
  """20 MB of pairs (900,000 lines, every path unique): read within the
  cap, then refused at its first missing image."""
  with open(tmp_path / "pairs.txt", "w") as f:
    for i in range(900_000):
      f.write(f"p{i}.jpg q{i}.jpg {i % 2}\n")
  assert (tmp_path / "pairs.txt").stat().st_size > 20_000_000
  result = _main(
      tmp_path / "run",
      f"--config.eval.pairs_files=('{tmp_path / 'pairs.txt'}',)",
      timeout=_SECONDS,
  )
  commands.assert_refused(result, "p0.jpg", max_rss_mib=MAIN_MIB)


@pytest.mark.parametrize(
    "case, changes, words",
    [
        ("a scalar stem", {"input_layer.0.weight": np.float32(1)}, "stem"),
        (
            "a 1-D head",
            {"output_layer.3.weight": np.ones(8, np.float32)},
            "embedding size, inputs",
        ),
        (
            "width 0",
            {"input_layer.0.weight": np.ones((0, 3, 3, 3), np.float32)},
            "stem",
        ),
        (
            "a 100 x 100 head map",
            {
                "output_layer.3.weight": np.ones(
                    (8, 256 * 100 * 100), np.float32
                )
            },
            "square feature map",
        ),
    ],
)
def test_weights_of_odd_shapes(tmp_path, case, changes, words):
  del case
  src = hostile.odd_npz(tmp_path, "odd.npz", **changes)
  result = _convert(src, tmp_path / "run")
  commands.assert_refused(result, src, words, max_rss_mib=CONVERT_MIB)


def test_a_safetensors_size_that_is_no_number_is_ignored(tmp_path):
  from safetensors import numpy as safe_numpy  # pylint: disable=g-import-not-at-top

  state = {
      k: np.asarray(v, np.float32) for k, v in hostile._adaface_state().items()
  }  # pylint: disable=protected-access
  src = tmp_path / "model.safetensors"
  src.write_bytes(safe_numpy.save(state, metadata={"qgjt_jax.image_size": "²"}))
  result = _convert(src, tmp_path / "run")
  assert result.returncode == 0, result.output
  assert "input size      32 x 32" in result.output  # read from the tensors


@pytest.mark.parametrize(
    "row, words",
    [
        ("face0.jpg" + ",x" * 10 + "," + "9" * 200_000, "not a CSV row"),
        ("face\x000.jpg" + ",10" * 10, "control characters"),
    ],
)
def test_a_landmarks_row_that_is_no_row(reference_run, tmp_path, row, words):
  folder = _faces(tmp_path / "faces")
  table = _write(tmp_path / "points.csv", row.encode() + b"\n")
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={tmp_path / 'out.npz'}",
      f"--landmarks={table}",
  )
  commands.assert_refused(result, table, words, max_rss_mib=MAIN_MIB)


@pytest.mark.parametrize(
    "points, words",
    [
        ("1e300," * 9 + "1e300", "five points"),
        ("5,5," * 4 + "5,5", "eyes are 0.0 px apart"),
        ("-500,10,-480,10,-490,20,-495,25,-485,25", "outside"),
    ],
)
def test_landmarks_that_are_no_face_are_never_embedded(
    reference_run, tmp_path, points, words
):
  folder = _faces(tmp_path / "faces", count=2)
  table = _write(
      tmp_path / "points.csv",
      f"face0.jpg,{points}\nface1.jpg,"
      "10,13,22,13,16,19,11,25,21,25\n".encode(),
  )
  table.write_text(
      table.read_text()
      .replace("face0.jpg", str(folder / "face0.jpg"))
      .replace("face1.jpg", str(folder / "face1.jpg"))
  )
  out = tmp_path / "out.npz"
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={out}",
      f"--landmarks={table}",
  )
  commands.assert_refused(result, "face0.jpg", words, max_rss_mib=MAIN_MIB)
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={out}",
      f"--landmarks={table}",
      "--skip_bad",
  )
  assert result.returncode == 0, result.output
  assert "left out face0.jpg: " in result.output
  assert list(np.load(out)["paths"]) == ["face1.jpg"]


def test_a_landmarks_file_of_many_faces_for_one_photo(reference_run, tmp_path):
  folder = _faces(tmp_path / "faces", count=1)
  row = f"{folder / 'face0.jpg'},10,13,22,13,16,19,11,25,21,25\n"
  table = _write(tmp_path / "points.csv", (row * 400_000).encode())
  assert table.stat().st_size > 20_000_000
  result = _main(
      reference_run[0],
      "--mode=embed",
      f"--images={folder}",
      f"--out={tmp_path / 'out.npz'}",
      f"--landmarks={table}",
      "--all_faces",
      timeout=_SECONDS,
  )
  commands.assert_refused(
      result, table, "over 1000 faces", max_rss_mib=MAIN_MIB
  )


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--far=0", "--far=0"),
        ("--far=nan", "--far=nan"),
        ("--far=-1", "--far=-1"),
        ("--threshold=nan", "--threshold=nan"),
        (
            "--config.limits.max_image_file_bytes=9223372036854775807",
            "max_image_file_bytes",
        ),
    ],
)
def test_numbers_out_of_range(reference_run, tmp_path, flag, words):
  folder = _faces(tmp_path / "faces", count=2)
  result = _main(
      reference_run[0],
      "--mode=compare",
      f"--images={folder / 'face0.jpg'},{folder / 'face1.jpg'}",
      flag,
  )
  commands.assert_refused(result, words, max_rss_mib=MAIN_MIB)


def _identify(run, gallery, probes, out, *extra):
  return _main(
      run,
      "--mode=identify",
      f"--gallery={gallery}",
      f"--images={probes}",
      f"--out={out}",
      "--threshold=0.5",
      *extra,
  )


def test_identify_writes_names_a_spreadsheet_shows_and_does_not_run(
    reference_run, tmp_path
):
  gallery, probes = tmp_path / "gallery", tmp_path / "probes"
  _faces(gallery / '=HYPERLINK("http:"&A1)', count=2)
  _faces(gallery / "bob", count=2)
  # After a space and in full width, a spreadsheet still reads a formula;
  # a terminal obeys ESC ] ... BEL (it retitles the window).
  for name in (" =1+1", "\uff1dSUM(A1)", "\x1b]0;owned\x07eve"):
    _faces(gallery / name, count=2)
  _faces(probes, count=1)
  odd = probes / os.fsdecode(b"\xff\xfeprobe.jpg")
  odd.write_bytes(hostile.face_jpeg(seed=7))
  out = tmp_path / "who.csv"
  result = _identify(reference_run[0], gallery, probes, out)
  assert result.returncode == 0, result.output
  rows = list(csv.reader(out.open(encoding="utf-8")))
  cells = [c for row in rows[1:] for c in row]
  assert not any(c[:1] in "=+-@" for c in cells if c), cells
  assert '\'=HYPERLINK("http:"&A1)' in cells
  assert "' =1+1" in cells and "'\uff1dSUM(A1)" in cells
  assert any(c.startswith("\\xff\\xfe") for c in cells)  # escaped, named
  assert "\\x1b]0;owned\\x07eve" in cells
  assert not any(c in "\x1b\x07" for c in out.read_text() + result.output)


def test_identify_with_a_gallery_of_only_bad_photos(reference_run, tmp_path):
  gallery = tmp_path / "gallery"
  _write(
      (gallery / "ann").mkdir(parents=True) or gallery / "ann" / "x.jpg",
      b"not an image",
  )
  probes = _faces(tmp_path / "probes", count=1)
  result = _identify(
      reference_run[0], gallery, probes, tmp_path / "who.csv", "--skip_bad"
  )
  commands.assert_refused(result, "--gallery", "x.jpg", max_rss_mib=MAIN_MIB)


def test_a_full_disk_leaves_neither_half_of_a_stablehlo_export(
    reference_run, tmp_path
):
  """The model and its sidecar land together or not at all; an old pair
  stays whole; the message names the file."""
  with commands.small_disk(tmp_path / "small", "size=64k") as small:
    out = small / "model.stablehlo"
    result = _export(reference_run[0], out)
    commands.assert_refused(result, out, "No space left", max_rss_mib=MAIN_MIB)
    assert sorted(p.name for p in small.iterdir()) == []
    (small / "model.stablehlo").write_bytes(b"old model")
    (small / "model.stablehlo.json").write_text("old sidecar")
    result = _export(reference_run[0], out, "--overwrite")
    commands.assert_refused(result, max_rss_mib=MAIN_MIB)
    assert (small / "model.stablehlo").read_bytes() == b"old model"
    assert (small / "model.stablehlo.json").read_text() == "old sidecar"
    assert sorted(p.name for p in small.iterdir()) == [
        "model.stablehlo",
        "model.stablehlo.json",
    ]


@pytest.mark.parametrize("folder", ["eval", "checkpoints"])
def test_writes_never_go_through_a_workdir_link(
    reference_run, tmp_path, folder
):
  """A downloaded workdir whose eval (or checkpoints) folder is a link:
  evaluation (or training on) refuses, naming it, and nothing lands where
  the link points."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  if folder == "eval":
    shutil.rmtree(workdir / "eval", ignore_errors=True)
    (workdir / "eval").symlink_to(elsewhere)
    result = _main(workdir, "--mode=eval")
  else:
    shutil.move(workdir / "checkpoints", elsewhere / "checkpoints")
    (workdir / "checkpoints").symlink_to(elsewhere / "checkpoints")
    before = sorted(p.name for p in (elsewhere / "checkpoints").iterdir())
    result = _main(workdir, num_epochs=2.0)
  commands.assert_refused(
      result, workdir / folder, "is a link", max_rss_mib=MAIN_MIB
  )
  if folder == "eval":
    assert list(elsewhere.iterdir()) == []
  else:
    assert (
        sorted(p.name for p in (elsewhere / "checkpoints").iterdir()) == before
    )


def _tampered_workdir(reference_run, tmp_path, record) -> pathlib.Path:
  """A downloaded workdir whose stored evaluation was edited: a
  calibration set holding `record`'s rows."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  result = workdir / "eval" / f"step_{tiny_runs.STEPS}.json"
  stored = json.loads(result.read_text())
  stored["calibration_people"] = record
  result.write_text(json.dumps(stored))
  return workdir


_SCORING = "flip-fused n1 e1 + n2 e2"


@pytest.mark.parametrize(
    "row, words",
    [
        # A threshold of -1 "at FAR 1e-6, 0 of 1,000,000,000 impostor pairs":
        # anyone would be the same person. 30 photos make 435 pairs.
        (
            {
                "far": 1e-6,
                "cosine": -1.0,
                "accepted": 0,
                "impostors": 10**9,
                "tar": 1.0,
                "genuine": 100,
            },
            ["impostors", "1,000,000,000"],
        ),
        (
            {
                "far": 1e-6,
                "cosine": float("nan"),
                "accepted": 0,
                "impostors": 400,
                "tar": 1.0,
            },
            ["cosine", "nan"],
        ),
        (
            {"far": 1e-6, "cosine": 0.5, "accepted": "0", "impostors": 400},
            ["accepted", "'0'"],
        ),
    ],
    ids=["everyone", "nan", "string"],
)
def test_stored_thresholds_that_do_not_add_up_decide_and_export_nothing(
    reference_run, tmp_path, row, words
):
  workdir = _tampered_workdir(
      reference_run,
      tmp_path,
      {
          "thresholds": [row],
          "impostor_pairs": 400,
          "num_images": 30,
          "num_people": 3,
          "provenance": {
              "kind": "calibration",
              "scoring": _SCORING,
              "step": tiny_runs.STEPS,
          },
      },
  )
  folder = _faces(tmp_path / "faces", count=2)
  result = _main(
      workdir,
      "--mode=compare",
      f"--images={folder / 'face0.jpg'},{folder / 'face1.jpg'}",
      "--far=1e-6",
  )
  commands.assert_refused(
      result, "calibration_people.thresholds[0].", *words, max_rss_mib=MAIN_MIB
  )
  assert "same person" not in result.output
  exported = _run(
      "qgjt_jax.export",
      f"--workdir={workdir}",
      "--format=safetensors",
      f"--out={tmp_path / 'm.safetensors'}",
  )
  commands.assert_refused(
      exported, "calibration_people", *words, max_rss_mib=MAIN_MIB
  )
  assert not (tmp_path / "m.safetensors").exists()


def test_a_deeply_nested_stored_evaluation_is_one_line(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  (workdir / "eval" / f"step_{tiny_runs.STEPS}.json").write_text(
      "[" * 200_000 + "]" * 200_000
  )
  folder = _faces(tmp_path / "faces", count=2)
  result = _main(
      workdir,
      "--mode=compare",
      f"--images={folder / 'face0.jpg'},{folder / 'face1.jpg'}",
  )
  commands.assert_refused(
      result, "not a readable evaluation result", max_rss_mib=MAIN_MIB
  )
