"""Closed-set identification: rank-k accuracy (CMC) of probes vs a gallery.

As in the reference's DIR_FAR with FAR = 1 (TinyFace, SCface): the score is
the inner product of (unit) embeddings; probes without any mate in the
gallery are left out; a probe succeeds at rank k when a gallery entry of its
identity is among its k highest-scoring gallery entries. Equal scores are
resolved in the probe's favour (measure-zero for real-valued embeddings).
"""
from collections.abc import Sequence

import numpy as np


def probe_ranks(probe_feats: np.ndarray, probe_labels: np.ndarray,
                gallery_feats: np.ndarray, gallery_labels: np.ndarray, *,
                chunk_size: int = 256) -> np.ndarray:
  """1-based rank of the best-scoring mate of each probe (0: no mate).

  The rank is 1 + the number of gallery entries scoring strictly higher than
  the probe's best mate. Probes are processed in chunks so a gallery of
  150k+ distractors never needs the full (P, G) score matrix.
  """
  probe_feats = np.asarray(probe_feats, np.float32)
  gallery_feats = np.asarray(gallery_feats, np.float32)
  probe_labels = np.asarray(probe_labels)
  gallery_labels = np.asarray(gallery_labels)
  if probe_feats.shape[0] != probe_labels.shape[0]:
    raise ValueError(f'{len(probe_feats)} probe features but '
                     f'{len(probe_labels)} labels')
  if gallery_feats.shape[0] != gallery_labels.shape[0]:
    raise ValueError(f'{len(gallery_feats)} gallery features but '
                     f'{len(gallery_labels)} labels')
  ranks = np.zeros(len(probe_feats), np.int64)
  for start in range(0, len(probe_feats), chunk_size):
    stop = start + chunk_size
    scores = probe_feats[start:stop] @ gallery_feats.T  # (c, G)
    mate = probe_labels[start:stop, None] == gallery_labels[None, :]
    has_mate = mate.any(axis=1)
    best_mate = np.where(mate, scores, -np.inf).max(axis=1)
    higher = (scores > best_mate[:, None]).sum(axis=1)
    ranks[start:stop] = np.where(has_mate, higher + 1, 0)
  return ranks


def rank_k_accuracy(probe_feats: np.ndarray, probe_labels: np.ndarray,
                    gallery_feats: np.ndarray, gallery_labels: np.ndarray,
                    ranks: Sequence[int] = (1, 5, 20)) -> dict[int, float]:
  """{k: fraction of mated probes identified within the top k}."""
  r = probe_ranks(probe_feats, probe_labels, gallery_feats, gallery_labels)
  mated = r[r > 0]
  if not len(mated):
    raise ValueError('no probe has a mate in the gallery')
  return {int(k): float(np.mean(mated <= k)) for k in ranks}
