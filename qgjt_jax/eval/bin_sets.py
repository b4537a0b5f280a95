"""insightface `.bin` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin...).

A `.bin` is a pickle of (encoded images, is-same flags): 2P encoded JPEG/PNG
images, consecutive pairs, and P booleans. The public files were written by
Python 2, whose byte strings only load in Python 3 with encoding='bytes'.

Unpickling can run arbitrary code, so the file is read by the restricted
reader (`files/pickles.py`), which here resolves one name: how Python 3
pickles bytes at protocol 2, and numpy's bool scalars (flags saved from a
numpy comparison). A `.bin` holds bytes, lists and booleans and nothing else
is accepted.
"""

import concurrent.futures
import os
import pickle

import numpy as np

from qgjt_jax import errors
from qgjt_jax.files import images as images_lib
from qgjt_jax.files import pickles
from qgjt_jax.files import regular


class BinSetError(errors.UserError, ValueError):
  """A `.bin` set that cannot be read (the message names the file)."""


def _latin1(text, encoding='latin1'):
  """`_codecs.encode(text, 'latin1')`: how Python 3 pickles bytes at
  protocol 2; for a str only, in that encoding only."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(
        '_codecs.encode of something other than text as latin1'
    )
  return text.encode('latin1')


class _BoolType:
  """numpy's bool dtype, the one dtype a `.bin`'s flags may name."""


def _dtype(name, *unused):
  if name not in ('b1', '?'):
    raise pickle.UnpicklingError(
        f'a numpy dtype {name!r}; a verification set holds booleans only'
    )
  return _BoolType()


def _bool_scalar(dtype, data=b''):
  """`numpy.core.multiarray.scalar` of a numpy bool: a flag saved from a
  numpy comparison."""
  if not isinstance(dtype, _BoolType) or data not in (b'\x00', b'\x01'):
    raise pickle.UnpicklingError('a numpy scalar that is not a boolean')
  return data == b'\x01'


class _Unpickler(pickles.RestrictedUnpickler):
  """A `.bin` holds bytes, lists and booleans: the names it may use are
  Python 3's way of pickling bytes at protocol 2 and numpy's of a bool."""

  _NAMES = {
      ('_codecs', 'encode'): _latin1,
      ('numpy', 'dtype'): _dtype,
      ('numpy.core.multiarray', 'scalar'): _bool_scalar,
      ('numpy._core.multiarray', 'scalar'): _bool_scalar,
  }

  def find_class(self, module, name):
    if (module, name) in self._NAMES:
      return self._NAMES[(module, name)]
    return super().find_class(module, name)

  def build(self, target, state):
    if not isinstance(target, _BoolType):  # a dtype's state: nothing to keep
      super().build(target, state)


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
  """Reads an insightface `.bin` set.

  Returns:
    (encoded images: 2P bytes objects, issame: bool (P,)). Image 2i and 2i+1
    form pair i.
  Raises:
    FileNotFoundError, or BinSetError naming the file when it is not a
    pickle or not shaped like a verification set.
  """
  path = os.fspath(path)
  if not os.path.lexists(path):
    raise FileNotFoundError(f'verification set {path} does not exist')
  with regular.open_regular(path) as f:
    try:
      obj = pickles.load(
          _Unpickler(f, os.fstat(f.fileno()).st_size, path, encoding='bytes')
      )
    except pickles.PickleError as e:
      raise BinSetError(
          f'{e}; it is damaged or not a verification set'
      ) from None
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise BinSetError(
        f'{path}: expected a pickled pair (images, issame), '
        f'got {type(obj).__name__}'
        + (f' of length {len(obj)}' if hasattr(obj, '__len__') else '')
    )
  encoded, issame = obj
  if not isinstance(encoded, (list, tuple)) or not all(
      isinstance(x, (bytes, bytearray)) for x in encoded
  ):
    raise BinSetError(
        f'{path}: the first element must be a list of encoded images (bytes)'
    )
  if not isinstance(issame, (list, tuple)) or not all(
      isinstance(x, bool) or (type(x) is int and x in (0, 1))  # pylint: disable=unidiomatic-typecheck
      for x in issame
  ):
    raise BinSetError(
        f'{path}: the second element must be a flat list of booleans'
    )
  if len(encoded) != 2 * len(issame):
    raise BinSetError(
        f'{path}: {len(encoded)} images for {len(issame)} '
        'pairs; a verification set holds exactly two images '
        'per pair'
    )
  return [bytes(x) for x in encoded], np.array(issame, bool)


def decode_image(
    data: bytes, image_size: int = 112, where: str = '<image>'
) -> np.ndarray:
  """One encoded image -> uint8 (image_size, image_size, 3) BGR.

  Raises:
    images.ImageError or limits.LimitError, naming `where`.
  """
  return images_lib.resize_square(
      images_lib.decode_image(data, where), image_size
  )


def decode_bin_images(
    encoded: list[bytes],
    image_size: int = 112,
    *,
    num_threads: int = 8,
    path: str = '<set>',
) -> np.ndarray:
  """Decodes `.bin` images to uint8 (N, image_size, image_size, 3) BGR.

  Raises:
    BinSetError: naming `path` and the image that cannot be decoded, or is
      larger than the limits allow.
  """
  out = np.empty((len(encoded), image_size, image_size, 3), np.uint8)

  def decode(i):
    out[i] = decode_image(
        encoded[i], image_size, f'{path}: image {i} of the set'
    )

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
      list(pool.map(decode, range(len(encoded))))
  except ValueError as e:
    raise BinSetError(f'{errors.one_line(e)}; the set is damaged') from None
  return out
