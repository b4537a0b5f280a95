"""SCface identification: frontal mugshot gallery vs surveillance probes.

File names follow the public SCface release: probes `<id>_cam<c>_<d>.jpg`
(surveillance camera c = 1..8 at distance d = 1 (4.20 m), 2 (2.60 m),
3 (1.00 m)), gallery `<id>_frontal.jpg` (mugshots). Surveillance frames must
be face-aligned first; like the reference (scface_helper), the evaluator reads
aligned crops from one folder:

  <root>/all.txt            optional: one image per line, the first
                            tab-separated field is its name without ".jpg"
  <root>/<aligned_dir>/<name>.jpg

Without all.txt every image below <root>/<aligned_dir> is used (file stems
must then be unique). Protocol: cameras 6-8 (the infrared ones) are left out;
for each distance, rank-1 of that distance's probes against all frontal
mugshots (inner product, closed set). Other files (rotated mugshots...) are
ignored.
"""

import dataclasses
import os
import pathlib
import re

import numpy as np

from qgjt_jax.eval import extract
from qgjt_jax.eval import identification
from qgjt_jax.files import images as images_lib

EXCLUDED_CAMERAS = (6, 7, 8)
DISTANCES = (1, 2, 3)
_PROBE = re.compile(r'^(\d+)_cam(\d+)_(\d+)$', re.IGNORECASE)
_GALLERY = re.compile(r'^(\d+)_frontal', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SCfaceLayout:
  gallery_paths: list[pathlib.Path]
  gallery_labels: np.ndarray
  probe_paths: dict[int, list[pathlib.Path]]  # distance -> paths
  probe_labels: dict[int, np.ndarray]


def _image_paths(
    root: pathlib.Path, aligned: pathlib.Path
) -> list[pathlib.Path]:
  listing = root / 'all.txt'
  if listing.is_file():
    paths = []
    for line in listing.read_text().splitlines():
      name = line.split('\t')[0].strip()
      if name:
        path = aligned / f'{name}.jpg'
        if not path.is_file():
          raise FileNotFoundError(
              f'SCface: {listing} lists {name}, but {path} does not exist'
          )
        paths.append(path)
    return paths
  images_lib.require_dir(aligned, f'SCface (and no {listing})')
  paths = images_lib.list_images(aligned)
  seen = {}
  for p in paths:
    if p.stem in seen:
      raise ValueError(
          f'SCface: {seen[p.stem]} and {p} have the same name; '
          'point aligned_dir at one copy of the images'
      )
    seen[p.stem] = p
  return paths


def scface_layout(
    root: str | os.PathLike,
    aligned_dir: str | os.PathLike = '',
    excluded_cameras=EXCLUDED_CAMERAS,
) -> SCfaceLayout:
  """Reads gallery and per-distance probes (see module doc)."""
  root = pathlib.Path(root)
  images_lib.require_dir(root, 'SCface')
  gallery, gallery_labels = [], []
  probes = {d: [] for d in DISTANCES}
  probe_labels = {d: [] for d in DISTANCES}
  for path in _image_paths(root, root / aligned_dir):
    if m := _PROBE.match(path.stem):
      identity, camera, distance = map(int, m.groups())
      if camera not in excluded_cameras and distance in probes:
        probes[distance].append(path)
        probe_labels[distance].append(identity)
    elif m := _GALLERY.match(path.stem):
      gallery.append(path)
      gallery_labels.append(int(m.group(1)))
  if not gallery:
    raise FileNotFoundError(
        f'SCface: no <id>_frontal images under {root / aligned_dir}'
    )
  if not any(probes.values()):
    raise FileNotFoundError(
        f'SCface: no <id>_cam<c>_<d> images under {root / aligned_dir}'
    )
  return SCfaceLayout(
      gallery,
      np.array(gallery_labels),
      probes,
      {d: np.array(v, np.int64) for d, v in probe_labels.items()},
  )


def scface_metrics(
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray,
    probe_feats: dict[int, np.ndarray],
    probe_labels: dict[int, np.ndarray],
) -> dict:
  """rank1_d<d> and num_probes_d<d> for every distance with probes."""
  metrics = {}
  for d in sorted(probe_feats):
    if len(probe_feats[d]) == 0:
      continue
    acc = identification.rank_k_accuracy(
        probe_feats[d], probe_labels[d], gallery_feats, gallery_labels, (1,)
    )
    metrics[f'rank1_d{d}'] = acc[1]
    metrics[f'num_probes_d{d}'] = int(len(probe_feats[d]))
  metrics['num_gallery'] = int(len(gallery_feats))
  return metrics


def evaluate_scface(
    embed_fn: extract.EmbedFn,
    root: str | os.PathLike,
    *,
    batch_size: int,
    aligned_dir: str | os.PathLike = '',
    flip: bool = True,
    fusion: str | None = extract.DEFAULT_FUSION,
    image_size: int = 112,
    num_threads: int = 8,
    progress: bool = True,
) -> dict:
  """Embeds SCface and returns rank-1 per distance."""
  layout = scface_layout(root, aligned_dir)
  paths = list(layout.gallery_paths)
  offsets = {}
  for d in DISTANCES:
    offsets[d] = (len(paths), len(paths) + len(layout.probe_paths[d]))
    paths += layout.probe_paths[d]
  feats = extract.extract_embeddings(
      embed_fn,
      images_lib.image_files(paths, image_size, num_threads=num_threads),
      batch_size=batch_size,
      flip=flip,
      fusion=fusion,
      progress=progress,
      desc='scface',
  )
  n_gallery = len(layout.gallery_paths)
  return scface_metrics(
      feats[:n_gallery],
      layout.gallery_labels,
      {d: feats[a:b] for d, (a, b) in offsets.items()},
      layout.probe_labels,
  )
