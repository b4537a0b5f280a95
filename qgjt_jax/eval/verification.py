"""Pair verification on `.bin` sets: 10-fold accuracy (docs/METHOD.md section 7).

The protocol of insightface / AdaFace `calculate_roc`: squared L2 distance
between the two (unit) embeddings of each pair, a pair is called "same" when
the distance is strictly below the threshold; the pairs are cut into
`nfolds` contiguous folds (KFold without shuffling: the first P % nfolds
folds get one extra pair); for each fold the threshold on the grid with the
best accuracy on the other folds (first one on ties) is applied to the fold.

The low-resolution variant ("CRLFW", as in the reference's crlfw_helper)
shrinks the FIRST image of every pair to low_res x low_res and enlarges it
back, both with PIL's bilinear filter (torchvision's default Resize on PIL
images), so each pair compares a low- and a high-resolution face.
"""

import os

import numpy as np
from PIL import Image

from qgjt_jax.eval import bin_sets
from qgjt_jax.eval import extract
from qgjt_jax.eval import reject
from qgjt_jax.eval import thresholds as thresholds_lib
from qgjt_jax.method import quality

DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)


def fold_bounds(num: int, nfolds: int) -> list[tuple[int, int]]:
  """[start, stop) of `nfolds` contiguous folds, larger folds first."""
  if not 1 < nfolds <= num:
    raise ValueError(
        f'need 2 <= nfolds <= number of pairs, got nfolds='
        f'{nfolds} for {num} pairs'
    )
  sizes = np.full(nfolds, num // nfolds)
  sizes[: num % nfolds] += 1
  stops = np.cumsum(sizes)
  return [(int(b - s), int(b)) for b, s in zip(stops, sizes)]


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
  """Squared L2 distance of rows 2i and 2i+1, (P,)."""
  embeddings = np.asarray(embeddings, np.float64)
  if embeddings.ndim != 2 or len(embeddings) % 2:
    raise ValueError(
        'embeddings must be (2P, D) with pairs on consecutive '
        f'rows, got {embeddings.shape}'
    )
  return np.sum(np.square(embeddings[0::2] - embeddings[1::2]), axis=1)


def verification_metrics(
    embeddings: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
    fold_sizes=None,
) -> dict:
  """K-fold verification accuracy of consecutive-pair embeddings.

  Args:
    embeddings: (2P, D), normally unit rows; pair i is rows 2i, 2i+1.
    issame: (P,) booleans.
    nfolds: number of contiguous folds.
    thresholds: grid of squared-distance thresholds.
    fold_sizes: the pairs of each contiguous fold, in order, instead of
      `nfolds` equal ones (folds that keep people apart).

  Returns:
    accuracy_mean, accuracy_std (population std over folds, as insightface),
    best_threshold (mean of the per-fold thresholds, a squared distance)
    and best_threshold_cosine (the same as a cosine, 1 - d / 2: unit rows),
    fold_accuracies, fold_thresholds, num_pairs, impostor_pairs, and the
    cosine thresholds
    at each FAR the impostor pairs resolve (`thresholds.at_far`).
  """
  dist = pair_distances(embeddings)
  issame = np.asarray(issame, bool).reshape(-1)
  if len(issame) != len(dist):
    raise ValueError(
        f'{len(dist)} pairs of embeddings but {len(issame)} issame flags'
    )
  thresholds = np.asarray(thresholds, np.float64)
  # (T, P): whether each threshold predicts each pair correctly.
  predict = dist[None, :] < thresholds[:, None]
  correct = predict == issame[None, :]
  if fold_sizes is None:
    bounds = fold_bounds(len(dist), nfolds)
  else:
    stops = np.cumsum(fold_sizes)
    if stops[-1] != len(dist) or min(fold_sizes) < 1:
      raise ValueError(
          f'fold sizes {list(fold_sizes)} do not cover the '
          f'{len(dist)} pairs'
      )
    bounds = [(int(b - s), int(b)) for b, s in zip(stops, fold_sizes)]
  starts = [b[0] for b in bounds]
  fold_correct = np.add.reduceat(correct, starts, axis=1)  # (T, F)
  total_correct = fold_correct.sum(axis=1)
  accuracies, best = [], []
  for k, (start, stop) in enumerate(bounds):
    # Train accuracies share one denominator, so comparing counts picks the
    # same (first) best threshold as comparing accuracies.
    index = int(np.argmax(total_correct - fold_correct[:, k]))
    best.append(float(thresholds[index]))
    accuracies.append(float(fold_correct[index, k]) / (stop - start))
  cosines = 1.0 - dist / 2.0
  return {
      'accuracy_mean': float(np.mean(accuracies)),
      'accuracy_std': float(np.std(accuracies)),
      'best_threshold': float(np.mean(best)),
      'best_threshold_cosine': 1.0 - float(np.mean(best)) / 2.0,
      'thresholds': thresholds_lib.at_far(cosines[issame], cosines[~issame]),
      'roc': thresholds_lib.roc_points(cosines[issame], cosines[~issame]),
      'fold_accuracies': accuracies,
      'fold_thresholds': best,
      'num_pairs': int(len(dist)),
      'impostor_pairs': int(np.sum(~issame)),
  }


def shrink(image: np.ndarray, low_res: int) -> np.ndarray:
  """One uint8 (H, W, 3) face shrunk to low_res px and enlarged back (PIL
  bilinear both ways)."""
  if low_res < 1:
    raise ValueError(f'low_res must be a positive size, got {low_res}')
  height, width = image.shape[:2]
  small = Image.fromarray(image).resize(
      (low_res, low_res), Image.Resampling.BILINEAR
  )
  return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))


def degrade_first_of_pairs(images: np.ndarray, low_res: int) -> np.ndarray:
  """Copy of `images` with every even-indexed image shrunk (`shrink`)."""
  out = np.array(images, copy=True)
  for i in range(0, len(out), 2):
    out[i] = shrink(out[i], low_res)
  return out


def evaluate_pairs(
    embed_fn: extract.EmbedFn,
    images: np.ndarray,
    issame: np.ndarray,
    *,
    batch_size: int,
    low_res: int | None = None,
    flip: bool = True,
    fusion: str | None = extract.DEFAULT_FUSION,
    nfolds: int = 10,
    progress: bool = True,
    desc: str = 'verification',
    clean_then_degraded: bool = False,
) -> dict:
  """Embeds decoded pair images (2P, H, W, 3) and scores them.

  Decode a set once with `bin_sets` and call this per checkpoint (and per
  `low_res`) to avoid decoding again. Adds 'mean_norm' (the average fused
  feature norm, a cheap health check), 'low_res' and the norm's EDC and ERC
  as the pairs' quality (`reject.reject_metrics`); with
  `clean_then_degraded` (each pair a clean face, then a degraded one: in
  the synthetic HQ-LQ set every one went through the downscale) also
  'quality_auc', how well the norm tells the two apart.
  """
  if low_res is not None:
    images = degrade_first_of_pairs(images, low_res)
  feats, norms = extract.extract_embeddings(
      embed_fn,
      images,
      batch_size=batch_size,
      flip=flip,
      fusion=fusion,
      progress=progress,
      return_norms=True,
      desc=desc,
  )
  metrics = verification_metrics(feats, issame, nfolds=nfolds)
  metrics['mean_norm'] = float(np.mean(norms))
  metrics['low_res'] = low_res
  metrics.update(
      reject.reject_metrics(
          1.0 - pair_distances(feats) / 2.0,
          issame,
          np.minimum(norms[0::2], norms[1::2]),
      )
  )
  if clean_then_degraded:
    metrics['quality_auc'] = float(
        quality.separation_auc(norms[0::2], norms[1::2])
    )
    metrics['norm_histogram'] = norm_histogram(norms[0::2], norms[1::2])
  return metrics


def evaluate_bin(
    embed_fn: extract.EmbedFn,
    path: str | os.PathLike,
    *,
    batch_size: int,
    low_res: int | None = None,
    image_size: int = 112,
    flip: bool = True,
    fusion: str | None = extract.DEFAULT_FUSION,
    nfolds: int = 10,
    progress: bool = True,
) -> dict:
  """Loads, decodes and evaluates one `.bin` set (see evaluate_pairs)."""
  encoded, issame = bin_sets.load_bin(path)
  images = bin_sets.decode_bin_images(encoded, image_size, path=os.fspath(path))
  name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
  if low_res is not None:
    name = f'{name}@{low_res}px'
  return evaluate_pairs(
      embed_fn,
      images,
      issame,
      batch_size=batch_size,
      low_res=low_res,
      flip=flip,
      fusion=fusion,
      nfolds=nfolds,
      progress=progress,
      desc=name,
  )


def norm_histogram(
    clean: np.ndarray, degraded: np.ndarray, bins: int = 40
) -> dict[str, list]:
  """Counts of the clean and degraded faces' norms over shared bins."""
  edges = np.histogram_bin_edges(np.r_[clean, degraded], bins)
  return {
      'edges': edges.tolist(),
      'clean': np.histogram(clean, edges)[0].tolist(),
      'degraded': np.histogram(degraded, edges)[0].tolist(),
  }
