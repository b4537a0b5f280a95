"""Start-up checks of a config: one message naming the key and the fix.

Run before anything expensive, so a typo or an impossible value fails in
seconds instead of after compiling (or hours into a run).
"""
from __future__ import annotations

import os

import jax
import ml_collections
from jax.sharding import Mesh

from qgjt_jax import parallel

_CHOICES = {
    "data.kind": ("rec", "tfds", "synthetic"),
    "quality.partition": ("norm", "degradation"),
    "head.kind": ("adaface", "arcface", "cosface", "softmax"),
    "contrastive.gate": ("sgn", "cos", "linear"),
    "contrastive.gate_range": ("half", "whole"),
    "contrastive.pair_quality": ("low", "mean", "high"),
    "contrastive.margin": ("static", "dynamic", "none"),
    "contrastive.mask": ("zero", "neg_inf", "none"),
    "queue.kind": ("proxy", "realtime", "moco", "none"),
    "optim.schedule": ("multistep", "cosine"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}


class ConfigError(ValueError):
  pass


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def check_train_config(config: ml_collections.ConfigDict,
                       num_classes: int | None = None) -> None:
  for key, allowed in _CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise ConfigError(f"config.{key}={value!r} is not one of {allowed}.")
  for key in ("head.b", "contrastive.b"):
    value = _get(config, key)
    if not 0.0 <= value <= 1.0:
      raise ConfigError(f"config.{key}={value} must lie in [0, 1] (a quality "
                        "threshold; 0 disables the gate).")
  batch = config.global_batch_size
  if batch < 1:
    raise ConfigError(f"config.global_batch_size={batch} must be positive.")
  if batch % jax.process_count():
    raise ConfigError(
        f"config.global_batch_size={batch} is not divisible by the "
        f"{jax.process_count()} processes; use a multiple of it.")
  keys_per_step = batch if config.queue.kind == "moco" else 2 * batch
  if config.queue.kind != "none" and config.queue.capacity < keys_per_step:
    raise ConfigError(
        f"config.queue.capacity={config.queue.capacity} is smaller than the "
        f"{keys_per_step} keys enqueued per step (2 x global_batch_size); "
        f"use at least {keys_per_step}.")
  if config.num_epochs <= 0:
    raise ConfigError(f"config.num_epochs={config.num_epochs} must be > 0.")
  if config.optim.lr <= 0:
    raise ConfigError(f"config.optim.lr={config.optim.lr} must be > 0.")
  if num_classes is not None and num_classes < 2:
    raise ConfigError(f"The training set has {num_classes} identities; at "
                      "least 2 are needed.")
  check_data_paths(config)


def check_data_paths(config: ml_collections.ConfigDict) -> None:
  data = config.data
  if data.kind == "rec":
    if not data.rec_dir:
      raise ConfigError(
          "config.data.rec_dir is not set: point it at the folder holding "
          "insightface's train.rec and train.idx, e.g. "
          "--config.data.rec_dir=/data/faces_emore.")
    if "://" not in data.rec_dir and not os.path.isdir(data.rec_dir):
      raise ConfigError(f"config.data.rec_dir={data.rec_dir!r} does not exist.")
  if data.kind == "tfds" and not data.tfds_name:
    raise ConfigError(
        "config.data.tfds_name is not set: name a prepared set such as "
        "'insightface_rec/ms1mv2' (see `python -m qgjt_jax.data.prepare`).")
  for path in config.eval.bin_sets:
    if "://" not in path and not os.path.isfile(path):
      raise ConfigError(f"config.eval.bin_sets lists {path!r}, which does not "
                        "exist.")


def check_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  data_devices = parallel.data_parallel_size(mesh)
  if config.global_batch_size % data_devices:
    raise ConfigError(
        f"config.global_batch_size={config.global_batch_size} is not "
        f"divisible by the {data_devices} data-parallel devices; use a "
        "multiple of it.")
  if config.eval.batch_size % data_devices:
    raise ConfigError(
        f"config.eval.batch_size={config.eval.batch_size} is not divisible by "
        f"the {data_devices} data-parallel devices.")
