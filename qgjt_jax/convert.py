"""`python -m qgjt_jax.convert`: PyTorch, safetensors or .npz weights into a workdir.

The code is qgjt_jax/interop/convert.py; this module keeps the command's name.
"""
from qgjt_jax.interop import convert

if __name__ == "__main__":
  convert.cli()
