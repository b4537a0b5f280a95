"""Every command's bad input ends in one line that says what to do.

Each case runs the command as a user would (a subprocess) and asserts exit
status 1, that the error is one `ERROR:` line, the last one, with no
traceback, and that it names the file or key.
"""

import shutil

import cv2
import numpy as np
import pytest

from qgjt_jax import checkpoint as ckpt
from qgjt_jax.data import synthetic
from tests.helpers import commands
from tests.helpers import tiny_runs
from tests.helpers.torch_writer import write_torch_file

pytestmark = pytest.mark.slow


def _main(workdir, *extra, **changes):
  return commands.main(*tiny_runs.cli_command(workdir, *extra, **changes)[3:])


# ---------------------------------------------------------------------------
# qgjt_jax.main


def test_a_config_file_that_does_not_exist(tmp_path):
  result = commands.run(
      "qgjt_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path}"
  )
  commands.assert_refused(result, "configs/nope.py", "No such file")


def test_a_config_file_with_a_syntax_error(tmp_path):
  recipe = tmp_path / "recipe.py"
  recipe.write_text("def get_config(:\n  pass\n")
  result = commands.run(
      "qgjt_jax.main", f"--config={recipe}", f"--workdir={tmp_path / 'run'}"
  )
  commands.assert_refused(result, recipe, "line 1")


@pytest.mark.parametrize(
    "flag, named",
    [
        ("--config.x=abc", "--config.x"),
        ("--config.global_batch_size=0", "config.global_batch_size=0"),
        ("--config.data.kind=rec", "config.data.rec_dir"),
    ],
)
def test_bad_config_values(tmp_path, flag, named):
  result = commands.run(
      "qgjt_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={tmp_path}",
      flag,
  )
  commands.assert_refused(result, named)


def test_a_rec_without_its_idx(tmp_path, insightface_rec_dir):
  rec = tmp_path / "faces"
  rec.mkdir()
  for name in ("train.rec", "property"):
    shutil.copy(insightface_rec_dir / name, rec / name)
  result = _main(
      tmp_path / "run", **{"data.kind": "rec", "data.rec_dir": str(rec)}
  )
  commands.assert_refused(result, rec / "train.idx")


def test_eval_mode_on_an_empty_workdir(tmp_path):
  result = _main(tmp_path, "--mode=eval")
  commands.assert_refused(result, tmp_path / "checkpoints")


def test_a_read_only_workdir(tmp_path):
  with commands.small_disk(tmp_path / "ro", "ro,size=1m") as ro:
    result = _main(ro / "run")
  commands.assert_refused(result, ro / "run", "Read-only")


def test_a_full_disk_keeps_the_last_complete_checkpoint(tmp_path):
  """Room for one checkpoint (about 3 MiB) but not two."""
  with commands.small_disk(tmp_path / "small", "size=5m") as small:
    result = _main(small / "run", **{"checkpoint_every_steps": 4})
    commands.assert_refused(result, small / "run" / "checkpoints", "free")
    manager = ckpt.make_manager(str(small / "run" / "checkpoints"))
    assert manager.all_steps() == [4]
    template = tiny_runs.load_state(small / "run", 4)
    assert int(template["step"]) == 4  # the latest step restores
    manager.close()


def test_a_failed_background_write_is_a_checkpoint_error(tmp_path):
  manager = ckpt.make_manager(str(tmp_path))
  with pytest.raises(ckpt.CheckpointError, match="no space left"):
    with ckpt._disk_full_is_checkpoint_error(manager, 8):
      raise ValueError(
          "RESOURCE_EXHAUSTED: Failed to write 5 bytes: No "
          "space left on device [os_error_code='28']"
      )
  with pytest.raises(ValueError, match="unrelated"):
    with ckpt._disk_full_is_checkpoint_error(manager, 8):
      raise ValueError("unrelated")
  manager.close()


# ---------------------------------------------------------------------------
# qgjt_jax.data.prepare


def _folder(root, broken=None):
  person = root / "person"
  person.mkdir(parents=True)
  for view in range(2):
    cv2.imwrite(
        str(person / f"{view}.jpg"), synthetic.render_photo(0, 0, view, 48)
    )
  if broken:
    data = (person / "0.jpg").read_bytes()
    (person / broken).write_bytes(data[: len(data) // 3])
  return root


@pytest.mark.parametrize("case", ["truncated", "empty", "not_images"])
def test_prepare_on_bad_folders(tmp_path, case):
  src = tmp_path / "src"
  if case == "truncated":
    _folder(src, broken="cut.jpg")
    named = [src / "person" / "cut.jpg", "--skip_bad"]
  elif case == "empty":
    src.mkdir()
    named = [src, "is empty"]
  else:
    (src / "person").mkdir(parents=True)
    (src / "person" / "notes.txt").write_text("no faces here")
    named = [src / "person" / "notes.txt", "--skip_bad"]
  result = commands.run(
      "qgjt_jax.data.prepare",
      "--format=image_folder",
      f"--src={src}",
      f"--data_dir={tmp_path / 'tfds'}",
      "--name=mine",
  )
  commands.assert_refused(result, *named)
  if case == "not_images":  # skipping them all leaves nothing
    result = commands.run(
        "qgjt_jax.data.prepare",
        "--format=image_folder",
        f"--src={src}",
        f"--data_dir={tmp_path / 'tfds'}",
        "--name=mine",
        "--skip_bad",
    )
    commands.assert_refused(result, src, "none of the 1 files")


# ---------------------------------------------------------------------------
# qgjt_jax.convert, qgjt_jax.bench, qgjt_jax.data.bench, qgjt_jax.launch_local


def test_convert_on_files_that_are_no_model(tmp_path):
  text = tmp_path / "garbage.pth"
  text.write_text("not a checkpoint\n")
  commands.assert_refused(
      commands.run(
          "qgjt_jax.convert", f"--src={text}", f"--workdir={tmp_path / 'a'}"
      ),
      text,
      "is not a PyTorch checkpoint",
  )
  commands.assert_refused(
      commands.run(
          "qgjt_jax.convert",
          f"--src={tmp_path / 'no.pth'}",
          f"--workdir={tmp_path / 'b'}",
      ),
      tmp_path / "no.pth",
  )
  other = tmp_path / "resnet.pth"  # tensors, but no backbone's
  write_torch_file(other, {"layer.weight": np.zeros((2, 2), np.float32)})
  commands.assert_refused(
      commands.run(
          "qgjt_jax.convert", f"--src={other}", f"--workdir={tmp_path / 'c'}"
      ),
      other,
      "no backbone found",
  )
  pickled = tmp_path / "objects.pth"  # anything but tensors
  write_torch_file(
      pickled,
      {"weight": np.zeros(2, np.float32), "hook": collections_counter()},
  )
  commands.assert_refused(
      commands.run(
          "qgjt_jax.convert", f"--src={pickled}", f"--workdir={tmp_path / 'd'}"
      ),
      pickled,
      "collections.Counter",
  )


def collections_counter():
  import collections  # pylint: disable=g-import-not-at-top

  return collections.Counter("ab")


def test_the_other_commands(tmp_path):
  commands.assert_refused(
      commands.run("qgjt_jax.bench", "--config.model.name=resnet50"),
      "config.model.name='resnet50'",
  )
  commands.assert_refused(
      commands.run(
          "qgjt_jax.data.bench",
          f"--rec={tmp_path / 'nope'}",
          "--synthetic_images=0",
      ),
      tmp_path / "nope",
  )
  commands.assert_refused(
      commands.run(
          "qgjt_jax.launch_local", "--", "--config=configs/synthetic.py"
      ),
      "--workdir",
  )
