"""Helpers for the notebooks: config overrides, metrics, views, plots.

The notebooks in `notebooks/` stay short by calling these; everything here is
host-side numpy/matplotlib around the public training and evaluation APIs.
Plot functions return a matplotlib Figure and never pick a backend, so they
work inline in Jupyter/Colab and headless (Agg) alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import cv2
import ml_collections
import numpy as np

from qgjt_jax import workdir as workdir_layout
from qgjt_jax.data import degrade
from qgjt_jax.data import synthetic
from qgjt_jax.files import images


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Sets dotted keys ({'model.base_width': 8}) in place; returns config.

  Unknown keys raise KeyError naming the key, as `--config.KEY=VALUE` does.
  """
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      if name not in node:
        raise KeyError(f"config has no section {name!r} (in {dotted!r})")
      node = node[name]
    if leaf not in node:
      raise KeyError(f"config has no key {dotted!r}")
    node[leaf] = value
  return config


def round_batch_sizes(
    config: ml_collections.ConfigDict, device_count: int
) -> ml_collections.ConfigDict:
  """Rounds the train and eval batch sizes up to multiples of device_count.

  A batch is split evenly over the data-parallel devices (8 TPU cores on a
  Colab v2-8), so a CPU-sized batch of 100 would be refused there.
  """
  round_up = lambda n: -(-n // device_count) * device_count
  config.global_batch_size = round_up(config.global_batch_size)
  config.eval.batch_size = round_up(config.eval.batch_size)
  return config


def read_metrics(workdir: str) -> dict[str, np.ndarray]:
  """WORKDIR/metrics.jsonl as {name: (steps,) float array}, sorted by step.

  Records of one step are merged (the evaluation adds its own record at its
  step); where a value repeats, as for steps a resumed run logs again, the
  later one wins. Metrics a step lacks are NaN.
  """
  by_step = {}
  metrics = workdir_layout.Workdir(workdir).metrics
  for line in metrics.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      by_step.setdefault(int(record["step"]), {}).update(record)
  steps = sorted(by_step)
  names = sorted({k for r in by_step.values() for k in r})
  return {
      n: np.array([by_step[s].get(n, np.nan) for s in steps], np.float64)
      for n in names
  }


def hq_threshold_norm(
    mean: float, std: float, b: float, h: float, eps: float
) -> float:
  """The feature norm whose quality equals b: the HQ/LQ boundary.

  Quality is q = (a + 1) / 2 with a = clip(h (n - mu) / (sigma + eps), -1, 1)
  (`method.quality.margin_scaler`), so q = b at n* = mu + (sigma + eps)(2b - 1) / h.
  """
  return float(mean + (std + eps) * (2.0 * b - 1.0) / h)


def final_quality_stats(
    metrics: Mapping[str, np.ndarray],
) -> tuple[float, float]:
  """(mu, sigma) after the last logged step.

  The train step logs the running statistics after its update, the values
  it stores in the state, and the last step is always logged: this is the
  checkpoint's `state.quality` without restoring the whole state.
  """
  return float(metrics["quality_mean"][-1]), float(metrics["quality_std"][-1])


def training_views(
    config: ml_collections.ConfigDict, count: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`count` training faces as the step sees them: H views, L views, r.

  Faces are spread over every identity of the synthetic training set. The H
  view is the photo itself (unflipped, for display), the L view comes from
  the config's degradation recipe; r is its resolution factor.
  """
  spec = config.data.synthetic
  source = synthetic.SyntheticFaces(
      spec.num_identities,
      spec.images_per_identity,
      image_size=config.data.image_size,
      seed=spec.seed,
  )
  count = min(count, len(source))
  rng = np.random.default_rng(seed)
  indices = np.linspace(0, len(source) - 1, count).round().astype(int)
  view_cfg = degrade.view_config_from(config.data.view)
  clean, degraded, scales = [], [], []
  for i in indices:
    img = images.decode_image(source[int(i)]["image"])
    clean.append(degrade.clean_view(img, rng, flip_p=0.0))
    low, r = degrade.degraded_view(img, rng, view_cfg)
    degraded.append(low)
    scales.append(r)
  return np.stack(clean), np.stack(degraded), np.asarray(scales, np.float64)


def heldout_faces(
    config: ml_collections.ConfigDict, identity: int, variations: Sequence[int]
) -> np.ndarray:
  """Photos of a held-out (never trained on) identity, uint8 BGR."""
  spec = config.data.synthetic
  return np.stack(
      [
          synthetic.render_photo(
              spec.seed, identity, v, config.data.image_size, heldout=True
          )
          for v in variations
      ]
  )


def low_quality(
    config: ml_collections.ConfigDict, images: np.ndarray, seed: int = 0
) -> np.ndarray:
  """The evaluation's LQ version of faces: downscaled, JPEG, upscaled."""
  cfg = degrade.view_config_from(config.data.view)
  rng = np.random.default_rng(seed)
  return np.stack(
      [
          degrade.low_resolution(
              im, rng, cfg.min_scale, cfg.max_scale, cfg.jpeg_quality
          )[0]
          for im in images
      ]
  )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rgb(img: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(np.asarray(img, np.uint8), cv2.COLOR_BGR2RGB)


def _figure(*args, **kwargs):
  from matplotlib import pyplot as plt

  return plt.subplots(*args, **kwargs)


def plot_losses(metrics: Mapping[str, np.ndarray]):
  """Classification and contrastive losses, and the HQ share of each view."""
  fig, axes = _figure(1, 3, figsize=(15, 3.6))
  step = metrics["step"]
  axes[0].plot(step, metrics["loss_cls"], color="tab:blue")
  axes[0].set_title("classification loss (HQ branch)")
  axes[1].plot(step, metrics["loss_con"], color="tab:orange")
  axes[1].set_title("contrastive loss (LQ branch)")
  if "con_weight" in metrics:
    on = np.flatnonzero(metrics["con_weight"] > 0)
    if on.size:
      axes[1].axvline(
          step[on[0]],
          color="gray",
          ls="--",
          label="contrastive loss switched on",
      )
      axes[1].legend(loc="best", fontsize=8)
  for name, label in (
      ("hq_fraction_clean", "clean (H) views"),
      ("hq_fraction_degraded", "degraded (L) views"),
  ):
    if name in metrics:
      axes[2].plot(step, metrics[name], label=label)
  axes[2].set_ylim(-0.05, 1.05)
  axes[2].set_title("share of images judged HQ")
  axes[2].legend(loc="best", fontsize=8)
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def plot_norms(
    clean_norms: np.ndarray,
    degraded_norms: np.ndarray,
    scales: np.ndarray,
    threshold: Optional[float] = None,
    threshold_label: str = "HQ/LQ threshold",
):
  """Norm histograms of both views, and the L-view norm against its r."""
  fig, axes = _figure(1, 2, figsize=(12, 4))
  values = np.concatenate([clean_norms, degraded_norms])
  bins = np.linspace(values.min(), values.max(), 40)
  if not np.all(np.isfinite(bins)) or bins[0] == bins[-1]:
    bins = 40
  axes[0].hist(clean_norms, bins=bins, alpha=0.6, label="clean (H) views")
  axes[0].hist(degraded_norms, bins=bins, alpha=0.6, label="degraded (L) views")
  axes[0].set_xlabel("feature norm |z|")
  axes[0].set_ylabel("faces")
  axes[0].set_title("feature norm distribution")
  axes[1].scatter(
      np.ones_like(clean_norms),
      clean_norms,
      s=10,
      color="tab:blue",
      label="H view (r = 1)",
  )
  axes[1].scatter(
      scales, degraded_norms, s=10, color="tab:orange", label="L view"
  )
  axes[1].set_xlabel("resolution factor r")
  axes[1].set_ylabel("feature norm |z|")
  axes[1].set_title("norm vs degradation")
  if threshold is not None and np.isfinite(threshold):
    axes[0].axvline(threshold, color="red", ls="--", label=threshold_label)
    axes[1].axhline(threshold, color="red", ls="--", label=threshold_label)
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  return fig


def plot_views(
    clean: np.ndarray,
    degraded: np.ndarray,
    scales: np.ndarray,
    columns: int = 8,
):
  """Two rows: H views above, their L views (with r) below.

  The columns are spread over the given faces (different identities when the
  faces come from `training_views`).
  """
  columns = min(columns, len(clean))
  picks = np.linspace(0, len(clean) - 1, columns).round().astype(int)
  fig, axes = _figure(2, columns, figsize=(1.6 * columns, 3.6), squeeze=False)
  for j, i in enumerate(picks):
    axes[0, j].imshow(_rgb(clean[i]))
    axes[1, j].imshow(_rgb(degraded[i]))
    axes[1, j].set_title(f"r = {scales[i]:.2f}", fontsize=8)
    for ax in axes[:, j]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_ylabel("H view")
  axes[1, 0].set_ylabel("L view")
  fig.tight_layout()
  return fig


def plot_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str]],
    similarities: Sequence[float],
):
  """One column per pair: the two faces, titled with their cosine."""
  fig, axes = _figure(
      2, len(pairs), figsize=(2.6 * len(pairs), 5.4), squeeze=False
  )
  for j, ((a, b, label), sim) in enumerate(zip(pairs, similarities)):
    axes[0, j].imshow(_rgb(a))
    axes[1, j].imshow(_rgb(b))
    axes[0, j].set_title(f"{label}\ncos = {sim:.3f}", fontsize=9)
    for ax in axes[:, j]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  return fig


def local_copy(path: str, directory: str = "/tmp/qgjt_eval") -> str:
  """`path` itself when local; a remote file (gs://...) is copied first.

  Readers of `.bin` sets open local files; orbax reads gs:// on its own.
  """
  if "://" not in path:
    return path
  from etils import epath

  source = epath.Path(path)
  target = epath.Path(directory) / source.name
  target.parent.mkdir(parents=True, exist_ok=True)
  if not target.exists():
    source.copy(target)
  return str(target)
