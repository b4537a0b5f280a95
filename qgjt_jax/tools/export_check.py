r"""Lowers a recipe's programs for accelerators from any machine.

  python -m qgjt_jax.export_check --config=configs/ms1m.py \
      --platforms=tpu,cuda [--model_parallelism=2]

Builds the train step exactly as training does (`stack.build_stack`: the
recipe's model, batch, classifier and queue, on a (data, model) mesh of this
machine's devices) and the evaluation forward pass, and exports both with
`jax.export` for the platforms named, without running or compiling them.
An operation that has no lowering for TPU or GPU, or a sharding that does
not partition, fails here in minutes on a laptop instead of on a pod.
Prints one JSON line per program (platforms, mesh, StableHLO size, time).
For a mesh with several devices on a CPU host, start it with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from qgjt_jax import config_checks
from qgjt_jax import errors
from qgjt_jax import parallel
from qgjt_jax import recipe_flags
from qgjt_jax import stack as stack_lib
from qgjt_jax.inference import model as model_lib
from qgjt_jax.tools import step_bench


def export_programs(config: ml_collections.ConfigDict, num_classes: int,
                    platforms: Sequence[str]) -> list[dict[str, Any]]:
  """Exports the train step and the eval forward pass for `platforms`;
  returns a record per program."""
  stack = stack_lib.build_stack(config, num_classes=num_classes,
                                steps_per_epoch=10_000.0)
  mesh = stack.mesh
  dtype = jnp.dtype(config.eval.dtype)
  model = stack.model.clone(dtype=dtype)
  images = jax.ShapeDtypeStruct(
      (config.eval.batch_size, config.data.image_size,
       config.data.image_size, 3), jnp.uint8,
      sharding=parallel.batch_sharding(mesh))
  programs = {
      "train_step": (stack.train_step, (stack.abstract_state(),
                                        stack.abstract_batch())),
      "eval_forward": (model_lib.sharded_forward(model, mesh),
                       (model_lib.abstract_variables(
                           model, config.data.image_size,
                           parallel.replicated(mesh)), images)),
  }
  records = []
  for name, (function, args) in programs.items():
    t0 = time.perf_counter()
    exported = jax.export.export(function, platforms=tuple(platforms))(*args)
    records.append({
        "program": name, "platforms": list(exported.platforms),
        "mesh": dict(mesh.shape), "arch": config.model.name,
        "batch": config.global_batch_size, "classes": num_classes,
        "queue": config.queue.capacity, "dtype": config.model.dtype,
        "stablehlo_bytes": len(exported.mlir_module_serialized),
        "seconds": round(time.perf_counter() - t0, 1)})
  return records


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = recipe_flags.argument_parser("python -m qgjt_jax.export_check", __doc__)
  p.add_argument("--platforms", default="tpu,cuda",
                 help="comma-separated: tpu, cuda, rocm, cpu")
  p.add_argument("--classes", type=int, default=step_bench.MS1MV2_CLASSES)
  p.add_argument("--model_parallelism", type=int, default=None,
                 help="the mesh's model axis (default: the recipe's)")
  return recipe_flags.parse_tool_args(p, argv,
                                      str(step_bench.DEFAULT_CONFIG))


def main(argv: Optional[Sequence[str]] = None) -> None:
  a = _parse(sys.argv[1:] if argv is None else argv)
  with errors.expected_failures(verbose=a.traceback):
    config = a.recipe
    if a.model_parallelism is not None:
      config.model_parallelism = a.model_parallelism
    config_checks.check_values(config)
    try:
      mesh = parallel.make_mesh(config.model_parallelism)
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
    config_checks.check_mesh(config, mesh)
    records = export_programs(config, a.classes,
                              [p for p in a.platforms.split(",") if p])
  for record in records:
    print(json.dumps(record), flush=True)


def cli() -> None:
  """`python -m qgjt_jax.export_check`."""
  main()


if __name__ == "__main__":
  cli()
