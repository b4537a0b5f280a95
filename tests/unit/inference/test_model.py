"""The Python surface: `qgjt_jax.load_model` and `Model.embed` check their
inputs as the commands do, in one line that speaks Python."""

import numpy as np
import pytest

import qgjt_jax
from qgjt_jax.inference import model as model_lib

_S = 32


def _faces(n=2, size=_S, channels=3, dtype=np.uint8, high=256):
  rng = np.random.default_rng(0)
  return rng.integers(0, high, (n, size, size, channels)).astype(dtype)


@pytest.mark.parametrize(
    "images, words",
    [
        (_faces(dtype=np.float32), ["float32", "uint8 0-255", "not guessed"]),
        (_faces(channels=4), ["4 channels", "alpha", "BGR"]),
        (_faces(size=40), ["40 x 40 px", f"{_S} x {_S} px", "aligned"]),
        (_faces()[0], ["images[None] for one face"]),
        (_faces().transpose(0, 3, 1, 2), ["channels last", "transpose"]),
        (_faces(dtype=np.int32) - 10, ["int32", "0-255"]),
        (np.zeros((2, _S, _S, 3), bool), ["bool", "uint8 BGR"]),
        ([_faces(1)[0], _faces(1, size=40)[0]], ["different shapes"]),
        (np.zeros((_S, _S)), ["shape (32, 32)"]),
    ],
    ids=[
        "float",
        "rgba",
        "size",
        "one_face",
        "nchw",
        "negative",
        "bool",
        "ragged",
        "2d",
    ],
)
def test_faces_that_are_refused_say_what_to_pass(images, words):
  with pytest.raises(model_lib.FaceInputError) as raised:
    model_lib.as_faces(images, _S)
  assert isinstance(raised.value, ValueError)
  message = str(raised.value)
  assert "\n" not in message
  for word in words:
    assert word in message, (word, message)


def test_faces_converted_only_where_nothing_is_guessed():
  faces = _faces()
  assert model_lib.as_faces(faces, _S) is faces
  converted = model_lib.as_faces(faces.astype(np.int64), _S)
  assert converted.dtype == np.uint8 and np.array_equal(converted, faces)
  grey = model_lib.as_faces(faces[..., :1], _S)
  assert grey.shape == faces.shape and np.array_equal(
      grey, np.repeat(faces[..., :1], 3, axis=-1)
  )
  listed = model_lib.as_faces(list(faces), _S)
  assert np.array_equal(listed, faces)
  assert np.array_equal(model_lib.as_faces(iter(faces), _S), faces)


def test_load_model_speaks_python(tmp_path):
  missing = tmp_path / "no_such_run"
  with pytest.raises(
      FileNotFoundError,
      match=r"load_model\(.*no_such_run.*" r"no such file or folder",
  ):
    qgjt_jax.load_model(str(missing))
  with pytest.raises(
      FileNotFoundError, match="holds no model record"
  ) as raised:
    qgjt_jax.load_model(str(tmp_path))
  assert "--" not in str(raised.value)  # no command-line flag advised
  assert qgjt_jax.__all__ == ["load_model", "__version__"]


def test_embed_refuses_a_wrong_size_before_the_network(reference_run):
  """A wrong size was Flax's ScopeParamShapeError; integers in range embed
  as their uint8 copy."""
  model = qgjt_jax.load_model(str(reference_run[0]))
  size = model.image_size
  with pytest.raises(model_lib.FaceInputError, match=f"{size} x {size} px"):
    model.embed(_faces(size=size + 8))
  faces = _faces(size=size)
  want = model.embed(faces)
  got = model.embed(faces.astype(np.int32))
  np.testing.assert_array_equal(got[0], want[0])


def test_a_record_from_others_neither_allocates_nor_raises_limits(
    reference_run, tmp_path
):
  """A downloaded workdir's config.json is read like any file from
  others: an eval batch of 2**40 faces is refused by name, raised limits
  are not adopted, and a record that is a device is not read."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from qgjt_jax import base_config  # pylint: disable=g-import-not-at-top
  from qgjt_jax import records  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  record_path = workdir / "config.json"
  record = json.loads(record_path.read_text())
  record["config"]["eval"]["batch_size"] = 2**40
  record["config"]["limits"]["max_image_pixels"] = 10**12
  record_path.write_text(json.dumps(record))
  with pytest.raises(
      ValueError,
      match=r"config.eval.batch_size=1099511627776" r" must be in \[1, 65536\]",
  ):
    qgjt_jax.load_model(str(workdir))
  assert records.recorded_config(str(workdir)).limits.max_image_pixels == (
      base_config.get_base_config().limits.max_image_pixels
  )
  record_path.unlink()
  record_path.symlink_to("/dev/zero")
  with pytest.raises(records.RecordError, match="not a regular file"):
    records.recorded_config(str(workdir))


@pytest.mark.parametrize("damage", ["_METADATA", "d"])
def test_a_damaged_quality_item_leaves_quality_unrated(
    reference_run, tmp_path, capsys, damage
):
  """The norm statistics are optional: a damaged item (JSON, or the
  array data) is said in a warning, and the model still embeds."""
  import shutil  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  step = max(
      int(p.name)
      for p in (workdir / "checkpoints").iterdir()
      if p.name.isdigit()
  )
  item = workdir / "checkpoints" / str(step) / "quality" / damage
  if item.is_dir():
    for path in item.rglob("*"):
      if path.is_file():
        path.write_bytes(b"\0" * 16)
  else:
    item.write_text("{not json")
  model = qgjt_jax.load_model(str(workdir))
  assert model.norm_stats is None
  assert "norm statistics of step" in capsys.readouterr().out
  _, norms = model.embed(_faces(size=model.image_size))
  assert np.isnan(model.quality(norms)).all()
