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

import cv2
import numpy as np

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
    ('builtins', 'bytearray'),
    ('__builtin__', 'bytearray'),
}


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
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
    FileNotFoundError, or ValueError naming the file when it is not a pickle
    or not shaped like a verification set.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'verification set {path} does not exist')
  try:
    with open(path, 'rb') as f:
      obj = _RestrictedUnpickler(f, encoding='bytes').load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not a readable insightface .bin pickle: '
                     f'{e}') from e
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise ValueError(f'{path}: expected a pickled pair (images, issame), got '
                     f'{type(obj).__name__}'
                     + (f' of length {len(obj)}' if hasattr(obj, '__len__')
                        else ''))
  encoded, issame = obj
  try:
    encoded = [bytes(memoryview(x).cast('B')) if not isinstance(x, bytes)
               else x for x in encoded]
  except TypeError as e:
    raise ValueError(f'{path}: the first element must be a list of encoded '
                     f'images (bytes): {e}') from e
  issame = np.asarray(issame)
  if issame.ndim != 1 or not (issame.dtype == bool or
                              np.issubdtype(issame.dtype, np.integer)):
    raise ValueError(f'{path}: the second element must be a flat list of '
                     f'booleans, got dtype {issame.dtype} shape {issame.shape}')
  if len(encoded) != 2 * len(issame):
    raise ValueError(f'{path}: {len(encoded)} images for {len(issame)} pairs; '
                     'a verification set holds exactly two images per pair')
  return encoded, issame.astype(bool)


def decode_image(data: bytes, image_size: int = 112) -> np.ndarray:
  """One encoded image -> uint8 (image_size, image_size, 3) BGR."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise ValueError('cannot decode image')
  return images_lib.resize_square(image, image_size)


def decode_bin_images(encoded: list[bytes], image_size: int = 112, *,
                      num_threads: int = 8) -> np.ndarray:
  """Decodes `.bin` images to uint8 (N, image_size, image_size, 3) BGR."""
  out = np.empty((len(encoded), image_size, image_size, 3), np.uint8)

  def decode(i):
    try:
      out[i] = decode_image(encoded[i], image_size)
    except ValueError as e:
      raise ValueError(f'image {i} of the set: {e}') from None

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    list(pool.map(decode, range(len(encoded))))
  return out
