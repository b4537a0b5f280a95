"""Tests of the TFDS builders, the ArrayRecord source and the prepare command.

TFDS is slow to import and to set up, so each dataset is prepared once per
module and shared. The command-line runs happen in subprocesses where
TensorFlow cannot be imported, which is the promise: preparing needs no TF.
"""

import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
from PIL import Image
import pytest

from qgjt_jax.data import builders
from qgjt_jax.data import prepare
from qgjt_jax.data import sources
from qgjt_jax.data import synthetic
from qgjt_jax.files import images
from tests.helpers import commands
from tests.helpers import tiny_runs

PROJECT_ROOT = tiny_runs.ROOT

# Makes TensorFlow look not installed: no finder returns a spec for it, so
# `import tensorflow` fails and `importlib.util.find_spec` says None.
_HIDE_TF = textwrap.dedent("""
    import importlib.machinery
    import sys

    class _HideTensorFlow:
      def __init__(self, finder):
        self._finder = finder

      def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          return None
        return self._finder.find_spec(name, path, target)

      def invalidate_caches(self):
        self._finder.invalidate_caches()

    sys.meta_path[:] = [_HideTensorFlow(f)
                        if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
    """)


def smooth_image(h, w, seed, channels=3, dtype=np.uint8):
  """A smooth picture (JPEG-friendly) with different content per channel."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, channels)).astype(np.float32)
  big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
  big = big.reshape(h, w, channels)
  top = np.iinfo(dtype).max
  return np.clip(big / 255 * top, 0, top).astype(dtype)


def make_folder(root: pathlib.Path) -> dict:
  """root/<identity>/... with one file of each awkward kind.

  Returns {relative path: expected BGR uint8 112x112 picture or None (bad) or
  "bytes" (a 112x112 JPEG kept as is)}.
  """
  for d in ("2", "7/sub", "10"):
    (root / d).mkdir(parents=True)
  expect = {}
  color = smooth_image(112, 112, 0)  # BGR
  cv2.imwrite(str(root / "2/color.png"), color)
  expect["2/color.png"] = color
  gray = smooth_image(90, 100, 1, channels=1)[..., 0]
  cv2.imwrite(str(root / "2/gray.jpg"), gray)
  gray_back = cv2.imread(str(root / "2/gray.jpg"), cv2.IMREAD_GRAYSCALE)
  gray_big = cv2.resize(gray_back, (112, 112), interpolation=cv2.INTER_CUBIC)
  expect["2/gray.jpg"] = np.repeat(gray_big[..., None], 3, axis=2)
  rgba = smooth_image(64, 64, 2, channels=4)
  rgba[..., 3] = np.linspace(0, 255, 64, dtype=np.uint8)  # varying alpha
  Image.fromarray(rgba, "RGBA").save(root / "7/rgba.png")
  expect["7/rgba.png"] = cv2.resize(
      rgba[..., 2::-1], (112, 112), interpolation=cv2.INTER_CUBIC
  )
  deep = smooth_image(120, 120, 3, dtype=np.uint16)  # BGR, 16 bits
  cv2.imwrite(str(root / "7/deep.png"), deep)
  expect["7/deep.png"] = cv2.resize(
      (deep >> 8).astype(np.uint8), (112, 112), interpolation=cv2.INTER_AREA
  )
  cv2.imwrite(str(root / "7/sub/nested.jpg"), smooth_image(112, 112, 4))
  expect["7/sub/nested.jpg"] = "bytes"
  gif = smooth_image(112, 112, 5)
  Image.fromarray(gif[..., ::-1]).save(root / "10/anim.gif")
  # Palette quantisation changes the picture: expect what Pillow reads back.
  with Image.open(root / "10/anim.gif") as back:
    expect["10/anim.gif"] = np.asarray(back.convert("RGB"))[..., ::-1]
  (root / "10/notes.txt").write_text("not a picture")
  (root / "10/broken.jpg").write_bytes(
      (root / "7/sub/nested.jpg").read_bytes()[:50]
  )
  expect["10/notes.txt"] = expect["10/broken.jpg"] = None
  (root / "10/.DS_Store").write_bytes(b"\0\1")  # hidden: ignored
  (root / "README.txt").write_text("outside any identity: ignored")
  return expect


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("faces")
  return root, make_folder(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def rec_prepared(insightface_rec_dir, data_dir):
  return prepare.prepare(
      "insightface_rec",
      src=str(insightface_rec_dir),
      data_dir=str(data_dir),
      name="fixture_set",
  )


@pytest.fixture(scope="module")
def folder_failed_then_prepared(folder, data_dir):
  """A first run stops at a bad file (like an interrupt); the rerun works."""
  root, _ = folder
  with pytest.raises(builders.BadImageError) as failure:
    prepare.prepare(
        "image_folder", src=str(root), data_dir=str(data_dir), name="faces"
    )
  version_dir = data_dir / "face_image_folder/faces/1.0.0"
  left_behind = version_dir.exists()
  result = prepare.prepare(
      "image_folder",
      src=str(root),
      data_dir=str(data_dir),
      name="faces",
      skip_bad=True,
  )
  return failure.value, left_behind, result


# -- insightface_rec -----------------------------------------------------------


def test_rec_round_trip(rec_prepared, insightface_rec_dir):
  assert not rec_prepared.reused
  assert rec_prepared.name == "insightface_rec/fixture_set"
  assert (rec_prepared.num_images, rec_prepared.num_classes) == (160, 20)
  stored = sources.ArrayRecordSource(rec_prepared.dataset_dir)
  direct = sources.RecSource(insightface_rec_dir)
  assert len(stored) == 160 and stored.num_classes == 20
  assert stored.name == "insightface_rec/fixture_set"
  seen = set()
  for i in range(len(stored)):
    key = int(stored.example(i)["key"])
    record = stored[i]
    assert set(record) == {"image", "label"}
    assert record["label"].dtype == np.int32
    expected = direct[key - 1]  # image keys are 1..160
    assert record["image"] == expected["image"]
    assert record["label"] == expected["label"]
    seen.add(key)
  assert seen == set(range(1, 161))
  assert stored.info.metadata["identity_range_mismatches"] == 0


def test_known_config_checks_counts(insightface_rec_dir, data_dir):
  with pytest.raises(ValueError, match="expects 10572"):
    prepare.prepare(
        "insightface_rec",
        src=str(insightface_rec_dir),
        data_dir=str(data_dir),
        name="casia_webface",
    )
  assert not (data_dir / "insightface_rec/casia_webface/1.0.0").exists()


def test_source_access_paths(rec_prepared, data_dir):
  by_name = sources.open_source(
      "insightface_rec/fixture_set", data_dir=data_dir
  )
  by_dir = sources.open_source(rec_prepared.dataset_dir)
  assert isinstance(by_name, sources.ArrayRecordSource)
  assert by_name.dataset_dir == by_dir.dataset_dir
  batch = by_dir.__getitems__([3, 1, 4])
  assert [b["image"] for b in batch] == [by_dir[i]["image"] for i in (3, 1, 4)]
  clone = pickle.loads(pickle.dumps(by_dir))
  assert clone[7]["image"] == by_dir[7]["image"]
  with pytest.raises(FileNotFoundError, match="no prepared dataset"):
    sources.ArrayRecordSource.from_name(data_dir, "insightface_rec/absent")


def test_train_source_tfds_kind(rec_prepared, data_dir):
  ml_collections = pytest.importorskip("ml_collections")
  config = ml_collections.ConfigDict(
      dict(
          data=dict(
              kind="tfds",
              tfds_name="insightface_rec/fixture_set",
              tfds_data_dir=str(data_dir),
          )
      )
  )
  src = sources.train_source(config)
  assert isinstance(src, sources.ArrayRecordSource)
  assert (len(src), src.num_classes) == (160, 20)


def test_grain_reads_the_sources(rec_prepared, insightface_rec_dir):
  grain = pytest.importorskip("grain")
  for src in (
      sources.RecSource(insightface_rec_dir),
      sources.ArrayRecordSource(rec_prepared.dataset_dir),
  ):
    ds = grain.MapDataset.source(src).map(
        lambda r: (images.decode_image(r["image"]), r["label"])
    )
    image, label = ds[5]
    assert image.shape == (112, 112, 3) and 0 <= label < 20


# -- image folders -------------------------------------------------------------


def test_folder_bad_file_fails_run_and_leaves_nothing(
    folder_failed_then_prepared, folder
):
  error, left_behind, _ = folder_failed_then_prepared
  root, _ = folder
  assert error.path in {str(root / "10/notes.txt"), str(root / "10/broken.jpg")}
  assert error.path in str(error)
  assert not left_behind


def test_folder_round_trip(folder_failed_then_prepared, folder):
  _, _, result = folder_failed_then_prepared
  root, expect = folder
  assert result.num_images == 6 and result.num_classes == 3
  assert result.num_skipped == 2
  src = sources.ArrayRecordSource(result.dataset_dir)
  names = src.info.features["label"].names
  assert names == ["2", "7", "10"]  # numeric identity names sort as numbers
  assert sorted(src.info.metadata["skipped"]) == [
      "10/broken.jpg",
      "10/notes.txt",
  ]
  got = {}
  for i in range(len(src)):
    path = src.example(i)["path"]
    path = path.decode() if isinstance(path, bytes) else path
    got[path] = src[i]
  assert sorted(got) == sorted(p for p, e in expect.items() if e is not None)
  for path, record in got.items():
    assert names[record["label"]] == path.split("/")[0]
    assert record["image"][:3] == b"\xff\xd8\xff"
    image = images.decode_image(record["image"])
    assert image.shape == (112, 112, 3)
    if isinstance(expect[path], str):  # already right: stored unchanged
      assert record["image"] == (root / path).read_bytes()
      continue
    err = np.abs(image.astype(int) - expect[path].astype(int)).mean()
    assert err < 4, (path, err)
  gray = images.decode_image(got["2/gray.jpg"]["image"]).astype(int)
  assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 2


def test_convert_rejects_and_keeps(tmp_path):
  with pytest.raises(builders.BadImageError, match="where.png: not a readable"):
    builders.convert_face_image(b"GIF89a garbage", where="where.png")
  with pytest.raises(builders.BadImageError):
    builders.convert_face_image(b"")
  # A right-sized 3-channel JPEG is kept byte for byte; a PNG is re-encoded.
  ok = cv2.imencode(".jpg", smooth_image(112, 112, 9))[1].tobytes()
  assert builders.convert_face_image(ok) == ok
  png = cv2.imencode(".png", smooth_image(112, 112, 9))[1].tobytes()
  assert builders.convert_face_image(png)[:3] == b"\xff\xd8\xff"


# -- the command line, twice, without TensorFlow -------------------------------


def run_cli(args, hide_dir, timeout=240):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(hide_dir), str(PROJECT_ROOT), env.get("PYTHONPATH", "")]
  )
  return commands.run("qgjt_jax.data.prepare", *args, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def hide_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("no_tf")
  (d / "sitecustomize.py").write_text(_HIDE_TF)
  env = dict(os.environ, PYTHONPATH=str(d))
  probe = subprocess.run(
      [
          sys.executable,
          "-c",
          "import importlib.util as u; "
          "assert u.find_spec('tensorflow') is None; import tensorflow",
      ],
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  assert probe.returncode != 0 and "No module named 'tensorflow'" in (
      probe.stderr
  ), probe.stderr
  return d


def test_cli_twice_without_tensorflow(folder, hide_dir, tmp_path):
  root, _ = folder
  data_dir = tmp_path / "tfds"
  args = [
      "--format=image_folder",
      f"--src={root}",
      f"--data_dir={data_dir}",
      "--name=cli_faces",
      "--skip_bad",
  ]
  # What a killed run leaves behind: it must not get in the way.
  stale = data_dir / "face_image_folder/cli_faces/incomplete.ABC123_1.0.0"
  stale.mkdir(parents=True)
  first = run_cli(args, hide_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  version_dir = data_dir / "face_image_folder/cli_faces/1.0.0"
  assert first.stdout.strip().splitlines()[-1] == (
      f"Prepared face_image_folder/cli_faces in {version_dir}: 6 images, "
      "3 identities, 2 unreadable files skipped"
  )
  assert (
      "face_image_folder/cli_faces: [##############################] "
      "8/8 (100.0%)"
  ) in first.stderr
  assert str(stale) in first.stderr  # named in a warning
  files = {p: p.stat().st_mtime_ns for p in version_dir.iterdir()}

  second = run_cli(args, hide_dir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.strip().splitlines()[-1] == (
      f"Reused face_image_folder/cli_faces in {version_dir}: 6 images, "
      "3 identities, 2 unreadable files skipped"
  )
  assert {p: p.stat().st_mtime_ns for p in version_dir.iterdir()} == files
  assert len(sources.ArrayRecordSource(version_dir)) == 6


def test_cli_insightface_without_tensorflow(
    insightface_rec_dir, hide_dir, tmp_path
):
  result = run_cli(
      [
          "--format=insightface_rec",
          f"--src={insightface_rec_dir}",
          f"--data_dir={tmp_path}",
          "--name=generic",
      ],
      hide_dir,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (
      result.stdout.strip()
      .splitlines()[-1]
      .endswith(": 160 images, 20 identities")
  )
  stored = sources.ArrayRecordSource.from_name(
      tmp_path, "insightface_rec/generic"
  )
  assert len(stored) == 160 and stored.num_classes == 20


def test_photos_are_detected_aligned_and_the_faceless_named(
    faces_dir, hide_dir, tmp_path
):
  """--align=detect: each photo's largest face on the 112 px template, as
  --mode=embed aligns it; a photo without a face is left out and named."""
  from qgjt_jax.align import faces  # pylint: disable=g-import-not-at-top

  src = tmp_path / "photos"
  for person in ("s1", "s2"):
    (src / person).mkdir(parents=True)
    for photo in sorted((faces_dir / person).iterdir())[:3]:
      shutil.copy(photo, src / person / photo.name)
  noise = np.random.default_rng(0).integers(0, 256, (112, 92, 3), np.uint8)
  cv2.imwrite(str(src / "s2" / "wall.png"), noise)
  data_dir = tmp_path / "tfds"
  result = run_cli(
      [
          "--format=image_folder",
          f"--src={src}",
          "--align=detect",
          "--image_size=112",
          f"--data_dir={data_dir}",
          "--name=orl",
      ],
      hide_dir,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1].endswith(
      ": 6 images, 2 identities, 1 photos without a face left out"
  )
  assert "  left out s2/wall.png: no face found; left out" in lines
  stored = sources.ArrayRecordSource.from_name(
      data_dir, "face_image_folder/orl"
  )
  load = faces.photo_loader(112)
  for i in range(len(stored)):
    record = stored.example(i)
    crop = images.decode_image(record["image"])
    want = load(src / record["path"].decode())
    assert crop.shape == (112, 112, 3)
    assert np.abs(crop.astype(int) - want).mean() < 3  # JPEG at 95
  again = run_cli(
      [
          "--format=image_folder",
          f"--src={src}",
          "--image_size=96",
          f"--data_dir={data_dir}",
          "--name=orl",
      ],
      hide_dir,
  )
  assert again.returncode == 1 and "image_size=112" in again.stderr


def test_bad_source_is_reported(tmp_path, data_dir):
  (tmp_path / "property").write_text("2,112,112")
  with pytest.raises(sources.RecordIOError, match=r"train\.rec: cannot open"):
    prepare.prepare(
        "insightface_rec",
        src=str(tmp_path),
        data_dir=str(data_dir),
        name="broken",
    )
  with pytest.raises(ValueError, match="unknown format"):
    prepare.prepare("nope", src=str(tmp_path), data_dir=str(data_dir), name="x")


# -- the generated set ---------------------------------------------------------

TINY = dict(num_identities=3, images_per_identity=4, image_size=24, seed=5)


@pytest.fixture(scope="module")
def synthetic_prepared(data_dir):
  return prepare.prepare(
      "synthetic", data_dir=str(data_dir), name="tiny", **TINY
  )


def test_synthetic_round_trip(synthetic_prepared, data_dir):
  assert not synthetic_prepared.reused
  assert synthetic_prepared.name == "synthetic_faces/tiny"
  assert (synthetic_prepared.num_images, synthetic_prepared.num_classes) == (
      12,
      3,
  )
  stored = sources.ArrayRecordSource.from_name(data_dir, "synthetic_faces/tiny")
  generated = synthetic.SyntheticFaces(3, 4, image_size=24, seed=5)
  assert len(stored) == len(generated) and stored.num_classes == 3
  seen = set()
  for i in range(len(stored)):
    index = int(stored.example(i)["index"])
    record, expected = stored[i], generated[index]
    assert record["image"] == expected["image"], index
    assert record["label"] == expected["label"], index
    assert record["label"].dtype == np.int32
    seen.add(index)
  assert seen == set(range(12))
  assert stored.info.metadata["parameters"] == dict(TINY, nuisance=1.0)
  # The stored JPEGs are the renderer's: another seed gives other bytes.
  other = synthetic.SyntheticFaces(3, 4, image_size=24, seed=6)
  assert other[0]["image"] != generated[0]["image"]


def test_synthetic_rerun_reuses_only_the_same_set(synthetic_prepared, data_dir):
  again = prepare.prepare(
      "synthetic", data_dir=str(data_dir), name="tiny", **TINY
  )
  assert again.reused and again.dataset_dir == synthetic_prepared.dataset_dir
  with pytest.raises(ValueError, match=r"seed=5 \(requested 6\).*--overwrite"):
    prepare.prepare(
        "synthetic", data_dir=str(data_dir), name="tiny", **dict(TINY, seed=6)
    )
  # Defaults stand in for the flags left out; they differ from TINY's too.
  with pytest.raises(ValueError, match="num_identities=3 .requested 1000."):
    prepare.prepare("synthetic", data_dir=str(data_dir), name="tiny")


def test_synthetic_overwrite_regenerates(tmp_path):
  small = dict(num_identities=2, images_per_identity=2, image_size=16)
  first = prepare.prepare(
      "synthetic", data_dir=str(tmp_path), name="s", **small
  )
  second = prepare.prepare(
      "synthetic",
      data_dir=str(tmp_path),
      name="s",
      overwrite=True,
      **dict(small, seed=1),
  )
  assert not second.reused and second.dataset_dir == first.dataset_dir
  stored = sources.ArrayRecordSource(second.dataset_dir)
  generated = synthetic.SyntheticFaces(2, 2, image_size=16, seed=1)
  for i in range(len(stored)):
    assert (
        stored[i]["image"]
        == generated[int(stored.example(i)["index"])]["image"]
    )


def test_synthetic_registered_configs():
  configs = {c.name: c for c in builders.SyntheticFacesBuilder.BUILDER_CONFIGS}
  assert {"demo_40px", "faces_112px"} <= set(configs)
  assert configs["faces_112px"].image_size == 112
  assert builders.synthetic_config("demo_40px") == "demo_40px"
  assert builders.synthetic_config("demo_40px", image_size=40) == "demo_40px"
  with pytest.raises(ValueError, match="num_identities=10 .registered: 64."):
    builders.synthetic_config("demo_40px", num_identities=10)
  with pytest.raises(ValueError, match="must be positive"):
    builders.synthetic_config("empty", num_identities=0)
  custom = builders.synthetic_config("mine", image_size=64)
  assert custom.parameters() == dict(
      num_identities=1000,
      images_per_identity=20,
      image_size=64,
      seed=0,
      nuisance=1.0,
  )


def test_synthetic_demo_config_is_the_demo_set():
  pytest.importorskip("ml_collections")
  sys.path.insert(0, str(PROJECT_ROOT))
  from configs import synthetic as demo  # pylint: disable=g-import-not-at-top

  data = demo.get_config().data
  registered = {
      c.name: c for c in builders.SyntheticFacesBuilder.BUILDER_CONFIGS
  }["demo_40px"]
  assert registered.parameters() == dict(
      num_identities=data.synthetic.num_identities,
      images_per_identity=data.synthetic.images_per_identity,
      image_size=data.image_size,
      seed=data.synthetic.get("seed", 0),
      nuisance=1.0,
  )


def test_generation_flags_belong_to_synthetic(insightface_rec_dir, data_dir):
  with pytest.raises(ValueError, match="--seed is for --format=synthetic"):
    prepare.prepare(
        "insightface_rec",
        src=str(insightface_rec_dir),
        data_dir=str(data_dir),
        name="generic",
        seed=1,
    )
  with pytest.raises(ValueError, match="--src is not used"):
    prepare.prepare(
        "synthetic",
        src=str(insightface_rec_dir),
        data_dir=str(data_dir),
        name="tiny",
    )


def test_cli_synthetic_twice_without_tensorflow(hide_dir, tmp_path):
  args = [
      "--format=synthetic",
      f"--data_dir={tmp_path}",
      "--name=cli_synth",
      "--num_identities=2",
      "--images_per_identity=3",
      "--image_size=16",
  ]
  version_dir = tmp_path / "synthetic_faces/cli_synth/1.0.0"
  first = run_cli(args, hide_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.strip().splitlines()[-1] == (
      f"Prepared synthetic_faces/cli_synth in {version_dir}: 6 images, "
      "2 identities"
  )
  assert (
      "synthetic_faces/cli_synth: [##############################] 6/6 (100.0%)"
      in first.stderr
  )
  second = run_cli(args, hide_dir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.strip().splitlines()[-1] == (
      f"Reused synthetic_faces/cli_synth in {version_dir}: 6 images, "
      "2 identities"
  )
  stored = sources.ArrayRecordSource(version_dir)
  generated = synthetic.SyntheticFaces(2, 3, image_size=16)
  assert sorted(stored[i]["image"] for i in range(6)) == sorted(
      generated[i]["image"] for i in range(6)
  )
