"""`python -m qgjt_jax.data.bench`: the input pipeline's throughput.

The code is qgjt_jax/tools/pipeline_bench.py; this module keeps the
command's name.
"""

from qgjt_jax.tools import pipeline_bench

if __name__ == "__main__":
  pipeline_bench.cli()
