"""The training stack in one call: schedule, optimiser, model, state, step.

Training, the throughput benchmark, the notebooks and the tests all build
what a run needs here, from a config and the data's class count:

  stack = build_stack(config, num_classes=85742, steps_per_epoch=11373)
  state = stack.init_state(jax.random.key(config.seed))
  state, metrics = stack.train_step(state, batch)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from qgjt_jax import optim
from qgjt_jax import parallel
from qgjt_jax import state as state_lib
from qgjt_jax import step as step_lib
from qgjt_jax.method import settings as settings_lib
from qgjt_jax.method.batch import Batch, make_batch


@dataclasses.dataclass(frozen=True)
class TrainingStack:
  """Everything a training run computes with, built once."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  num_classes: int
  steps_per_epoch: float
  lr_schedule: Callable[[jax.Array], jax.Array]
  tx: optax.GradientTransformation
  model: nn.Module
  settings: settings_lib.StepSettings
  state_shardings: state_lib.TrainState
  train_step: Callable[..., Any]  # jitted (state, batch) -> (state, metrics)
  create_state: Callable[[jax.Array], state_lib.TrainState]  # pure

  def init_state(self, rng: jax.Array) -> state_lib.TrainState:
    """A fresh state, created directly in its sharded layout."""
    return jax.jit(self.create_state, out_shardings=self.state_shardings)(rng)

  def abstract_state(self) -> state_lib.TrainState:
    """The state's shapes and shardings, nothing allocated (for lowering)."""
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding
        ),
        jax.eval_shape(self.create_state, jax.random.key(0)),
        self.state_shardings,
    )

  def abstract_batch(self) -> Batch:
    """One global batch's shapes, split over the mesh (for lowering)."""
    b, size = self.config.global_batch_size, self.config.data.image_size
    sharding = parallel.batch_sharding(self.mesh)
    image = jax.ShapeDtypeStruct(
        (b, size, size, 3), jnp.uint8, sharding=sharding
    )
    per_sample = lambda dtype: jax.ShapeDtypeStruct(
        (b,), dtype, sharding=sharding
    )
    return make_batch(
        image,
        image,
        per_sample(jnp.int32),
        per_sample(jnp.float32),
        per_sample(jnp.float32),
    )


def build_stack(
    config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    steps_per_epoch: float,
    mesh: Optional[Mesh] = None,
    model: Optional[nn.Module] = None,
) -> TrainingStack:
  """The stack of `config` on `mesh` (default: every device, with
  `config.model_parallelism`); `model` replaces the config's backbone (any
  module returning (unit embeddings, norms))."""
  mesh = mesh or parallel.make_mesh(config.model_parallelism)
  schedule = optim.make_lr_schedule(
      config.optim, steps_per_epoch, config.num_epochs
  )
  tx = optim.make_optimizer(config.optim, schedule)
  model = model or state_lib.build_model(config)
  settings = settings_lib.StepSettings.from_config(config, steps_per_epoch)
  create = lambda rng: state_lib.create_train_state(
      config,
      model,
      tx,
      num_classes,
      rng,
      model_parallelism=parallel.model_parallel_size(mesh),
  )
  shardings = state_lib.state_shardings(
      jax.eval_shape(create, jax.random.key(0)), mesh
  )
  train_step = step_lib.make_train_step(
      model=model,
      tx=tx,
      settings=settings,
      lr_schedule=schedule,
      mesh=mesh,
      state_shardings=shardings,
  )
  return TrainingStack(
      config=config,
      mesh=mesh,
      num_classes=num_classes,
      steps_per_epoch=steps_per_epoch,
      lr_schedule=schedule,
      tx=tx,
      model=model,
      settings=settings,
      state_shardings=shardings,
      train_step=train_step,
      create_state=create,
  )
