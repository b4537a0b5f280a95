r"""Imports PyTorch IResNet weights into Flax: AdaFace/QGFace `net.py`
models and insightface arcface_torch backbones (`backbone.pth` of their model
zoo).

Command line: turn a pretrained checkpoint into an orbax checkpoint of this
project (step 0, the `model` item that `--mode=eval` and fine-tuning read):

  python -m qgjt_jax.convert --src=adaface_ir101_ms1mv2.ckpt \
      --workdir=runs/adaface_ir101 [--arch=auto|ir50|ir_se50|...] \
      [--overwrite]

`--src` is a Lightning `.ckpt`, a `.pth`/`.pt` state dict, a
`.safetensors` file (CVLFace's hub models, or `export --format=safetensors`,
whose recorded input size and channel order are used) or an `.npz` of
name -> array, all read without torch (`torch_files`) and without running
anything from the file. The architecture, base width,
embedding size and input size are read from the tensors (`--arch` names the
depth instead); the program prints them and the parameter count, and records
them in WORKDIR/converted_from.json, from which every command that uses the
model (`--mode=eval`, embed, compare, identify, export, `qgjt_jax.load_model`)
rebuilds it. It refuses to replace an existing WORKDIR/checkpoints unless
`--overwrite`.

Their models take RGB input where AdaFace's take BGR: the converted workdir
records `model.input_order`, which every use of the model follows. The names
and layouts of both PyTorch codes are mapped by `state_dicts`; the files are
read by `weight_files`, neither running anything from them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
from typing import Any, Mapping

from absl import app
from absl import flags
from etils import epath
import numpy as np

from qgjt_jax import checkpoint
from qgjt_jax import errors
from qgjt_jax import models
from qgjt_jax import outputs
from qgjt_jax import records
from qgjt_jax import workdir_lock
from qgjt_jax.files import limits
from qgjt_jax.interop import state_dicts
from qgjt_jax.interop import weight_files
from qgjt_jax.models import iresnet


# --- Command line: a pretrained checkpoint -> this project's orbax layout.


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
  """Converted backbone variables and the settings that rebuild the model."""
  variables: dict
  num_layers: int
  use_se: bool
  base_width: int
  embedding_size: int
  image_size: int
  layout: str = "adaface"
  input_order: str = "BGR"

  @property
  def name(self) -> str:
    """The canonical `config.model.name` ("ir100", "ir_se50", "r50", ...)."""
    if self.layout == "insightface":
      return f"r{self.num_layers}"
    return f"ir{'_se' if self.use_se else ''}{self.num_layers}"

  @property
  def num_params(self) -> int:
    return iresnet.count_params(self.variables["params"])

  def config_overrides(self) -> dict[str, Any]:
    """config key -> the value a config needs to build this very model."""
    return {"model.name": self.name,
            "model.base_width": self.base_width,
            "model.embedding_size": self.embedding_size,
            "model.input_order": self.input_order,
            "data.image_size": self.image_size}


# The channel order each layout's published models were trained on.
DEFAULT_INPUT_ORDER = {"adaface": "BGR", "insightface": "RGB"}


def parse_arch(name: str) -> tuple[str, int, bool]:
  """(layout, num_layers, use_se) of a backbone name ("ir101", "r50")."""
  model = models.build_backbone(name)
  return model.layout, model.num_layers, model.use_se


def convert_state_dict(state_dict: Mapping[str, Any], arch: str = "auto",
                       input_order: str = "auto",
                       image_size: int | None = None) -> ConvertedModel:
  """Converts a state dict for the named (or, with "auto", inferred) IResNet.

  `input_order` "auto" takes the layout's convention (AdaFace/QGFace models
  read BGR, insightface's RGB). The input size is 16 times the side of the
  head's feature map unless `image_size` (a file's own record) says which
  of the sizes that map fits.

  Raises:
    state_dicts.StateDictMismatchError: the tensors do not fit (names listed); with an
      explicit `arch` the message also says what the file looks like.
    ValueError: an unknown `arch` or `input_order`.
  """
  found, _ = state_dicts.detect_layout(state_dict)
  _check_finite(state_dicts.backbone_state(state_dict))
  if arch == "auto":
    layout = found
    num_layers, use_se = state_dicts.infer_architecture(state_dict)
  else:
    layout, num_layers, use_se = parse_arch(arch)
  if input_order == "auto":
    input_order = DEFAULT_INPUT_ORDER[layout]
  if input_order not in ("BGR", "RGB"):
    raise ValueError(f"input order {input_order!r}: use BGR, RGB or auto")
  try:
    if layout != found:
      raise state_dicts.StateDictMismatchError(
          f"{arch} is an {layout}-layout backbone; the state dict has "
          f"{found} names")
    variables = state_dicts.torch_state_dict_to_flax(state_dict, num_layers=num_layers,
                                         use_se=use_se)
  except state_dicts.StateDictMismatchError as e:
    if arch == "auto":
      raise
    try:
      depth, se = state_dicts.infer_architecture(state_dict)
      name = (f"r{depth}" if found == "insightface" else
              f"ir{'_se' if se else ''}{depth}")
      hint = f"\nthe tensors look like {name}"
    except state_dicts.StateDictMismatchError:
      hint = ""
    raise state_dicts.StateDictMismatchError(f"{e}{hint}") from e
  params = variables["params"]
  base_width = params["input_layer"]["conv"]["kernel"].shape[-1]
  fc_in, embedding_size = params["output_layer"]["fc"]["kernel"].shape
  final_channels = iresnet.unit_specs(num_layers, base_width,
                                      layout)[-1].out_channels
  # Four stride-2 stages: a side x side map before the head means input
  # images of 16 * side pixels (112 -> 7 for the published models).
  side = math.isqrt(fc_in // final_channels)
  if image_size is not None and -(-image_size // 16) != side:
    raise state_dicts.StateDictMismatchError(
        f"the file records {image_size} px images, but its head sees a "
        f"{side} x {side} map, which {16 * side} px images give")
  return ConvertedModel(variables=variables, num_layers=num_layers,
                        use_se=use_se, base_width=int(base_width),
                        embedding_size=int(embedding_size),
                        image_size=image_size or 16 * side, layout=layout,
                        input_order=input_order)


def _check_finite(tensors: Mapping[str, Any]) -> None:
  """Weights with NaN or infinities make every embedding NaN: refused."""
  bad = [name for name, value in tensors.items()
         if isinstance(value, np.ndarray) and value.dtype.kind == "f" and
         not np.isfinite(value).all()]
  if bad:
    raise state_dicts.StateDictMismatchError(
        f"{len(bad)} backbone tensor(s) hold NaN or infinite values "
        f"({', '.join(sorted(bad)[:3])}{', ...' if len(bad) > 3 else ''}): "
        "the weights are damaged or come from a diverged run")


# What a workdir holds about its model: replaced together by --overwrite,
# so no record of the old model (a training run's config.json, its
# evaluations) is left to describe the new one.
_MODEL_RECORDS = (records.CONFIG_RECORD, records.CONVERTED_RECORD, "eval")


def check_writable(workdir: str, overwrite: bool = False) -> None:
  """Refuses a workdir that holds a model (unless asked to replace it).

  Raises:
    FileExistsError: naming the folder and what is in it.
  """
  directory = epath.Path(checkpoint.checkpoints_dir(workdir))
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory} exists and is not a folder")
  entries = sorted(p.name for p in directory.iterdir()
                   ) if directory.exists() else []
  records = [name for name in _MODEL_RECORDS
             if (epath.Path(workdir) / name).exists()]
  if (entries or records) and not overwrite:
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    what = (f"{directory} already holds checkpoints ({shown})" if entries
            else f"{workdir} already holds a run's {', '.join(records)}")
    raise FileExistsError(
        f"{what}; choose another --workdir, or pass --overwrite to delete "
        "that model (checkpoints, records, evaluations) and write the "
        "converted one instead")


def write_checkpoint(workdir: str, converted: ConvertedModel, *,
                     source: str = "", overwrite: bool = False) -> str:
  """Writes WORKDIR/checkpoints/0 holding the `model` item; returns the folder.

  Also records the source file and the config overrides in
  WORKDIR/converted_from.json, so they can be found again later.

  Raises:
    FileExistsError: the checkpoint folder is not empty and not `overwrite`.
  """
  check_writable(workdir, overwrite)
  root = epath.Path(workdir)
  directory = epath.Path(checkpoint.checkpoints_dir(workdir))
  # Written beside, then swapped in: an interrupted conversion leaves the
  # old model whole (and a step left beside step 0 would be "the latest").
  staging = root / ".checkpoints.converting"
  if staging.exists():
    staging.rmtree()
  checkpoint.save_model_only(str(staging), converted.variables, step=0)
  record = {"source": os.path.abspath(source) if source else "",
            "architecture": converted.name, "layout": converted.layout,
            "input_order": converted.input_order,
            "num_layers": converted.num_layers, "use_se": converted.use_se,
            "base_width": converted.base_width,
            "embedding_size": converted.embedding_size,
            "image_size": converted.image_size,
            "num_params": converted.num_params,
            "config_overrides": converted.config_overrides()}
  for name in _MODEL_RECORDS:
    old = root / name
    if old.is_dir():
      old.rmtree()
    elif old.exists():
      old.unlink()
  if directory.exists():
    directory.rmtree()
  staging.rename(directory)
  outputs.write(str(root / records.CONVERTED_RECORD),
                json.dumps(record, indent=2) + "\n", overwrite=True)
  return str(directory)


def summary(src: str, workdir: str, converted: ConvertedModel) -> str:
  """What the program prints after a conversion."""
  se = "with" if converted.use_se else "no"
  size = converted.image_size
  return "\n".join([
      f"Converted {src}",
      f"  architecture    {converted.name} ({converted.num_layers} layers, "
      f"{se} SE)",
      f"  base width      {converted.base_width}",
      f"  embedding size  {converted.embedding_size}",
      f"  input           {converted.input_order} ({converted.layout} "
      "layout)",
      f"  input size      {size} x {size}",
      f"  parameters      {converted.num_params:,}",
      f"Wrote the model (step 0) to {checkpoint.checkpoints_dir(workdir)}; "
      f"{records.CONVERTED_RECORD} beside it says which model it is, so "
      "every command that uses it needs only --workdir. Evaluate it with",
      f"  python -m qgjt_jax.main --workdir={shlex.quote(workdir)} "
      "--mode=eval \\",
      "      --config.eval.bin_sets=\"('/data/lfw.bin', '/data/agedb_30.bin')\"",
      "(or eval.tinyface_root, scface_root, ijb_root, folders).",
  ])


def _define_flags() -> None:
  flags.DEFINE_string("src", None, "The PyTorch checkpoint: .ckpt "
                      "(Lightning), .pth/.pt (state dict; AdaFace/QGFace or "
                      "insightface arcface_torch), .safetensors (CVLFace, "
                      "or this project's export) or .npz.")
  flags.DEFINE_string("workdir", None, "Work directory to create; the model "
                      "goes to WORKDIR/checkpoints (step 0).")
  flags.DEFINE_string("arch", "auto", "auto (read from the tensors) or a "
                      "backbone name: " + ", ".join(models.backbone_names()))
  flags.DEFINE_enum("input_order", "auto", ["auto", "BGR", "RGB"],
                    "The channel order the weights were trained on: auto "
                    "(AdaFace/QGFace BGR, insightface RGB) or as given.")
  flags.DEFINE_bool("overwrite", False, "Delete an existing "
                    "WORKDIR/checkpoints and write the converted model.")
  flags.DEFINE_bool("force_lock", False, "Take the workdir's lock even when "
                    "its note says another run holds it.")
  limits.define_flags()
  errors.define_traceback_flag()
  flags.mark_flags_as_required(["src", "workdir"])


def main(argv: list[str]) -> None:
  verbose = errors.start_absl_command(argv)
  cfg = flags.FLAGS
  with errors.expected_failures(verbose=verbose):
    # Before the (slow) read: a bad name or a workdir in use fails at once.
    if cfg.arch != "auto":
      try:
        parse_arch(cfg.arch)
      except ValueError as e:
        raise errors.UserError(f"--arch={cfg.arch}: {e}") from None
    check_writable(cfg.workdir, cfg.overwrite)
    limits.configure_from_flags()
    state, recorded = weight_files.read_with_record(cfg.src)
    try:
      converted = convert_state_dict(
          state, cfg.arch,
          recorded.get("input_order", "auto") if cfg.input_order == "auto"
          else cfg.input_order, recorded.get("image_size"))
    except state_dicts.StateDictMismatchError as e:
      raise state_dicts.StateDictMismatchError(f"{cfg.src}: {e}") from e
    lock = workdir_lock.acquire(cfg.workdir, force=cfg.force_lock)
    try:
      write_checkpoint(cfg.workdir, converted, source=cfg.src,
                       overwrite=cfg.overwrite)
    finally:
      if lock is not None:
        lock.release()
  print(summary(cfg.src, cfg.workdir, converted), flush=True)


def cli() -> None:
  """`python -m qgjt_jax.convert`."""
  _define_flags()
  app.run(main, flags_parser=errors.parse_flags)


if __name__ == "__main__":
  cli()
