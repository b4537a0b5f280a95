"""Images from users' files: the one place they are read, checked and decoded.

Every reader of images (the `.rec` sets and the training pipeline, image
folders, `.bin` sets, own folders and pairs files, the photos of embed,
compare and identify) goes through here:

* `check_encoded_image` reads the size an encoded image declares from its
  header, before anything is decoded, and refuses one over the limits
  (`limits.py`: a 48 KB PNG can declare 20000 x 20000 pixels);
* `decode_image` decodes to uint8 (H, W, 3) **BGR**;
* `imread_bgr` / `read_image` read a file (a regular file, within
  max_image_file_bytes) and decode it; `files_below` and `list_images`
  find them below a folder, by one rule on links; `LazyImages` reads them on demand, in threads.

Colour convention (the one place it is written down): the images in the
insightface `.rec` sets are ordinary JPEGs with true colours. The authors'
loaders (AdaFace and QGFace `dataset/record_dataset.py`) decode them with
`mx.image.imdecode`, which returns RGB, and then reverse the channels, so
their networks are trained and evaluated on BGR images. `cv2.imdecode`
returns BGR directly, so `decode_image` gives exactly the array those models
see (before the (x / 255 - 0.5) / 0.5 normalisation, which happens later on
the device); nothing else in the project flips channels. OpenCV also
releases the GIL while decoding, so a small thread pool keeps a device fed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import dataclasses
import io
import os
import pathlib
import struct
from typing import Optional

import cv2
import numpy as np

from qgjt_jax import errors
from qgjt_jax import reporting
from qgjt_jax.files import limits
from qgjt_jax.files import regular


class ImageError(errors.UserError, ValueError):
  """Bytes or a file that are not a decodable image (the message names it)."""


IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".pgm",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)


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
    ImageError: not a decodable image.
  """
  if not os.path.lexists(path):
    raise FileNotFoundError(f"image {path} does not exist")
  return decode_image(read_image_file(path), os.fspath(path))


def read_image(path: str | os.PathLike, image_size: int = 112) -> np.ndarray:
  """uint8 (image_size, image_size, 3) BGR; other sizes are resized."""
  return resize_square(imread_bgr(path), image_size)


def load_in_chunks(
    load: Callable[[int], np.ndarray],
    indices: Sequence[int],
    *,
    chunk_size: int = 256,
    num_threads: int = 8,
) -> Iterator[np.ndarray]:
  """Yields stacked chunks of load(i) for i in `indices`, in order.

  At most 2 * num_threads chunks are in flight, so memory stays bounded
  however many images there are.
  """
  starts = range(0, len(indices), chunk_size)

  def load_chunk(start):
    return np.stack([load(int(i)) for i in indices[start : start + chunk_size]])

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

  def chunks(
      self, indices: Sequence[int], chunk_size: int = 256
  ) -> Iterator[np.ndarray]:
    return load_in_chunks(
        self.load, indices, chunk_size=chunk_size, num_threads=self.num_threads
    )


def image_files(
    paths: Sequence[str | os.PathLike],
    image_size: int = 112,
    *,
    num_threads: int = 8,
) -> LazyImages:
  """The images at `paths` as uint8 BGR (image_size, image_size, 3)."""
  return LazyImages(
      lambda i: read_image(paths[i], image_size), len(paths), num_threads
  )


def files_below(
    folder: pathlib.Path,
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """The visible files below `folder` (at any depth, sorted) and the linked
  folders inside it, which are not followed.

  The one rule for every folder of photos read: `folder` may itself be a
  link, but a link below it could lead into another person's photos,
  upward, or across the whole file system, so it is left for the caller to
  name. Hidden names (".DS_Store") are skipped. A dangling or looping link
  to a file is listed: reading it says what is wrong.
  """
  found, links = [], []
  for path, subfolders, files in os.walk(folder):
    inside = [
        pathlib.Path(path) / name
        for name in sorted(subfolders)
        if not name.startswith(".")
    ]
    links += [p for p in inside if p.is_symlink()]
    subfolders[:] = [p.name for p in inside if not p.is_symlink()]
    found += [
        pathlib.Path(path) / name for name in files if not name.startswith(".")
    ]
  return sorted(found), sorted(links)


def described_links(root: pathlib.Path, links: list[pathlib.Path]) -> str:
  """The first few linked folders left out, as 'a/b -> target, ...'."""
  return ", ".join(
      f"{p.relative_to(root)} -> {os.readlink(p)}" for p in links[:3]
  ) + (", ..." if len(links) > 3 else "")


def list_images(directory: pathlib.Path) -> list[pathlib.Path]:
  """The image files below `directory` by `files_below`'s rule, where the
  folders directly in it count as the folder handed (a folder of people
  whose folders are links, as `folders.read` takes them), unless one holds
  `directory` or lies inside it. The linked folders left out are named in
  a note. Every name with an image suffix is listed, readable or not:
  reading it then says what is wrong, instead of the image silently
  missing."""
  directory = pathlib.Path(directory)
  found, links = files_below(directory)
  real_root = os.path.realpath(directory)
  for link in [p for p in links if p.parent == directory]:
    real = os.path.realpath(link)
    if not (
        real_root == real
        or real.startswith(real_root + os.sep)
        or real_root.startswith(real.rstrip(os.sep) + os.sep)
    ):
      links.remove(link)
      more, deeper = files_below(link)
      found += more
      links += deeper
  if links:
    reporting.note(
        f"{directory}: {len(links)} linked folder(s) inside not "
        "followed, their images left out ("
        + described_links(directory, sorted(links))
        + ")."
    )
  return sorted(
      p
      for p in found
      if os.path.splitext(p.name)[1].lower() in IMAGE_EXTENSIONS
  )


def require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_dir():
    raise FileNotFoundError(f"{what}: directory {path} does not exist")
  return path


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(f"{what}: file {path} does not exist")
  return path


def imdecode_or_none(data: bytes, where: str = "<image>") -> np.ndarray | None:
  """`cv2.imdecode(IMREAD_COLOR)` of the bytes, or None where OpenCV can't.

  The size the image declares is checked first (`limits`), so a small file
  declaring a vast image is refused before anything is allocated for it.

  Raises:
    limits.LimitError: naming `where`.
  """
  buf = np.frombuffer(data, np.uint8)
  if not buf.size:
    return None
  try:
    check_encoded_image(data, where)
  except limits.LimitError:
    raise
  except ValueError:
    return None  # no image format can be read from it
  try:
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)
  except cv2.error:
    return None


def decode_image(data: bytes, where: str = "<image>") -> np.ndarray:
  """Decodes an encoded face image to uint8 (H, W, 3) in **BGR** order.

  This is the project's single decoding function (see the module docstring
  for why BGR). Grey images come back with the grey value in all three channels,
  an alpha channel is dropped, 16-bit images are reduced to 8 bits and the EXIF
  orientation is applied: the behaviour of `cv2.IMREAD_COLOR`, which is also
  what MXNet's own decoder does. The image is decoded at full resolution.

  Args:
    data: the encoded JPEG/PNG (or any format OpenCV reads) bytes.
    where: names the image in the error message (file and record key).

  Returns:
    A C-contiguous uint8 array of shape (H, W, 3), channels B, G, R.

  Raises:
    ImageError: the bytes are not an image OpenCV can decode.
    limits.LimitError: the image declares more pixels than allowed.
  """
  image = imdecode_or_none(data, where)
  if image is None or image.ndim != 3 or image.shape[2] != 3:
    raise ImageError(
        f"{where}: {len(data)} bytes that are not a decodable image"
    )
  return image


# ---------------------------------------------------------------------------
# Headers: the size an encoded image declares, read before it is decoded.

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames).
_SOF = {
    0xC0,
    0xC1,
    0xC2,
    0xC3,
    0xC5,
    0xC6,
    0xC7,
    0xC9,
    0xCA,
    0xCB,
    0xCD,
    0xCE,
    0xCF,
}


def _jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:  # stray bytes between segments, as libjpeg skips
      pos = data.find(b"\xff", pos)
      if pos < 0:
        return None
      continue
    marker = data[pos + 1]
    if marker == 0xFF:  # fill byte
      pos += 1
      continue
    if marker in (0x01, *range(0xD0, 0xD8)):  # no length field
      pos += 2
      continue
    (length,) = struct.unpack_from(">H", data, pos + 2)
    if marker in _SOF:
      if pos + 9 > len(data):
        return None
      height, width = struct.unpack_from(">HH", data, pos + 5)
      return width, height
    pos += 2 + length
  return None


class _VastForPillow(Exception):
  """Pillow refused to open the image for its size (over twice its own
  limit, Image.MAX_IMAGE_PIXELS)."""


def _pillow_size(data: bytes) -> Optional[tuple[int, int]]:
  """Other formats: Pillow reads the header only (no pixels)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(data)) as image:
      return image.size
  except Image.DecompressionBombError:
    raise _VastForPillow() from None
  except Exception:  # pylint: disable=broad-except
    return None  # Pillow raises many types on bytes that are no image


def declared_image_size(data: bytes) -> Optional[tuple[int, int]]:
  """(width, height) an encoded image declares, or None if no reader here
  can tell (then it is not an image OpenCV or Pillow can read either)."""
  if data.startswith(_PNG) and len(data) >= 24:
    return struct.unpack_from(">II", data, 16)
  if data.startswith(b"\xff\xd8"):
    size = _jpeg_size(data)
    if size is not None:
      return size
  return _pillow_size(data)


def check_encoded_image(data: bytes, where: str) -> None:
  """Refuses an encoded image whose declared size is over the limits.

  Raises:
    limits.LimitError: too many bytes or pixels (naming `where`).
    ValueError: no size can be read from the bytes (not an image).
  """
  allowed = limits.current()
  if len(data) > allowed.max_image_file_bytes:
    raise limits.exceeded(
        where, "the image's size in bytes", len(data), "max_image_file_bytes"
    )
  try:
    size = declared_image_size(bytes(data))
  except _VastForPillow:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    raise limits.exceeded(
        where,
        "an image of more pixels than Pillow opens",
        2 * Image.MAX_IMAGE_PIXELS,
        "max_image_pixels",
    ) from None
  if size is None:
    raise ValueError(
        f"{where}: {len(data)} bytes that are not an image in a "
        "format read here (JPEG, PNG, BMP, WebP, TIFF, GIF...)"
    )
  width, height = size
  if width * height > allowed.max_image_pixels:
    raise limits.exceeded(
        where,
        f"an image of {width} x {height} pixels",
        width * height,
        "max_image_pixels",
    )


def read_image_file(path: str | os.PathLike) -> bytes:
  """The bytes of an image file, refused before reading if too large or
  not a regular file.

  Raises:
    regular.NotAFileError: a folder, a FIFO, a device (naming the path).
    FileNotFoundError, OSError: naming the path (a dangling link or a link
      loop among them).
    limits.LimitError: the file is over max_image_file_bytes.
  """
  path = os.fspath(path)
  try:
    with regular.open_regular(path) as f:
      size = os.fstat(f.fileno()).st_size
      limit = limits.current().max_image_file_bytes
      if size > limit:
        raise limits.exceeded(
            path, "the file's size in bytes", size, "max_image_file_bytes"
        )
      return f.read(limit + 1)
  except OSError:
    if os.path.islink(path) and not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} is a dangling or looping symbolic link, not an image"
      ) from None
    raise
