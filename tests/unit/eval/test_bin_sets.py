"""insightface `.bin` reading: the fixture, Python-2 pickles, errors."""

import collections
import io
import pickle
import struct

import cv2
import numpy as np
from PIL import Image
import pytest

from qgjt_jax.eval import bin_sets


def _jpeg(color, size=16):
  image = np.full((size, size, 3), color, np.uint8)
  image[: size // 2, : size // 2] = 255 - image[0, 0]  # a corner, for flips
  ok, data = cv2.imencode('.jpg', image)
  assert ok
  return data.tobytes()


def _python2_pickle(images, issame):
  """The opcodes Python 2's cPickle (protocol 2) writes for (list of str,
  list of bool): byte strings are STRING opcodes, which Python 3 decodes as
  text unless told encoding='bytes'."""
  out = [b'\x80\x02', b']', b'(']
  for data in images:
    if len(data) < 256:
      out += [b'U', bytes([len(data)]), data]
    else:
      out += [b'T', struct.pack('<i', len(data)), data]
  out += [b'e', b']', b'(']
  out += [b'\x88' if s else b'\x89' for s in issame]
  out += [b'e', b'\x86', b'.']
  return b''.join(out)


def test_lfw_fixture(insightface_rec_dir):
  path = insightface_rec_dir / 'lfw.bin'
  encoded, issame = bin_sets.load_bin(path)
  assert len(encoded) == 80 and all(isinstance(e, bytes) for e in encoded)
  assert issame.dtype == bool and issame.shape == (40,)
  # The fixture's own pickle, read without our code, agrees.
  with open(path, 'rb') as f:
    raw_images, raw_issame = pickle.load(f, encoding='bytes')
  np.testing.assert_array_equal(issame, np.array(raw_issame, bool))
  assert encoded == list(raw_images)

  images = bin_sets.decode_bin_images(encoded)
  assert images.shape == (80, 112, 112, 3) and images.dtype == np.uint8
  # BGR: PIL decodes the same JPEG as RGB.
  for i in (0, 41, 79):
    rgb = np.asarray(Image.open(io.BytesIO(encoded[i])).convert('RGB'))
    diff = np.abs(images[i].astype(int) - rgb[..., ::-1].astype(int))
    assert diff.mean() < 1.0, i


def test_python2_pickle_needs_bytes_encoding(tmp_path):
  images = [_jpeg((10 * i, 200, 30)) for i in range(6)]
  issame = [True, False, True]
  path = tmp_path / 'old.bin'
  path.write_bytes(_python2_pickle(images, issame))
  with pytest.raises(UnicodeDecodeError):  # the default ASCII decoding fails
    pickle.loads(path.read_bytes())
  encoded, flags = bin_sets.load_bin(path)
  assert encoded == images
  np.testing.assert_array_equal(flags, issame)
  decoded = bin_sets.decode_bin_images(encoded, image_size=112)
  assert decoded.shape == (6, 112, 112, 3)
  # Resized 16 -> 112: the bright corner stays top-left.
  assert decoded[0, 10, 10].mean() > decoded[0, 100, 100].mean()


def test_python3_pickles_and_numpy_flags(tmp_path):
  """Flags saved as numpy bools load; a numpy array (which could declare any
  size or dtype) is not what a .bin holds and is refused."""
  images = [_jpeg((0, 0, 200)) for _ in range(4)]
  for protocol in (2, pickle.HIGHEST_PROTOCOL):
    path = tmp_path / f'p{protocol}.bin'
    path.write_bytes(
        pickle.dumps(
            (images, [np.bool_(True), np.bool_(False)]), protocol=protocol
        )
    )
    encoded, issame = bin_sets.load_bin(path)
    assert encoded == images
    np.testing.assert_array_equal(issame, [True, False])
    path.write_bytes(
        pickle.dumps((images, np.array([True, False])), protocol=protocol)
    )
    with pytest.raises(bin_sets.BinSetError, match='never needs'):
      bin_sets.load_bin(path)


def test_errors_name_the_file(tmp_path):
  missing = tmp_path / 'nothere.bin'
  with pytest.raises(FileNotFoundError, match='nothere.bin'):
    bin_sets.load_bin(missing)

  garbage = tmp_path / 'garbage.bin'
  garbage.write_bytes(b'\x00\x01 this is not a pickle')
  with pytest.raises(ValueError, match='garbage.bin.*not a readable'):
    bin_sets.load_bin(garbage)

  wrong = tmp_path / 'dict.bin'
  wrong.write_bytes(pickle.dumps({'images': []}))
  with pytest.raises(ValueError, match='dict.bin.*expected a pickled pair'):
    bin_sets.load_bin(wrong)

  odd = tmp_path / 'odd.bin'
  odd.write_bytes(pickle.dumps(([_jpeg((1, 2, 3))] * 5, [True, False])))
  with pytest.raises(ValueError, match='odd.bin: 5 images for 2 pairs'):
    bin_sets.load_bin(odd)

  flags = tmp_path / 'flags.bin'
  flags.write_bytes(pickle.dumps(([_jpeg((1, 2, 3))] * 2, ['yes'])))
  with pytest.raises(ValueError, match='flags.bin.*booleans'):
    bin_sets.load_bin(flags)


def test_refuses_pickles_that_call_arbitrary_code(tmp_path):

  class Payload:

    def __reduce__(self):
      return collections.OrderedDict, ()

  path = tmp_path / 'evil.bin'
  path.write_bytes(pickle.dumps(([Payload()], [True])))
  with pytest.raises(ValueError, match='collections.OrderedDict'):
    bin_sets.load_bin(path)


def test_undecodable_image_is_reported_by_index():
  with pytest.raises(ValueError, match='image 1 '):
    bin_sets.decode_bin_images([_jpeg((5, 5, 5)), b'not an image'])
