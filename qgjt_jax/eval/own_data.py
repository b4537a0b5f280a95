"""Evaluation on your own faces: image folders and pairs files.

`config.eval.folders` and `calibration_folders`: folders of one sub-folder
per person (aligned crops, or photos with `config.eval.align="detect"`).
Each is scored three ways:

* verification: every genuine pair (two images of one person; at most
  `max_pairs`, a seeded sample beyond) and a seeded sample of impostor
  pairs (up to `max_pairs`, so FARs down to 1e-6 are resolved on big
  folders): TAR at each FAR the impostors resolve (insightface's nearest-
  point rule, as for IJB), the cosine thresholds, k-fold accuracy with
  folds of disjoint people (`person_folds`), and the error-versus-reject
  curve of the norm;
* open-set identification (`identification.open_set_calibration`): each
  person left out of a gallery of the others' templates in turn, the
  thresholds at each false-positive identification rate;
* closed-set identification, leave one out: each image of a person with
  two or more images is a probe against every other image; its rank is 1
  + the number of other people's images scoring at least its best mate
  (a tie counts against the probe). rank1/rank5 are shares of probes,
  rank1_per_person/rank5_per_person the mean over people of each
  person's share, so a person with many photos does not outweigh the
  others;
* files whose bytes are identical under two names are reported
  (`duplicate_files`): within a person they double-count a photo, across
  people they make an impostor pair of one photo.

`config.eval.pairs_files`: text files of "PATH_A PATH_B LABEL" lines (label
1: same person, 0: different; paths relative to the file; separated by
spaces, tabs or commas; `#` starts a comment), scored as a `.bin` set is,
after a seeded shuffle of the pairs: 10-fold accuracy, TAR at FAR,
thresholds, reject curve.
"""

from __future__ import annotations

import array
import dataclasses
import io
import os
import pathlib
import re
import stat

import numpy as np

from qgjt_jax import errors
from qgjt_jax import reporting
from qgjt_jax.eval import extract
from qgjt_jax.eval import identification
from qgjt_jax.eval import ijb
from qgjt_jax.eval import reject
from qgjt_jax.eval import thresholds
from qgjt_jax.eval import verification
from qgjt_jax.files import folders
from qgjt_jax.files import images as images_lib
from qgjt_jax.files import regular

MAX_PAIRS = 1_000_000
MAX_PAIRS_FILE_BYTES = 32 << 20  # a million pairs of 30-character lines
_SEED = 0


class OwnDataError(errors.UserError, ValueError):
  """A folder or pairs file that cannot be evaluated (names it)."""


def sample_pairs(
    labels: np.ndarray, max_pairs: int = MAX_PAIRS, seed: int = _SEED
) -> tuple[np.ndarray, np.ndarray]:
  """(genuine (G, 2), impostor (I, 2)) index pairs i < j: every genuine
  pair (a seeded sample beyond max_pairs), and every impostor pair or, when
  there are more than max_pairs, a seeded sample of max_pairs distinct
  ones. Memory stays in the pairs kept, whatever the folder's size."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  n = len(labels)
  genuine = [np.zeros((0, 2), np.int64)]
  for person in np.unique(labels):
    idx = np.flatnonzero(labels == person)
    a, b = np.triu_indices(len(idx), k=1)
    genuine.append(np.stack([idx[a], idx[b]], 1))
  genuine = np.concatenate(genuine)
  if len(genuine) > max_pairs:
    genuine = genuine[np.sort(rng.choice(len(genuine), max_pairs, False))]
  impostor_count = n * (n - 1) // 2 - int(
      sum(k * (k - 1) // 2 for k in np.bincount(labels))
  )
  if impostor_count <= max_pairs:
    first, second = np.triu_indices(n, k=1)
    differ = labels[first] != labels[second]
    return genuine, np.stack([first[differ], second[differ]], 1)
  found = np.zeros((0, 2), np.int64)
  while len(found) < max_pairs:
    draw = np.sort(rng.integers(0, n, (2 * max_pairs, 2)), axis=1)
    draw = draw[labels[draw[:, 0]] != labels[draw[:, 1]]]
    found = np.unique(np.concatenate([found, draw]), axis=0)
  return genuine, found[np.sort(rng.choice(len(found), max_pairs, False))]


def leave_one_out_ranks(
    feats: np.ndarray, labels: np.ndarray, chunk_size: int = 256
) -> np.ndarray:
  """1-based rank of each image's best mate among all other images: 1 +
  the other people's images scoring at least as high (ties count against
  the probe); 0: no other image of its person."""
  feats = np.asarray(feats, np.float32)
  ranks = np.zeros(len(feats), np.int64)
  for start in range(0, len(feats), chunk_size):
    rows = np.arange(start, min(start + chunk_size, len(feats)))
    scores = feats[rows] @ feats.T
    scores[np.arange(len(rows)), rows] = -np.inf  # not itself
    mate = labels[rows, None] == labels[None, :]
    mate[np.arange(len(rows)), rows] = False
    best = np.where(mate, scores, -np.inf).max(axis=1)
    higher = (~mate & (scores >= best[:, None])).sum(axis=1)
    ranks[rows] = np.where(mate.any(axis=1), higher + 1, 0)
  return ranks


def _pair_metrics(
    feats, norms, pairs, issame, tar_rule: str, labels=None, first=None
) -> dict:
  """TAR at FAR, thresholds and the reject curve of scored pairs (with
  `labels`, each image's person, thresholds also state their spread over
  people; with `first`, the (feats, norms) the first image of each pair is
  scored by, its low-resolution copy)."""
  first_feats, first_norms = first or (feats, norms)
  scores = np.sum(first_feats[pairs[:, 0]] * feats[pairs[:, 1]], axis=1)
  out = {}
  fars = [f for f in ijb.FAR_TARGETS if (~issame).sum() * f >= 1]
  if fars and issame.any():
    out.update(
        {
            ijb.far_key(f): v
            for f, v in ijb.tar_at_far(issame, scores, fars, tar_rule).items()
        }
    )
  out["thresholds"] = thresholds.from_labels(
      issame,
      scores,
      None if labels is None else (labels[pairs[:, 0]], labels[pairs[:, 1]]),
  )
  out["impostor_pairs"] = int(np.sum(~issame))
  out["roc"] = thresholds.roc_points(scores[issame], scores[~issame])
  out.update(
      reject.reject_metrics(
          scores,
          issame,
          np.minimum(first_norms[pairs[:, 0]], norms[pairs[:, 1]]),
      )
  )
  return out


def person_folds(
    genuine: np.ndarray,
    impostor: np.ndarray,
    labels: np.ndarray,
    nfolds: int,
    seed: int = _SEED,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """(pairs, issame, fold sizes) for k-fold accuracy with no person in two
  folds: people are dealt to `nfolds` folds (seeded); a genuine pair goes
  to its person's fold, an impostor pair to the fold of both its people
  (pairs across folds are left out); each fold keeps as many impostors as
  genuine pairs (seeded), shuffled. So a threshold is never chosen on the
  people it is tested on."""
  rng = np.random.default_rng(seed)
  fold_of = rng.permutation(int(labels.max()) + 1) % nfolds
  same_fold = fold_of[labels[impostor[:, 0]]] == fold_of[labels[impostor[:, 1]]]
  impostor = impostor[same_fold]
  g_fold = fold_of[labels[genuine[:, 0]]]
  i_fold = fold_of[labels[impostor[:, 0]]]
  pairs, same, sizes = [], [], []
  for f in range(nfolds):
    g, i = genuine[g_fold == f], impostor[i_fold == f]
    count = min(len(g), len(i))
    if not count:
      continue
    chosen = np.concatenate(
        [g[rng.permutation(len(g))[:count]], i[rng.permutation(len(i))[:count]]]
    )
    order = rng.permutation(2 * count)
    pairs.append(chosen[order])
    same.append(np.r_[np.ones(count, bool), np.zeros(count, bool)][order])
    sizes.append(2 * count)
  if not sizes:
    return np.zeros((0, 2), np.int64), np.zeros(0, bool), []
  return np.concatenate(pairs), np.concatenate(same), sizes


def folder_metrics(
    feats: np.ndarray,
    norms: np.ndarray,
    labels: np.ndarray,
    *,
    max_pairs: int = MAX_PAIRS,
    nfolds: int = 10,
    tar_rule: str = "insightface",
    first=None,
) -> dict:
  """Verification, open-set and leave-one-out identification (see
  module). With `first` (the (feats, norms) of every image shrunk to a low
  resolution), verification only, each pair's first image low-resolution
  and its second clean."""
  genuine, impostor = sample_pairs(labels, max_pairs)
  pairs = np.concatenate([genuine, impostor])
  issame = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
  out = _pair_metrics(feats, norms, pairs, issame, tar_rule, labels, first)
  # k-fold accuracy with folds of disjoint people (two people a fold at
  # least, so each fold has impostors).
  folds = min(nfolds, (int(labels.max()) + 1) // 2)
  balanced, same, sizes = person_folds(genuine, impostor, labels, folds)
  if len(sizes) >= 2:
    first_feats = feats if first is None else first[0]
    pair_rows = np.stack(
        [first_feats[balanced[:, 0]], feats[balanced[:, 1]]], axis=1
    )
    fold = verification.verification_metrics(
        pair_rows.reshape(-1, feats.shape[1]), same, fold_sizes=sizes
    )
    out.update(
        accuracy_mean=fold["accuracy_mean"],
        accuracy_std=fold["accuracy_std"],
        accuracy_folds=len(sizes),
    )
  out.update(
      num_images=int(len(labels)),
      num_people=int(labels.max() + 1),
      genuine_pairs=int(len(genuine)),
      impostor_pairs=int(len(impostor)),
  )
  if first is not None:
    out.update(
        mean_norm=float(np.mean(first[1])),
        mean_norm_clean=float(np.mean(norms)),
    )
    return out
  out["open_set"] = identification.open_set_calibration(feats, labels)
  out["searches"] = identification.Searches(
      np.asarray(feats, np.float32), np.asarray(labels, np.int32)
  )
  ranks = leave_one_out_ranks(feats, labels)
  probes = ranks > 0
  if probes.any():
    images_of = np.bincount(labels)
    probing = images_of > 1  # every image of such a person is a probe
    for k in (1, 5):
      hit = (ranks <= k) & probes
      out[f"rank{k}"] = float(np.mean(hit[probes]))
      out[f"rank{k}_per_person"] = float(
          np.mean(
              np.bincount(labels, hit, len(images_of))[probing]
              / images_of[probing]
          )
      )
    out["probe_people"] = int(probing.sum())
  out["mean_norm"] = float(np.mean(norms))
  return out


@dataclasses.dataclass(frozen=True)
class PairsFile:
  """A pairs file: each image once, and the pairs as indices into them."""

  folder: str  # what the file's relative paths are relative to
  names: list[str]  # the image paths as written, each once
  pairs: np.ndarray  # (P, 2) int32 indices into `names`
  issame: np.ndarray  # (P,) bool

  def image(self, i: int) -> str:
    return os.path.join(self.folder, self.names[i])


def read_pairs_file(path: str | os.PathLike) -> PairsFile:
  """The pairs of a pairs file, every line checked and a bad one named.

  Memory stays within a small multiple of the file (measured: 16 times
  for a file of short paths, each unique; far less when images recur):
  the text is read line by line,
  each image path is kept once as written (a path in many pairs costs one
  string) and the pairs as two int32 indices.

  Raises:
    OwnDataError: naming the file, and the line of a bad one.
  """
  path = pathlib.Path(path)
  try:
    text = regular.read_text(
        path, MAX_PAIRS_FILE_BYTES, "a pairs file", OwnDataError
    )
  except FileNotFoundError:
    raise OwnDataError(
        f"config.eval.pairs_files: {path} does not exist"
    ) from None
  index: dict[str, int] = {}
  firsts, seconds, same = (array.array("i") for _ in range(3))
  for number, line in enumerate(io.StringIO(text), start=1):
    fields = [f for f in _SEPARATORS.split(line.split("#")[0].strip()) if f]
    if not fields:
      continue
    if len(fields) != 3 or fields[2] not in ("0", "1"):
      raise OwnDataError(
          f"{path}:{number}: expected 'PATH_A PATH_B LABEL' "
          f"with LABEL 1 (same) or 0, got {line.strip()[:200]!r}"
      )
    for field in fields[:2]:
      if not field.isprintable():
        raise OwnDataError(
            f"{path}:{number}: the path {field[:100]!r} holds "
            "control characters"
        )
    a, b = (index.setdefault(f, len(index)) for f in fields[:2])
    firsts.append(a)
    seconds.append(b)
    same.append(fields[2] == "1")
  del text
  issame = np.frombuffer(same, np.int32).astype(bool)
  if not issame.any() or issame.all():
    raise OwnDataError(
        f"{path}: needs both same (1) and different (0) "
        f"pairs; it has {int(issame.sum())} same of "
        f"{len(issame)}"
    )
  pairs = np.stack(
      [np.frombuffer(firsts, np.int32), np.frombuffer(seconds, np.int32)], 1
  )
  return PairsFile(str(path.parent), list(index), pairs, issame)


_SEPARATORS = re.compile(r"[\s,]+")


def check_images_exist(paths, where: str) -> None:
  """Each image is there, a regular file and not empty, so a folder or pairs
  file that cannot be evaluated stops a run at its start, not after its
  training.

  Raises:
    OwnDataError: naming `where` and the first image that is not.
  """
  for image in paths:
    try:
      info = os.stat(image)
    except (OSError, ValueError) as e:
      raise OwnDataError(f"{where}: {image}: {errors.one_line(e)}") from None
    if not stat.S_ISREG(info.st_mode) or not info.st_size:
      what = "empty" if stat.S_ISREG(info.st_mode) else "not a regular file"
      raise OwnDataError(f"{where}: {image} is {what}, not an image")


def check_folder(folder: str, what: str) -> None:
  """What evaluating a folder of people needs, checked before a run."""
  people = folders.read(folder, what, min_people=2)
  check_images_exist(people.paths, f"{what}={folder}")


def check_pairs_file(path: str) -> None:
  """What evaluating a pairs file needs, checked before a run."""
  found = read_pairs_file(path)
  check_images_exist(map(found.image, range(len(found.names))), str(path))


def evaluate_folder(
    embed_fn: extract.EmbedFn,
    folder: str,
    *,
    batch_size: int,
    image_size: int,
    load=None,
    fusion=extract.DEFAULT_FUSION,
    progress: bool = True,
    tar_rule: str = "insightface",
    low_res=(),
) -> dict[str, dict]:
  """Embeds a folder of people and scores it (`folder_metrics`): {"": the
  clean faces' metrics, "@Npx": verification with the first image of each
  pair shrunk to N px and enlarged back, for each N of `low_res`}. `load`
  turns a path into a crop (default: the image resized)."""
  people = folders.read(folder, "config.eval.folders", min_people=2)
  paths, labels = people.paths, people.labels
  load = load or (lambda p: images_lib.read_image(p, image_size))
  name = os.path.basename(os.path.normpath(folder))
  crops = images_lib.LazyImages(lambda i: load(paths[i]), len(paths))
  embed = lambda faces, desc: extract.extract_embeddings(
      embed_fn,
      faces,
      batch_size=batch_size,
      fusion=fusion,
      progress=progress,
      return_norms=True,
      desc=desc,
  )
  feats, norms = embed(crops, name)
  out = {"": folder_metrics(feats, norms, labels, tar_rule=tar_rule)}
  out[""]["duplicate_files"] = duplicate_report(people)
  for size in low_res:
    shrunk = images_lib.LazyImages(
        lambda i, size=size: verification.shrink(crops.load(i), size),
        len(paths),
    )
    out[f"@{size}px"] = folder_metrics(
        feats,
        norms,
        labels,
        tar_rule=tar_rule,
        first=embed(shrunk, f"{name}@{size}px"),
    )
    out[f"@{size}px"]["low_res"] = size
  return out


def duplicate_report(people: folders.People, listed: int = 20) -> dict:
  """Byte-identical files of a folder of people: how many groups within
  one person and across people, and the first `listed` groups' paths."""
  groups = folders.identical_files(people.paths)
  across = [g for g in groups if len(set(people.labels[g])) > 1]
  if groups:
    reporting.note(
        f"{people.root}: {len(groups)} group(s) of identical "
        f"files under different names ({len(across)} across "
        "people), e.g. " + ", ".join(str(people.paths[i]) for i in groups[0])
    )
  return {
      "groups": len(groups),
      "across_people": len(across),
      "examples": [[str(people.paths[i]) for i in g] for g in groups[:listed]],
  }


def evaluate_pairs_file(
    embed_fn: extract.EmbedFn,
    path: str,
    *,
    batch_size: int,
    image_size: int,
    load=None,
    fusion=extract.DEFAULT_FUSION,
    progress: bool = True,
    tar_rule: str = "insightface",
) -> dict:
  """Scores a pairs file as a `.bin` set, plus TAR at FAR."""
  found = read_pairs_file(path)
  pairs, issame = found.pairs, found.issame
  load = load or (lambda p: images_lib.read_image(p, image_size))
  feats, norms = extract.extract_embeddings(
      embed_fn,
      images_lib.LazyImages(lambda i: load(found.image(i)), len(found.names)),
      batch_size=batch_size,
      fusion=fusion,
      progress=progress,
      return_norms=True,
      desc=os.path.basename(path),
  )
  out = _pair_metrics(feats, norms, pairs, issame, tar_rule)
  if len(issame) >= 10:
    # Shuffled (seeded) before folding: a file listing its genuine pairs
    # first would otherwise give folds of one kind.
    order = np.random.default_rng(_SEED).permutation(len(issame))
    fold = verification.verification_metrics(
        feats[pairs[order]].reshape(2 * len(order), -1), issame[order]
    )
    out.update(
        accuracy_mean=fold["accuracy_mean"],
        accuracy_std=fold["accuracy_std"],
        best_threshold_cosine=fold["best_threshold_cosine"],
    )
  out.update(
      num_pairs=int(len(issame)),
      num_images=len(found.names),
      mean_norm=float(np.mean(norms)),
  )
  return out
