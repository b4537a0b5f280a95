"""Folders of people: the one reader of `root/<person>/<photos>`.

Training (`data.prepare --format=image_folder`), evaluation
(`config.eval.folders`, `calibration_folders`) and `--mode=identify`
(`--gallery`) read such folders here, by one set of rules:

* a person is a visible sub-folder of the root, named by its folder;
* every visible file below a person's folder (at any depth) is one of that
  person's images, so a file that is not a readable image is named when it
  is read (or left out, named, where the command takes --skip_bad), never
  dropped unseen;
* a person's folder may itself be a link, but a linked folder below it is
  not followed (it could lead into another person's photos, upward, or
  across the whole file system): it is left out and named;
* an image file directly in the root belongs to nobody and is refused,
  named; other files there (a README) are ignored, and said to be;
* hidden files and folders (".DS_Store") are ignored;
* two person folders that are one folder (links), or one inside another or
  holding the root, are refused: their images would get two names;
* people are sorted by name (numerically when every name is a number, as
  in insightface's sets), and each person's files by path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib

import numpy as np

from qgjt_jax import errors
from qgjt_jax import reporting
from qgjt_jax.files import images
from qgjt_jax.files import regular


class FolderError(errors.UserError, ValueError):
  """A folder of people that cannot be read as one (the message names it)."""


@dataclasses.dataclass(frozen=True)
class People:
  """The images of a folder of people."""

  root: pathlib.Path
  names: list[str]  # the people, in label order
  paths: list[pathlib.Path]  # every image, grouped by person
  labels: np.ndarray  # (len(paths),) the person index of each

  def person(self, i: int) -> str:
    return self.names[int(self.labels[i])]


def _visible(path: pathlib.Path) -> bool:
  return not path.name.startswith(".")


def read(root: str | os.PathLike, what: str, *, min_people: int = 1) -> People:
  """The people of `root` by the module's rules; `what` names the flag or
  config key in messages.

  Raises:
    FolderError: not a folder, an image outside every person's folder,
      folders that are one another, fewer than `min_people` with files.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FolderError(
        f"{what}={root} is not a folder of people (one "
        "sub-folder of photos per person)"
    )
  entries = sorted(root.iterdir())
  loose = [p for p in entries if _visible(p) and not p.is_dir()]
  stray = [p for p in loose if p.suffix.lower() in images.IMAGE_EXTENSIONS]
  if stray:
    raise FolderError(
        f"{what}={root}: {stray[0].name} is not in a person's folder: one "
        "sub-folder per person (PERSON/photo.jpg); move it into one, or out"
    )
  if loose:
    reporting.note(
        f"{root}: {len(loose)} file(s) outside the person folders "
        f"ignored ({', '.join(p.name for p in loose[:3])}"
        f"{', ...' if len(loose) > 3 else ''})."
    )
  folders = [p for p in entries if _visible(p) and p.is_dir()]
  if all(p.name.isdigit() for p in folders):
    folders.sort(key=lambda p: (int(p.name), p.name))
  _check_distinct(root, folders)
  names, paths, labels, empty, links = [], [], [], [], []
  for folder in folders:
    found, linked = images.files_below(folder)
    links += linked
    if not found:
      empty.append(folder.name)
      continue
    labels += [len(names)] * len(found)
    names.append(folder.name)
    paths += found
  if empty:
    reporting.note(
        f"{root}: {len(empty)} person folder(s) without files "
        f"left out ({', '.join(empty[:3])}"
        f"{', ...' if len(empty) > 3 else ''})."
    )
  if links:
    reporting.note(
        f"{root}: {len(links)} linked folder(s) inside person "
        "folders not followed, their photos left out ("
        + images.described_links(root, links)
        + ")."
    )
  if len(names) < min_people:
    raise FolderError(
        f"{what}={root} holds {len(names)} person folder(s) with files; "
        f"this needs at least {min_people} (one sub-folder per person)"
    )
  return People(root, names, paths, np.asarray(labels, np.int64))


def _check_distinct(root: pathlib.Path, folders: list[pathlib.Path]) -> None:
  """No person folder is (through links) the root, an ancestor of it, the
  same folder as another person's, or inside another person's."""
  real_root = os.path.realpath(root)
  owner = {}
  for folder in folders:
    real = os.path.realpath(folder)
    if real_root == real or real_root.startswith(real.rstrip(os.sep) + os.sep):
      raise FolderError(
          f"{folder} links to {real}, which holds the whole "
          "set: its images would be added again under another "
          "name; remove the link"
      )
    if real in owner:
      raise FolderError(
          f"{folder} and {owner[real]} are the same folder "
          f"({real}): its images would get two names; remove "
          "one of them"
      )
    owner[real] = folder
  for real, folder in owner.items():
    parent = os.path.dirname(real)
    while parent and parent != os.path.dirname(parent):
      if parent in owner:
        raise FolderError(
            f"{folder} is inside person folder {owner[parent]} "
            f"({real}): its images would get two names; remove "
            "the link"
        )
      parent = os.path.dirname(parent)


def identical_files(paths) -> list[list[int]]:
  """Groups (of two or more indices into `paths`) of files whose bytes are
  the same: one photo saved under two names, which a folder of people
  would count as two photos (or, in two people's folders, as an impostor
  pair at cosine 1). Only files of equal size are read, in chunks."""
  by_size: dict[int, list[int]] = {}
  for i, path in enumerate(paths):
    by_size.setdefault(os.stat(path).st_size, []).append(i)
  groups = []
  for same_size in by_size.values():
    if len(same_size) < 2:
      continue
    by_digest: dict[bytes, list[int]] = {}
    for i in same_size:
      digest = hashlib.sha256()
      with regular.open_regular(paths[i]) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      by_digest.setdefault(digest.digest(), []).append(i)
    groups += [g for g in by_digest.values() if len(g) > 1]
  return sorted(groups)
