r"""A workdir's model, out of JAX: ONNX (onnxruntime, TensorRT, insightface's
client), StableHLO, or the PyTorch weights of its backbone (safetensors).
The code of `python -m qgjt_jax.export` (qgjt_jax/export.py).

--workdir is a workdir (a training run's, or one `qgjt_jax.convert` wrote),
its checkpoints folder or a step folder; the model is the one its record
describes (`qgjt_jax.load_model`), at --step or the latest step. The ONNX
and StableHLO models compute what `--mode=embed` and every decision
compute: each face and its mirror image through the network, fused (the
direction of n1 e1 + n2 e2, the mean of the two norms; `extract.
DECISION_SCORING`), so a deployment scores as the thresholds were measured.

  layout "qgjt" (ONNX default, and StableHLO)
    in   images      (batch, S, S, 3) uint8, BGR (OpenCV's order), aligned
                     faces; the normalisation (x / 255 - 0.5) / 0.5 and any
                     channel swap the weights need are inside
    out  embeddings  (batch, D) float32, unit rows
         norms       (batch,) float32, the feature norms (quality indicator)
  layout "insightface" (ONNX): what insightface's recognition models take,
    so `insightface.model_zoo.get_model(path)` loads it and its `get_feat`
    works (for square inputs of at least 112 px, a multiple of 16, as its
    router requires)
    in   input.1     (batch, 3, S, S) float32, RGB, (x - 127.5) / 127.5
    out  embedding   (batch, D) float32: the unit embedding times the norm

The ONNX graph is translated from the jaxpr of the very function that
embeds (`onnx_export`), so every backbone exports. The StableHLO file is
`jax.export`'s serialisation, lowered for every platform of --platforms
(default cpu, cuda and tpu) and free of source paths: `jax.export.
deserialize(open(path, 'rb').read()).call(images)` runs it on any of them
without this project; its conventions go to a .json beside it, written
together with it.

Every format carries what the workdir knows beyond its weights
(`carried`): every threshold the evaluation of the exported step measured,
each with its set, kind of faces, scoring, counts and intervals, and the
feature-norm statistics and quality settings. `qgjt_jax.convert` of an
exported file restores both, so the converted workdir decides and rates
quality as this one does.

The safetensors file is a state dict in the names and layouts of the
public PyTorch code of the model's family (each family names its code in
models/). Those programs build only the published sizes (112 px faces,
...), so the command says whether theirs loads this one or only
`qgjt_jax.convert` reads it back; the file's metadata records the input
size and channel order.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from qgjt_jax import config_keys
from qgjt_jax import errors
from qgjt_jax import outputs
from qgjt_jax import records

LAYOUTS = {
    "qgjt": {
        "input": "images: (batch, size, size, 3) uint8, BGR channel order, "
        "aligned face crops; normalisation inside the model",
        "outputs": "embeddings: (batch, D) float32 unit rows; norms: "
        "(batch,) float32 feature norms (quality indicator); "
        "each face fused with its mirror image",
    },
    "insightface": {
        "input": "input.1: (batch, 3, size, size) float32, RGB channel "
        "order, (x - 127.5) / 127.5, aligned face crops",
        "outputs": "embedding: (batch, D) float32, unit embedding times the "
        "feature norm; each face fused with its mirror image",
    },
}
FORMATS = ("onnx", "stablehlo", "safetensors")
# What each format needs beyond the base install, and the extra naming it.
_NEEDS = {"onnx": ("onnx", "onnx"), "stablehlo": ("flatbuffers", None)}


def load(path: str, step: Optional[int] = None):
  """The workdir's model (`inference.model.load_model`), computing in
  float32 for export."""
  from qgjt_jax.inference import model as model_lib  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  model = model_lib.load_model(path, step)
  return model, model.module.clone(dtype=jnp.float32), model.host_variables()


def forward_fn(model, variables):
  """uint8 BGR images -> (unit embeddings, norms), flip-fused: the
  exported function."""
  from qgjt_jax.inference import model as model_lib  # pylint: disable=g-import-not-at-top

  return model_lib.fused_forward(model, variables)


# ---------------------------------------------------------------------------
# StableHLO through jax.export.


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def stablehlo_bytes(
    model,
    variables: dict,
    image_size: int,
    batch: Optional[int] = None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> bytes:
  """jax.export's serialisation of the forward pass for `platforms`
  (symbolic batch when `batch` is None).

  The module carries no source locations: they would name this machine's
  paths to the package's files in a file that is handed to others.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  shape = ((batch,) if batch else jax.export.symbolic_shape("batch")) + (
      image_size,
      image_size,
      3,
  )
  previous = jax.config.jax_traceback_in_locations_limit
  jax.config.update("jax_traceback_in_locations_limit", 0)
  try:
    exported = jax.export.export(
        jax.jit(forward_fn(model, variables)), platforms=tuple(platforms)
    )(jax.ShapeDtypeStruct(shape, jnp.uint8))
  finally:
    jax.config.update("jax_traceback_in_locations_limit", previous)
  return bytes(exported.serialize())


def parse_platforms(text: str) -> tuple[str, ...]:
  """'cpu,cuda' -> ('cpu', 'cuda'); an unknown or missing name is one
  line."""
  names = tuple(p.strip() for p in text.split(",") if p.strip())
  unknown = [p for p in names if p not in PLATFORMS]
  if unknown or not names:
    raise errors.UserError(
        f"--platforms={text}: a comma-separated list of "
        f"{', '.join(PLATFORMS)}"
    )
  return tuple(dict.fromkeys(names))


def _require(fmt: str) -> None:
  """One line naming what to install when a format's package is missing."""
  package, extra = _NEEDS.get(fmt, (None, None))
  if package is None:
    return
  try:
    __import__(package)
  except ImportError:
    how = (
        f"pip install 'qgjt_jax[{extra}]'"
        if extra
        else f"pip install {package}"
    )
    raise errors.UserError(
        f"--format={fmt} needs the {package} package, "
        f"which is not installed: {how}"
    ) from None


def loads_in(module, image_size: int) -> tuple[str, Optional[str]]:
  """(the public code whose names the safetensors file uses, why that code
  cannot build this model, or None when it can)."""
  from qgjt_jax import models  # pylint: disable=g-import-not-at-top

  return models.family_of_module(module).public_code(module, image_size)


def onnx_proto(
    module,
    variables: dict,
    image_size: int,
    batch: Optional[int],
    metadata: dict,
    layout: str,
):
  """The ONNX model of a layout (see the module doc), translated from the
  jaxpr of the function that embeds (`interop.onnx_export`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qgjt_jax.inference import model as model_lib  # pylint: disable=g-import-not-at-top
  from qgjt_jax.interop import onnx_export  # pylint: disable=g-import-not-at-top

  size = image_size
  if layout == "insightface":

    def insightface_layout(x, weights):
      # (B, 3, S, S) RGB in [-1, 1] -> the BGR NHWC faces every model takes.
      bgr = jnp.flip(jnp.transpose(x, (0, 2, 3, 1)), axis=-1)
      unit, norms = model_lib.fused_features(module, weights, bgr)
      return (unit * norms[:, None],)

    return onnx_export.onnx_model(
        insightface_layout,
        jax.ShapeDtypeStruct((1, 3, size, size), jnp.float32),
        input_name="input.1",
        output_names=("embedding",),
        batch=batch,
        weights=variables,
        metadata=metadata,
    )
  return onnx_export.onnx_model(
      lambda x, weights: model_lib.fused_forward(module, weights)(x),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8),
      input_name="images",
      output_names=("embeddings", "norms"),
      batch=batch,
      weights=variables,
      metadata=metadata,
  )


def export(
    path: str,
    fmt: str,
    out: str,
    *,
    batch: Optional[int] = None,
    step: Optional[int] = None,
    overwrite: bool = False,
    layout: str = "qgjt",
    platforms: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
  """Writes the model of a workdir (or a checkpoints or step folder) to
  `out`; returns what the file says.

  `out` (and for StableHLO `out`.json) is checked before the model is
  loaded and written whole or not at all; an existing one is refused
  unless `overwrite`. `platforms` are StableHLO's (default
  DEFAULT_PLATFORMS; the other formats run wherever their runtime does).
  """
  from qgjt_jax.inference import decisions  # pylint: disable=g-import-not-at-top
  from qgjt_jax.interop import carried  # pylint: disable=g-import-not-at-top

  if fmt not in FORMATS:
    raise errors.UserError(f"--format={fmt}: use {', '.join(FORMATS)}")
  if layout not in LAYOUTS or (layout != "qgjt" and fmt != "onnx"):
    raise errors.UserError(
        f"--onnx_layout={layout}: use qgjt or (for "
        "--format=onnx) insightface"
    )
  if platforms is not None and fmt != "stablehlo":
    raise errors.UserError(
        f"--platforms is for --format=stablehlo; "
        f"--format={fmt} runs wherever its runtime does"
    )
  platforms = tuple(platforms or DEFAULT_PLATFORMS)
  _require(fmt)
  targets = [out] + ([out + ".json"] if fmt == "stablehlo" else [])
  for target in targets:
    outputs.check_output(target, overwrite=overwrite)
  loaded, module, variables = load(path, step)
  image_size = loaded.image_size
  # The workdir's name, not this machine's path to it.
  workdir_name = os.path.basename(os.path.abspath(loaded.workdir))
  metadata = {
      "qgjt_jax.model": loaded.name,
      "qgjt_jax.weights_input_order": loaded.input_order,
      "qgjt_jax.image_size": image_size,
      "qgjt_jax.source": f"workdir {workdir_name}, step {loaded.step}",
      "qgjt_jax.batch": batch or "dynamic",
      "qgjt_jax.scoring": _scoring(fmt),
  }
  if fmt == "stablehlo":
    metadata["qgjt_jax.platforms"] = ",".join(platforms)
  measured = decisions.exported(loaded.workdir, loaded.step)
  if measured:
    metadata[carried.THRESHOLDS_KEY] = json.dumps(measured)
  quality = carried.quality_record(
      loaded.norm_stats,
      loaded.config.quality.h,
      loaded.config.quality.eps,
      loaded.hq_threshold,
  )
  if quality:
    metadata[carried.QUALITY_KEY] = quality
  if fmt == "safetensors":
    code, why_not = loads_in(module, image_size)
    metadata["qgjt_jax.loads_in"] = (
        f"qgjt_jax.convert only ({code} cannot build it: {why_not})"
        if why_not
        else f"{code} (strict load), and qgjt_jax.convert"
    )
    _write_safetensors(out, module, variables, image_size, metadata, overwrite)
  elif fmt == "onnx":
    # What rebuilds the model around the weights (`convert` of the file).
    settings = {
        key: config_keys.lookup(loaded.config, key)
        for key in records.model_keys() + records.MODEL_INPUT_KEYS
    }
    settings = {
        k: v for k, v in settings.items() if v is not config_keys.MISSING
    }
    proto = onnx_proto(
        module,
        variables,
        image_size,
        batch,
        {
            **LAYOUTS[layout],
            **metadata,
            carried.MODEL_SETTINGS_KEY: json.dumps(settings),
        },
        layout,
    )
    outputs.write(out, proto.SerializeToString(), overwrite=overwrite)
  else:
    data = stablehlo_bytes(module, variables, image_size, batch, platforms)
    sidecar = {**LAYOUTS["qgjt"], **metadata}
    for key in (carried.THRESHOLDS_KEY, carried.QUALITY_KEY):
      if key in metadata:
        sidecar[key] = json.loads(metadata[key])
    outputs.write_together(
        {out: data, out + ".json": json.dumps(sidecar, indent=2)},
        overwrite=overwrite,
    )
  return metadata


def _scoring(fmt: str) -> str:
  from qgjt_jax.eval import extract  # pylint: disable=g-import-not-at-top

  if fmt == "safetensors":
    return "weights only: score as you choose"
  return extract.DECISION_SCORING


def _write_safetensors(
    out: str,
    model,
    variables: dict,
    image_size: int,
    metadata: dict,
    overwrite: bool,
) -> None:
  """The model as the PyTorch state dict of its family's public code
  (`models.registry.TorchLayer`)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from qgjt_jax.interop import state_dicts  # pylint: disable=g-import-not-at-top

  state = state_dicts.to_torch(variables, model, image_size)
  text = {"format": "pt", **{k: str(v) for k, v in metadata.items()}}
  outputs.write(
      out, safetensors.numpy.save(state, metadata=text), overwrite=overwrite
  )


def summary(out: str, fmt: str, layout: str, metadata: dict) -> list[str]:
  """What the command prints about the file it wrote."""
  size = metadata["qgjt_jax.image_size"]
  if fmt == "safetensors":
    return [
        f"Wrote {out}: a PyTorch state dict in the names of "
        f"{metadata['qgjt_jax.model']}'s PyTorch code, for {size} px "
        f"{metadata['qgjt_jax.weights_input_order']} input. Loads in: "
        f"{metadata['qgjt_jax.loads_in']}."
    ]
  layout = layout if fmt == "onnx" else "qgjt"
  where = (
      f", for {metadata['qgjt_jax.platforms']}" if fmt == "stablehlo" else ""
  )
  lines = [
      f"Wrote {out} ({fmt}{where}, {layout} layout, batch "
      f"{metadata['qgjt_jax.batch']}, {size} px): in "
      f"{LAYOUTS[layout]['input']}; out {LAYOUTS[layout]['outputs']}."
  ]
  if layout == "insightface" and not (
      size >= 112 and size % 16 == 0 and size not in (96, 128, 192)
  ):
    lines.append(
        f"insightface.model_zoo.get_model routes a file by its input size "
        f"(square, at least 112 px, a multiple of 16) and returns None for "
        f"{size} px: load it with insightface.model_zoo.arcface_onnx."
        "ArcFaceONNX(model_file=PATH) instead."
    )
  if "qgjt_jax.thresholds" not in metadata:
    lines.append(
        "No decision thresholds recorded: the workdir has no "
        "evaluation that measured them (run --mode=eval first, "
        "with config.eval.calibration_folders for photos)."
    )
  return lines
