"""Five points per photo from a CSV file, written by any detector.

One row per face:

  path,left_eye_x,left_eye_y,right_eye_x,right_eye_y,nose_x,nose_y,
  mouth_left_x,mouth_left_y,mouth_right_x,mouth_right_y

in pixels of the photo, "left" being the image's left. A relative path is
relative to the CSV file's folder. A photo with several rows has several
faces (at most MAX_FACES_PER_PHOTO). A first row whose coordinates are not
numbers is a header. The file is read with bounds (size, field length) and
every value is checked, so a damaged or hostile file ends in one line naming
its row; memory stays a small multiple of the file (each face's points as
ten float32 numbers). Whether the points are a face of their photo is
checked when the photo is read (`five_points.check_face`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import pathlib

import numpy as np

from qgjt_jax import errors
from qgjt_jax.files import regular

MAX_FILE_BYTES = 256 << 20  # ~2.5 million rows; far more than any gallery
MAX_FACES_PER_PHOTO = 1000  # a crowd, not a face recognition photo, beyond
_FIELDS = 11
_MAX_FIELD = 4096  # characters: a path, or a number


class LandmarksFileError(errors.UserError, ValueError):
  """A landmarks file that cannot be used (the message names file and row)."""


def _row_points(row: list[str], where: str) -> np.ndarray | None:
  """(5, 2) points of a row, or None for a header row."""
  try:
    values = [float(v) for v in row[1:]]
  except ValueError:
    return None
  if not all(math.isfinite(v) for v in values):
    raise LandmarksFileError(
        f"{where}: coordinates must be finite numbers, "
        f"got {','.join(row[1:])}"
    )
  return np.asarray(values, np.float32).reshape(5, 2)


def read_landmarks(
    path: str | os.PathLike,
) -> dict[pathlib.Path, list[np.ndarray]]:
  """{resolved photo path: [(5, 2) points per face]} from a CSV file."""
  path = pathlib.Path(path)
  if not os.path.lexists(path):
    raise LandmarksFileError(f"--landmarks={path}: no such file")
  text = regular.read_text(
      path,
      MAX_FILE_BYTES,
      "a landmarks file",
      LandmarksFileError,
      "--landmarks=",
  )
  faces: dict[pathlib.Path, list[np.ndarray]] = {}
  reader = csv.reader(io.StringIO(text))
  line = 0
  while True:
    try:
      row = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      raise LandmarksFileError(
          f"{path}:{reader.line_num}: not a CSV row ({e})"
      ) from None
    line = reader.line_num
    if not row or not "".join(row).strip():
      continue
    where = f"{path}:{line}"
    if max(map(len, row)) > _MAX_FIELD or not row[0].isprintable():
      raise LandmarksFileError(
          f"{where}: a field over {_MAX_FIELD} "
          "characters, or a path with control "
          "characters"
      )
    if len(row) != _FIELDS:
      raise LandmarksFileError(
          f"{where}: {len(row)} fields; a row is the image path and the x,y "
          "of five points (11 fields)"
      )
    points = _row_points(row, where)
    if points is None:
      if line == 1 or not faces:
        continue  # a header
      raise LandmarksFileError(
          f"{where}: coordinates that are not numbers: "
          f"{','.join(row[1:])[:200]}"
      )
    photo = pathlib.Path(row[0].strip())
    if not photo.is_absolute():
      photo = path.parent / photo
    listed = faces.setdefault(resolved(photo), [])
    if len(listed) >= MAX_FACES_PER_PHOTO:
      raise LandmarksFileError(
          f"{where}: over {MAX_FACES_PER_PHOTO} faces "
          f"for {row[0].strip()[:200]}"
      )
    listed.append(points)
  if not faces:
    raise LandmarksFileError(f"--landmarks={path}: no rows of five points")
  return faces


def resolved(path: str | os.PathLike) -> pathlib.Path:
  """The key a photo is looked up by (links and `..` resolved)."""
  return pathlib.Path(os.path.realpath(path))
