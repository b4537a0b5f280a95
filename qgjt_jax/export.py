"""`python -m qgjt_jax.export`: a workdir's model as ONNX, StableHLO or safetensors.

The code is qgjt_jax/interop/export.py; this module keeps the command's name.
"""
from qgjt_jax.interop import export

if __name__ == "__main__":
  export.cli()
