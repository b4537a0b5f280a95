"""Threaded image loading: order, bounded prefetch, resizing, errors."""

import threading
import os

import cv2
import numpy as np
import pytest

from qgjt_jax.files import images


def test_load_in_chunks_keeps_order_and_bounds_prefetch():
  lock = threading.Lock()
  loaded = []

  def load(i):
    with lock:
      loaded.append(i)
    return np.full((2, 2, 3), i, np.uint8)

  chunks = images.load_in_chunks(load, range(17), chunk_size=3, num_threads=2)
  first = next(chunks)
  np.testing.assert_array_equal(first[:, 0, 0, 0], [0, 1, 2])
  # At most 2 * num_threads chunks were requested ahead of the consumer.
  assert len(loaded) <= 3 * (2 * 2 + 1)
  rest = list(chunks)
  assert [len(c) for c in rest] == [3, 3, 3, 3, 2]
  values = np.concatenate([first, *rest])[:, 0, 0, 0]
  np.testing.assert_array_equal(values, np.arange(17))


def test_lazy_images_read_only_the_rows_asked_for(tmp_path):
  paths = []
  for i in range(5):
    paths.append(tmp_path / f"{i}.png")
    cv2.imwrite(str(paths[-1]), np.full((10, 10, 3), 40 * i, np.uint8))
  lazy = images.image_files(paths, 4, num_threads=2)
  assert len(lazy) == 5
  (chunk,) = list(lazy.chunks([4, 1, 1], chunk_size=3))
  assert chunk.shape == (3, 4, 4, 3)
  np.testing.assert_array_equal(chunk[:, 0, 0, 0], [160, 40, 40])


def test_read_image_resizes_and_names_bad_files(tmp_path):
  image = np.zeros((20, 30, 3), np.uint8)
  image[..., 2] = 255  # red in BGR
  path = tmp_path / "a.png"
  cv2.imwrite(str(path), image)
  out = images.read_image(path, 112)
  assert out.shape == (112, 112, 3)
  np.testing.assert_array_equal(out[50, 50], [0, 0, 255])
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    images.read_image(tmp_path / "missing.jpg")
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="broken.jpg"):
    images.read_image(tmp_path / "broken.jpg")


def test_list_images_follows_no_link_below_the_folder(tmp_path, capsys):
  """The folder handed, and the folders directly in it (people), may be
  links; deeper links, and one to `/` (it would walk the whole file
  system), are named, never followed."""
  photos = tmp_path / "photos"
  (photos / "day1").mkdir(parents=True)
  for name in ("day1/a.jpg", "b.PNG", "notes.txt", ".hidden.jpg"):
    (photos / name).write_bytes(b"x")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "c.jpg").write_bytes(b"x")
  os.symlink("/", photos / "root")
  os.symlink("../../other", photos / "day1" / "more")
  os.symlink("missing.jpg", photos / "dangling.jpg")
  os.symlink(photos, tmp_path / "handed")
  os.symlink(tmp_path / "other", photos / "carol")
  listed = images.list_images(tmp_path / "handed")
  assert [p.relative_to(tmp_path / "handed").as_posix() for p in listed] == [
      "b.PNG",
      "carol/c.jpg",
      "dangling.jpg",
      "day1/a.jpg",
  ]
  assert (
      "2 linked folder(s) inside not followed, their images left out "
      "(day1/more -> ../../other, root -> /)"
  ) in capsys.readouterr().out
