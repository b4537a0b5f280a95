r"""Embeddings of your own face images from a checkpoint (--mode=embed/compare).

  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --mode=embed --images=/data/my_faces --out=my_faces.npz [--skip_bad]
  python -m qgjt_jax.main --config=configs/ms1m.py --workdir=runs/ms1m \
      --mode=compare --images=a.jpg,b.jpg

The images are aligned face crops (any size: resized to the model's input),
read with OpenCV. For each, `embed` writes the unit embedding, the feature
norm (the quality indicator), its quality q in [0, 1] under the run's
running norm statistics and which side of the HQ/LQ threshold
(`config.head.b`) that puts it on, and its path relative to the folder. A
checkpoint without those statistics (a converted model) leaves quality NaN.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import errors
from qgjt_jax import evaluate
from qgjt_jax import outputs
from qgjt_jax import parallel
from qgjt_jax import reporting
from qgjt_jax import state as state_lib
from qgjt_jax.eval import extract
from qgjt_jax.eval import images as images_lib
from qgjt_jax.losses import margin


class ImageError(ValueError):
  """An image that cannot be read (the message names it)."""


@dataclasses.dataclass
class Embedded:
  embeddings: np.ndarray  # (N, D) float32, unit rows
  norms: np.ndarray       # (N,) float32
  quality: np.ndarray     # (N,) float32 in [0, 1]; NaN without statistics
  hq: np.ndarray          # (N,) bool: quality >= threshold
  threshold: float
  paths: list[str]
  skipped: list[str]


def _embedder(config: ml_collections.ConfigDict, workdir: str,
              step: Optional[int]):
  """(embed function, norm statistics or None, the step)."""
  config = evaluate.with_recorded_input_order(config, workdir)
  mesh = parallel.make_mesh(1)
  dtype = jnp.dtype(config.eval.dtype)
  model = state_lib.build_model(config).clone(dtype=dtype)
  directory = f"{workdir}/checkpoints"
  variables, restored = ckpt.restore_model(
      directory, evaluate.abstract_model_variables(config, model, mesh), step)
  stats = ckpt.restore_quality(directory, restored)
  return (evaluate.make_embed_fn(model, dtype, mesh, variables), stats,
          restored)


def _read_all(paths: Sequence[pathlib.Path], size: int, skip_bad: bool,
              hint: str):
  """LazyImages of `paths` and the set of unreadable ones: those are
  listed (and replaced by a blank face) when skip_bad, else raise
  ImageError naming the file, followed by `hint`."""
  bad = set()  # a set: an image may be read more than once (padding)

  def load(i):
    try:
      return images_lib.read_image(paths[i], size)
    except (OSError, ValueError) as e:  # limits.LimitError among them
      if not skip_bad:
        raise ImageError(f"{errors.one_line(e)}{hint}") from None
      bad.add(i)
      return np.zeros((size, size, 3), np.uint8)
  return images_lib.LazyImages(load, len(paths)), bad


def embed_images(config: ml_collections.ConfigDict, workdir: str,
                 paths: Sequence[str | os.PathLike], *, root: str = "",
                 skip_bad: bool = False, step: Optional[int] = None,
                 progress: bool = True,
                 hint: str = "; pass --skip_bad to leave such images out"
                 ) -> Embedded:
  """Embeds `paths` with the model of a workdir's checkpoint (see module).

  An unreadable image raises ImageError (its message ends with `hint`),
  or with `skip_bad` is left out and listed in `skipped`.
  """
  paths = [pathlib.Path(p) for p in paths]
  embed_fn, stats, restored = _embedder(config, workdir, step)
  images, bad = _read_all(paths, config.data.image_size, skip_bad, hint)
  feats, norms = extract.extract_embeddings(
      embed_fn, images, batch_size=config.eval.batch_size, flip=False,
      return_norms=True, progress=progress, desc="embed")
  keep = np.setdiff1d(np.arange(len(paths)), sorted(bad))
  if stats is None:
    quality = np.full(len(paths), np.nan, np.float32)
  else:
    scaler = margin.margin_scaler(
        jnp.asarray(norms), margin.QualityStats(
            mean=jnp.float32(stats["mean"]), std=jnp.float32(stats["std"])),
        config.quality.h, config.quality.eps)
    quality = np.asarray(margin.quality_from_scaler(scaler), np.float32)
  threshold = float(config.head.b)
  name = lambda p: os.path.relpath(p, root) if root else str(p)
  reporting.note(f"Embedded {len(keep)} image(s) with the model of step "
                 f"{restored}" + (f"; skipped {len(bad)} unreadable."
                                  if bad else "."))
  return Embedded(embeddings=feats[keep], norms=norms[keep],
                  quality=quality[keep], hq=quality[keep] >= threshold,
                  threshold=threshold, paths=[name(paths[i]) for i in keep],
                  skipped=[name(paths[i]) for i in sorted(bad)])


def run_embed(config: ml_collections.ConfigDict, workdir: str, folder: str,
              out: str, *, skip_bad: bool = False, step: Optional[int] = None,
              overwrite: bool = False) -> Embedded:
  """--mode=embed: every image below `folder` into the .npz `out` (that
  very name; refused before any work if it exists, unless `overwrite`)."""
  outputs.check_output(out, overwrite=overwrite)
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise ImageError(f"--images={folder} is not a folder of face images")
  paths = images_lib.list_images(root)
  if not paths:
    raise ImageError(f"--images={folder} holds no images (.jpg, .jpeg, "
                     ".png, .bmp)")
  result = embed_images(config, workdir, paths, root=str(root),
                        skip_bad=skip_bad, step=step)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with outputs.atomic_file(out, overwrite=overwrite) as f:
      np.savez(f, embeddings=result.embeddings, norms=result.norms,
               quality=result.quality, hq=result.hq,
               threshold=np.float64(result.threshold),
               paths=np.array(result.paths), skipped=np.array(result.skipped))
  reporting.note(f"Wrote {out}: embeddings {result.embeddings.shape}, norms, "
                 "quality, hq, paths.")
  return result


def run_compare(config: ml_collections.ConfigDict, workdir: str,
                images: Sequence[str], *, step: Optional[int] = None) -> float:
  """--mode=compare: the cosine of two faces and both qualities."""
  if len(images) != 2:
    raise ImageError(f"--images={','.join(images)}: give two images, "
                     "--images=A.jpg,B.jpg")
  result = embed_images(config, workdir, images, progress=False, step=step,
                        hint="")
  cosine = float(result.embeddings[0] @ result.embeddings[1])
  lines = [f"cosine similarity {cosine:.4f}"]
  for path, norm, q, hq in zip(result.paths, result.norms, result.quality,
                               result.hq):
    side = ("" if np.isnan(q) else
            f", quality {q:.3f} ({'HQ' if hq else 'LQ'} at b="
            f"{result.threshold})")
    lines.append(f"{path}: feature norm {norm:.3f}{side}")
  reporting.note("\n".join(lines))
  return cosine
