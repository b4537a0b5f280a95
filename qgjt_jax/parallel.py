"""Device mesh, shardings and multi-host start-up.

Everything that decides where arrays live is here, so the train step itself
only names logical layouts. The mesh has two axes:

* `data`: the replicas of the class proxies W. Together with `model` it also
  splits the batch: the backbone is data-parallel over *every* device.
* `model`: the classifier's class axis is split over it (PartialFC-style), so
  W, its optimiser state and the (2B, C) logits of a step are divided by the
  `model` size. With `model` = all devices this is insightface's PartialFC;
  with `model` = 1 it is plain data parallelism.

Axes are built as `AxisType.Auto`: jax >= 0.11 defaults to Explicit axes, under
which ordinary jitted code would need sharding annotations everywhere.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
# The batch is split over both axes (the backbone is replicated on every
# device, so a `model` group must not run the same images twice).
BATCH_AXES = (DATA_AXIS, MODEL_AXIS)

# Set to 0 to never start jax.distributed (e.g. one process per node in a
# SLURM allocation used as independent jobs), to 1 to always start it.
DISTRIBUTED_ENV = "QGJT_DISTRIBUTED"
# Seconds without a heartbeat after which the processes of a run decide a
# peer is lost and stop with an error naming it (instead of hanging in the
# next collective); jax's default is 100.
HEARTBEAT_ENV = "QGJT_HEARTBEAT_TIMEOUT_S"


def detect_cluster(environ: Mapping[str, str]) -> Optional[dict[str, Any]]:
  """What a multi-process launch looks like from its environment, or None.

  Returns the keyword arguments for `jax.distributed.initialize` that jax
  cannot find itself (an explicit coordinator with process count and id);
  an empty dict means jax's own cluster detection (SLURM, Open MPI, TPU pod
  metadata) fills everything in. None means a single process: calling
  `initialize` there would wait for peers that never come.
  """
  forced = environ.get(DISTRIBUTED_ENV)
  if forced == "0":
    return None
  if "JAX_COORDINATOR_ADDRESS" in environ:
    kwargs = {}
    if "JAX_NUM_PROCESSES" in environ:
      kwargs["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in environ:
      kwargs["process_id"] = int(environ["JAX_PROCESS_ID"])
    if kwargs.get("num_processes", 2) > 1:
      return kwargs
    return None
  # SLURM: more than one task in the step (several nodes, or one process per
  # GPU on one node). SLURM_STEP_NUM_TASKS is set inside `srun`.
  tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
  if "SLURM_JOB_ID" in environ and tasks and int(tasks) > 1:
    return {}
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return {}
  # A TPU VM of a pod slice lists every worker; a single-host slice one.
  if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
    return {}
  if forced == "1":
    return {}
  return None


def maybe_initialize_distributed(
    environ: Optional[Mapping[str, str]] = None,
) -> bool:
  """Starts jax.distributed when a multi-process cluster is detected.

  Must run before anything touches a device. Returns whether it started.
  Recognised: `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`, optional `JAX_LOCAL_DEVICE_IDS`: what launch/ scripts
  set), SLURM steps of several tasks, Open MPI, and TPU pod slices.
  """
  if jax.distributed.is_initialized():
    return True
  environ = os.environ if environ is None else environ
  kwargs = detect_cluster(environ)
  if kwargs is None:
    return False
  if environ.get(HEARTBEAT_ENV):
    kwargs["heartbeat_timeout_seconds"] = int(environ[HEARTBEAT_ENV])
  # XLA's CPU client has no cross-process collectives unless told which to
  # use; a CPU cluster (tests, a laptop, CPU-only nodes) would fail at the
  # first reduction. GPU and TPU clients ignore the setting.
  if not environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info(
      "Multi-process launch detected; jax.distributed.initialize(%s)", kwargs
  )
  jax.distributed.initialize(**kwargs)
  logging.info(
      "Process %d of %d, %d local / %d global devices.",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return True


def make_mesh(model_parallelism: int = 1, devices: Any = None) -> Mesh:
  """A (data, model) mesh over all devices, Auto axes.

  Devices are ordered by process, so each process's devices hold one
  contiguous block of the batch (what `host_to_global` and the per-process
  input pipeline assume), and a `model` group of consecutive devices sits on
  as few hosts as possible.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  num_devices = len(devices)
  if model_parallelism < 1 or num_devices % model_parallelism:
    raise ValueError(
        f"config.model_parallelism={model_parallelism} must divide the "
        f"device count {num_devices}."
    )
  shape = (num_devices // model_parallelism, model_parallelism)
  device_grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(
      device_grid,
      (DATA_AXIS, MODEL_AXIS),
      axis_types=(AxisType.Auto, AxisType.Auto),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def classifier_sharding(mesh: Mesh) -> NamedSharding:
  """W (D, C): the class axis split over `model`, replicated over `data`."""
  return NamedSharding(mesh, P(None, MODEL_AXIS))


def data_parallel_size(mesh: Mesh) -> int:
  """How many shards the batch is split into (every device holds one)."""
  return mesh.shape[DATA_AXIS] * mesh.shape[MODEL_AXIS]


def model_parallel_size(mesh: Mesh) -> int:
  return mesh.shape[MODEL_AXIS]


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's slice of the batch into global device arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch,
  )
