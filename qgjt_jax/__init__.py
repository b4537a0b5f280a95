"""qgjt_jax: QGFace (quality-guided joint training) in JAX/Flax."""

__version__ = "0.1.0"


def load_model(path, step=None, **kwargs):
  """The model of a workdir, its checkpoints folder or a step folder, on the
  devices present: `qgjt_jax.inference.model.load_model`."""
  from qgjt_jax.inference import model  # pylint: disable=g-import-not-at-top
  return model.load_model(path, step, **kwargs)
