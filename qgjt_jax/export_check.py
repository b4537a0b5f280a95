"""`python -m qgjt_jax.export_check`: a recipe's programs lowered for TPU and GPU.

The code is qgjt_jax/tools/export_check.py; this module keeps the command's name.
"""
from qgjt_jax.tools import export_check

if __name__ == "__main__":
  export_check.cli()
