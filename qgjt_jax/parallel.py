"""Device mesh, shardings and multi-host start-up.

Everything that decides where arrays live is here, so the train step itself
only names logical layouts. The mesh has two axes: `data` (the batch is split
over it) and `model` (the classifier's class axis may be split over it). Axes
are built as `AxisType.Auto`: jax >= 0.11 defaults to Explicit axes, under
which ordinary jitted code would need sharding annotations everywhere.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def maybe_initialize_distributed() -> None:
  """Starts jax.distributed when a multi-process cluster is detected.

  TPU pod slices, SLURM jobs and explicit coordinator settings are recognised
  by jax itself; we only avoid calling it on a single machine, where it would
  wait for peers that never come.
  """
  if jax.distributed.is_initialized():
    return
  cluster_markers = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_NUM_NODES",
                     "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
  multi_node_slurm = int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
  if explicit or multi_node_slurm or tpu_pod:
    logging.info("Cluster detected (%s); initialising jax.distributed.",
                 [m for m in cluster_markers if m in os.environ])
    jax.distributed.initialize()


def make_mesh(model_parallelism: int = 1, devices: Any = None) -> Mesh:
  """A (data, model) mesh over all devices, Auto axes."""
  devices = jax.devices() if devices is None else devices
  num_devices = len(devices)
  if model_parallelism < 1 or num_devices % model_parallelism:
    raise ValueError(
        f"config.model_parallelism={model_parallelism} must divide the "
        f"device count {num_devices}.")
  shape = (num_devices // model_parallelism, model_parallelism)
  device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, (DATA_AXIS, MODEL_AXIS),
              axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's slice of the batch into global device arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)
