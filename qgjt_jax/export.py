r"""`python -m qgjt_jax.export`: a workdir's model as ONNX, StableHLO or a
PyTorch state dict (safetensors).

  python -m qgjt_jax.export --workdir=runs/ms1m --format=onnx \
      --out=model.onnx [--onnx_layout=qgjt|insightface] [--batch=N] [--step=N]
  python -m qgjt_jax.export --workdir=runs/ms1m --format=stablehlo \
      --out=model.stablehlo [--platforms=cpu,cuda,tpu]
  python -m qgjt_jax.export --workdir=runs/ms1m --format=safetensors \
      --out=model.safetensors

What each format holds, its layouts and what it carries beyond the weights:
qgjt_jax/interop/export.py, the code.
"""

from absl import app
from absl import flags

from qgjt_jax import errors
from qgjt_jax.interop import export

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A workdir, its checkpoints folder or a step folder."
)
_FORMAT = flags.DEFINE_enum(
    "format", None, list(export.FORMATS), "The file to write."
)
_OUT = flags.DEFINE_string("out", None, "The file written.")
_ONNX_LAYOUT = flags.DEFINE_enum(
    "onnx_layout",
    "qgjt",
    sorted(export.LAYOUTS),
    "qgjt: uint8 BGR NHWC in, unit embeddings and norms out; insightface: "
    "float32 RGB NCHW in, one feature out, as insightface's client expects.",
)
_BATCH = flags.DEFINE_string(
    "batch", "dynamic", "'dynamic' or a fixed batch size."
)
_PLATFORMS = flags.DEFINE_string(
    "platforms",
    None,
    "StableHLO's platforms, comma-separated, from "
    f"{', '.join(export.PLATFORMS)} (one file runs on each; default "
    f"{','.join(export.DEFAULT_PLATFORMS)}).",
)
_STEP = flags.DEFINE_integer(
    "step", None, "The checkpoint step (default: the latest).", lower_bound=0
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
errors.define_traceback_flag()
flags.mark_flags_as_required(["workdir", "format", "out"])


def _batch_size() -> int | None:
  if _BATCH.value == "dynamic":
    return None
  if not (_BATCH.value.isdigit() and int(_BATCH.value) > 0):
    raise errors.UserError(
        f"--batch={_BATCH.value}: 'dynamic' or a positive size"
    )
  return int(_BATCH.value)


def main(argv: list[str]) -> None:
  verbose = errors.start_absl_command(argv)
  with errors.expected_failures(verbose=verbose):
    metadata = export.export(
        _WORKDIR.value,
        _FORMAT.value,
        _OUT.value,
        batch=_batch_size(),
        step=_STEP.value,
        overwrite=_OVERWRITE.value,
        layout=_ONNX_LAYOUT.value,
        platforms=(
            export.parse_platforms(_PLATFORMS.value)
            if _PLATFORMS.value is not None
            else None
        ),
    )
  for line in export.summary(
      _OUT.value, _FORMAT.value, _ONNX_LAYOUT.value, metadata
  ):
    print(line, flush=True)


def cli() -> None:
  """The `qgjt-export` console script."""
  app.run(main, flags_parser=errors.parse_flags)


if __name__ == "__main__":
  cli()
