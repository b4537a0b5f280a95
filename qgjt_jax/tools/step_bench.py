r"""Throughput of the full QGFace train step on synthetic, device-resident data.

  python -m qgjt_jax.bench --arch=ir50 --batch=256
  python -m qgjt_jax.bench --arch=ir50 --batch=256 --no_qgface
  python -m qgjt_jax.bench --arch=ir100 --batch=256 --dtype=bfloat16

Times the train step of a recipe (`--config`, default configs/ms1m.py)
exactly as training builds and jits it (`stack.build_stack`: both views, 2 x
batch images; a classifier of --classes identities; the proxy-updated queue
of --queue rows; the optimiser update; state donated) after --warmup steps,
with no host synchronisation inside the timed loop, and prints one JSON
line: device kind, arch, batch, dtype, step_ms, samples/s, images/s, the XLA
cost analysis's FLOPs per step, the model FLOPs utilisation against the
device's peak bf16 rate (null for devices not in `PEAK_BF16_FLOPS`), compile
time, XLA's memory analysis of the compiled step (argument, output and
temporary bytes, known on any host before running) and the peak device
memory. `--no_qgface` times the same step without the QGFace extras (no
queue, no contrastive loss, no quality gate: queue kind "none", b = 0), so the
extras' overhead is the ratio of two runs of one process. The flags set their
config keys over the recipe's; a --config.KEY that one of them sets is
refused, naming the flag.

Needs jax, flax, optax, numpy and ml_collections; not TensorFlow, grain, clu
or orbax (nothing here imports the data pipeline or the checkpointer), which
accelerator images often lack.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from qgjt_jax import base_config
from qgjt_jax import config_checks
from qgjt_jax import errors
from qgjt_jax import models
from qgjt_jax import parallel
from qgjt_jax import recipe_flags
from qgjt_jax import stack as stack_lib
from qgjt_jax.method.batch import make_batch

# Dense bf16 peak FLOP/s of one device, by `device_kind` (datasheet values).
# Matched in order, first hit wins; unknown kinds report a null utilisation.
PEAK_BF16_FLOPS: tuple[tuple[str, Optional[float]], ...] = (
    ("H200", 989e12),          # same chip as the H100 SXM
    ("H100 PCIe", None),       # lower clocks; not tabulated here
    ("H100 NVL", None),
    ("H100", 989e12),          # SXM
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),        # v5p reports itself as "TPU v5"
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
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / (
    "ms1m.py")


def default_recipe() -> ml_collections.ConfigDict:
  return base_config.load_recipe(str(DEFAULT_CONFIG))


# The keys the benchmark's own flags set over the recipe: a --config.KEY
# override of one of them would be silently undone, so it is refused.
FLAG_OF_KEY = {
    "model.name": "arch", "model.dtype": "dtype",
    "model.base_width": "base_width", "model.embedding_size":
    "embedding_size", "model.remat": "remat", "data.image_size":
    "image_size", "global_batch_size": "batch", "model_parallelism":
    "model_parallelism", "head.sample_rate": "sample_rate",
    "head.logits_dtype": "logits_dtype", "queue.capacity": "queue"}


def bench_config(config: ml_collections.ConfigDict, *, arch: str,
                 batch: int, dtype: str, queue: int, qgface: bool,
                 image_size: int, base_width: int, embedding_size: int,
                 model_parallelism: int, sample_rate: float,
                 logits_dtype: str, remat: str) -> ml_collections.ConfigDict:
  """The recipe with the benchmark's settings.

  `contrastive.start_epoch = 0`: the benchmark times the joint phase, where
  both losses are live. `qgface=False` removes the extras: no queue (so no
  contrastive loss) and b = 0 (no quality gate).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(name=arch, dtype=dtype, base_width=base_width,
                      embedding_size=embedding_size, remat=remat)
  config.data.image_size = image_size
  config.global_batch_size = batch
  config.model_parallelism = model_parallelism
  config.head.update(sample_rate=sample_rate, logits_dtype=logits_dtype)
  config.contrastive.start_epoch = 0.0
  config.queue.capacity = queue
  if not qgface:
    config.queue.kind = "none"
    config.head.b = 0.0
  return config


def synthetic_batches(num: int, batch: int, image_size: int,
                      num_classes: int, seed: int = 0) -> list[dict]:
  """Host batches shaped like the input pipeline's (uint8 images)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    shape = (batch, image_size, image_size, 3)
    out.append(make_batch(
        image_h=rng.integers(0, 256, shape, dtype=np.uint8),
        image_l=rng.integers(0, 256, shape, dtype=np.uint8),
        label=rng.integers(0, num_classes, (batch,), dtype=np.int32),
        degrade_l=rng.uniform(0.1, 0.5, (batch,)).astype(np.float32)))
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
  return {f"compiled_{name}_bytes": getattr(mem, f"{name}_size_in_bytes",
                                            None) for name in names}


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


def extras_cost(settings: dict[str, Any], classes: int,
                recipe: Optional[ml_collections.ConfigDict] = None
                ) -> dict[str, Any]:
  """XLA's cost analysis of the step with and without the QGFace extras
  (queue, contrastive loss, quality gate), from the lowered programs: no
  compile, no run, so any host estimates the extras' share of the work.

  `settings` are bench_config's keyword arguments but `qgface`; `recipe`
  the config (default: configs/ms1m.py's).
  """
  recipe = default_recipe() if recipe is None else recipe
  record = {}
  for qgface in (True, False):
    config = bench_config(recipe, qgface=qgface,
                          **settings)
    config_checks.check_values(config)
    stack = stack_lib.build_stack(config, num_classes=classes,
                                  steps_per_epoch=10_000.0)
    cost = stack.train_step.lower(stack.abstract_state(),
                                  stack.abstract_batch()).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    name = "qgface" if qgface else "plain"
    record[f"{name}_flops"] = float((cost or {}).get("flops", math.nan))
    record[f"{name}_bytes_accessed"] = float(
        (cost or {}).get("bytes accessed", math.nan))
  for what in ("flops", "bytes_accessed"):
    record[f"extras_{what}_ratio"] = round(
        record[f"qgface_{what}"] / record[f"plain_{what}"], 4)
  return {"bench": "qgface_extras_cost", "arch": settings["arch"],
          "batch": settings["batch"], "classes": classes,
          "queue": settings["queue"], "device": jax.devices()[0].device_kind,
          **record}


def run(*, arch: str = "ir50", batch: int = 256, dtype: str = "bfloat16",
        classes: int = MS1MV2_CLASSES, queue: int = 8192, steps: int = 20,
        warmup: int = 3, repeats: int = 3, qgface: bool = True,
        image_size: int = 112, base_width: int = 64,
        embedding_size: int = 512, model_parallelism: int = 1,
        sample_rate: float = 1.0, logits_dtype: str = "float32",
        remat: str = "none",
        recipe: Optional[ml_collections.ConfigDict] = None,
        trace_dir: Optional[str] = None, dump_hlo: Optional[str] = None
        ) -> dict[str, Any]:
  """Builds, warms up and times the step of `recipe` (default:
  configs/ms1m.py's config) with the settings given; returns the JSON
  record."""
  if steps < 1 or warmup < 1 or repeats < 1:
    raise ValueError("steps, warmup and repeats must be >= 1")
  config = bench_config(
      default_recipe() if recipe is None else recipe, arch=arch, batch=batch, dtype=dtype,
      queue=queue, qgface=qgface, image_size=image_size,
      base_width=base_width, embedding_size=embedding_size,
      model_parallelism=model_parallelism, sample_rate=sample_rate,
      logits_dtype=logits_dtype, remat=remat)
  config_checks.check_values(config)
  # A long epoch: the lr milestones and the ramps stay put while timing.
  stack = stack_lib.build_stack(config, num_classes=classes,
                                steps_per_epoch=10_000.0)
  mesh, train_step = stack.mesh, stack.train_step
  state = stack.init_state(jax.random.key(config.seed))
  # Two batches in turn, already on the device: the loop times the step only.
  batches = [parallel.host_to_global(b, mesh) for b in synthetic_batches(
      2, batch, image_size, classes)]

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
      "arch": arch,
      "batch": batch,
      "images": 2 * batch,
      "dtype": dtype,
      "qgface": qgface,
      "classes": classes,
      "queue": queue if qgface else 0,
      "model_parallelism": model_parallelism,
      "sample_rate": sample_rate,
      "logits_dtype": logits_dtype,
      "remat": remat,
      "steps": steps,
      "repeats": repeats,
      "step_ms": round(step_s * 1e3, 3),
      "step_ms_min": round(min(windows) * 1e3, 3),
      "step_ms_max": round(max(windows) * 1e3, 3),
      "samples_per_s": round(batch / step_s, 1),
      "images_per_s": round(2 * batch / step_s, 1),
      # Per device: the compiled module is the SPMD-partitioned one.
      "xla_flops_per_step": flops,
      "xla_gflops_per_image": (round(flops * num_devices / (2 * batch) / 1e9,
                                     3) if flops else None),
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


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = recipe_flags.argument_parser("python -m qgjt_jax.bench", __doc__)
  p.add_argument("--arch", default="ir50",
                 help="a backbone name: " + ", ".join(models.backbone_names()))
  p.add_argument("--batch", type=int, default=256,
                 help="samples per step (each gives 2 images)")
  p.add_argument("--dtype", default="bfloat16",
                 choices=("bfloat16", "float32", "float16"),
                 help="backbone compute dtype")
  p.add_argument("--classes", type=int, default=MS1MV2_CLASSES)
  p.add_argument("--queue", type=int, default=8192, help="queue capacity K")
  p.add_argument("--steps", type=int, default=20, help="timed steps per window")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3,
                 help="timed windows; step_ms is their median")
  p.add_argument("--no_qgface", action="store_true",
                 help="no queue, contrastive loss or quality gate")
  p.add_argument("--image_size", type=int, default=112)
  p.add_argument("--base_width", type=int, default=64,
                 help="for the backbones that have this setting")
  p.add_argument("--embedding_size", type=int, default=512)
  p.add_argument("--model_parallelism", type=int, default=1)
  p.add_argument("--sample_rate", type=float, default=1.0,
                 help="PartialFC share of classes per step (1.0: all)")
  p.add_argument("--logits_dtype", default="float32",
                 choices=("float32", "bfloat16"),
                 help="dtype of the (2B, C) cosine matmul")
  p.add_argument("--remat", default="none", choices=("none", "block"),
                 help="recompute each residual unit in the backward pass")
  p.add_argument("--trace_dir", default=None,
                 help="also write a jax.profiler trace of 3 steps here")
  p.add_argument("--dump_hlo", default=None,
                 help="write the compiled step's HLO text to this file")
  p.add_argument("--extras_cost", action="store_true",
                 help="instead of timing: XLA's FLOPs and bytes of the step "
                 "with and without the QGFace extras (lowered only)")
  for arg in argv:
    key = arg[len("--config."):].split("=", 1)[0]
    if arg.startswith("--config.") and key in FLAG_OF_KEY:
      sys.exit(f"ERROR: {arg}: the benchmark sets {key} from its own flag; "
               f"give --{FLAG_OF_KEY[key]}= instead")
  return recipe_flags.parse_tool_args(p, argv, str(DEFAULT_CONFIG))


def main(argv: Optional[Sequence[str]] = None) -> None:
  a = _parse(sys.argv[1:] if argv is None else argv)
  parallel.maybe_initialize_distributed()
  with errors.expected_failures(verbose=a.traceback):
    record = _run(a)
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)


def _run(a: argparse.Namespace) -> dict[str, Any]:
  if a.extras_cost:
    return extras_cost(dict(
        arch=a.arch, batch=a.batch, dtype=a.dtype, queue=a.queue,
        image_size=a.image_size, base_width=a.base_width,
        embedding_size=a.embedding_size,
        model_parallelism=a.model_parallelism, sample_rate=a.sample_rate,
        logits_dtype=a.logits_dtype, remat=a.remat), a.classes, a.recipe)
  return run(arch=a.arch, batch=a.batch, dtype=a.dtype, classes=a.classes,
             queue=a.queue, steps=a.steps, warmup=a.warmup,
             repeats=a.repeats, qgface=not a.no_qgface,
             image_size=a.image_size, base_width=a.base_width,
             embedding_size=a.embedding_size,
             model_parallelism=a.model_parallelism,
             sample_rate=a.sample_rate, logits_dtype=a.logits_dtype,
             remat=a.remat, recipe=a.recipe, trace_dir=a.trace_dir,
             dump_hlo=a.dump_hlo)


def cli() -> None:
  """`python -m qgjt_jax.bench`."""
  main()


if __name__ == "__main__":
  cli()
