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

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes to size x size: area averaging to shrink, bilinear to enlarge."""
  if image.shape[:2] == (size, size):
    return image
  shrink = image.shape[0] > size and image.shape[1] > size
  interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  return cv2.resize(image, (size, size), interpolation=interpolation)


def imread_bgr(path: str | os.PathLike) -> np.ndarray:
  """The image at `path` as uint8 (H, W, 3) BGR; a clear error if unreadable."""
  image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
  if image is None:
    if not os.path.exists(path):
      raise FileNotFoundError(f'image {path} does not exist')
    raise ValueError(f'cannot decode image {path}')
  return image


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
  """Image files below `directory` (recursively), sorted for determinism."""
  return sorted(p for p in directory.rglob('*')
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_dir():
    raise FileNotFoundError(f'{what}: directory {path} does not exist')
  return path


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(f'{what}: file {path} does not exist')
  return path
