r"""Prepares a face training set as a TFDS ArrayRecord dataset.

  python -m qgjt_jax.data.prepare --format=insightface_rec \
      --src=/data/faces_emore --data_dir=/data/tfds --name=ms1mv2
  python -m qgjt_jax.data.prepare --format=image_folder \
      --src=/data/my_faces --data_dir=/data/tfds --name=my_faces --skip_bad
  python -m qgjt_jax.data.prepare --format=synthetic --data_dir=/data/tfds \
      --name=demo_40px
  python -m qgjt_jax.data.prepare --format=synthetic --data_dir=/data/tfds \
      --name=my_synth --num_identities=500 --images_per_identity=40 \
      --image_size=112 --seed=3

The result is `data_dir/<builder>/<name>/1.0.0/`, read with
`qgjt_jax.data.sources.ArrayRecordSource.from_name(data_dir,
"<builder>/<name>")`; the last line printed says where and how many images and
identities it holds. Progress lines are logged while it runs.

Interrupting is safe: TFDS writes into a temporary `incomplete.*` directory and
renames it only when everything is written, so a rerun starts afresh (a hard
kill can leave that temporary directory behind; a warning names it). Running
again on a prepared dataset reuses it; `--overwrite` rebuilds it. A generated
set is reused only if it was made with the requested parameters. Run it on one
host only when several share `data_dir`.

Formats live in `FORMATS`; another module adds one with `register_format`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from qgjt_jax import errors
from qgjt_jax.data import builders
from qgjt_jax.files import limits


@dataclasses.dataclass(frozen=True)
class PrepareRequest:
  """What the user asked for (the command-line flags).

  The generation parameters (`num_identities`, ...; None: the named config's
  or the default) concern the "synthetic" format only.
  """

  src: str | None
  data_dir: str
  name: str
  skip_bad: bool = False
  align: str = "none"
  num_identities: int | None = None
  images_per_identity: int | None = None
  image_size: int | None = None
  seed: int | None = None


# A format turns a request into a TFDS builder writing ArrayRecord files; the
# request's `src` is passed to that builder as its manual dir.
BuilderFactory = Callable[[PrepareRequest], tfds.core.DatasetBuilder]
FORMATS: dict[str, BuilderFactory] = {}


def register_format(name: str) -> Callable[[BuilderFactory], BuilderFactory]:
  """Decorator adding a builder factory to `FORMATS` under `name`."""

  def register(factory: BuilderFactory) -> BuilderFactory:
    if name in FORMATS and FORMATS[name] is not factory:
      raise ValueError(f"format {name!r} is already registered")
    FORMATS[name] = factory
    return factory

  return register


_GENERATION_PARAMETERS = (
    "num_identities",
    "images_per_identity",
    "image_size",
    "seed",
)


def _require_src(request: PrepareRequest, takes: tuple[str, ...] = ()) -> str:
  given = [
      k
      for k in _GENERATION_PARAMETERS
      if getattr(request, k) is not None and k not in takes
  ]
  if given:
    raise ValueError(f"--{given[0]} is for --format=synthetic only")
  if not request.src:
    raise ValueError("--src is required for this format")
  if not pathlib.Path(request.src).is_dir():
    raise FileNotFoundError(f"--src={request.src} is not a directory")
  return request.src


@register_format("insightface_rec")
def _insightface_rec(request: PrepareRequest) -> tfds.core.DatasetBuilder:
  src = _require_src(request)
  if request.align != "none":
    raise ValueError(
        "--align is for --format=image_folder (a .rec holds aligned crops)"
    )
  return builders.InsightFaceRec(
      data_dir=request.data_dir,
      file_format="array_record",
      config=builders.insightface_config(request.name, src),
  )


@register_format("image_folder")
def _image_folder(request: PrepareRequest) -> tfds.core.DatasetBuilder:
  _require_src(request, takes=("image_size",))
  return builders.FaceImageFolder(
      data_dir=request.data_dir,
      file_format="array_record",
      config=builders.image_folder_config(
          request.name, request.image_size or builders.IMAGE_SIZE, request.align
      ),
      skip_bad=request.skip_bad,
  )


@register_format("synthetic")
def _synthetic(request: PrepareRequest) -> tfds.core.DatasetBuilder:
  if request.src:
    raise ValueError(
        "--src is not used by --format=synthetic (the set is generated)"
    )
  if request.align != "none":
    raise ValueError("--align is for --format=image_folder")
  return builders.SyntheticFacesBuilder(
      data_dir=request.data_dir,
      file_format="array_record",
      config=builders.synthetic_config(
          request.name,
          num_identities=request.num_identities,
          images_per_identity=request.images_per_identity,
          image_size=request.image_size,
          seed=request.seed,
      ),
  )


def _check_reused_parameters(
    builder: tfds.core.DatasetBuilder, metadata
) -> None:
  """A reused generated set must be the one asked for, not a namesake."""
  config = builder.builder_config
  stored = metadata.get("parameters")
  if stored is None or not hasattr(config, "parameters"):
    return
  wanted = config.parameters()
  differ = sorted(k for k in wanted if stored.get(k) != wanted[k])
  if differ:
    said = ", ".join(
        f"{k}={stored.get(k)} (requested {wanted[k]})" for k in differ
    )
    raise ValueError(
        f"{builder.data_dir} was prepared with {said}; pass "
        "--overwrite to regenerate it, or choose another --name"
    )


@dataclasses.dataclass(frozen=True)
class PrepareResult:
  """Where the prepared dataset is and what it holds."""

  dataset_dir: str
  name: str  # "builder/config", for ArrayRecordSource.from_name
  num_images: int
  num_classes: int
  num_skipped: int
  reused: bool
  num_no_face: int = 0
  # "path: reason" of each file left out (at most the first 1,000).
  left_out: tuple[str, ...] = ()


def _stale_incomplete_dirs(builder: tfds.core.DatasetBuilder) -> list[str]:
  config_dir = pathlib.Path(os.fspath(builder.data_dir)).parent
  if not config_dir.is_dir():
    return []
  return sorted(
      os.fspath(p)
      for p in config_dir.iterdir()
      if p.is_dir() and p.name.startswith("incomplete.")
  )


def prepare(
    fmt: str,
    *,
    src: str | None = None,
    data_dir: str,
    name: str,
    skip_bad: bool = False,
    overwrite: bool = False,
    align: str = "none",
    **parameters: int | None,
) -> PrepareResult:
  """Prepares (or reuses) one dataset; the body of the command.

  Args:
    fmt: a key of `FORMATS`.
    src: the user's data (the builder's manual dir).
    data_dir: the TFDS data directory to write under.
    name: the dataset's config name (known insightface names check counts).
    skip_bad: skip unreadable images instead of failing (image folders).
    overwrite: rebuild even if the dataset exists.
    align: "detect" to find and align each photo's face (image folders).
    **parameters: the generated set's `num_identities`,
      `images_per_identity`, `image_size`, `seed` ("synthetic" format).

  Returns:
    The counts and location.
  """
  # This command prints its own progress line and counts.
  tfds.disable_progress_bar()
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
  request = PrepareRequest(
      src=src,
      data_dir=data_dir,
      name=name,
      skip_bad=skip_bad,
      align=align,
      **parameters,
  )
  builder = FORMATS[fmt](request)
  reused = builder.is_prepared() and not overwrite
  if reused:
    _check_reused_parameters(builder, builder.info.metadata or {})
  mode = (
      tfds.download.GenerateMode.FORCE_REDOWNLOAD
      if overwrite
      else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=src, download_mode=mode, try_download_gcs=False
      )
  )
  info = builder.info
  metadata = info.metadata or {}
  if reused:
    previous = metadata.get("source")
    if src and previous and os.path.abspath(previous) != os.path.abspath(src):
      logging.warning(
          "%s was prepared from %s, not %s; reusing it (pass "
          "--overwrite to rebuild)",
          builder.data_dir,
          previous,
          src,
      )
  stale = _stale_incomplete_dirs(builder)
  if stale:
    logging.warning(
        "temporary directories left by interrupted runs (delete them when no "
        "other prepare is running): %s",
        ", ".join(stale),
    )
  config = builder.builder_config.name if builder.builder_config else None
  return PrepareResult(
      dataset_dir=os.fspath(builder.data_dir),
      name=f"{builder.name}/{config}" if config else builder.name,
      num_images=int(info.splits["train"].num_examples),
      num_classes=int(info.features["label"].num_classes),
      num_skipped=int(metadata.get("num_skipped", 0)),
      reused=reused,
      num_no_face=int(metadata.get("num_no_face", 0)),
      left_out=tuple(
          f"{path}: {reason}"
          for path, reason in zip(
              metadata.get("skipped", ()), metadata.get("skipped_reasons", ())
          )
      ),
  )


def _define_flags() -> None:
  # Defined on demand, not at import, so that importing `prepare` (for
  # `register_format`) cannot clash with another program's flags.
  flags.DEFINE_enum(
      "format",
      None,
      sorted(FORMATS),
      "Layout of --src, or synthetic for the generated set.",
  )
  flags.DEFINE_string(
      "src",
      None,
      "The user's data: an insightface folder "
      "(train.rec, train.idx, property) or an image tree "
      "root/<identity>/<images>.",
  )
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write to.")
  flags.DEFINE_string(
      "name",
      None,
      "Dataset (config) name, e.g. ms1mv2, "
      "casia_webface, generic or any name of your own.",
  )
  flags.DEFINE_bool(
      "skip_bad",
      False,
      "Skip and count unreadable images "
      "instead of stopping at the first one.",
  )
  flags.DEFINE_bool("overwrite", False, "Rebuild an existing dataset.")
  flags.DEFINE_enum(
      "align",
      "none",
      ["none", "detect"],
      "image_folder: "
      "none (the files are aligned face crops) or detect (find "
      "each photo's largest face and align it to the "
      "five-point template; the `.[align]` extra).",
  )
  synthetic = " (--format=synthetic; default: the named set's or "
  flags.DEFINE_integer(
      "num_identities",
      None,
      f"Generated identities{synthetic}1000).",
      lower_bound=1,
  )
  flags.DEFINE_integer(
      "images_per_identity",
      None,
      f"Generated images per identity{synthetic}20).",
      lower_bound=1,
  )
  flags.DEFINE_integer(
      "image_size",
      None,
      "Side of the stored images (image_folder, synthetic; default 112).",
      lower_bound=8,
      upper_bound=1024,
  )
  flags.DEFINE_integer(
      "seed", None, f"Which faces are generated{synthetic}0).", lower_bound=0
  )
  limits.define_flags()
  errors.define_traceback_flag()
  flags.mark_flags_as_required(["format", "data_dir", "name"])


def check_src(fmt: str, src: str | None) -> None:
  """--src names a folder with something in it (before TFDS's own, less
  clear, refusal)."""
  if fmt == "synthetic":
    return
  if not src:
    raise builders.DataError(
        f"--format={fmt} needs --src, the folder holding the data"
    )
  if not os.path.isdir(src):
    raise builders.DataError(f"--src={src} is not a folder")
  if not any(True for _ in os.scandir(src)):
    layout = (
        "<root>/<identity>/<image>"
        if fmt == "image_folder"
        else "train.rec, train.idx and property"
    )
    raise builders.DataError(f"--src={src} is empty: it must hold {layout}")


def main(argv: Sequence[str]) -> None:
  verbose = errors.start_absl_command(argv)
  f = flags.FLAGS
  with errors.expected_failures(verbose=verbose):
    check_src(f.format, f.src)
    limits.configure_from_flags()
    result = prepare(
        f.format,
        src=f.src,
        data_dir=f.data_dir,
        name=f.name,
        skip_bad=f.skip_bad,
        overwrite=f.overwrite,
        align=f.align,
        num_identities=f.num_identities,
        images_per_identity=f.images_per_identity,
        image_size=f.image_size,
        seed=f.seed,
    )
  what = "Reused" if result.reused else "Prepared"
  shown = 50
  for line in result.left_out[:shown]:
    print(errors.displayable(f"  left out {line}"), flush=True)
  if result.num_skipped > shown:
    print(
        f"  ... and {result.num_skipped - shown} more (the dataset's "
        "metadata lists the first 1,000)",
        flush=True,
    )
  unreadable = result.num_skipped - result.num_no_face
  skipped = (
      f", {unreadable} unreadable files skipped" if unreadable else ""
  ) + (
      f", {result.num_no_face} photos without a face left out"
      if result.num_no_face
      else ""
  )
  print(
      errors.displayable(
          f"{what} {result.name} in {result.dataset_dir}: {result.num_images} "
          f"images, {result.num_classes} identities{skipped}"
      ),
      flush=True,
  )


def cli() -> None:
  """The `qgjt-prepare` console script: `python -m qgjt_jax.data.prepare`."""
  _define_flags()
  app.run(main, flags_parser=errors.parse_flags)


if __name__ == "__main__":
  cli()
