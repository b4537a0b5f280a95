"""Face encoders, built by name (`build_backbone("ir50")`, "mbf", "vit_t").

One module per family (iresnet, mobilefacenet, vit) declares it in the
registry (`registry.Family`); everything else in the package reaches a
family through the functions here.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from qgjt_jax.models import iresnet  # registers  # noqa: F401
from qgjt_jax.models import mobilefacenet  # registers  # noqa: F401
from qgjt_jax.models import vit  # registers  # noqa: F401
from qgjt_jax.models.iresnet import IResNet
from qgjt_jax.models.layers import count_params
from qgjt_jax.models.layers import init_shapes
from qgjt_jax.models.layers import normalize_images
from qgjt_jax.models.registry import backbone_names
from qgjt_jax.models.registry import families
from qgjt_jax.models.registry import family_of
from qgjt_jax.models.registry import family_of_module
from qgjt_jax.models.registry import family_settings
from qgjt_jax.models.registry import recorded_model_keys

__all__ = [
    "IResNet",
    "build_backbone",
    "backbone_names",
    "count_params",
    "families",
    "family_of",
    "family_of_module",
    "family_settings",
    "init_shapes",
    "normalize_images",
    "recorded_model_keys",
]


def build_backbone(
    name: str,
    dtype: Any = jnp.float32,
    *,
    embedding_size: int = 512,
    remat: bool = False,
    input_order: str = "BGR",
    **settings,
):
  """The backbone called `name`, computing in `dtype` (parameters stay
  float32).

  Args:
    name: a backbone name, case-insensitive (`backbone_names()`).
    dtype: compute dtype.
    embedding_size, remat, input_order: the settings every family takes.
    **settings: the family's own (IResNet: base_width, dropout_rate);
      a setting the family does not have is refused.

  Raises:
    ValueError: an unknown name (listing the valid ones) or setting.
  """
  family, canonical = family_of(name)
  unknown = sorted(set(settings) - set(family.settings))
  if unknown:
    raise ValueError(
        f"{canonical} ({family.name}) has no setting "
        f"{', '.join(unknown)}; its own settings: "
        f"{', '.join(family.settings) or 'none'}"
    )
  return family.build(
      canonical,
      dtype=dtype,
      embedding_size=embedding_size,
      remat=remat,
      input_order=input_order,
      **settings,
  )
