"""Throughput of the full QGFace train step on synthetic, device-resident data.

The code of `python -m qgjt_jax.bench` (qgjt_jax/bench.py, its flags and
docs): `run` times a recipe's train step exactly as training builds and jits
it, `extras_cost` reads XLA's estimate of the QGFace extras' cost.

Needs jax, flax, optax, numpy and ml_collections; not TensorFlow, grain, clu
or orbax (nothing here imports the data pipeline or the checkpointer), which
accelerator images often lack.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from qgjt_jax import base_config
from qgjt_jax import config_checks
from qgjt_jax import errors
from qgjt_jax import parallel
from qgjt_jax import stack as stack_lib
from qgjt_jax.method.batch import make_batch

# Dense bf16 peak FLOP/s of one device, by `device_kind` (datasheet values).
# Matched in order, first hit wins; unknown kinds report a null utilisation.
PEAK_BF16_FLOPS: tuple[tuple[str, Optional[float]], ...] = (
    ("H200", 989e12),  # same chip as the H100 SXM
    ("H100 PCIe", None),  # lower clocks; not tabulated here
    ("H100 NVL", None),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
)

# MS1MV2 (insightface's faces_emore): the identity count of the paper's runs.
MS1MV2_CLASSES = 85742


def peak_flops(device_kind: str) -> Optional[float]:
  """Peak dense bf16 FLOP/s for a device kind, or None when unknown."""
  for pattern, peak in PEAK_BF16_FLOPS:
    if pattern.lower() in device_kind.lower():
      return peak
  return None


# The recipes are part of the package (configs/ at the repository's root
# is a link to them), so the default is found from an installed wheel too.
DEFAULT_CONFIG = (
    pathlib.Path(__file__).resolve().parents[1] / "configs" / ("ms1m.py")
)


def default_recipe() -> ml_collections.ConfigDict:
  return base_config.load_recipe(str(DEFAULT_CONFIG))


def bench_config(
    config: ml_collections.ConfigDict, qgface: bool = True
) -> ml_collections.ConfigDict:
  """The recipe as the benchmark times it.

  `contrastive.start_epoch = 0`: the benchmark times the joint phase, where
  both losses are live. `qgface=False` removes the extras: no queue (so no
  contrastive loss) and b = 0 (no quality gate).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.contrastive.start_epoch = 0.0
  if not qgface:
    config.queue.kind = "none"
    config.head.b = 0.0
  return config


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config keys a benchmark's JSON line reports, by their old names."""
  return {
      "arch": config.model.name,
      "batch": config.global_batch_size,
      "dtype": config.model.dtype,
      "queue": config.queue.capacity,
      "image_size": config.data.image_size,
      "model_parallelism": config.model_parallelism,
      "sample_rate": config.head.sample_rate,
      "logits_dtype": config.head.logits_dtype,
      "remat": config.model.remat,
  }


def synthetic_batches(
    num: int, batch: int, image_size: int, num_classes: int, seed: int = 0
) -> list[dict]:
  """Host batches shaped like the input pipeline's (uint8 images)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    shape = (batch, image_size, image_size, 3)
    out.append(
        make_batch(
            image_h=rng.integers(0, 256, shape, dtype=np.uint8),
            image_l=rng.integers(0, 256, shape, dtype=np.uint8),
            label=rng.integers(0, num_classes, (batch,), dtype=np.int32),
            degrade_l=rng.uniform(0.1, 0.5, (batch,)).astype(np.float32),
        )
    )
  return out


def _cost_flops(compiled: Any) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _compiled_memory(compiled: Any) -> dict[str, Optional[int]]:
  """XLA's memory analysis of the compiled step, per device, in bytes."""
  names = ("argument", "output", "temp", "alias", "generated_code")
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    mem = None
  return {
      f"compiled_{name}_bytes": getattr(mem, f"{name}_size_in_bytes", None)
      for name in names
  }


def _peak_memory_gib(devices: Sequence[Any]) -> Optional[float]:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return round(max(peaks) / 2**30, 3) if peaks else None


def extras_cost(
    config: ml_collections.ConfigDict, classes: int = MS1MV2_CLASSES
) -> dict[str, Any]:
  """XLA's cost analysis of `config`'s step with and without the QGFace
  extras (queue, contrastive loss, quality gate), from the lowered
  programs: no compile, no run, so any host estimates the extras' share of
  the work."""
  record = {}
  for qgface in (True, False):
    timed = bench_config(config, qgface=qgface)
    config_checks.check_values(timed)
    stack = stack_lib.build_stack(
        timed, num_classes=classes, steps_per_epoch=10_000.0
    )
    cost = stack.train_step.lower(
        stack.abstract_state(), stack.abstract_batch()
    ).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    name = "qgface" if qgface else "plain"
    record[f"{name}_flops"] = float((cost or {}).get("flops", math.nan))
    record[f"{name}_bytes_accessed"] = float(
        (cost or {}).get("bytes accessed", math.nan)
    )
  for what in ("flops", "bytes_accessed"):
    record[f"extras_{what}_ratio"] = round(
        record[f"qgface_{what}"] / record[f"plain_{what}"], 4
    )
  settings = _settings(config)
  return {
      "bench": "qgface_extras_cost",
      "arch": settings["arch"],
      "batch": settings["batch"],
      "classes": classes,
      "queue": settings["queue"],
      "device": jax.devices()[0].device_kind,
      **record,
  }


def run(
    config: ml_collections.ConfigDict,
    *,
    classes: int = MS1MV2_CLASSES,
    steps: int = 20,
    warmup: int = 3,
    repeats: int = 3,
    qgface: bool = True,
    trace_dir: Optional[str] = None,
    dump_hlo: Optional[str] = None,
) -> dict[str, Any]:
  """Builds, warms up and times the step of `config` (a recipe's:
  `default_recipe()` is configs/ms1m.py's); returns the JSON record."""
  if steps < 1 or warmup < 1 or repeats < 1:
    raise errors.UserError(
        f"--steps={steps}, --warmup={warmup}, --repeats={repeats}: each "
        "must be 1 or more"
    )
  settings = _settings(config)
  config = bench_config(config, qgface=qgface)
  config_checks.check_values(config)
  # A long epoch: the lr milestones and the ramps stay put while timing.
  stack = stack_lib.build_stack(
      config, num_classes=classes, steps_per_epoch=10_000.0
  )
  mesh, train_step = stack.mesh, stack.train_step
  state = stack.init_state(jax.random.key(config.seed))
  # Two batches in turn, already on the device: the loop times the step only.
  batches = [
      parallel.host_to_global(b, mesh)
      for b in synthetic_batches(
          2, config.global_batch_size, config.data.image_size, classes
      )
  ]

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(compiled.as_text())

  metrics = None
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 2])
  jax.block_until_ready((state, metrics))

  windows = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    windows.append((time.perf_counter() - t0) / steps)
  step_s = float(np.median(windows))

  if trace_dir:
    jax.profiler.start_trace(trace_dir)
    for i in range(3):
      state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()

  device = jax.devices()[0]
  flops = _cost_flops(compiled)
  peak = peak_flops(device.device_kind)
  num_devices = mesh.devices.size
  record = {
      "device": device.device_kind,
      "platform": device.platform,
      "devices": num_devices,
      "jax": jax.__version__,
      **settings,
      "images": 2 * settings["batch"],
      "qgface": qgface,
      "classes": classes,
      "queue": settings["queue"] if qgface else 0,
      "steps": steps,
      "repeats": repeats,
      "step_ms": round(step_s * 1e3, 3),
      "step_ms_min": round(min(windows) * 1e3, 3),
      "step_ms_max": round(max(windows) * 1e3, 3),
      "samples_per_s": round(settings["batch"] / step_s, 1),
      "images_per_s": round(2 * settings["batch"] / step_s, 1),
      # Per device: the compiled module is the SPMD-partitioned one.
      "xla_flops_per_step": flops,
      "xla_gflops_per_image": (
          round(flops * num_devices / (2 * settings["batch"]) / 1e9, 3)
          if flops
          else None
      ),
      "tflops_per_s": round(flops / step_s / 1e12, 2) if flops else None,
      "peak_bf16_tflops": peak / 1e12 if peak else None,
      "mfu": round(flops / step_s / peak, 4) if flops and peak else None,
      "peak_memory_gib": _peak_memory_gib(mesh.devices.flat),
      "compile_s": round(compile_s, 1),
      "loss": float(metrics["loss"]),
      "finite": bool(math.isfinite(float(metrics["loss"]))),
  }
  record.update(_compiled_memory(compiled))
  return record
