"""The one functional train state, and where its pieces live on the mesh.

Everything that changes during training is a field here (the quality running
statistics, the queue and the dynamic margin included), so a checkpoint of
this object is a complete snapshot and the train step has no hidden state.
"""
from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qgjt_jax import parallel
from qgjt_jax import queue as queue_lib
from qgjt_jax.losses import contrastive
from qgjt_jax.losses import margin
from qgjt_jax.models import build_backbone


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any                 # {'backbone': ..., 'classifier': {'kernel': (D, C)}}
  batch_stats: Any
  opt_state: optax.OptState
  quality: margin.QualityStats
  queue: queue_lib.QueueState
  margin: contrastive.MarginState
  rng: jax.Array
  # Momentum encoder ({'params', 'batch_stats'}) of the "moco" queue variant.
  ema: Optional[Any] = None
  # Numerical guard: steps skipped for a non-finite loss or gradient.
  nonfinite_total: jax.Array = None
  nonfinite_streak: jax.Array = None


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  m = config.model
  return build_backbone(m.name, dtype=jnp.dtype(m.dtype),
                        base_width=m.base_width,
                        embedding_size=m.embedding_size,
                        dropout_rate=m.dropout_rate)


def init_classifier(rng: jax.Array, dim: int, num_classes: int) -> jax.Array:
  """Unit-norm class proxies, as AdaFace's uniform-then-renorm init."""
  kernel = jax.random.uniform(rng, (dim, num_classes), jnp.float32, -1.0, 1.0)
  return kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       tx: optax.GradientTransformation, num_classes: int,
                       rng: jax.Array) -> TrainState:
  """Initialises every field; pure, so it can run under jit with shardings."""
  init_rng, cls_rng, state_rng = jax.random.split(rng, 3)
  size = config.data.image_size
  dummy = jnp.zeros((2, size, size, 3), jnp.float32)
  variables = model.init({"params": init_rng, "dropout": init_rng}, dummy,
                         train=False)
  params = {
      "backbone": variables["params"],
      "classifier": {"kernel": init_classifier(
          cls_rng, config.model.embedding_size, num_classes)},
  }
  batch_stats = variables.get("batch_stats", {})
  capacity = config.queue.capacity if config.queue.kind != "none" else 1
  ema = None
  if config.queue.kind == "moco":
    ema = {"params": params, "batch_stats": batch_stats}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      quality=margin.init_quality_stats(config.quality.init_mean,
                                        config.quality.init_std),
      queue=queue_lib.init_queue(capacity, config.model.embedding_size),
      margin=contrastive.init_margin_state(),
      rng=state_rng,
      ema=ema,
      nonfinite_total=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32),
  )


def _leaf_sharding(mesh: Mesh, path: tuple[Any, ...], leaf: Any
                   ) -> NamedSharding:
  """Class proxies (and their optimiser state) split over `model`."""
  keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  if "classifier" in keys and getattr(leaf, "ndim", 0) == 2:
    return NamedSharding(mesh, P(None, parallel.MODEL_AXIS))
  return parallel.replicated(mesh)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _leaf_sharding(mesh, path, leaf), abstract_state)


def create_sharded_state(config, model, tx, num_classes, rng, mesh
                         ) -> tuple[TrainState, TrainState]:
  """Creates the state directly in its sharded layout; returns it and the
  shardings (for jit and checkpoint restore)."""
  init = lambda r: create_train_state(config, model, tx, num_classes, r)
  abstract = jax.eval_shape(init, rng)
  shardings = state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings
