"""A recipe's train step and evaluation forward pass exported for other
platforms with `jax.export`, without running or compiling them: the code of
`python -m qgjt_jax.export_check` (qgjt_jax/export_check.py).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from qgjt_jax import parallel
from qgjt_jax import stack as stack_lib
from qgjt_jax.inference import model as model_lib


def export_programs(
    config: ml_collections.ConfigDict,
    num_classes: int,
    platforms: Sequence[str],
) -> list[dict[str, Any]]:
  """Exports the train step and the eval forward pass for `platforms`;
  returns a record per program."""
  stack = stack_lib.build_stack(
      config, num_classes=num_classes, steps_per_epoch=10_000.0
  )
  mesh = stack.mesh
  dtype = jnp.dtype(config.eval.dtype)
  model = stack.model.clone(dtype=dtype)
  images = jax.ShapeDtypeStruct(
      (
          config.eval.batch_size,
          config.data.image_size,
          config.data.image_size,
          3,
      ),
      jnp.uint8,
      sharding=parallel.batch_sharding(mesh),
  )
  programs = {
      "train_step": (
          stack.train_step,
          (stack.abstract_state(), stack.abstract_batch()),
      ),
      "eval_forward": (
          model_lib.sharded_forward(model, mesh),
          (
              model_lib.abstract_variables(
                  model, config.data.image_size, parallel.replicated(mesh)
              ),
              images,
          ),
      ),
  }
  records = []
  for name, (function, args) in programs.items():
    t0 = time.perf_counter()
    exported = jax.export.export(function, platforms=tuple(platforms))(*args)
    records.append(
        {
            "program": name,
            "platforms": list(exported.platforms),
            "mesh": dict(mesh.shape),
            "arch": config.model.name,
            "batch": config.global_batch_size,
            "classes": num_classes,
            "queue": config.queue.capacity,
            "dtype": config.model.dtype,
            "stablehlo_bytes": len(exported.mlir_module_serialized),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
  return records
