"""`python -m qgjt_jax.bench`: the train step's throughput.

The code is qgjt_jax/tools/step_bench.py; this module keeps the command's name.
"""
from qgjt_jax.tools import step_bench

if __name__ == "__main__":
  step_bench.cli()
