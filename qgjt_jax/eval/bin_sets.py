"""insightface `.bin` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin...).

A `.bin` is a pickle of (encoded images, is-same flags): 2P encoded JPEG/PNG
images, consecutive pairs, and P booleans. The public files were written by
Python 2, whose byte strings only load in Python 3 with encoding='bytes'.

Unpickling can run arbitrary code, so only the few globals such files can
legitimately need (numpy arrays, Python-3 protocol-2 bytes) are allowed.
"""
import concurrent.futures
import os
import pickle

import numpy as np

from qgjt_jax import errors
from qgjt_jax import limits
from qgjt_jax.data import recordio
from qgjt_jax.eval import images as images_lib

_ALLOWED_GLOBALS = {
    ('_codecs', 'encode'),  # bytes in Python-3 pickles of protocol <= 2
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),  # arrays in protocol-5 pickles
    ('numpy._core.numeric', '_frombuffer'),
}


class BinSetError(errors.UserError, ValueError):
  """A `.bin` set that cannot be read (the message names the file)."""


def _bytearray(data=b''):
  """bytearray(data) for bytes only: bytearray(10**10) would allocate."""
  if not isinstance(data, (bytes, bytearray)):
    raise pickle.UnpicklingError('bytearray() of something other than bytes')
  return bytearray(data)


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler (the C one grows its memo to any index a few
  bytes name), resolving only what a verification set needs."""

  def find_class(self, module, name):
    if (module, name) in (('builtins', 'bytearray'),
                          ('__builtin__', 'bytearray')):
      return _bytearray
    if (module, name) in _ALLOWED_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f'refers to {module}.{name}, which a verification set never needs')


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
  if not os.path.isfile(path):
    raise FileNotFoundError(f'verification set {path} does not exist')
  try:
    with open(path, 'rb') as f:
      bounded = limits.BoundedReader(f, os.fstat(f.fileno()).st_size)
      obj = _RestrictedUnpickler(bounded, encoding='bytes').load()
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Only numpy's reconstruction runs while reading: whatever fails (a bad
    # opcode, a truncated file, a call with wrong arguments) is the file's.
    raise BinSetError(f'{path} is not a readable insightface .bin pickle '
                      f'({type(e).__name__}: {str(e)[:200]}); it is damaged '
                      'or not a verification set') from e
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise BinSetError(f'{path}: expected a pickled pair (images, issame), '
                      f'got {type(obj).__name__}'
                      + (f' of length {len(obj)}' if hasattr(obj, '__len__')
                         else ''))
  encoded, issame = obj
  try:
    encoded = [bytes(memoryview(x).cast('B')) if not isinstance(x, bytes)
               else x for x in encoded]
  except (TypeError, ValueError) as e:
    raise BinSetError(f'{path}: the first element must be a list of '
                      f'encoded images (bytes): {e}') from e
  try:
    issame = np.asarray(issame)
  except (TypeError, ValueError, RecursionError) as e:
    raise BinSetError(f'{path}: the second element is not a list of '
                      f'booleans ({type(e).__name__})') from e
  if issame.ndim != 1 or not (issame.dtype == bool or
                              np.issubdtype(issame.dtype, np.integer)):
    raise BinSetError(f'{path}: the second element must be a flat list of '
                      f'booleans, got dtype {issame.dtype} shape '
                      f'{issame.shape}')
  if len(encoded) != 2 * len(issame):
    raise BinSetError(f'{path}: {len(encoded)} images for {len(issame)} '
                      'pairs; a verification set holds exactly two images '
                      'per pair')
  return encoded, issame.astype(bool)


def decode_image(data: bytes, image_size: int = 112,
                 where: str = '<image>') -> np.ndarray:
  """One encoded image -> uint8 (image_size, image_size, 3) BGR.

  Raises:
    RecordIOError (a ValueError) or limits.LimitError, naming `where`.
  """
  return images_lib.resize_square(recordio.decode_image(data, where),
                                  image_size)


def decode_bin_images(encoded: list[bytes], image_size: int = 112, *,
                      num_threads: int = 8, path: str = '<set>'
                      ) -> np.ndarray:
  """Decodes `.bin` images to uint8 (N, image_size, image_size, 3) BGR.

  Raises:
    BinSetError: naming `path` and the image that cannot be decoded, or is
      larger than the limits allow.
  """
  out = np.empty((len(encoded), image_size, image_size, 3), np.uint8)

  def decode(i):
    out[i] = decode_image(encoded[i], image_size, f'{path}: image {i} of the set')

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
      list(pool.map(decode, range(len(encoded))))
  except ValueError as e:
    raise BinSetError(f'{errors.one_line(e)}; the set is damaged') from None
  return out
