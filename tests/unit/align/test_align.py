"""From raw photos to aligned crops: the detector on real faces, landmarks
files, and the warp onto the five-point template."""

import csv
import pathlib

import numpy as np
import pytest

from qgjt_jax import errors
from qgjt_jax.align import faces
from qgjt_jax.align import five_points
from qgjt_jax.align import landmarks_file
from qgjt_jax.files import images as images_lib

pytest.importorskip(
    "dlib", reason="the alignment extra: pip install -e '.[align]'"
)


@pytest.fixture(scope="module")
def detector():
  from qgjt_jax.align import detector as detector_lib

  return detector_lib.Detector()


@pytest.fixture(scope="module")
def photos(faces_dir):
  found = sorted(faces_dir.glob("*/*.pgm"))
  assert len(found) == 120, faces_dir
  return found


@pytest.fixture(scope="module")
def detected(photos, detector):
  return {p: detector(images_lib.imread_bgr(p)) for p in photos}


def test_one_face_in_nearly_every_real_photo(detected):
  one = [p for p, found in detected.items() if len(found) == 1]
  assert len(one) >= 0.95 * len(detected), [
      (p.name, len(f)) for p, f in detected.items() if len(f) != 1
  ]
  for found in detected.values():
    for face in found:
      x0, y0, x1, y1 = face.box
      left_eye, right_eye, nose, mouth_left, mouth_right = face.points
      # Sanity of the five points: inside the box, in a face's order.
      assert np.all(
          (face.points >= [x0 - 5, y0 - 5]) & (face.points <= [x1 + 5, y1 + 5])
      )
      assert left_eye[0] < nose[0] < right_eye[0]
      assert mouth_left[0] < mouth_right[0]
      assert (
          max(left_eye[1], right_eye[1])
          < nose[1]
          < min(mouth_left[1], mouth_right[1])
      )


def test_aligned_crops_put_the_eyes_on_the_template(detected, detector):
  """Found again in the 112 px crop, the eyes sit a few pixels from where
  the template puts them (the fit spreads its error over five points)."""
  errors_px = []
  for photo, found in detected.items():
    if not found:
      continue
    crop = five_points.align_face(
        images_lib.imread_bgr(photo), found[0].points, 112
    )
    again = detector(crop)
    assert again, f"no face in the aligned crop of {photo}"
    errors_px += list(
        np.linalg.norm(
            again[0].points[:2] - five_points.TEMPLATE_112[:2], axis=1
        )
    )
  assert np.median(errors_px) < 4.0, np.median(errors_px)
  assert np.percentile(errors_px, 95) < 7.0, np.percentile(errors_px, 95)


def test_a_landmarks_file_gives_the_same_crops(detected, tmp_path):
  """Points written to a CSV by "another detector" (relative paths, a
  header) give the crops the detector gives, pixel for pixel."""
  chosen = list(detected)[::10]
  table = tmp_path / "points.csv"
  with open(table, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
        [
            "path",
            "lex",
            "ley",
            "rex",
            "rey",
            "nx",
            "ny",
            "mlx",
            "mly",
            "mrx",
            "mry",
        ]
    )
    for photo in chosen:
      link = tmp_path / f"{photo.parent.name}_{photo.name}"
      link.symlink_to(photo)
      writer.writerow([link.name] + list(detected[photo][0].points.ravel()))
  from_file = faces.locate(
      [tmp_path / f"{p.parent.name}_{p.name}" for p in chosen],
      faces.Alignment("landmarks", str(table)),
      on_error=_raise,
      show_progress=False,
  )
  from_detector = faces.locate(
      chosen, faces.Alignment("detect"), on_error=_raise, show_progress=False
  )
  assert len(from_file) == len(from_detector) == len(chosen)
  for a, b in zip(from_file, from_detector):
    # The CSV holds the points as text: the same crops to the last bit
    # would need every digit; within one grey level is the same crop.
    crop_a = faces.crop_image(images_lib.imread_bgr(a.path), a, 40)
    crop_b = faces.crop_image(images_lib.imread_bgr(b.path), b, 40)
    assert np.abs(crop_a.astype(int) - crop_b.astype(int)).max() <= 1


def _raise(path, e):
  raise e


def test_photos_without_a_face_or_with_several_are_named(
    tmp_path, photos, capsys
):
  blank = tmp_path / "blank.png"
  import cv2

  cv2.imwrite(str(blank), np.full((120, 100, 3), 128, np.uint8))
  pair = tmp_path / "pair.png"
  face = images_lib.imread_bgr(photos[0])
  cv2.imwrite(str(pair), np.concatenate([face, face[:, ::-1]], axis=1))
  crops = faces.locate(
      [blank, pair],
      faces.Alignment("detect"),
      on_error=_raise,
      show_progress=False,
  )
  out = capsys.readouterr().out
  assert f"{blank}: no face found; left out" in out
  assert f"{pair}: 2 faces; the largest is used (--all_faces" in out
  assert [c.path for c in crops] == [pair]
  every = faces.locate(
      [pair],
      faces.Alignment("detect", all_faces=True),
      on_error=_raise,
      show_progress=False,
  )
  assert [c.index for c in every] == [0, 1]
  assert faces.crop_name(every[1], str) == f"{pair}#1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg,1,2,3\n", ":1: 4 fields; a row is the image path"),
        (
            "path" + ",x" * 10 + "\na.jpg," + ",".join(["1"] * 9) + ",nan\n",
            ":2: coordinates must be finite",
        ),
        (
            "a.jpg,"
            + ",".join(["1"] * 10)
            + "\nb.jpg,"
            + ",".join(["x"] * 10)
            + "\n",
            ":2: coordinates that are not numbers",
        ),
        ("", "no rows of five points"),
        (b"\xff\xfe\x00bad", "not UTF-8 text"),
    ],
    ids=["short_row", "nan", "text_mid_file", "empty", "binary"],
)
def test_a_bad_landmarks_file_is_one_line_naming_the_row(
    tmp_path, text, message
):
  table = tmp_path / "points.csv"
  (table.write_bytes if isinstance(text, bytes) else table.write_text)(text)
  with pytest.raises(landmarks_file.LandmarksFileError, match=message):
    landmarks_file.read_landmarks(table)


def test_landmarks_rows_resolve_against_the_file_and_group_by_photo(tmp_path):
  (tmp_path / "sub").mkdir()
  table = tmp_path / "sub" / "points.csv"
  row = ",".join(str(v) for v in five_points.TEMPLATE_112.ravel())
  table.write_text(f"../a.jpg,{row}\n{tmp_path / 'a.jpg'},{row}\nb.jpg,{row}\n")
  found = landmarks_file.read_landmarks(table)
  assert sorted(found) == sorted(
      [
          pathlib.Path(tmp_path.resolve() / "a.jpg"),
          pathlib.Path(tmp_path.resolve() / "sub" / "b.jpg"),
      ]
  )
  assert len(found[pathlib.Path(tmp_path.resolve() / "a.jpg")]) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (("sideways", None, False), "--align=sideways"),
        (("detect", "p.csv", False), "give one of them"),
        (("none", None, True), "--all_faces needs faces"),
    ],
)
def test_alignment_flags_that_contradict_are_refused(flags, message):
  with pytest.raises(errors.UserError, match=message):
    faces.Alignment.from_flags(*flags)
