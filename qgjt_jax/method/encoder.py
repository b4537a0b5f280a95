"""The encoder's train-mode forward pass and the quality it reads.

What every queue variant uses to turn images into unit embeddings, norms and
their quality (docs/METHOD.md sections 1 and 2), under one step's constants.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qgjt_jax import parallel
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.models import layers
from qgjt_jax.models import normalize_images


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What one step's pieces share (constants of the trace)."""

  model: nn.Module
  mesh: Mesh
  settings: Any  # settings.StepSettings
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Encoding:
  """Images through one encoder: float32 unit embeddings and norms, the
  encoder's new BatchNorm and norm statistics, and the two scalers
  (`quality.read_quality`: the margin's and the gates')."""

  embeddings: jax.Array
  norms: jax.Array
  batch_stats: Any
  quality: quality_lib.QualityStats
  scaler: jax.Array
  gate_scaler: jax.Array


def encode(
    ctx: StepContext,
    params: Any,
    batch_stats: Any,
    stats: quality_lib.QualityStats,
    images: jax.Array,
    degradation: jax.Array,
    dropout_rng: jax.Array,
) -> Encoding:
  """Train-mode forward of uint8 images split over the batch axes, then the
  quality statistics updated over their norms and read."""
  images = jax.lax.with_sharding_constraint(
      images, NamedSharding(ctx.mesh, P(parallel.BATCH_AXES))
  )
  with layers.frozen_statistics(ctx.settings.frozen_batch_norm):
    (embeddings, norms), updates = ctx.model.apply(
        {"params": params, "batch_stats": batch_stats},
        normalize_images(images, ctx.settings.compute_dtype),
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
    )
  norms = norms.astype(jnp.float32)
  stats, scaler, gate_scaler = quality_lib.read_quality(
      ctx.settings.quality, stats, norms, degradation
  )
  return Encoding(
      embeddings.astype(jnp.float32),
      norms,
      updates["batch_stats"],
      stats,
      scaler,
      gate_scaler,
  )
