"""Learning-rate schedules and the SGD optimiser of the AdaFace recipe.

PyTorch's SGD adds weight decay to the gradient before the momentum buffer
("coupled" decay: buf = mu * buf + g + wd * w; w -= lr * buf). optax's
`add_decayed_weights` followed by `sgd(momentum)` is the same computation in
the same order, and gradient clipping comes first, as
`clip_grad_norm_` before `optimizer.step()` does.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

# config.optim.schedule's values.
SCHEDULES = ("multistep", "cosine")


def make_lr_schedule(
    optim: ml_collections.ConfigDict, steps_per_epoch: float, num_epochs: float
) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up, then multi-step (x gamma at each milestone) or cosine."""
  warmup_steps = optim.warmup_epochs * steps_per_epoch
  total_steps = max(num_epochs * steps_per_epoch, 1.0)
  boundaries = [m * steps_per_epoch for m in optim.milestones]
  if optim.schedule not in SCHEDULES:
    raise ValueError(
        f"config.optim.schedule={optim.schedule!r}: expected "
        f"one of {', '.join(SCHEDULES)}."
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if optim.schedule == "multistep":
      passed = sum((step >= b).astype(jnp.float32) for b in boundaries)
      factor = optim.gamma**passed
    else:
      progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1.0)
      factor = 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
    if warmup_steps > 0:
      factor = factor * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
    return optim.lr * factor

  return schedule


# BatchNorm modules are named "bn", "bn2", "shortcut_bn"... (or flax's default
# "BatchNorm_0").
_BATCHNORM_NAME = re.compile(r"(^|_)bn\d*$|batchnorm", re.IGNORECASE)


def _is_batchnorm_path(path: tuple[Any, ...]) -> bool:
  return any(_BATCHNORM_NAME.search(str(getattr(k, "key", k))) for k in path)


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies: every parameter but BatchNorm's."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not _is_batchnorm_path(path), params
  )


def make_optimizer(
    optim: ml_collections.ConfigDict, schedule: Callable[[jax.Array], jax.Array]
) -> optax.GradientTransformation:
  parts = []
  # With clip_each_loss the step clips each loss's gradient itself.
  if (
      optim.grad_clip_norm
      and optim.grad_clip_norm > 0
      and not optim.get("clip_each_loss", False)
  ):
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  if optim.weight_decay:
    parts.append(
        optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask)
    )
  parts.append(optax.sgd(schedule, momentum=optim.momentum or None))
  if optim.backbone_lr_scale != 1.0:
    # Scaling the final updates is scaling the learning rate: SGD's
    # momentum buffer holds gradients, not updates.
    parts.append(
        optax.masked(optax.scale(optim.backbone_lr_scale), backbone_mask)
    )
  return optax.chain(*parts)


def backbone_mask(params: Any) -> Any:
  """True on the backbone's leaves ({'backbone', 'classifier'} params)."""
  return {
      name: jax.tree.map(lambda _, mine=name == "backbone": mine, subtree)
      for name, subtree in params.items()
  }
