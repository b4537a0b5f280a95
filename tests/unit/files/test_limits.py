"""What an untrusted file may declare: image sizes read from headers, the
limits' configuration and how it reaches worker processes."""

import io
import multiprocessing
import pickle

import cv2
import numpy as np
from PIL import Image
import pytest

from qgjt_jax import errors
from qgjt_jax.data import pipeline
from qgjt_jax.files import images
from qgjt_jax.files import limits
from tests.helpers import hostile


@pytest.fixture(autouse=True)
def _restore_limits():
  yield
  limits.configure()


def _pillow(fmt: str, size=(37, 21), **save) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, (10, 20, 30)).save(buffer, fmt, **save)
  return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        cv2.imencode(".jpg", np.zeros((21, 37, 3), np.uint8))[1].tobytes(),
        cv2.imencode(".png", np.zeros((21, 37), np.uint8))[1].tobytes(),
        _pillow("JPEG", progressive=True),
        _pillow("JPEG", exif=Image.Exif().tobytes() + b"\0" * 60000),
        _pillow("BMP"),
        _pillow("WEBP"),
        _pillow("TIFF"),
        _pillow("GIF"),
    ],
    ids=["jpeg", "png", "progressive", "exif", "bmp", "webp", "tiff", "gif"],
)
def test_the_declared_size_is_read_from_the_header(data):
  assert images.declared_image_size(data) == (37, 21)
  images.check_encoded_image(data, "face.x")  # well under the limits


def test_bytes_that_are_no_image_have_no_size():
  assert images.declared_image_size(b"just some text") is None
  with pytest.raises(
      ValueError, match="face.jpg: 14 bytes that are not an image"
  ):
    images.check_encoded_image(b"just some text", "face.jpg")


def test_an_image_over_the_limits_is_refused_by_name(tmp_path):
  bomb = hostile.png_bomb(tmp_path / "bomb.png", 20000).read_bytes()
  assert images.declared_image_size(bomb) == (20000, 20000)
  with pytest.raises(
      limits.LimitError,
      match=r"bomb.png: an image of 20000 x 20000 pixels "
      r"\(400,000,000\) is over the limit "
      r"max_image_pixels=50,000,000.*"
      r"--config.limits.max_image_pixels=N",
  ):
    images.check_encoded_image(bomb, "bomb.png")
  limits.configure({"max_image_pixels": 400_000_000})
  images.check_encoded_image(bomb, "bomb.png")  # trusted: raised limit
  limits.configure({"max_image_file_bytes": 1000})
  with pytest.raises(limits.LimitError, match="max_image_file_bytes=1,000"):
    images.check_encoded_image(bomb, "bomb.png")


def _worker_limit(init, answer) -> None:
  init(0, 1)
  answer.put(limits.current().max_pickle_depth)


def test_configuration_is_checked_and_reaches_worker_processes():
  for bad in (
      {"max_image_pixels": 0},
      {"max_image_pixels": 1.5},
      {"max_image_pixels": "many"},
  ):
    with pytest.raises(errors.UserError, match="must be a positive integer"):
      limits.configure(bad, "config.limits")
  with pytest.raises(errors.UserError, match="unknown limit 'max_pixels'"):
    limits.configure({"max_pixels": 3})
  limits.configure({"max_pickle_depth": 7})
  context = multiprocessing.get_context("spawn")  # a fresh interpreter
  answer = context.Queue()
  worker = context.Process(
      target=_worker_limit, args=(pipeline.worker_init(), answer)
  )
  worker.start()
  assert answer.get(timeout=120) == 7
  worker.join(timeout=60)


def test_a_limit_error_survives_a_worker_process():
  error = limits.exceeded(
      "train.rec: record 3", "an image", 9, "max_image_pixels"
  )
  copy = pickle.loads(pickle.dumps(error))
  assert str(copy) == str(error) and copy.where == "train.rec: record 3"
