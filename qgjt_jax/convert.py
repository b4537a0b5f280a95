r"""`python -m qgjt_jax.convert`: a pretrained file into a workdir.

  python -m qgjt_jax.convert --src=adaface_ir101_ms1mv2.ckpt \
      --workdir=runs/adaface_ir101 [--arch=auto|NAME] [--overwrite]
  python -m qgjt_jax.convert --src=w600k_mbf.onnx --workdir=runs/w600k_mbf

The files read, how the model is recognised and what is restored:
qgjt_jax/interop/convert.py, the code.
"""

from absl import app
from absl import flags

from qgjt_jax import errors
from qgjt_jax import models
from qgjt_jax import workdir_lock
from qgjt_jax.files import limits
from qgjt_jax.interop import convert

_SRC = flags.DEFINE_string(
    "src",
    None,
    "The pretrained file: .ckpt (Lightning), .pth/.pt (a state "
    "dict), .safetensors (CVLFace, or this project's export), .npz, or "
    ".onnx (insightface's recognisers).",
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Work directory to create; "
    "the model goes to WORKDIR/checkpoints (step "
    "0).",
)
_ARCH = flags.DEFINE_string(
    "arch",
    "auto",
    "auto (read from the tensors) or "
    "a backbone name: " + ", ".join(models.backbone_names()),
)
_INPUT_ORDER = flags.DEFINE_enum(
    "input_order",
    "auto",
    ["auto", "BGR", "RGB"],
    "The channel order the "
    "weights were trained on: auto (the family's published weights') or as "
    "given.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Delete an existing "
    "WORKDIR/checkpoints and write the converted "
    "model.",
)
_FORCE_LOCK = flags.DEFINE_bool(
    "force_lock",
    False,
    "Take the workdir's "
    "lock even when its note says another run "
    "holds it.",
)
limits.define_flags()
errors.define_traceback_flag()
flags.mark_flags_as_required(["src", "workdir"])


def main(argv: list[str]) -> None:
  verbose = errors.start_absl_command(argv)
  with errors.expected_failures(verbose=verbose):
    # Before the (slow) read: a bad name or a workdir in use fails at once.
    if _ARCH.value != "auto":
      try:
        models.family_of(_ARCH.value)
      except ValueError as e:
        raise errors.UserError(f"--arch={_ARCH.value}: {e}") from None
    convert.check_writable(_WORKDIR.value, _OVERWRITE.value)
    limits.configure_from_flags()
    converted = convert.convert_file(
        _SRC.value, _ARCH.value, _INPUT_ORDER.value
    )
    lock = workdir_lock.acquire(_WORKDIR.value, force=_FORCE_LOCK.value)
    try:
      convert.write_checkpoint(
          _WORKDIR.value,
          converted,
          source=_SRC.value,
          overwrite=_OVERWRITE.value,
      )
    finally:
      if lock is not None:
        lock.release()
  print(convert.summary(_SRC.value, _WORKDIR.value, converted), flush=True)


def cli() -> None:
  """The `qgjt-convert` console script."""
  app.run(main, flags_parser=errors.parse_flags)


if __name__ == "__main__":
  cli()
