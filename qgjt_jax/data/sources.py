"""Random-access face-image sources for grain.

Every source here is a grain `RandomAccessDataSource` by duck typing
(`__len__`, `__getitem__`), picklable to grain worker processes (files are
opened lazily in each process), and yields records

  {"image": <encoded JPEG/PNG bytes>, "label": np.int32 class id}

with attributes `num_classes` and `name`. Images stay encoded so the decode
runs in the pipeline's worker processes, with `files.images.decode_image`,
which returns uint8 (H, W, 3) **BGR**: the channel order the authors' models
are trained on (it says why).

* `RecSource`: straight from an insightface `train.rec`/`train.idx`, so training
  can start without converting anything.
* `ArrayRecordSource`: a dataset prepared by `qgjt_jax.data.prepare` (TFDS
  ArrayRecord, see `qgjt_jax.data.builders`).
* `open_source`: picks one of them from a path or a prepared dataset name.
* `train_source`: the source a training config's `config.data` names, by
  its kind (`register_kind`: rec, tfds, synthetic).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import numpy as np

from qgjt_jax.data.recordio import InsightFaceRecord
from qgjt_jax.data.recordio import RecordIOError

__all__ = [
    "RecSource",
    "ArrayRecordSource",
    "open_source",
    "train_source",
    "DataKind",
    "register_kind",
    "data_kind",
    "RecordIOError",
]

PathLike = str | os.PathLike


def _rec_paths(path: PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(rec, idx) from a directory holding train.rec or a .rec file path."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "train.rec"
  if path.suffix != ".rec":
    raise RecordIOError(
        f"{path}: expected a .rec file or a directory with train.rec"
    )
  return path, path.with_suffix(".idx")


class RecSource:
  """The images of an insightface `.rec` set, in `image_keys` order.

  Attributes:
    num_classes: number of classes (from `property`, checked against the
      identity header).
    name: a short name of the set (its directory name by default).
    record: the underlying `InsightFaceRecord`.
  """

  def __init__(self, path: PathLike, *, name: str | None = None):
    """Opens the set.

    Args:
      path: a directory holding `train.rec`, `train.idx` (and usually
        `property`), or the path of a `.rec` file with its `.idx` beside it.
      name: the source name; defaults to the directory name.

    Raises:
      RecordIOError: missing or malformed files.
    """
    rec, idx = _rec_paths(path)
    self.record = InsightFaceRecord(rec, idx)
    self.num_classes = self.record.num_classes
    self.name = name or rec.parent.name or rec.stem

  def __len__(self) -> int:
    return len(self.record)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image, label = self.record.read_image(int(index))
    return {"image": image, "label": np.int32(label)}

  def where(self, index: int) -> str:
    """Names image `index` in messages: the file and its record key."""
    return f"{self.record.rec_path}: record {self.record.key(int(index))}"

  def __repr__(self) -> str:
    return (
        f"RecSource({str(self.record.rec_path)!r}, images={len(self)}, "
        f"num_classes={self.num_classes})"
    )


def _resolve_prepared_dir(data_dir: PathLike, name: str) -> pathlib.Path:
  """Directory of a prepared dataset "builder/config[:version]"."""
  name, _, version = name.partition(":")
  root = pathlib.Path(data_dir) / name
  if version:
    path = root / version
  else:
    versions = []
    if root.is_dir():
      for child in root.iterdir():
        parts = child.name.split(".")
        if (
            child.is_dir()
            and len(parts) == 3
            and all(p.isdigit() for p in parts)
            and (child / "dataset_info.json").exists()
        ):
          versions.append((tuple(int(p) for p in parts), child))
    if not versions:
      raise FileNotFoundError(
          f"no prepared dataset {name!r} under {data_dir} (run python -m "
          "qgjt_jax.data.prepare first)"
      )
    path = max(versions)[1]
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"{path} holds no prepared dataset")
  return path


class ArrayRecordSource:
  """A dataset prepared by `qgjt_jax.data.prepare` (TFDS, ArrayRecord files).

  The records come back with the image still encoded (TFDS's own image
  decoding is skipped) and the label as np.int32.

  Attributes:
    num_classes: from the dataset's `label` ClassLabel feature.
    name: "builder/config", e.g. "insightface_rec/ms1mv2".
    info: the TFDS DatasetInfo.
  """

  def __init__(self, dataset_dir: PathLike, split: str = "train"):
    """Opens a prepared dataset.

    Args:
      dataset_dir: the version directory, `data_dir/builder/config/1.0.0`.
      split: the split to read (the face builders write "train" only).
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.dataset_dir = pathlib.Path(dataset_dir)
    builder = tfds.builder_from_directory(os.fspath(self.dataset_dir))
    self.info = builder.info
    self.num_classes = int(builder.info.features["label"].num_classes)
    config = builder.builder_config.name if builder.builder_config else None
    self.name = f"{builder.name}/{config}" if config else builder.name
    self.split = split
    self._source = builder.as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()}
    )

  @classmethod
  def from_name(
      cls, data_dir: PathLike, name: str, split: str = "train"
  ) -> "ArrayRecordSource":
    """Opens "builder/config[:version]" under `data_dir` (newest version)."""
    return cls(_resolve_prepared_dir(data_dir, name), split)

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _record(example: dict[str, Any]) -> dict[str, Any]:
    return {"image": example["image"], "label": np.int32(example["label"])}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._record(self._source[int(index)])

  def example(self, index: int) -> dict[str, Any]:
    """The full stored example, with its origin ("key" or "path")."""
    return self._source[int(index)]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # ArrayRecord reads a batch of records in one call, cheaper than one by one.
    return [
        self._record(e)
        for e in self._source.__getitems__([int(i) for i in indices])
    ]

  def __repr__(self) -> str:
    return (
        f"ArrayRecordSource({str(self.dataset_dir)!r}, split={self.split!r}"
        f", images={len(self)}, num_classes={self.num_classes})"
    )


def open_source(
    path_or_name: PathLike,
    *,
    data_dir: PathLike | None = None,
    split: str = "train",
) -> RecSource | ArrayRecordSource:
  """Opens whichever kind of source `path_or_name` names.

  Args:
    path_or_name: a `.rec` file or a directory with `train.rec` (-> RecSource);
      a prepared dataset version directory (-> ArrayRecordSource); or, with
      `data_dir`, a prepared dataset name "builder/config[:version]".
    data_dir: where prepared datasets live, for names.
    split: the split of a prepared dataset.

  Returns:
    The source.
  """
  path = pathlib.Path(path_or_name)
  if path.suffix == ".rec" or (path / "train.rec").exists():
    return RecSource(path)
  if (path / "dataset_info.json").exists():
    return ArrayRecordSource(path, split)
  if data_dir is not None:
    return ArrayRecordSource.from_name(data_dir, os.fspath(path_or_name), split)
  raise FileNotFoundError(
      f"{path_or_name}: neither a .rec set nor a prepared dataset directory "
      "(pass data_dir= to open a prepared dataset by name)"
  )


def default_tfds_data_dir() -> str:
  """TFDS's default data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  )


# ---------------------------------------------------------------------------
# The kinds of training data (`config.data.kind`): a registry, like the
# queue variants. A kind opens its source from `config.data` and says what
# is wrong with the keys it reads (the config checks raise it, naming the
# key), so adding a kind is writing its two functions.


@dataclasses.dataclass(frozen=True)
class DataKind:
  name: str
  # config.data -> the training source.
  open: Callable[[Any], Any]
  # (config.data, whether to look at the files) -> what is wrong, or None.
  problem: Callable[[Any, bool], Optional[str]]


_KINDS: dict[str, DataKind] = {}


def register_kind(kind: DataKind) -> DataKind:
  _KINDS[kind.name] = kind
  return kind


def data_kind(name: str) -> DataKind:
  if name not in _KINDS:
    raise ValueError(
        f"config.data.kind={name!r}: expected one of {', '.join(_KINDS)}"
    )
  return _KINDS[name]


def _local_missing(path: str, folder: bool = False) -> bool:
  """A local path (not object storage) that does not exist."""
  if "://" in path:
    return False
  return not (os.path.isdir(path) if folder else os.path.exists(path))


def _rec_problem(data: Any, files: bool) -> Optional[str]:
  if not data.rec_dir:
    return (
        "config.data.rec_dir is not set: point it at the folder holding "
        "insightface's train.rec and train.idx, e.g. "
        "--config.data.rec_dir=/data/faces_emore."
    )
  if files and _local_missing(data.rec_dir):
    return (
        f"config.data.rec_dir={data.rec_dir!r} does not exist: point it at "
        "the folder holding train.rec and train.idx."
    )
  return None


def _tfds_problem(data: Any, files: bool) -> Optional[str]:
  if not data.tfds_name:
    return (
        "config.data.tfds_name is not set: name a prepared set such as "
        "'insightface_rec/ms1mv2' (see `python -m qgjt_jax.data.prepare`)."
    )
  if (
      files
      and data.tfds_data_dir
      and _local_missing(data.tfds_data_dir, folder=True)
  ):
    return (
        f"config.data.tfds_data_dir={data.tfds_data_dir!r} does not exist: "
        "use the --data_dir given to `python -m qgjt_jax.data.prepare`."
    )
  return None


def _synthetic_problem(data: Any, files: bool) -> Optional[str]:
  del files  # generated: no files
  spec = data.synthetic
  for key, least in (
      ("num_identities", 2),
      ("images_per_identity", 1),
      ("eval_identities", 2),
      ("eval_pairs", 1),
  ):
    if spec[key] < least:
      return (
          f"config.data.synthetic.{key}={spec[key]} must be at least {least}."
      )
  return None


def _synthetic_source(data: Any):
  from qgjt_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  spec = data.synthetic
  return synthetic.SyntheticFaces(
      spec.num_identities,
      spec.images_per_identity,
      image_size=data.image_size,
      seed=spec.seed,
      cache=True,
  )


# "rec": an insightface folder (`rec_dir`), read directly; "tfds": a set
# `qgjt_jax.data.prepare` wrote (`tfds_name` such as
# "insightface_rec/ms1mv2", under `tfds_data_dir` or TFDS's default
# directory); "synthetic": the generated set sized by `data.synthetic` (its
# `seed` fixes which faces exist, independently of the training seed).
register_kind(
    DataKind("rec", lambda data: RecSource(data.rec_dir), _rec_problem)
)
register_kind(
    DataKind(
        "tfds",
        lambda data: ArrayRecordSource.from_name(
            data.tfds_data_dir or default_tfds_data_dir(), data.tfds_name
        ),
        _tfds_problem,
    )
)
register_kind(DataKind("synthetic", _synthetic_source, _synthetic_problem))


def kinds() -> tuple[str, ...]:
  """config.data.kind's values: the kinds registered."""
  return tuple(_KINDS)


def train_source(config: Any):
  """The training source that `config.data` describes (its kind's)."""
  return data_kind(config.data.kind).open(config.data)
