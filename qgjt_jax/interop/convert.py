r"""Imports pretrained weights into a workdir: PyTorch and safetensors
state dicts and insightface's ONNX recognisers, of every registered
backbone family.

The code of `python -m qgjt_jax.convert` (qgjt_jax/convert.py): a
pretrained file into an orbax checkpoint of this project (step 0, the
`model` item that `--mode=eval` and fine-tuning read).

`--src` is a Lightning `.ckpt`, a `.pth`/`.pt` state dict, a
`.safetensors` file (CVLFace's hub models, or `export --format=safetensors`,
whose recorded input size and channel order are used), an `.npz` of
name -> array (all read without torch, `weight_files`) or an `.onnx` graph
(`onnx_import`: insightface's recognisers, matched layer by layer, or this
project's export, whose weights carry their variables' names and whose
metadata the model's settings); nothing from the file runs. The family, model, sizes and
input size are read from the tensors' names and shapes (each family's
`recognise`; `--arch` says which model the file must hold); the program
prints them and the parameter count, and records them in
WORKDIR/converted_from.json, from which every command that uses the model
(`--mode=eval`, embed, compare, identify, export, `qgjt_jax.load_model`)
rebuilds it. It refuses to replace an existing WORKDIR/checkpoints unless
`--overwrite`.

A file this project exported also carries its norm statistics, quality
settings and calibrated thresholds (`carried`): they are checked to add up
and restored (the checkpoint's `quality` item, converted_from.json's
`quality_settings`, eval/step_0.json), so the
converted workdir rates quality and decides as its source did.

Published weights read BGR (AdaFace/QGFace) or RGB (insightface): the
family says which, and the converted workdir records `model.input_order`,
which every use of the model follows. The PyTorch names of each family are
mapped by `state_dicts`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from typing import Any, Mapping, Optional

import numpy as np

from qgjt_jax import checkpoint
from qgjt_jax import models
from qgjt_jax import outputs
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.interop import state_dicts
from qgjt_jax.interop import weight_files

# --- Command line: a pretrained checkpoint -> this project's orbax layout.


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
  """Converted backbone variables and the settings that rebuild the model."""

  variables: dict
  name: str  # the canonical config.model.name
  embedding_size: int
  image_size: int
  input_order: str
  settings: dict[str, Any]  # the family's own (config.model.KEY)
  description: str  # the family's one line
  # What an exported file carries beyond the weights: norm statistics,
  # quality settings, thresholds.
  carried: Optional[Any] = None  # carried.Carried

  @property
  def num_params(self) -> int:
    return models.count_params(self.variables["params"])

  def module(self):
    """The Flax module of these variables (float32)."""
    return models.build_backbone(
        self.name,
        embedding_size=self.embedding_size,
        input_order=self.input_order,
        **self.settings,
    )

  def config_overrides(self) -> dict[str, Any]:
    """config key -> the value a config needs to build this very model."""
    return {
        "model.name": self.name,
        **{f"model.{k}": v for k, v in self.settings.items()},
        "model.embedding_size": self.embedding_size,
        "model.input_order": self.input_order,
        "data.image_size": self.image_size,
    }


def convert_state_dict(
    state_dict: Mapping[str, Any],
    arch: str = "auto",
    input_order: str = "auto",
    image_size: int | None = None,
) -> ConvertedModel:
  """Converts a state dict of any registered backbone family.

  The family, model and sizes are read from the tensors' names and shapes
  (`state_dicts.find_backbone`); `arch` (not "auto") is the name the file
  must hold. `input_order` "auto" takes the channel order the family's
  published weights read (AdaFace/QGFace BGR, insightface RGB). The input
  size is the one the head's shapes imply unless `image_size` (a file's own
  record) says which of the sizes that fit it is.

  Raises:
    state_dicts.StateDictMismatchError: the tensors do not fit (names
      listed), or are not the `arch` asked for (saying what they are).
    ValueError: an unknown `arch` or `input_order`.
  """
  if arch != "auto":
    _, wanted = models.family_of(arch)
  found = state_dicts.find_backbone(state_dict)
  recognised = found.recognised
  _check_finite(found.tensors)
  if arch != "auto" and wanted != recognised.name:
    raise state_dicts.StateDictMismatchError(
        f"{arch} was asked for, but the tensors look like {recognised.name}"
    )
  if input_order == "auto":
    input_order = found.family.input_order(recognised.name)
  if input_order not in ("BGR", "RGB"):
    raise ValueError(f"input order {input_order!r}: use BGR, RGB or auto")
  module = models.build_backbone(
      recognised.name,
      embedding_size=recognised.embedding_size,
      input_order=input_order,
      **recognised.settings,
  )
  size = image_size or recognised.image_size
  try:
    variables = state_dicts.to_flax(found.tensors, module, size)
  except state_dicts.StateDictMismatchError as e:
    if size == recognised.image_size:
      raise
    raise state_dicts.StateDictMismatchError(
        f"the file records {image_size} px images, but its head's shapes "
        f"are those of {recognised.image_size} px ones:\n{e}"
    ) from None
  return ConvertedModel(
      variables=variables,
      name=recognised.name,
      embedding_size=recognised.embedding_size,
      image_size=size,
      input_order=input_order,
      settings=dict(recognised.settings),
      description=found.family.describe(module),
  )


def convert_file(
    path: str, arch: str = "auto", input_order: str = "auto"
) -> ConvertedModel:
  """The model in a weight file of any format convert reads (see the
  module doc); an ONNX graph's convolutions are checked against the
  model's own.

  Raises:
    errors.UserError: the file cannot be read or holds no backbone this
      package builds (each naming the file).
  """
  from qgjt_jax.interop import carried  # pylint: disable=g-import-not-at-top
  from qgjt_jax.interop import onnx_import  # pylint: disable=g-import-not-at-top

  if os.fspath(path).endswith(".onnx"):
    model = onnx_import.read_model(path)
    own = onnx_import.own_export(model, path)
    if own is not None:
      converted = _own_export(own, path, arch, input_order)
      return dataclasses.replace(
          converted, carried=carried.read(own.metadata, path)
      )
    weights = onnx_import.read_onnx(path, model)
    state, recorded = weights.state_dict, {
        "image_size": weights.image_size,
        "carried": carried.read(weights.metadata, path),
    }
  else:
    weights = None
    state, recorded = weight_files.read_with_record(path)
  try:
    converted = convert_state_dict(
        state,
        arch,
        recorded.get("input_order", "auto")
        if input_order == "auto"
        else input_order,
        recorded.get("image_size"),
    )
  except state_dicts.StateDictMismatchError as e:
    raise state_dicts.StateDictMismatchError(f"{path}: {e}") from e
  if weights is not None:
    onnx_import.check_conv_attributes(
        path,
        weights,
        converted.module(),
        converted.variables,
        converted.image_size,
    )
  return dataclasses.replace(converted, carried=recorded.get("carried"))


def _own_export(own, path: str, arch: str, input_order: str) -> ConvertedModel:
  """The model of an ONNX file this project exported: rebuilt from the
  settings it records, its variables read by name, each checked against
  the model's own shape (`onnx_import.OwnExport`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qgjt_jax.interop import onnx_export  # pylint: disable=g-import-not-at-top

  settings = own.settings

  def setting(key, kind, low=None, high=None):
    value = settings.get(key)
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        or (low is not None and not low <= value <= high)
    ):
      raise state_dicts.StateDictMismatchError(
          f"{path}: its recorded {key}={value!r} is not a model setting "
          "this project writes"
      )
    return value

  try:
    family, name = models.family_of(setting("model.name", str))
  except ValueError as e:
    raise state_dicts.StateDictMismatchError(f"{path}: {e}") from None
  if arch != "auto" and models.family_of(arch)[1] != name:
    raise state_dicts.StateDictMismatchError(
        f"{path}: {arch} was asked for, but the file holds {name}"
    )
  embedding_size = setting("model.embedding_size", int, 1, 65536)
  image_size = setting("data.image_size", int, 1, 4096)
  if input_order == "auto":
    input_order = setting("model.input_order", str)
  if input_order not in ("BGR", "RGB"):
    raise ValueError(f"input order {input_order!r}: use BGR, RGB or auto")
  own_settings = {
      key: settings[f"model.{key}"]
      for key in family.weight_settings
      if f"model.{key}" in settings
  }
  module = models.build_backbone(
      name,
      embedding_size=embedding_size,
      input_order=input_order,
      **own_settings,
  )
  shapes = jax.eval_shape(
      lambda: module.init(
          jax.random.key(0),
          jnp.zeros((1, image_size, image_size, 3)),
          train=False,
      )
  )
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  names = [onnx_export.weight_name(p) for p, _ in leaves]
  missing = [n for n in names if n not in own.weights]
  extra = sorted(set(own.weights) - set(names))
  wrong = [
      f"{n} {own.weights[n].shape} (the model's {leaf.shape})"
      for n, (_, leaf) in zip(names, leaves)
      if n in own.weights and own.weights[n].shape != leaf.shape
  ]
  if missing or extra or wrong:
    raise state_dicts.StateDictMismatchError(
        f"{path}: its weights are not those of the {name} it records: "
        + "; ".join(
            f"{what}: {', '.join(items[:5])}"
            for what, items in (
                ("missing", missing),
                ("not the model's", extra),
                ("of other shapes", wrong),
            )
            if items
        )
    )
  try:
    _check_finite(own.weights)
  except state_dicts.StateDictMismatchError as e:
    raise state_dicts.StateDictMismatchError(f"{path}: {e}") from None
  variables = jax.tree_util.tree_unflatten(
      tree,
      [
          np.asarray(own.weights[n], leaf.dtype)
          for n, (_, leaf) in zip(names, leaves)
      ],
  )
  return ConvertedModel(
      variables=variables,
      name=name,
      embedding_size=embedding_size,
      image_size=image_size,
      input_order=input_order,
      settings=own_settings,
      description=family.describe(module),
  )


def _check_finite(tensors: Mapping[str, Any]) -> None:
  """Weights with NaN or infinities make every embedding NaN: refused."""
  bad = [
      name
      for name, value in tensors.items()
      if isinstance(value, np.ndarray)
      and value.dtype.kind == "f"
      and not np.isfinite(value).all()
  ]
  if bad:
    raise state_dicts.StateDictMismatchError(
        f"{len(bad)} backbone tensor(s) hold NaN or infinite values "
        f"({', '.join(sorted(bad)[:3])}{', ...' if len(bad) > 3 else ''}): "
        "the weights are damaged or come from a diverged run"
    )


# What a workdir holds about its model: replaced together by --overwrite,
# so no record of the old model (a training run's config.json, its
# evaluations) is left to describe the new one.
_MODEL_RECORDS = (
    workdir_layout.CONFIG_RECORD,
    workdir_layout.CONVERTED_RECORD,
    workdir_layout.EVAL,
)


def check_writable(workdir: str, overwrite: bool = False) -> None:
  """Refuses a workdir that holds a model (unless asked to replace it).

  Raises:
    FileExistsError: naming the folder and what is in it.
  """
  layout = workdir_layout.Workdir(workdir)
  directory = layout.checkpoints
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory} exists and is not a folder")
  entries = (
      sorted(p.name for p in directory.iterdir()) if directory.exists() else []
  )
  records = [name for name in _MODEL_RECORDS if (layout.root / name).exists()]
  if (entries or records) and not overwrite:
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    what = (
        f"{directory} already holds checkpoints ({shown})"
        if entries
        else f"{workdir} already holds a run's {', '.join(records)}"
    )
    raise FileExistsError(
        f"{what}; choose another --workdir, or pass --overwrite to delete "
        "that model (checkpoints, records, evaluations) and write the "
        "converted one instead"
    )


def write_checkpoint(
    workdir: str,
    converted: ConvertedModel,
    *,
    source: str = "",
    overwrite: bool = False,
) -> str:
  """Writes WORKDIR/checkpoints/0 holding the `model` item; returns the folder.

  Also records the source file and the config overrides in
  WORKDIR/converted_from.json, so they can be found again later.

  Raises:
    FileExistsError: the checkpoint folder is not empty and not `overwrite`.
  """
  check_writable(workdir, overwrite)
  layout = workdir_layout.Workdir(workdir)
  root, directory = layout.root, layout.checkpoints
  # Written beside, then swapped in: an interrupted conversion leaves the
  # old model whole (and a step left beside step 0 would be "the latest").
  staging = root / ".checkpoints.converting"
  if staging.exists():
    staging.rmtree()
  carried = converted.carried
  checkpoint.save_model_only(
      str(staging),
      converted.variables,
      step=0,
      quality=carried and carried.norm_stats(),
  )
  record = {
      "source": os.path.abspath(source) if source else "",
      "architecture": converted.name,
      "description": converted.description,
      "input_order": converted.input_order,
      "embedding_size": converted.embedding_size,
      "image_size": converted.image_size,
      "num_params": converted.num_params,
      "config_overrides": converted.config_overrides(),
  }
  if carried and carried.quality:
    record["quality_settings"] = carried.settings()
  for name in _MODEL_RECORDS:
    old = root / name
    if old.is_dir():
      old.rmtree()
    elif old.exists():
      old.unlink()
  if directory.exists():
    directory.rmtree()
  staging.rename(directory)
  evaluation = carried and carried.evaluation(os.path.basename(source))
  if evaluation:
    layout.eval.mkdir(exist_ok=True)
    outputs.write(
        str(layout.eval / f"{workdir_layout.eval_result_name(0)}.json"),
        json.dumps(evaluation, indent=2) + "\n",
        overwrite=True,
    )
  outputs.write(
      str(layout.converted_record),
      json.dumps(record, indent=2) + "\n",
      overwrite=True,
  )
  return str(directory)


def summary(src: str, workdir: str, converted: ConvertedModel) -> str:
  """What the program prints after a conversion."""
  size = converted.image_size
  return "\n".join(
      [
          f"Converted {src}",
          f"  architecture    {converted.name}: {converted.description}",
          f"  embedding size  {converted.embedding_size}",
          f"  input           {converted.input_order}",
          f"  input size      {size} x {size}",
          f"  parameters      {converted.num_params:,}",
          "Wrote the model (step 0) to "
          f"{workdir_layout.Workdir(workdir).checkpoints}; "
          f"{workdir_layout.CONVERTED_RECORD} beside it says which model it "
          "is, so every command that uses it needs only --workdir. Evaluate it with",
          f"  python -m qgjt_jax.main --workdir={shlex.quote(workdir)} "
          "--mode=eval \\",
          "      --config.eval.bin_sets=\"('/data/lfw.bin', '/data/agedb_30.bin')\"",
          "(or eval.tinyface_root, scface_root, ijb_root, folders).",
      ]
  )
