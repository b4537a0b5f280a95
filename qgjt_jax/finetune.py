"""Starting a training run from a pretrained backbone (`config.init_from`).

`init_from` names a workdir (its latest checkpoint's `model` item: a run of
this project, or a model written by `python -m qgjt_jax.convert`) or a
PyTorch/`.npz` file (converted on the fly). The backbone's weights and
BatchNorm statistics replace the fresh ones; the classifier is new, for the
new run's identities: random unit columns, or with `init_classifier =
"class_means"` the normalised mean embedding of each class's training images
through the pretrained backbone, so the run starts with a meaningful
classifier instead of a loss in the forties. With `init_quality =
"measured"` the quality statistics start at the pretrained model's norms
on the training images (`measured_quality`) instead of
quality.init_mean/init_std. Only a fresh run reads `init_from`; a run
that resumes from its own checkpoints ignores it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qgjt_jax import config_checks
from qgjt_jax import parallel
from qgjt_jax import records
from qgjt_jax import reporting
from qgjt_jax.eval import extract
from qgjt_jax.files import images as images_lib
from qgjt_jax.inference import model as model_lib
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.models import layers
from qgjt_jax.models import normalize_images


def _is_workdir(path: str) -> bool:
  return "://" in path or os.path.isdir(path)


def _source_settings(init_from: str) -> dict[str, Any]:
  """{dotted key: value} of the model `init_from` holds, as far as known."""
  if _is_workdir(init_from):
    return records.recorded_model_settings(model_lib.locate(init_from)[0])
  return _converted(init_from).config_overrides()


@functools.lru_cache(maxsize=1)
def _converted(path: str):
  """The file converted once (reading it is the slow part; checked and then
  used in one start-up, so only the last file is kept)."""
  from qgjt_jax.interop import convert  # pylint: disable=g-import-not-at-top

  try:
    return convert.convert_file(path)
  except (OSError, ValueError) as e:
    raise config_checks.ConfigError(f"config.init_from={path!r}: {e}") from None


def check_source(
    config: ml_collections.ConfigDict, explicit: Iterable[str] = ()
) -> ml_collections.ConfigDict:
  """The config with the model `init_from` holds: its architecture, sizes
  and the channel order its weights expect replace the recipe's (one line
  says so); a `--config.KEY=` typed (`explicit`) that contradicts it is
  refused.

  Raises:
    ConfigError: the source is missing, unreadable or contradicted by an
      explicit key (naming it and the source's value).
  """
  path = config.init_from
  if not _is_workdir(path) and not os.path.isfile(path):
    raise config_checks.ConfigError(
        f"config.init_from={path!r} does not exist: name a workdir, its "
        "checkpoints folder, or a .pth/.ckpt/.npz/.safetensors/.onnx file."
    )
  settings = {
      k: v
      for k, v in _source_settings(path).items()
      if k in records.model_keys() + records.MODEL_INPUT_KEYS
  }
  try:
    return records.adopt_settings(
        config, settings, explicit, f"config.init_from={path}"
    )
  except records.RecordError as e:
    raise config_checks.ConfigError(str(e)) from None


def pretrained_backbone(config: ml_collections.ConfigDict, model, mesh) -> Any:
  """{'params', 'batch_stats'} of the backbone `config.init_from` holds,
  replicated on `mesh`."""
  path = config.init_from
  if _is_workdir(path):
    loaded = model_lib.load_model(path, config=config, mesh=mesh)
    reporting.note(f"Starting from the model of step {loaded.step} in {path}.")
    return loaded.variables
  abstract = model_lib.abstract_variables(
      model, config.data.image_size, parallel.replicated(mesh)
  )
  converted = _converted(path).variables
  reporting.note(f"Starting from the weights of {path}.")
  return jax.tree.map(
      lambda a, x: jax.device_put(np.asarray(a, x.dtype), x.sharding),
      converted,
      abstract,
  )


def class_mean_classifier(
    config: ml_collections.ConfigDict,
    model,
    mesh,
    variables: Any,
    source,
    num_classes: int,
    width: int,
) -> np.ndarray:
  """(D, width) columns: each class's normalised mean embedding (eval mode,
  clean images, no flip) through the pretrained backbone; zero padding
  columns past `num_classes`, random ones for classes without images."""
  from qgjt_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  size = config.data.image_size
  labels = np.array([int(source[i]["label"]) for i in range(len(source))])
  faces = images_lib.LazyImages(
      lambda i: pipeline.fit_size(
          images_lib.decode_image(source[i]["image"]), size
      ),
      len(source),
  )
  embed = model_lib.make_embed_fn(
      model.clone(dtype=jnp.dtype(config.eval.dtype)), mesh, variables
  )
  feats = extract.extract_embeddings(
      embed,
      faces,
      batch_size=config.eval.batch_size,
      flip=False,
      desc="class means",
  )
  sums = np.zeros((num_classes, feats.shape[1]), np.float64)
  np.add.at(sums, labels, feats)
  norms = np.linalg.norm(sums, axis=1, keepdims=True)
  rng = np.random.default_rng(config.seed)
  empty = norms[:, 0] == 0
  sums[empty] = rng.normal(size=(int(empty.sum()), feats.shape[1]))
  means = sums / np.linalg.norm(sums, axis=1, keepdims=True)
  kernel = np.zeros((feats.shape[1], width), np.float32)
  kernel[:, :num_classes] = means.T
  return kernel


# Records the measured start of the quality statistics reads at most.
_MEASURED_RECORDS = 2048


def measured_quality(
    config: ml_collections.ConfigDict, model, variables: Any, source
) -> quality_lib.QualityStats:
  """The mean and (unbiased) std of the feature norms training will read
  first: each record's two views of the first epoch (the clean face and
  the degraded one, `pipeline.TwoViews`) through the pretrained backbone in
  train mode, in batches of the run's global batch, at most 2,048 records
  (seeded). A model imported without statistics starts from these rather
  than from 0/0, which would call every face high quality until the
  running averages catch up."""
  from qgjt_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from qgjt_jax.data import degrade  # pylint: disable=g-import-not-at-top

  views = pipeline.TwoViews(
      source,
      config.seed,
      degrade.view_config_from(config.data.view),
      config.data.image_size,
  )
  count = min(len(source), _MEASURED_RECORDS)
  records = np.random.default_rng(config.seed).permutation(len(source))[:count]
  batch = max(2, min(config.global_batch_size, count))

  @jax.jit
  def norms_of(variables, images):
    with layers.frozen_statistics(config.model.batch_norm == "frozen"):
      (_, norms), _ = model.apply(
          variables,
          normalize_images(images, model.dtype),
          train=True,
          mutable=["batch_stats"],
          rngs={"dropout": jax.random.key(0)},
      )
    return norms

  found = []
  host = jax.device_get(variables)
  for start in range(0, count - batch + 1, batch):
    items = [views((0, int(i))) for i in records[start : start + batch]]
    images = np.concatenate(
        [
            np.stack([b["image_h"] for b in items]),
            np.stack([b["image_l"] for b in items]),
        ]
    )
    found.append(np.asarray(norms_of(host, images), np.float64))
  norms = np.clip(
      np.concatenate(found), quality_lib.NORM_MIN, quality_lib.NORM_MAX
  )
  stats = quality_lib.init_quality_stats(
      float(norms.mean()), float(norms.std(ddof=1))
  )
  mode = (
      "BatchNorms frozen"
      if config.model.batch_norm == "frozen"
      else "batch statistics"
  )
  reporting.note(
      f"Quality statistics start at the pretrained model's norms: "
      f"mean {float(stats.mean):.2f}, std {float(stats.std):.2f} "
      f"({len(norms)} views of {len(norms) // 2} training "
      f"images, train mode, {mode})."
  )
  return stats


def initialise(state, stack, config: ml_collections.ConfigDict, source):
  """The fresh `state` with the pretrained backbone (and, if asked, the
  class-mean classifier and the measured quality statistics) of
  `config.init_from`."""
  variables = pretrained_backbone(config, stack.model, stack.mesh)
  params = dict(state.params, backbone=variables["params"])
  if config.init_quality == "measured":
    state = state.replace(
        quality=jax.device_put(
            measured_quality(config, stack.model, variables, source),
            stack.state_shardings.quality,
        )
    )
  if config.init_classifier == "class_means":
    kernel = class_mean_classifier(
        config,
        stack.model,
        stack.mesh,
        variables,
        source,
        stack.num_classes,
        state.classifier_width,
    )
    params["classifier"] = {"kernel": kernel}
  params = jax.device_put(params, stack.state_shardings.params)
  state = state.replace(
      params=params,
      opt_state=stack.tx.init(params),
      batch_stats=jax.device_put(
          variables["batch_stats"], stack.state_shardings.batch_stats
      ),
  )
  # The queue variant's own state (MoCo's momentum encoder) starts from
  # the new weights, as a fresh run's does.
  state = state.replace(
      variant_state=stack.settings.queue.variant.init_state(
          jax.tree.map(jnp.copy, params),
          jax.tree.map(jnp.copy, state.batch_stats),
          state.quality,
      )
  )
  return state
