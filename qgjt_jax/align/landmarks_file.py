"""Five points per photo from a CSV file, written by any detector.

One row per face:

  path,left_eye_x,left_eye_y,right_eye_x,right_eye_y,nose_x,nose_y,
  mouth_left_x,mouth_left_y,mouth_right_x,mouth_right_y

in pixels of the photo, "left" being the image's left. A relative path is
relative to the CSV file's folder. A photo with several rows has several
faces. A first row whose coordinates are not numbers is a header. The file
is read with bounds (size, row length) and every value is checked, so a
damaged or hostile file ends in one line naming its row.
"""
from __future__ import annotations

import csv
import io
import math
import os
import pathlib

import numpy as np

from qgjt_jax import errors

MAX_FILE_BYTES = 1 << 30  # ~10 million rows; far more than any gallery
_FIELDS = 11


class LandmarksFileError(errors.UserError, ValueError):
  """A landmarks file that cannot be used (the message names file and row)."""


def _row_points(row: list[str], where: str) -> np.ndarray | None:
  """(5, 2) points of a row, or None for a header row."""
  try:
    values = [float(v) for v in row[1:]]
  except ValueError:
    return None
  if not all(math.isfinite(v) for v in values):
    raise LandmarksFileError(f"{where}: coordinates must be finite numbers, "
                             f"got {','.join(row[1:])}")
  return np.asarray(values, np.float64).reshape(5, 2)


def read_landmarks(path: str | os.PathLike
                   ) -> dict[pathlib.Path, list[np.ndarray]]:
  """{resolved photo path: [(5, 2) points per face]} from a CSV file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise LandmarksFileError(f"--landmarks={path}: no such file")
  size = path.stat().st_size
  if size > MAX_FILE_BYTES:
    raise LandmarksFileError(
        f"--landmarks={path}: {size:,} bytes, over the {MAX_FILE_BYTES:,} a "
        "landmarks file may hold: split it")
  try:
    text = path.read_bytes().decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise LandmarksFileError(f"{path}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start}): write the CSV as text") from None
  faces: dict[pathlib.Path, list[np.ndarray]] = {}
  reader = csv.reader(io.StringIO(text))
  for line, row in enumerate(reader, start=1):
    if not row or not "".join(row).strip():
      continue
    where = f"{path}:{line}"
    if len(row) != _FIELDS:
      raise LandmarksFileError(
          f"{where}: {len(row)} fields; a row is the image path and the x,y "
          "of five points (11 fields)")
    points = _row_points(row, where)
    if points is None:
      if line == 1 or not faces:
        continue  # a header
      raise LandmarksFileError(f"{where}: coordinates that are not numbers: "
                               f"{','.join(row[1:])[:200]}")
    photo = pathlib.Path(row[0].strip())
    if not photo.is_absolute():
      photo = path.parent / photo
    faces.setdefault(resolved(photo), []).append(points)
  if not faces:
    raise LandmarksFileError(f"--landmarks={path}: no rows of five points")
  return faces


def resolved(path: str | os.PathLike) -> pathlib.Path:
  """The key a photo is looked up by (links and `..` resolved)."""
  return pathlib.Path(os.path.realpath(path))
