"""TFDS builders that turn users' face data into ArrayRecord datasets.

The builders store the images already encoded (the insightface payload as it
is, a 112x112 JPEG made here with OpenCV, or the generated set's own JPEGs), so
preparing a dataset needs neither TensorFlow nor TFDS's TensorFlow-based image
encoder. They write
`file_format="array_record"`, read back with
`qgjt_jax.data.sources.ArrayRecordSource`; decode with
`qgjt_jax.files.images.decode_image` (BGR, see there).

* `insightface_rec`: an insightface `train.rec`/`train.idx`/`property` folder
  (the manual dir). Configs for the usual public sets check the expected
  counts; any other set goes through a config made by `insightface_config`.
* `face_image_folder`: `root/<identity>/<images>` of any format, size, depth
  or channel count, converted to 112x112 BGR-ordered JPEG. Identities are the
  sub-directory names (sorted numerically when all of them are integers).
* `synthetic_faces`: the generated set of `qgjt_jax.data.synthetic`, written
  once so that a run reads it like any prepared set (same JPEG bytes and
  labels as `SyntheticFaces` with the same parameters).

Features of all: "image" (encoded bytes, `tfds.features.Image` with the JPEG
encoding declared), "label" (ClassLabel), plus where each example came from:
"key" (the .rec record key), "path" (relative to the root) or "index" (the
`SyntheticFaces` record index). TFDS shuffles the
example order when writing, which is why the origin is stored.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import threading
from typing import Any, Iterator

from absl import logging
import cv2
import numpy as np
from PIL import Image as PILImage
import tensorflow_datasets as tfds

from qgjt_jax import errors
from qgjt_jax import progress as progress_lib
from qgjt_jax.data import recordio
from qgjt_jax.data import synthetic
from qgjt_jax.files import folders
from qgjt_jax.files import images
from qgjt_jax.files import limits

IMAGE_SIZE = 112
JPEG_QUALITY = 95
_JPEG_SOI = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_LISTED_SKIPS = 1000  # skipped paths kept in the dataset metadata


class DataError(errors.UserError, ValueError):
  """Data that cannot be prepared as asked (the message names it)."""


class BadImageError(DataError):
  """A file in an image folder is not an image we can read."""

  def __init__(self, path: os.PathLike | str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = str(path)
    self.reason = reason


class NoFaceError(BadImageError):
  """A photo in which --align=detect finds no face to keep."""


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of builders that download nothing (user data in the manual dir, or
  data generated here)."""

  # Nothing is downloaded, so there are no URL checksums to look up. Said
  # explicitly because TFDS 4.9's lookup locates the checksum file through the
  # `importlib_resources` backport, which recent etils no longer installs.
  url_infos = None


# -- insightface .rec ----------------------------------------------------------


@dataclasses.dataclass(eq=False)
class InsightFaceRecConfig(tfds.core.BuilderConfig):
  """One insightface set; None means "take it from the files".

  Attributes:
    num_classes: expected number of identities (checked), or None.
    num_images: expected number of images (checked), or None.
    image_size: (height, width) of the stored images, or None.
  """

  num_classes: int | None = None
  num_images: int | None = None
  image_size: tuple[int, int] | None = (IMAGE_SIZE, IMAGE_SIZE)


_ZOO = (
    "https://github.com/deepinsight/insightface/tree/master/recognition/"
    "_datasets_"
)


class InsightFaceRec(_ManualBuilder):
  """Face recognition training sets in the insightface RecordIO layout."""

  name = "insightface_rec"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images and labels of train.rec, stored as is."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download the training set from the insightface dataset zoo
  ({_ZOO}): e.g. MS1M-ArcFace (faces_emore, = MS1MV2), MS1M-RetinaFace
  (ms1m-retinaface-t1, = MS1MV3), CASIA-Webface (faces_webface_112x112) or
  VGG2 (faces_vgg_112x112). Unzip it and pass the folder holding `train.rec`,
  `train.idx` and `property` as the manual dir (`--src` of
  `python -m qgjt_jax.data.prepare --format=insightface_rec`).
  """
  BUILDER_CONFIGS = [
      InsightFaceRecConfig(
          name="ms1mv2",
          num_classes=85742,
          num_images=5822653,
          description="MS1M-ArcFace (faces_emore): 85,742 ids, 5,822,653 "
          "images.",
      ),
      InsightFaceRecConfig(
          name="ms1mv3",
          num_classes=93431,
          num_images=5179510,
          description="MS1M-RetinaFace (ms1m-retinaface-t1): 93,431 ids, "
          "5,179,510 images.",
      ),
      InsightFaceRecConfig(
          name="casia_webface",
          num_classes=10572,
          num_images=490623,
          description="CASIA-WebFace (faces_webface_112x112): 10,572 ids, "
          "490,623 images.",
      ),
      InsightFaceRecConfig(
          name="vggface2",
          description="VGGFace2 (faces_vgg_112x112), about 9K ids and 3.3M "
          "images; the counts are taken from the files.",
      ),
      InsightFaceRecConfig(
          name="generic",
          image_size=None,
          description="Any set in the insightface layout; counts and image "
          "size are taken from the files.",
      ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config: InsightFaceRecConfig = self.builder_config
    shape = (*(config.image_size or (None, None)), 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Aligned face images and identity labels read from an "
        "insightface train.rec. Images are the stored JPEGs, unchanged; "
        "decode them to BGR (qgjt_jax.files.images.decode_image).",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(
                    shape=shape, encoding_format="jpeg"
                ),
                "label": tfds.features.ClassLabel(
                    num_classes=config.num_classes
                ),
                "key": tfds.features.Scalar(np.int64, doc="record key in .rec"),
            }
        ),
        supervised_keys=("image", "label"),
        homepage=_ZOO,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(os.fspath(dl_manager.manual_dir))
    record = recordio.InsightFaceRecord(
        root / "train.rec", root / "train.idx", root / "property"
    )
    config: InsightFaceRecConfig = self.builder_config
    where = f"config {self.builder_config.name!r}"
    checks = [
        ("classes", config.num_classes, record.num_classes),
        ("images", config.num_images, len(record)),
    ]
    for what, expected, found in checks:
      if expected is not None and expected != found:
        raise DataError(
            f"{root}: {found} {what}, but {where} expects {expected}. Is this "
            "the right set? Prepare other sets under their own name "
            "(qgjt_jax.data.prepare --name=<your name>)."
        )
    if (
        config.image_size is not None
        and record.image_size is not None
        and tuple(config.image_size) != tuple(record.image_size)
    ):
      raise DataError(
          f"{root}: images are {record.image_size}, {where} "
          f"expects {config.image_size}"
      )
    label = self.info.features["label"]
    if config.num_classes is None:
      label.names = [str(c) for c in range(record.num_classes)]
    self.info.metadata.update(
        source=os.fspath(root), format="insightface_rec", num_images=len(record)
    )
    return {"train": self._generate_examples(record)}

  def _generate_examples(
      self, record: recordio.InsightFaceRecord
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    # Identity records, where present, give every image's class a second time;
    # the image headers are what trainers use, so a disagreement is reported,
    # not fatal.
    expected = None
    if record.identity_keys is not None:
      ranges = record.identity_ranges()
      expected = np.full(record.identity_keys.start, -1, np.int64)
      for c, (lo, hi) in enumerate(ranges):
        expected[lo:hi] = c
    mismatches = []
    progress = progress_lib.Progress(
        len(record), f"{self.name}/{self.builder_config.name}"
    )
    for key in record.image_keys:
      key = int(key)
      header, image = record.read(key)
      label = record.check_label(
          recordio.class_id(header, f"{record.rec_path}: record {key}"), key
      )
      where = f"{record.rec_path}: record {key}"
      if not (image.startswith(_JPEG_SOI) or image.startswith(_PNG_SIGNATURE)):
        # Unusual but legal formats are accepted if OpenCV reads them.
        images.decode_image(image, where)
      else:  # kept as they are, but not if they declare a vast image
        try:
          images.check_encoded_image(image, where)
        except limits.LimitError:
          raise
        except ValueError as e:
          raise recordio.RecordIOError(str(e)) from None
      if expected is not None and expected[key] != label:
        mismatches.append(key)
      yield key, {"image": image, "label": label, "key": key}
      progress.update()
    progress.close()
    if mismatches:
      logging.warning(
          "%s: %d image labels disagree with the identity records' ranges "
          "(first keys: %s); the image labels were used.",
          record.rec_path,
          len(mismatches),
          mismatches[:10],
      )
    self.info.metadata["identity_range_mismatches"] = len(mismatches)


def insightface_config(
    name: str, src: os.PathLike | str
) -> InsightFaceRecConfig | str:
  """The config for preparing the set in `src` under `name`.

  Known names ("ms1mv2", ...) return the registered config name, whose counts
  are checked; any other name gets a config described by `src`'s property
  file, so several private sets can live side by side in one data_dir.
  """
  known = {c.name for c in InsightFaceRec.BUILDER_CONFIGS}
  if name in known:
    return name
  prop = pathlib.Path(src) / "property"
  size = recordio.read_property(prop)[1:] if prop.exists() else None
  return InsightFaceRecConfig(
      name=name,
      image_size=size,
      description=f"insightface-layout set prepared from {src}.",
  )


# -- image folders -------------------------------------------------------------


def convert_face_image(
    data: bytes,
    size: int = IMAGE_SIZE,
    quality: int = JPEG_QUALITY,
    where: str = "<image>",
) -> bytes:
  """Any encoded image -> a size x size, 3-channel JPEG of the same picture.

  Grey images are replicated to three channels, alpha is dropped, 16-bit
  images are reduced to 8 bits and the EXIF orientation is applied (OpenCV's
  IMREAD_COLOR rules, the same `decode_image` uses); formats OpenCV cannot
  read (GIF, ...) go through Pillow. Other sizes are resized to size x size
  (area filter when shrinking, cubic when enlarging) without keeping the
  aspect ratio: the folders are expected to hold aligned face crops.
  A 3-channel JPEG already of the right size and orientation is returned
  unchanged, so a converted insightface set keeps its exact bytes.

  Raises:
    BadImageError: not a readable image.
  """
  try:
    image = images.imdecode_or_none(data, where)
  except limits.LimitError as e:
    raise BadImageError(where, e.detail) from None
  if image is None:
    image = _decode_with_pillow(data, where)
  if image.shape[:2] == (size, size) and data.startswith(_JPEG_SOI):
    native = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if native is not None and np.array_equal(native, image):
      return data
  if image.shape[:2] != (size, size):
    shrink = image.shape[0] * image.shape[1] > size * size
    image = cv2.resize(
        image,
        (size, size),
        interpolation=(cv2.INTER_AREA if shrink else cv2.INTER_CUBIC),
    )
  ok, encoded = cv2.imencode(
      ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
  )
  if not ok:
    raise BadImageError(where, "could not be re-encoded as JPEG")
  return encoded.tobytes()


def _decode_with_pillow(data: bytes, where: str) -> np.ndarray:
  import io  # pylint: disable=g-import-not-at-top

  try:
    with PILImage.open(io.BytesIO(data)) as pil:
      pil.load()
      rgb = np.asarray(pil.convert("RGB"))
  except Exception as e:  # Pillow raises many types for bad files.
    raise BadImageError(
        where, f"not a readable image ({type(e).__name__}: {e})"
    ) from None
  return np.ascontiguousarray(rgb[:, :, ::-1])


@dataclasses.dataclass(eq=False)
class FaceImageFolderConfig(tfds.core.BuilderConfig):
  """The stored form of a converted folder.

  Attributes:
    image_size: side of the stored square images.
    jpeg_quality: quality of the JPEGs made here.
    align: "none" (the files are aligned crops, resized) or "detect" (each
      photo's largest face found and warped onto the five-point template;
      a photo without a face is left out and named).
  """

  image_size: int = IMAGE_SIZE
  jpeg_quality: int = JPEG_QUALITY
  align: str = "none"

  def parameters(self) -> dict[str, Any]:
    """What a reused set must have been prepared with."""
    return {"image_size": self.image_size, "align": self.align}


class FaceImageFolder(_ManualBuilder):
  """Face images in root/identity/image folders, as 112x112 JPEGs."""

  name = "face_image_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "112x112 JPEG images and identity labels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the folder of aligned face crops laid out as <root>/<identity>/<image>
  (any format OpenCV or Pillow reads) as the manual dir (`--src` of
  `python -m qgjt_jax.data.prepare --format=image_folder`).
  """
  BUILDER_CONFIGS = [FaceImageFolderConfig(name="default")]

  def __init__(self, *, skip_bad: bool = False, num_threads: int = 0, **kwargs):
    """Builder; see tfds.core.DatasetBuilder for `kwargs`.

    Args:
      skip_bad: skip (and count, in `skipped` and the dataset metadata) files
        that are not readable images, instead of failing on the first one.
      num_threads: conversion threads, 0 for one per CPU (OpenCV releases the
        GIL while decoding, resizing and encoding).
      **kwargs: for tfds.core.DatasetBuilder (data_dir, config, ...).
    """
    self.skip_bad = skip_bad
    self.num_threads = num_threads
    self.skipped: list[BadImageError] = []
    self._local = threading.local()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="Face images from an identity-per-folder tree, as "
        f"{size}x{size} JPEGs (decode to BGR with "
        "qgjt_jax.files.images.decode_image).",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(
                    shape=(size, size, 3), encoding_format="jpeg"
                ),
                "label": tfds.features.ClassLabel(),
                "path": tfds.features.Text(doc="file path under the root"),
            }
        ),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(os.fspath(dl_manager.manual_dir))
    people = folders.read(root, "--src")
    files = list(zip(people.paths, people.labels.tolist()))
    self.info.features["label"].names = people.names
    self.info.metadata.update(
        source=os.fspath(root),
        format="image_folder",
        parameters=self.builder_config.parameters(),
    )
    self.skipped = []
    return {"train": self._generate_examples(root, files)}

  def _convert(self, path: pathlib.Path) -> bytes | BadImageError:
    config: FaceImageFolderConfig = self.builder_config
    try:
      if config.align == "detect":
        return self._aligned(path)
      data = images.read_image_file(path)
      return convert_face_image(
          data, config.image_size, config.jpeg_quality, where=os.fspath(path)
      )
    except NoFaceError as e:
      return e  # left out and named, with or without --skip_bad
    except OSError as e:
      error = BadImageError(path, f"unreadable ({e.strerror or e})")
    except limits.LimitError as e:
      error = BadImageError(path, e.detail)
    except BadImageError as e:
      error = e
    if not self.skip_bad:
      raise BadImageError(
          error.path,
          f"{error.reason}; pass --skip_bad to leave unreadable files out",
      )
    return error

  def _aligned(self, path: pathlib.Path) -> bytes:
    """The photo's largest face on the template, as a JPEG (one detector
    per thread: dlib's are not shared between threads)."""
    from qgjt_jax.align import detector as detector_lib  # pylint: disable=g-import-not-at-top
    from qgjt_jax.align import five_points  # pylint: disable=g-import-not-at-top

    config: FaceImageFolderConfig = self.builder_config
    if not hasattr(self._local, "detect"):
      self._local.detect = detector_lib.Detector()
    photo = images.imread_bgr(path)
    faces = self._local.detect(photo)
    if not faces:
      raise NoFaceError(path, "no face found; left out")
    try:
      five_points.check_face(faces[0].points, *photo.shape[:2], os.fspath(path))
    except ValueError as e:
      raise NoFaceError(path, f"{e}; left out") from None
    crop = five_points.align_face(photo, faces[0].points, config.image_size)
    ok, encoded = cv2.imencode(
        ".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(config.jpeg_quality)]
    )
    if not ok:
      raise BadImageError(path, "could not be encoded as JPEG")
    return encoded.tobytes()

  def _generate_examples(
      self, root: pathlib.Path, files: list[tuple[pathlib.Path, int]]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    config: FaceImageFolderConfig = self.builder_config
    threads = self.num_threads or os.cpu_count() or 1
    progress = progress_lib.Progress(len(files), f"{self.name}/{config.name}")
    chunk = 64 * threads  # bounds the converted images held in memory
    num_images = 0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for start in range(0, len(files), chunk):
        batch = files[start : start + chunk]
        for (path, label), result in zip(
            batch, pool.map(self._convert, [p for p, _ in batch])
        ):
          progress.update()
          if isinstance(result, BadImageError):
            logging.warning("skipping %s", result)
            self.skipped.append(result)
            continue
          relative = path.relative_to(root).as_posix()
          num_images += 1
          yield relative, {"image": result, "label": label, "path": relative}
    progress.close()
    if not num_images:
      raise DataError(
          f"{root}: none of the {len(files)} files is a readable "
          "image: the folder must hold face images, "
          "<root>/<identity>/<image>"
      )
    listed = self.skipped[:_MAX_LISTED_SKIPS]
    self.info.metadata.update(
        num_images=num_images,
        num_skipped=len(self.skipped),
        num_no_face=sum(isinstance(e, NoFaceError) for e in self.skipped),
        skipped=[os.path.relpath(e.path, root) for e in listed],
        skipped_reasons=[e.reason for e in listed],
    )


def image_folder_config(
    name: str, image_size: int = IMAGE_SIZE, align: str = "none"
) -> FaceImageFolderConfig | str:
  """The config for preparing one folder under `name`."""
  if align not in ("none", "detect"):
    raise DataError(f"--align={align}: use none (aligned crops) or detect")
  if name == "default" and image_size == IMAGE_SIZE and align == "none":
    return name
  return FaceImageFolderConfig(
      name=name,
      image_size=image_size,
      align=align,
      description="Prepared from an identity-per-folder image tree"
      + (", faces detected and aligned." if align == "detect" else "."),
  )


# -- the generated set ---------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
  """The parameters of `synthetic.SyntheticFaces` (see there).

  Attributes:
    num_identities: generated people.
    images_per_identity: photos of each.
    image_size: side of the square images.
    seed: which people exist (and how each photo is taken).
    nuisance: how much photos of one person differ (1.0: as intended).
  """

  num_identities: int = 1000
  images_per_identity: int = 20
  image_size: int = IMAGE_SIZE
  seed: int = 0
  nuisance: float = 1.0

  def __post_init__(self):
    if min(self.num_identities, self.images_per_identity, self.image_size) < 1:
      raise ValueError(
          f"synthetic set {self.name!r}: num_identities, "
          "images_per_identity and image_size must be positive, got "
          f"{self.num_identities}, {self.images_per_identity}, "
          f"{self.image_size}"
      )

  def parameters(self) -> dict[str, Any]:
    """The generation parameters, as stored in the dataset metadata."""
    return {
        "num_identities": int(self.num_identities),
        "images_per_identity": int(self.images_per_identity),
        "image_size": int(self.image_size),
        "seed": int(self.seed),
        "nuisance": float(self.nuisance),
    }

  def source(self) -> synthetic.SyntheticFaces:
    return synthetic.SyntheticFaces(
        self.num_identities,
        self.images_per_identity,
        self.image_size,
        self.seed,
        nuisance=self.nuisance,
    )


class SyntheticFacesBuilder(_ManualBuilder):
  """The embedded generated face set, written out as ArrayRecord."""

  name = "synthetic_faces"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The JPEGs and labels of SyntheticFaces."}
  BUILDER_CONFIGS = [
      SyntheticFacesConfig(
          name="demo_40px",
          num_identities=64,
          images_per_identity=32,
          image_size=40,
          description="The CPU demo's set (configs/synthetic.py): 64 ids x "
          "32 images at 40x40.",
      ),
      SyntheticFacesConfig(
          name="faces_112px",
          num_identities=1000,
          images_per_identity=20,
          image_size=IMAGE_SIZE,
          description="1,000 ids x 20 images at 112x112, the size of the "
          "real training sets' faces.",
      ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config: SyntheticFacesConfig = self.builder_config
    size = config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="Generated face-like images (qgjt_jax.data.synthetic): "
        "camera JPEGs of random identities, with pose, expression, lighting "
        "and background varying per photo. Decode to BGR with "
        "qgjt_jax.files.images.decode_image.",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(
                    shape=(size, size, 3), encoding_format="jpeg"
                ),
                "label": tfds.features.ClassLabel(
                    num_classes=config.num_identities
                ),
                "index": tfds.features.Scalar(
                    np.int64, doc="record index in SyntheticFaces"
                ),
            }
        ),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download or read
    config: SyntheticFacesConfig = self.builder_config
    source = config.source()
    self.info.metadata.update(
        format="synthetic",
        num_images=len(source),
        parameters=config.parameters(),
    )
    return {"train": self._generate_examples(source)}

  def _generate_examples(
      self, source: synthetic.SyntheticFaces
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    progress = progress_lib.Progress(
        len(source), f"{self.name}/{self.builder_config.name}"
    )
    for index in range(len(source)):
      record = source[index]
      yield index, {
          "image": record["image"],
          "label": int(record["label"]),
          "index": index,
      }
      progress.update()
    progress.close()


def synthetic_config(
    name: str,
    *,
    num_identities: int | None = None,
    images_per_identity: int | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    nuisance: float | None = None,
) -> SyntheticFacesConfig | str:
  """The config for generating the set `name`; None means "the default".

  A registered name ("demo_40px", ...) stands for its parameters: given ones
  must agree, so a name never describes two different sets. Any other name
  gets a config of the given parameters (the `SyntheticFacesConfig` defaults
  for those left out).

  Raises:
    ValueError: a registered name with different parameters.
  """
  given = {
      "num_identities": num_identities,
      "images_per_identity": images_per_identity,
      "image_size": image_size,
      "seed": seed,
      "nuisance": nuisance,
  }
  given = {k: v for k, v in given.items() if v is not None}
  known = {c.name: c for c in SyntheticFacesBuilder.BUILDER_CONFIGS}
  if name in known:
    registered = known[name].parameters()
    differ = {
        k: (v, registered[k]) for k, v in given.items() if v != registered[k]
    }
    if differ:
      said = ", ".join(
          f"{k}={v} (registered: {r})" for k, (v, r) in differ.items()
      )
      raise ValueError(
          f"synthetic set {name!r} is registered with other "
          f"parameters: {said}; pick another name"
      )
    return name
  config = SyntheticFacesConfig(name=name, **given)
  p = config.parameters()
  config.description = (
      f"Generated: {p['num_identities']} ids x {p['images_per_identity']} "
      f"images at {p['image_size']} px, seed {p['seed']}, nuisance "
      f"{p['nuisance']:g}."
  )
  return config
