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
import optax
from jax.sharding import Mesh, NamedSharding

from qgjt_jax import parallel
from qgjt_jax.method import contrastive
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.method import queue_buffer as queue_lib
from qgjt_jax.method import queues
from qgjt_jax import models
import ml_collections


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'backbone': ..., 'classifier': {'kernel': (D, C)}}
  batch_stats: Any
  opt_state: optax.OptState
  quality: quality_lib.QualityStats
  queue: queue_lib.QueueState
  margin: contrastive.MarginState
  rng: jax.Array
  # What the queue variant adds (method/queues.py; the "moco" variant's
  # momentum encoder), or None.
  variant_state: Any = None
  # Numerical guard: steps skipped for a non-finite loss or gradient.
  nonfinite_total: jax.Array = None
  nonfinite_streak: jax.Array = None
  # The real class count C (static). The classifier may hold a few more,
  # all-zero columns so that `model` devices split it evenly; the step keeps
  # them out of the softmax. None: every column is a class.
  num_classes: Optional[int] = flax.struct.field(
      pytree_node=False, default=None
  )

  @property
  def classifier_width(self) -> int:
    return self.params["classifier"]["kernel"].shape[1]


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The backbone config.model describes (its family's own settings
  included)."""
  m = config.model
  return models.build_backbone(
      m.name,
      dtype=jnp.dtype(m.dtype),
      embedding_size=m.embedding_size,
      remat=m.remat == "block",
      input_order=m.input_order,
      **models.family_settings(m.name, m),
  )


def init_classifier(rng: jax.Array, dim: int, num_classes: int) -> jax.Array:
  """Unit-norm class proxies, as AdaFace's uniform-then-renorm init."""
  kernel = jax.random.uniform(rng, (dim, num_classes), jnp.float32, -1.0, 1.0)
  return kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)


def classifier_width(num_classes: int, model_parallelism: int = 1) -> int:
  """Columns of W: C rounded up to a multiple of the `model` axis size.

  jax shards only evenly divisible axes, and class counts rarely are
  (MS1MV2's 85,742 = 2 x 42,871). The padding columns are zero, masked out
  of the softmax and never a label, so they get no gradient, weight decay
  keeps them at zero, and they change neither the loss nor the update.
  """
  if num_classes < 1 or model_parallelism < 1:
    raise ValueError(
        f"num_classes={num_classes} and model_parallelism="
        f"{model_parallelism} must be positive."
    )
  return -(-num_classes // model_parallelism) * model_parallelism


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    num_classes: int,
    rng: jax.Array,
    model_parallelism: Optional[int] = None,
) -> TrainState:
  """Initialises every field; pure, so it can run under jit with shardings.

  `model_parallelism` (default `config.model_parallelism`) only decides the
  classifier's zero padding (`classifier_width`); the real columns are the
  same for any value, so runs on different meshes start identically.
  """
  if model_parallelism is None:
    model_parallelism = config.model_parallelism
  width = classifier_width(num_classes, model_parallelism)
  init_rng, cls_rng, state_rng = jax.random.split(rng, 3)
  size = config.data.image_size
  dummy = jnp.zeros((2, size, size, 3), jnp.float32)
  variables = model.init(
      {"params": init_rng, "dropout": init_rng}, dummy, train=False
  )
  params = {
      "backbone": variables["params"],
      "classifier": {
          "kernel": jnp.pad(
              init_classifier(
                  cls_rng, config.model.embedding_size, num_classes
              ),
              ((0, 0), (0, width - num_classes)),
          )
      },
  }
  batch_stats = variables.get("batch_stats", {})
  variant = queues.get(config.queue.kind)
  capacity = config.queue.capacity if variant.contrastive else 1
  quality = quality_lib.init_quality_stats(
      config.quality.init_mean, config.quality.init_std
  )
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      quality=quality,
      queue=queue_lib.init_queue(capacity, config.model.embedding_size),
      margin=contrastive.init_margin_state(),
      rng=state_rng,
      variant_state=variant.init_state(params, batch_stats, quality),
      nonfinite_total=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32),
      num_classes=num_classes,
  )


def _leaf_sharding(
    mesh: Mesh, path: tuple[Any, ...], leaf: Any
) -> NamedSharding:
  """Class proxies (W, its optimiser state, the momentum copy) split over
  `model`.

  Everything else (backbone, BatchNorm statistics, queue) is replicated: the
  backbone is data-parallel and the queue is small (K x D).
  """
  keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  if "classifier" in keys and getattr(leaf, "ndim", 0) == 2:
    return parallel.classifier_sharding(mesh)
  return parallel.replicated(mesh)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Shardings of every leaf, computed from the current mesh.

  A checkpoint restored with these lands in this mesh's layout whatever mesh
  wrote it (orbax reshards on read), which is how a run resumes on another
  device count.
  """
  width = abstract_state.classifier_width
  shards = parallel.model_parallel_size(mesh)
  if width % shards:
    raise ValueError(
        f"The classifier has {width} columns, which the {shards} devices of "
        "the mesh's `model` axis cannot split evenly; build the state with "
        f"model_parallelism={shards} (see classifier_width)."
    )
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _leaf_sharding(mesh, path, leaf), abstract_state
  )
