"""IJB-B / IJB-C 1:1 template verification (TAR at FAR), insightface protocol.

Layout of insightface's IJB release (recognition/_evaluation_/ijb), under
`root`, for subset S in {IJBB, IJBC} and s its lower case:

  S/loose_crop/<image>.jpg                  loosely cropped faces
  S/meta/s_name_5pts_score.txt              "<image> x1 y1 ... x5 y5 score"
  S/meta/s_face_tid_mid.txt                 "<image> <template> <media>"
  S/meta/s_template_pair_label.txt          "<template1> <template2> <0|1>"

Both per-image files list the images in the same order.

Protocol (insightface ijb_11.py as used by AdaFace/QGFace):
1. Align each loose crop to 112x112 with the similarity transform mapping its
   5 landmarks onto the ArcFace template (least squares), bilinear warp,
   black border.
2. Embed with flip fusion. With 'pre_norm_add' and use_norm_score the image
   feature is n1 e1 + n2 e2 (the un-normalised sum, insightface's "F2 N1");
   use_detector_score further multiplies by the detector score ("D1":
   insightface's scripts turn it on, AdaFace's and QGFace's leave it off;
   every result says which, as `detector_score_weighting`).
3. Average the features of each (template, media), sum a template's media
   features, L2-normalise; score = cosine of the two templates of each pair.
4. ROC of the scores; TAR at each target FAR is the TPR of the ROC point
   whose FPR is nearest the target, the largest TPR among equal FPRs
   (insightface: roc_curve, flipud, nearest).
"""

import dataclasses
import math
import os
import pathlib

import numpy as np

from qgjt_jax.align.five_points import align_face
from qgjt_jax.eval import extract
from qgjt_jax.eval import thresholds as thresholds_lib
from qgjt_jax.files import images as images_lib

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SUBSETS = ('IJBB', 'IJBC')


@dataclasses.dataclass(frozen=True)
class IJBLayout:
  image_paths: list[pathlib.Path]
  landmarks: np.ndarray  # (N, 5, 2) float32
  faceness: np.ndarray  # (N,) float32 detector scores
  templates: np.ndarray  # (N,) int64
  medias: np.ndarray  # (N,) int64
  pairs: np.ndarray  # (P, 2) int64 template ids
  labels: np.ndarray  # (P,) int64, 1 = same subject


def _read_table(path: pathlib.Path, ncols: int) -> tuple[list[str], np.ndarray]:
  """(first column as strings, the other ncols - 1 columns as float64)."""
  with open(path) as f:
    lines = [line.split(maxsplit=1) for line in f if line.strip()]
  if not lines:
    raise ValueError(f'{path} is empty')
  if len(lines[0][1].split()) != ncols - 1:
    raise ValueError(
        f'{path}: expected {ncols} fields per line, the first '
        f'line has {1 + len(lines[0][1].split())}'
    )
  try:
    values = np.loadtxt(path, usecols=range(1, ncols), ndmin=2, comments=None)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
  return [line[0] for line in lines], values


def ijb_layout(root: str | os.PathLike, subset: str = 'IJBC') -> IJBLayout:
  """Reads the insightface IJB layout of `subset` under `root`."""
  if subset not in SUBSETS:
    raise ValueError(f'subset must be one of {SUBSETS}, got {subset!r}')
  base = pathlib.Path(root) / subset
  images_lib.require_dir(base, subset)
  meta = images_lib.require_dir(base / 'meta', subset)
  crops = images_lib.require_dir(base / 'loose_crop', subset)
  s = subset.lower()
  points_file = images_lib.require_file(
      meta / f'{s}_name_5pts_score.txt', subset
  )
  tid_mid_file = images_lib.require_file(meta / f'{s}_face_tid_mid.txt', subset)
  pair_file = images_lib.require_file(
      meta / f'{s}_template_pair_label.txt', subset
  )

  names, points = _read_table(points_file, 12)
  tid_names, tid_mid = _read_table(tid_mid_file, 3)
  if len(names) != len(tid_names):
    raise ValueError(
        f'{points_file} lists {len(names)} images but '
        f'{tid_mid_file} lists {len(tid_names)}'
    )
  if names != tid_names:
    i = next(i for i, (a, b) in enumerate(zip(names, tid_names)) if a != b)
    raise ValueError(
        f'line {i + 1}: {points_file} has {names[i]} where '
        f'{tid_mid_file} has {tid_names[i]}'
    )
  try:
    pairs = np.loadtxt(pair_file, dtype=np.int64, ndmin=2)
  except ValueError as e:
    raise ValueError(f'{pair_file}: {e}') from e
  if pairs.shape[1] != 3:
    raise ValueError(f'{pair_file}: expected 3 columns, got {pairs.shape[1]}')
  return IJBLayout(
      image_paths=[crops / n for n in names],
      landmarks=points[:, :10].reshape(-1, 5, 2).astype(np.float32),
      faceness=points[:, 10].astype(np.float32),
      templates=tid_mid[:, 0].astype(np.int64),
      medias=tid_mid[:, 1].astype(np.int64),
      pairs=pairs[:, :2],
      labels=pairs[:, 2],
  )


def _group_sums(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """Row sums of `values` per group id 0..G-1 (every id present), float64."""
  order = np.argsort(groups, kind='stable')
  starts = np.r_[0, np.nonzero(np.diff(groups[order]))[0] + 1]
  return np.add.reduceat(values[order], starts, axis=0, dtype=np.float64)


def template_features(
    image_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Media-average then template-sum, L2-normalised.

  A media id is pooled within its template only (the same video may appear
  in several templates), as insightface does.

  Returns:
    (sorted unique template ids (T,), unit template features (T, D) float64).
  """
  keys = np.stack([np.asarray(templates), np.asarray(medias)], axis=1)
  media_keys, media_of_image = np.unique(keys, axis=0, return_inverse=True)
  media_of_image = media_of_image.reshape(-1)
  media_mean = (
      _group_sums(np.asarray(image_feats), media_of_image)
      / np.bincount(media_of_image)[:, None]
  )
  unique_templates, template_of_media = np.unique(
      media_keys[:, 0], return_inverse=True
  )
  template_sum = _group_sums(media_mean, template_of_media.reshape(-1))
  norm = np.linalg.norm(template_sum, axis=1, keepdims=True)
  return unique_templates, template_sum / np.maximum(norm, 1e-12)


def pair_scores(
    unique_templates: np.ndarray,
    template_feats: np.ndarray,
    pairs: np.ndarray,
    block_size: int = 1024,
) -> np.ndarray:
  """Cosine score of each template pair (P,), float64.

  Pairs are grouped by their first template and scored a block of first
  templates at a time with one matrix product against the second templates
  they meet: millions of pairs over a few thousand templates cost a few
  BLAS calls instead of gathering two feature rows per pair.
  """
  pairs = np.asarray(pairs)
  index = np.searchsorted(unique_templates, pairs)
  index = np.minimum(index, len(unique_templates) - 1)
  missing = unique_templates[index] != pairs
  if missing.any():
    raise ValueError(
        f'pairs refer to template ids without images, e.g. '
        f'{pairs[missing][0]}'
    )
  feats = np.asarray(template_feats, np.float64)
  first, second = index[:, 0], index[:, 1]
  order = np.argsort(first, kind='stable')
  bounds = np.searchsorted(
      first[order], np.arange(0, len(feats) + block_size, block_size)
  )
  scores = np.empty(len(pairs), np.float64)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    if lo == hi:
      continue
    sel = order[lo:hi]
    rows, row_of = np.unique(first[sel], return_inverse=True)
    cols, col_of = np.unique(second[sel], return_inverse=True)
    sim = feats[rows] @ feats[cols].T
    scores[sel] = sim[row_of.reshape(-1), col_of.reshape(-1)]
  return scores


def roc_curve(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds) with higher scores meaning "same".

  One point per distinct score (accept score >= threshold), preceded by the
  empty-acceptance point (threshold +inf), with interior collinear points
  dropped: the same points scikit-learn's roc_curve returns by default, so
  the nearest-FPR lookup below sees the points the published numbers saw.
  """
  labels = np.asarray(labels).reshape(-1) > 0
  scores = np.asarray(scores, np.float64).reshape(-1)
  order = np.argsort(-scores, kind='stable')
  scores, labels = scores[order], labels[order]
  last_of_value = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
  tps = np.cumsum(labels)[last_of_value]
  fps = last_of_value + 1 - tps
  thresholds = scores[last_of_value]
  if len(tps) > 2:
    keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
    tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
  tps, fps = np.r_[0, tps], np.r_[0, fps]
  thresholds = np.r_[np.inf, thresholds]
  if fps[-1] == 0 or tps[-1] == 0:
    raise ValueError('the ROC needs both positive and negative pairs')
  return fps / fps[-1], tps / tps[-1], thresholds


TAR_RULES = ('insightface', 'authors')


def tar_at_far(
    labels: np.ndarray,
    scores: np.ndarray,
    far_targets=FAR_TARGETS,
    rule: str = 'insightface',
) -> dict[float, float]:
  """{far: TAR} from the ROC point nearest each target.

  Several ROC points share an FPR where the TPR rises between two impostor
  scores; `rule` says which counts. "insightface" (ijb_11.py, the default)
  reads the flipped curve and takes the largest TPR among them (and, between
  two equally near FPRs, the larger). "authors" is the QGFace code's
  in-training IJB path, which reads the curve unflipped: the smallest TPR
  (and the smaller FPR). They differ only at FARs the impostors barely
  resolve; docs/FIDELITY.md gives the size.
  """
  if rule not in TAR_RULES:
    raise ValueError(f'tar rule {rule!r}; expected one of {TAR_RULES}')
  fpr, tpr, _ = roc_curve(labels, scores)
  if rule == 'insightface':
    fpr, tpr = fpr[::-1], tpr[::-1]
  out = {}
  for far in far_targets:
    out[far] = float(tpr[int(np.argmin(np.abs(fpr - far)))])
  return out


def far_key(far: float) -> str:
  return f'tar@far={far:.0e}'


def ijb_metrics(
    image_feats: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    pairs: np.ndarray,
    labels: np.ndarray,
    far_targets=FAR_TARGETS,
    tar_rule: str = 'insightface',
) -> dict:
  """TAR at each FAR ('tar@far=1e-04': ...) from per-image features."""
  unique_templates, feats = template_features(image_feats, templates, medias)
  scores = pair_scores(unique_templates, feats, pairs)
  same = np.asarray(labels).reshape(-1) > 0
  metrics = {
      far_key(f): v
      for f, v in tar_at_far(labels, scores, far_targets, tar_rule).items()
  }
  metrics.update(
      num_templates=int(len(unique_templates)),
      num_pairs=int(len(pairs)),
      impostor_pairs=int(np.sum(~same)),
      thresholds=thresholds_lib.from_labels(labels, scores),
      roc=thresholds_lib.roc_points(scores[same], scores[~same]),
  )
  return metrics


# 1:N identification: the release's two gallery sets and its mixed probes,
# by template and subject id, under two definitions that give different
# numbers, each named in the results.
_GALLERIES = {'IJBB': ('S1', 'S2'), 'IJBC': ('G1', 'G2')}
TPIR_FPIRS = (0.01, 0.1)
IDENTIFICATION_CONVENTIONS = {
    '1n_insightface_': "insightface ijb_1n.py (the authors' standalone "
    'script): both gallery sets as one, every probe '
    "mated; the FPIR threshold from all probes' non-mate "
    'scores; TPIR counts a mate above it at any rank',
    '1n_nist_': 'NIST (IJB-C, Maze et al. 2018): each gallery set on its '
    'own, probes whose subject it lacks are non-mated '
    'searches; a false alarm is a non-mated search whose best '
    'score reaches the threshold; TPIR counts a mate at rank 1 '
    '(ties against the probe) reaching it; the mean over the '
    'two sets beside each',
}


def _subject_list(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(template ids, subject ids) of a 1:N list (CSV with a header row)."""
  try:
    table = np.loadtxt(path, dtype=str, skiprows=1, delimiter=',', ndmin=2)
    return table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
  except (ValueError, IndexError) as e:
    raise ValueError(
        f'{path}: not a list of "template,subject" rows ({e})'
    ) from e


def identification_files(root, subset: str) -> list[pathlib.Path] | None:
  """The gallery and probe lists of `subset`, or None when any is absent."""
  meta, s = pathlib.Path(root) / subset / 'meta', subset.lower()
  files = [meta / f'{s}_1N_gallery_{g}.csv' for g in _GALLERIES[subset]]
  files.append(meta / f'{s}_1N_probe_mixed.csv')
  return files if all(f.is_file() for f in files) else None


def _chosen(unique_templates, feats, templates, subjects):
  """Features and subject of each distinct template of a list."""
  chosen, first = np.unique(templates, return_index=True)
  rows = np.searchsorted(unique_templates, chosen)
  if np.any(rows >= len(unique_templates)) or np.any(
      unique_templates[np.minimum(rows, len(unique_templates) - 1)] != chosen
  ):
    raise ValueError('a 1:N list names templates without images')
  return feats[rows], subjects[first]


# Probes scored against a gallery at a time: a block's similarities and
# masks take a few hundred MB at IJB-C's gallery of 3,531 templates, where
# all 19,593 mixed probes at once took several GB.
PROBE_BLOCK = 2048


def _probe_blocks(num_probes: int):
  for start in range(0, num_probes, PROBE_BLOCK):
    yield slice(start, min(num_probes, start + PROBE_BLOCK))


def insightface_identification(gallery, gallery_ids, probes, probe_ids) -> dict:
  """Rank-1/5/10 and TPIR at FPIR 0.01 and 0.1 as insightface's
  ijb_1n.py computes them: each probe's subject has one gallery template
  (its mate); rank-k is the mate among the k highest similarities (a tie
  broken by gallery order, as their stable sort does); the threshold at
  FPIR f is the ceil(f P)-th largest non-mate similarity over all P
  probes, and TPIR the share of probes whose mate scores above it.
  Probes are scored in blocks, keeping only the largest non-mate
  similarities that the thresholds read."""
  mate = [np.flatnonzero(gallery_ids == i) for i in probe_ids]
  if any(len(m) != 1 for m in mate):
    raise ValueError('each probe subject needs exactly one gallery template')
  mate = np.array([m[0] for m in mate], dtype=np.int64)
  needed = max(math.ceil(len(mate) * f) for f in TPIR_FPIRS)
  order = np.arange(len(gallery))[None, :]
  positions, mate_scores = [], []
  largest = np.empty(0, np.result_type(probes, gallery))
  for rows in _probe_blocks(len(mate)):
    similarity = probes[rows] @ gallery.T
    own = np.arange(similarity.shape[0]), mate[rows]
    score = similarity[own][:, None]
    positions.append(
        np.sum(similarity > score, axis=1)
        + np.sum((similarity == score) & (order < own[1][:, None]), axis=1)
    )
    mate_scores.append(score[:, 0])
    similarity[own] = -np.inf  # the non-mates remain
    pool = np.concatenate([largest, similarity.reshape(-1)])
    largest = np.partition(pool, len(pool) - min(needed, len(pool)))[
        len(pool) - min(needed, len(pool)) :
    ]
  position, mate_scores = np.concatenate(positions), np.concatenate(mate_scores)
  prefix = '1n_insightface_'
  out = {f'{prefix}rank{k}': float(np.mean(position < k)) for k in (1, 5, 10)}
  others = np.sort(largest)[::-1]
  for fpir in TPIR_FPIRS:
    threshold = others[math.ceil(len(mate) * fpir) - 1]
    out[f'{prefix}tpir@fpir={fpir:.0e}'] = float(
        np.mean(mate_scores > threshold)
    )
  out[f'{prefix}probes'] = int(len(mate))
  return out


def _nist_searches(gallery, gallery_ids, probes, probe_ids):
  """Per probe against one gallery set, scored in blocks: whether it is a
  mated search, its mate's score (-inf if none), its rank (1 + the other
  templates scoring at least the mate's) and its best score."""
  parts = []
  for rows in _probe_blocks(len(probes)):
    similarity = probes[rows] @ gallery.T
    mate = probe_ids[rows, None] == gallery_ids[None, :]
    mate_score = np.where(mate, similarity, -np.inf).max(axis=1)
    rank = 1 + np.sum(~mate & (similarity >= mate_score[:, None]), axis=1)
    parts.append((mate.any(axis=1), mate_score, rank, similarity.max(axis=1)))
  return [np.concatenate(column) for column in zip(*parts)]


def nist_identification(galleries, probes, probe_ids) -> dict:
  """The NIST definition (see IDENTIFICATION_CONVENTIONS) for each of
  `galleries` [(name, features, subject ids)], and the mean over them.

  Per gallery set: a probe whose subject the set holds is a mated search
  and its rank is 1 + the number of other templates scoring at least its
  mate's; the others are non-mated searches. The threshold at FPIR f lets
  at most floor(f N) of the N non-mated searches' best scores reach it
  (`thresholds.cut_at`); a rate the searches do not resolve (f N < 1) is
  left out, and so is the mean where a set leaves it out.
  """
  out, prefix = {}, '1n_nist_'
  by_rate = {}
  for name, gallery, gallery_ids in galleries:
    mated, mate_score, rank, best = _nist_searches(
        gallery, gallery_ids, probes, probe_ids
    )
    best = np.sort(best[~mated])[::-1]
    key = f'{prefix}{name}_'
    out[f'{key}mated_searches'] = int(mated.sum())
    out[f'{key}non_mated_searches'] = int(len(best))
    for k in (1, 5, 10):
      if mated.any():
        out[f'{key}rank{k}'] = float(np.mean(rank[mated] <= k))
    for fpir in TPIR_FPIRS:
      if len(best) * fpir < 1 or not mated.any():
        continue
      cosine = thresholds_lib.cut_at(best, math.floor(fpir * len(best)))
      tpir = float(np.mean((rank[mated] == 1) & (mate_score[mated] >= cosine)))
      out[f'{key}tpir@fpir={fpir:.0e}'] = tpir
      out[f'{key}fpir_measured@fpir={fpir:.0e}'] = float(
          np.mean(best >= cosine)
      )
      by_rate.setdefault(fpir, []).append(tpir)
  for fpir, values in by_rate.items():
    if len(values) == len(galleries):
      out[f'{prefix}tpir@fpir={fpir:.0e}'] = float(np.mean(values))
  return out


def identification_metrics(image_feats, templates, medias, files) -> dict:
  """1:N of the release's lists (`identification_files`) under both
  definitions, with the conventions they follow."""
  unique_templates, feats = template_features(image_feats, templates, medias)
  lists = [_subject_list(f) for f in files]
  galleries = [
      (
          pathlib.Path(f).stem.rsplit('_', 1)[-1],
          *_chosen(unique_templates, feats, *l),
      )
      for f, l in zip(files[:-1], lists[:-1])
  ]
  probes, probe_ids = _chosen(unique_templates, feats, *lists[-1])
  out = insightface_identification(
      np.concatenate([g for _, g, _ in galleries]),
      np.concatenate([i for _, _, i in galleries]),
      probes,
      probe_ids,
  )
  out.update(nist_identification(galleries, probes, probe_ids))
  out.update(
      num_probes=int(len(probes)),
      num_gallery=int(sum(len(g) for _, g, _ in galleries)),
      identification_conventions=IDENTIFICATION_CONVENTIONS,
  )
  return out


def evaluate_ijb(
    embed_fn: extract.EmbedFn,
    root: str | os.PathLike,
    *,
    batch_size: int,
    subset: str = 'IJBC',
    flip: bool = True,
    fusion: str | None = extract.DEFAULT_FUSION,
    use_norm_score: bool = True,
    use_detector_score: bool = False,
    far_targets=FAR_TARGETS,
    image_size: int = 112,
    num_threads: int = 8,
    progress: bool = True,
    tar_rule: str = 'insightface',
) -> dict:
  """Aligns, embeds and scores IJB-B or IJB-C 1:1 (see module doc)."""
  layout = ijb_layout(root, subset)

  def load(i):
    return align_face(
        images_lib.imread_bgr(layout.image_paths[i]),
        layout.landmarks[i],
        image_size,
    )

  feats, norms = extract.extract_embeddings(
      embed_fn,
      images_lib.LazyImages(load, len(layout.image_paths), num_threads),
      batch_size=batch_size,
      flip=flip,
      fusion=fusion,
      progress=progress,
      return_norms=True,
      desc=subset,
  )
  if use_norm_score:
    feats = feats * norms[:, None]
  if use_detector_score:
    feats = feats * layout.faceness[:, None]
  metrics = ijb_metrics(
      feats,
      layout.templates,
      layout.medias,
      layout.pairs,
      layout.labels,
      far_targets,
      tar_rule,
  )
  files = identification_files(root, subset)
  if files:  # 1:N, where the release's lists are present
    metrics.update(
        identification_metrics(feats, layout.templates, layout.medias, files)
    )
  metrics.update(
      pooling='norm-weighted' if use_norm_score else 'unit',
      detector_score_weighting=bool(use_detector_score),
      tar_rule=tar_rule,
  )
  return metrics
