"""qgjt_jax: QGFace (quality-guided joint training) in JAX/Flax."""

__version__ = "0.1.0"
