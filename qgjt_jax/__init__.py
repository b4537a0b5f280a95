"""qgjt_jax: QGFace (quality-guided joint training) in JAX/Flax.

The Python surface is `load_model` (and the `Model` it returns); training,
evaluation, export and conversion are commands (`python -m qgjt_jax.main`,
`qgjt_jax.export`, `qgjt_jax.convert`; see the README).
"""

from qgjt_jax.version import __version__

__all__ = ["load_model", "__version__"]


def load_model(path, step=None, **kwargs):
  """The model of a workdir, its checkpoints folder or a step folder, on the
  devices present: `qgjt_jax.inference.model.load_model`, whose `Model.embed`
  takes uint8 BGR aligned crops.

  Raises:
    FileNotFoundError (also a qgjt_jax.errors.UserError): `path` does not
      exist, or holds no model's record.
  """
  # pylint: disable=g-import-not-at-top
  from qgjt_jax.inference import model

  return model.load_model_from_python(path, step, **kwargs)
