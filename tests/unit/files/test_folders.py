"""One reader of folders of people, one rule, for every use."""

import os

import pytest

from qgjt_jax.files import folders


def _person(root, name, *files):
  (root / name).mkdir(parents=True, exist_ok=True)
  for f in files:
    (root / name / f).write_bytes(b"x")


def test_people_their_files_and_what_is_left_out(tmp_path, capsys):
  _person(tmp_path, "bob", "1.jpg", "notes.txt", ".hidden")
  _person(tmp_path, "ann", "2.png")
  (tmp_path / "ann" / "sub").mkdir()
  (tmp_path / "ann" / "sub" / "3.jpg").write_bytes(b"x")
  _person(tmp_path, "empty")
  (tmp_path / "README").write_text("about these people")
  people = folders.read(tmp_path, "--gallery")
  assert people.names == ["ann", "bob"]
  assert [p.relative_to(tmp_path).as_posix() for p in people.paths] == [
      "ann/2.png",
      "ann/sub/3.jpg",
      "bob/1.jpg",
      "bob/notes.txt",
  ]
  assert people.labels.tolist() == [0, 0, 1, 1]
  assert people.person(3) == "bob"
  printed = capsys.readouterr().out
  assert "1 file(s) outside the person folders ignored (README)" in printed
  assert "1 person folder(s) without files left out (empty)" in printed


def test_numbered_people_sort_as_numbers(tmp_path):
  for name in ("10", "9", "100"):
    _person(tmp_path, name, "a.jpg")
  assert folders.read(tmp_path, "x").names == ["9", "10", "100"]


def test_an_image_outside_every_person_is_refused(tmp_path):
  _person(tmp_path, "ann", "1.jpg")
  (tmp_path / "stray.JPG").write_bytes(b"x")
  with pytest.raises(
      folders.FolderError, match="stray.JPG is not in a person's folder"
  ):
    folders.read(tmp_path, "--gallery")


def test_folders_that_are_one_another_are_refused(tmp_path):
  _person(tmp_path, "ann", "1.jpg")
  os.symlink(tmp_path / "ann", tmp_path / "anna")
  with pytest.raises(folders.FolderError, match="are the same folder"):
    folders.read(tmp_path, "x")
  os.remove(tmp_path / "anna")
  os.symlink(tmp_path, tmp_path / "all")
  with pytest.raises(folders.FolderError, match="holds the whole set"):
    folders.read(tmp_path, "x")


def test_too_few_people_or_not_a_folder(tmp_path):
  _person(tmp_path, "ann", "1.jpg")
  with pytest.raises(folders.FolderError, match="at least 2"):
    folders.read(tmp_path, "config.eval.folders", min_people=2)
  with pytest.raises(folders.FolderError, match="is not a folder"):
    folders.read(tmp_path / "ann" / "1.jpg", "--gallery")


def test_links_inside_a_person_are_named_never_followed(tmp_path, capsys):
  """alice/more -> ../bob would enrol bob's photos as alice's; alice/up ->
  .. the whole set again; alice/root -> / the whole file system. A person
  folder that is itself a link is that person's."""
  _person(tmp_path / "set", "alice", "1.jpg")
  _person(tmp_path / "set", "bob", "2.jpg")
  _person(tmp_path / "elsewhere", "carol", "3.jpg")
  os.symlink(tmp_path / "elsewhere" / "carol", tmp_path / "set" / "carol")
  alice = tmp_path / "set" / "alice"
  os.symlink("../bob", alice / "more")
  os.symlink("..", alice / "up")
  os.symlink("/", alice / "root")
  (alice / "real").mkdir()
  (alice / "real" / "4.jpg").write_bytes(b"x")
  people = folders.read(tmp_path / "set", "--gallery")
  assert people.names == ["alice", "bob", "carol"]
  assert [p.relative_to(tmp_path / "set").as_posix() for p in people.paths] == [
      "alice/1.jpg",
      "alice/real/4.jpg",
      "bob/2.jpg",
      "carol/3.jpg",
  ]
  printed = capsys.readouterr().out
  assert (
      "3 linked folder(s) inside person folders not followed, their "
      "photos left out (alice/more -> ../bob, alice/root -> /, "
      "alice/up -> ..)"
  ) in printed
