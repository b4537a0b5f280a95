"""Reading evaluation images from disk as uint8 BGR, in threads.

OpenCV decodes in BGR, the channel order the models are trained on, and
releases the GIL while decoding, so a small thread pool keeps a device fed.
"""
from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import dataclasses
import os
import pathlib

import cv2
import numpy as np

from qgjt_jax import limits
from qgjt_jax.data import recordio

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.pgm', '.ppm', '.tif',
                    '.tiff', '.webp')


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes to size x size: area averaging to shrink, bilinear to enlarge."""
  if image.shape[:2] == (size, size):
    return image
  shrink = image.shape[0] > size and image.shape[1] > size
  interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  return cv2.resize(image, (size, size), interpolation=interpolation)


def imread_bgr(path: str | os.PathLike) -> np.ndarray:
  """The image at `path` as uint8 (H, W, 3) BGR; a clear error if unreadable.

  Raises:
    FileNotFoundError, OSError: naming the path (a folder, a dangling link).
    limits.LimitError: the file or the image it declares is too large.
    ValueError: not a decodable image.
  """
  if not os.path.lexists(path):
    raise FileNotFoundError(f'image {path} does not exist')
  data = limits.read_image_file(path)
  try:
    return recordio.decode_image(data, os.fspath(path))
  except recordio.RecordIOError as e:
    raise ValueError(f'cannot decode image {path}') from e


def read_image(path: str | os.PathLike, image_size: int = 112) -> np.ndarray:
  """uint8 (image_size, image_size, 3) BGR; other sizes are resized."""
  return resize_square(imread_bgr(path), image_size)


def load_in_chunks(load: Callable[[int], np.ndarray], indices: Sequence[int],
                   *, chunk_size: int = 256,
                   num_threads: int = 8) -> Iterator[np.ndarray]:
  """Yields stacked chunks of load(i) for i in `indices`, in order.

  At most 2 * num_threads chunks are in flight, so memory stays bounded
  however many images there are.
  """
  starts = range(0, len(indices), chunk_size)

  def load_chunk(start):
    return np.stack([load(int(i)) for i in indices[start:start + chunk_size]])

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    pending = []
    it = iter(starts)
    for start in it:
      pending.append(pool.submit(load_chunk, start))
      if len(pending) >= 2 * max(1, num_threads):
        break
    while pending:
      yield pending.pop(0).result()
      start = next(it, None)
      if start is not None:
        pending.append(pool.submit(load_chunk, start))


@dataclasses.dataclass(frozen=True)
class LazyImages:
  """`count` images read on demand by `load(i)`, in threads.

  What the evaluators hand to extraction, so that each process of a
  multi-host run reads only the images it embeds.
  """
  load: Callable[[int], np.ndarray]
  count: int
  num_threads: int = 8

  def __len__(self) -> int:
    return self.count

  def chunks(self, indices: Sequence[int], chunk_size: int = 256
             ) -> Iterator[np.ndarray]:
    return load_in_chunks(self.load, indices, chunk_size=chunk_size,
                          num_threads=self.num_threads)


def image_files(paths: Sequence[str | os.PathLike], image_size: int = 112, *,
                num_threads: int = 8) -> LazyImages:
  """The images at `paths` as uint8 BGR (image_size, image_size, 3)."""
  return LazyImages(lambda i: read_image(paths[i], image_size), len(paths),
                    num_threads)


def list_images(directory: pathlib.Path) -> list[pathlib.Path]:
  """Image files below `directory` (recursively), sorted for determinism.

  Every name with an image suffix is listed, readable or not (a folder
  named x.jpg, a dangling or looping link): reading it then says what is
  wrong, instead of the image silently missing. Linked folders are
  followed, each real folder once (a link loop ends there).
  """
  found, seen = [], set()
  for folder, subfolders, files in os.walk(directory, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:
      subfolders[:] = []
      continue
    seen.add(real)
    found += [pathlib.Path(folder) / name for name in files + subfolders
              if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
  return sorted(found)


def require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_dir():
    raise FileNotFoundError(f'{what}: directory {path} does not exist')
  return path


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(f'{what}: file {path} does not exist')
  return path
