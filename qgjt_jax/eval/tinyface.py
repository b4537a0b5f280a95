"""TinyFace 1:N identification: rank-1/5/20 with the distractor gallery.

Public layout (qmul-tinyface.github.io evaluation split), under `root`
(either directly or in a `tinyface/` subfolder, as the zip extracts):

  Testing_Set/Probe/<id>_<n>.jpg
  Testing_Set/Gallery_Match/<id>_<n>.jpg
  Testing_Set/Gallery_Distractor/<n>.jpg      (~153k faces of no probe id)

Protocol, as the reference's tinyface_helper: probes are every image of
Probe/, the gallery is Gallery_Match/ plus Gallery_Distractor/; identity is
the file name's prefix before the first "_"; distractors get the label -100
so they never match; closed-set rank-k with inner-product scores.

The raw images are tiny and unaligned. The reference embeds aligned 112x112
copies (`aligned_dir`, e.g. "aligned_pad_0.1_pad_high" under the data root,
with the same three sub-folders and file stems); the protocol (which images,
which labels) always comes from Testing_Set. Images of another size are
resized to image_size (area to shrink, bilinear to enlarge).
"""

import dataclasses
import os
import pathlib

import numpy as np

from qgjt_jax.eval import extract
from qgjt_jax.eval import identification
from qgjt_jax.files import images as images_lib

SPLITS = ('Probe', 'Gallery_Match', 'Gallery_Distractor')
DISTRACTOR_LABEL = -100


@dataclasses.dataclass(frozen=True)
class TinyFaceLayout:
  """Image paths of each split (to embed) and the protocol labels."""

  probe_paths: list[pathlib.Path]
  match_paths: list[pathlib.Path]
  distractor_paths: list[pathlib.Path]
  probe_labels: np.ndarray
  match_labels: np.ndarray

  @property
  def gallery_labels(self) -> np.ndarray:
    return np.concatenate(
        [
            self.match_labels,
            np.full(
                len(self.distractor_paths),
                DISTRACTOR_LABEL,
                self.match_labels.dtype,
            ),
        ]
    )


def identity_of(path: pathlib.Path) -> int:
  """The identity of a TinyFace file: its name's prefix before "_"."""
  prefix = path.name.split('_')[0]
  try:
    return int(prefix)
  except ValueError:
    raise ValueError(
        f'{path}: a TinyFace probe/match file name starts with '
        'its integer identity and "_"'
    ) from None


def find_testing_set(root: str | os.PathLike) -> pathlib.Path:
  root = pathlib.Path(root)
  for candidate in (root / 'Testing_Set', root / 'tinyface' / 'Testing_Set'):
    if candidate.is_dir():
      return candidate
  raise FileNotFoundError(
      f'TinyFace: neither {root / "Testing_Set"} nor '
      f'{root / "tinyface" / "Testing_Set"} exists (expected the public '
      'evaluation split with Probe/, Gallery_Match/, Gallery_Distractor/)'
  )


def _aligned_paths(
    protocol: list[pathlib.Path], aligned: pathlib.Path
) -> list[pathlib.Path]:
  by_stem = {p.stem: p for p in images_lib.list_images(aligned)}
  out = []
  for p in protocol:
    if p.stem not in by_stem:
      raise FileNotFoundError(
          f'TinyFace: {p.name} has no aligned copy {aligned / p.stem}.* '
      )
    out.append(by_stem[p.stem])
  return out


def tinyface_layout(
    root: str | os.PathLike, aligned_dir: str | os.PathLike | None = None
) -> TinyFaceLayout:
  """Reads the protocol from `root` (see module doc).

  Args:
    root: folder holding Testing_Set/ (or tinyface/Testing_Set/).
    aligned_dir: optional folder (absolute, or relative to root) of aligned
      copies with sub-folders Probe/, Gallery_Match/, Gallery_Distractor/.
  """
  testing = find_testing_set(root)
  protocol = {}
  for split in SPLITS:
    folder = images_lib.require_dir(testing / split, 'TinyFace')
    protocol[split] = images_lib.list_images(folder)
    if not protocol[split]:
      raise FileNotFoundError(f'TinyFace: no images in {folder}')
  paths = dict(protocol)
  if aligned_dir is not None:
    aligned_root = pathlib.Path(root) / aligned_dir
    for split in SPLITS:
      folder = images_lib.require_dir(
          aligned_root / split, 'TinyFace aligned images'
      )
      paths[split] = _aligned_paths(protocol[split], folder)
  return TinyFaceLayout(
      probe_paths=paths['Probe'],
      match_paths=paths['Gallery_Match'],
      distractor_paths=paths['Gallery_Distractor'],
      probe_labels=np.array([identity_of(p) for p in protocol['Probe']]),
      match_labels=np.array(
          [identity_of(p) for p in protocol['Gallery_Match']]
      ),
  )


def tinyface_metrics(
    probe_feats: np.ndarray,
    probe_labels: np.ndarray,
    match_feats: np.ndarray,
    match_labels: np.ndarray,
    distractor_feats: np.ndarray,
    ranks=(1, 5, 20),
) -> dict:
  """Rank-k accuracies with the distractors in the gallery."""
  gallery_feats = np.concatenate([match_feats, distractor_feats])
  gallery_labels = np.concatenate(
      [
          np.asarray(match_labels),
          np.full(len(distractor_feats), DISTRACTOR_LABEL),
      ]
  )
  accuracy = identification.rank_k_accuracy(
      probe_feats, probe_labels, gallery_feats, gallery_labels, ranks
  )
  metrics = {f'rank{k}': v for k, v in accuracy.items()}
  metrics.update(
      num_probes=int(len(probe_feats)),
      num_gallery_match=int(len(match_feats)),
      num_distractors=int(len(distractor_feats)),
  )
  return metrics


def evaluate_tinyface(
    embed_fn: extract.EmbedFn,
    root: str | os.PathLike,
    *,
    batch_size: int,
    aligned_dir: str | os.PathLike | None = None,
    ranks=(1, 5, 20),
    flip: bool = True,
    fusion: str | None = extract.DEFAULT_FUSION,
    image_size: int = 112,
    num_threads: int = 8,
    progress: bool = True,
) -> dict:
  """Embeds the TinyFace test split and returns rank-k accuracies."""
  layout = tinyface_layout(root, aligned_dir)
  paths = layout.probe_paths + layout.match_paths + layout.distractor_paths
  feats = extract.extract_embeddings(
      embed_fn,
      images_lib.image_files(paths, image_size, num_threads=num_threads),
      batch_size=batch_size,
      flip=flip,
      fusion=fusion,
      progress=progress,
      desc='tinyface',
  )
  n_probe, n_match = len(layout.probe_paths), len(layout.match_paths)
  return tinyface_metrics(
      feats[:n_probe],
      layout.probe_labels,
      feats[n_probe : n_probe + n_match],
      layout.match_labels,
      feats[n_probe + n_match :],
      ranks,
  )
