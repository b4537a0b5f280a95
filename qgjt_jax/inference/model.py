"""A trained model in one line: `qgjt_jax.load_model(path)`.

  import qgjt_jax
  model = qgjt_jax.load_model("runs/demo")    # or runs/demo/checkpoints/32
  embeddings, norms = model.embed(faces)      # uint8 BGR (N, S, S, 3) crops
  model.quality(norms)                        # q in [0, 1] (NaN: no stats)

`Model.embed` takes aligned face crops of the model's size, in OpenCV's
BGR order, as uint8 0-255. It converts by rule only where nothing is
guessed (integers within 0-255 to uint8, a grey channel (N, S, S, 1) to
three) and
refuses everything else in one line (`FaceInputError`, a ValueError):
floats (0-1 or 0-255 cannot be told apart), four channels (alpha, and RGB
or BGR?), another size (an unaligned or differently cropped face embeds
as another person).

The path is a workdir (a training run's, or one `qgjt_jax.convert` wrote),
its `checkpoints` folder, or one step folder in it. The model is rebuilt
from the workdir's record (`records.py`), not from a recipe typed again; its
weights restore onto whatever devices are present, whatever device count
wrote them; the running norm statistics (the quality indicator) come with
them. This is the package's one way to load weights for use: evaluation,
embedding, decisions, export, the notebooks and fine-tuning all call it.

Every use scores faces one way, `extract.DECISION_SCORING`: each face and
its mirror image are embedded and fused (the evaluation's default), the
unit embedding is the direction of n1 e1 + n2 e2 and the norm is the mean
of the two views' norms, the norm that training's statistics describe.
The thresholds the evaluations measure are scored the same way, so a
decision quotes the FAR of the very scores it compares.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import errors
from qgjt_jax import parallel
from qgjt_jax import records
from qgjt_jax import state as state_lib
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.eval import extract
from qgjt_jax.files import images as images_lib
from qgjt_jax.method import quality as quality_lib
from qgjt_jax.models import normalize_images


class ModelNotFoundError(errors.UserError, FileNotFoundError):
  """`qgjt_jax.load_model` was given a path that holds no model."""


class FaceInputError(errors.UserError, ValueError):
  """Images `Model.embed` cannot take as they are (see module)."""


def as_faces(images, image_size: int) -> np.ndarray:
  """`images` as uint8 BGR (N, image_size, image_size, 3) by the module's
  rules, or FaceInputError naming what is wrong and what to pass."""
  if not isinstance(images, (np.ndarray, list, tuple)) and not hasattr(
      images, "__array__"
  ):
    images = list(images)  # an iterable of faces
  try:
    images = np.asarray(images)
  except ValueError as e:  # ragged: faces of several sizes
    raise FaceInputError(
        f"faces of different shapes ({e}): pass "
        f"{image_size} x {image_size} crops"
    ) from None
  want = f"(N, {image_size}, {image_size}, 3) uint8 BGR aligned faces"
  if images.ndim == 3:
    raise FaceInputError(
        f"images of shape {images.shape}: pass {want} "
        "(images[None] for one face, images[..., None] for "
        "grey ones)"
    )
  if images.ndim != 4:
    raise FaceInputError(f"images of shape {images.shape}: pass {want}")
  if images.shape[-1] not in (1, 3):
    hint = {4: " (drop the alpha channel; the order must be BGR)"}.get(
        images.shape[-1],
        " (channels last: x.transpose(0, 2, 3, 1))"
        if images.shape[1] in (1, 3, 4)
        else "",
    )
    raise FaceInputError(f"{images.shape[-1]} channels: pass {want}{hint}")
  if images.shape[1:3] != (image_size, image_size):
    raise FaceInputError(
        f"faces of {images.shape[2]} x {images.shape[1]} px: this model "
        f"takes {image_size} x {image_size} px crops aligned to the "
        "five-point template (qgjt_jax.align, or read them with "
        "--mode=embed, which aligns and resizes)"
    )
  if images.dtype != np.uint8:
    if images.dtype.kind == "f":
      raise FaceInputError(
          f"{images.dtype} images: pass uint8 0-255 (for floats in 0-1, "
          "(x * 255).round().astype(np.uint8)); the range of floats is "
          "not guessed"
      )
    if images.dtype.kind not in "iu" or (
        images.size and (images.min() < 0 or images.max() > 255)
    ):
      raise FaceInputError(f"{images.dtype} images: pass {want}, values 0-255")
    images = images.astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def locate(path: str) -> tuple[str, Optional[int]]:
  """(workdir, step or None) of a workdir, its checkpoints folder or one of
  its step folders."""
  path = os.fspath(path).rstrip("/") or "/"
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.basename(parent) == workdir_layout.CHECKPOINTS:
    return os.path.dirname(parent) or ".", int(name)
  if name == workdir_layout.CHECKPOINTS:
    return parent or ".", None
  return path, None


@dataclasses.dataclass(frozen=True)
class Model:
  """A workdir's model at one step, ready to embed (see module)."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  module: Any  # the backbone, in the evaluation's compute dtype
  variables: Any  # {'params', 'batch_stats'}, replicated on `mesh`
  mesh: Mesh
  norm_stats: Optional[dict[str, float]]  # {'mean', 'std'}; None: converted
  batch_size: int  # per call of the forward pass, over all devices

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def input_order(self) -> str:
    """The channel order the weights expect (the images given are BGR)."""
    return self.config.model.input_order

  @property
  def name(self) -> str:
    return self.config.model.name

  @property
  def hq_threshold(self) -> float:
    """The quality b above which a face counts as high quality."""
    return float(self.config.head.b)

  @functools.cached_property
  def embed_fn(self) -> extract.ShardedEmbedFn:
    """One view's (unit embeddings, norms) of a batch of `batch_size`
    faces, for `extract.extract_embeddings` and the evaluations."""
    return make_embed_fn(self.module, self.mesh, self.variables)

  def embed(
      self, images, *, progress: bool = False, desc: str = "embed"
  ) -> tuple[np.ndarray, np.ndarray]:
    """(unit embeddings (N, D), norms (N,)) of uint8 BGR faces (an
    (N, S, S, 3) array, or files.images.LazyImages), scored as every
    decision is. Other inputs are converted or refused by the module's
    rules (FaceInputError)."""
    if not isinstance(images, images_lib.LazyImages):
      images = as_faces(images, self.image_size)
    return extract.extract_embeddings(
        self.embed_fn,
        images,
        batch_size=self.batch_size,
        flip=True,
        fusion=extract.DECISION_FUSION,
        return_norms=True,
        progress=progress,
        desc=desc,
    )

  def quality(self, norms: np.ndarray) -> np.ndarray:
    """q in [0, 1] of each norm under the run's statistics (NaN without:
    a converted model has none)."""
    norms = np.asarray(norms, np.float32)
    if self.norm_stats is None:
      return np.full(len(norms), np.nan, np.float32)
    scaler = quality_lib.margin_scaler(
        jnp.asarray(norms),
        quality_lib.QualityStats(
            mean=jnp.float32(self.norm_stats["mean"]),
            std=jnp.float32(self.norm_stats["std"]),
        ),
        self.config.quality.h,
        self.config.quality.eps,
    )
    return np.asarray(quality_lib.quality_from_scaler(scaler), np.float32)

  def host_variables(self) -> Any:
    """The variables as float32 numpy arrays (this process's copy)."""
    return jax.tree.map(
        lambda x: np.asarray(x.addressable_data(0), np.float32), self.variables
    )


def sharded_forward(module, mesh: Mesh):
  """The jitted forward pass (variables, uint8 BGR faces) -> (unit
  embeddings, norms) of one view, the faces split over every device of
  `mesh` as in training, the results replicated (a small all-gather)."""

  def forward(variables, images):
    emb, norms = module.apply(
        variables, normalize_images(images, module.dtype), train=False
    )
    return emb.astype(jnp.float32), norms.astype(jnp.float32)

  return jax.jit(
      forward,
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
      out_shardings=parallel.replicated(mesh),
  )


def make_embed_fn(module, mesh: Mesh, variables: Any) -> extract.ShardedEmbedFn:
  """`sharded_forward` of `variables`, for `extract.extract_embeddings`:
  each process passes its rows of a global batch (extract.HostShard)."""
  jitted = sharded_forward(module, mesh)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  return extract.ShardedEmbedFn(
      lambda local: jitted(variables, parallel.host_to_global(local, mesh)),
      extract.HostShard(jax.process_index(), jax.process_count()),
  )


def fused_features(
    module, variables: Any, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Normalised BGR faces (B, S, S, 3) and their mirror images through the
  network in one batch, fused as `Model.embed` scores
  (`extract.fuse_flip` with the decision's fusion): (unit embeddings (B,
  D), the mean of the two norms (B,))."""
  both = jnp.concatenate([x, jnp.flip(x, axis=2)])
  emb, norms = module.apply(variables, both, train=False)
  # The two halves by a reshape and static slices: plain ops whatever the
  # (symbolic) batch.
  half = lambda x, i: jax.lax.index_in_dim(
      x.reshape(2, -1, *x.shape[1:]), i, keepdims=False
  )
  return extract.fuse_flip(
      half(emb, 0),
      half(norms, 0),
      half(emb, 1),
      half(norms, 1),
      extract.DECISION_FUSION,
  )


def fused_forward(module, variables: Any):
  """uint8 BGR faces (B, S, S, 3) -> (unit embeddings (B, D), norms (B,)),
  flip-fused as `Model.embed` scores: the function the exported models
  compute."""
  return lambda images: fused_features(
      module, variables, normalize_images(images, module.dtype)
  )


def abstract_variables(module, image_size: int, sharding) -> Any:
  """Shapes of the backbone's {'params', 'batch_stats'} on `sharding`."""
  shapes = jax.eval_shape(
      lambda: module.init(
          jax.random.key(0),
          jnp.zeros((1, image_size, image_size, 3)),
          train=False,
      )
  )
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      {"params": shapes["params"], "batch_stats": shapes["batch_stats"]},
  )


def load_model(
    path: str,
    step: Optional[int] = None,
    *,
    config: Optional[ml_collections.ConfigDict] = None,
    explicit: Iterable[str] = (),
    mesh: Optional[Mesh] = None,
) -> Model:
  """The model of a workdir (see module) at `step` (default: the step of
  the path, else the latest readable one).

  Args:
    path: a workdir, its checkpoints folder or one of its step folders.
    step: the checkpoint step.
    config: settings to use it with (evaluation sets, batch size, compute
      dtype); default the workdir's own record. Its model settings give way
      to the record's, except the `explicit` keys (`--config.KEY=` flags
      typed), which must agree with it.
    mesh: where the weights go (default: every device, batch split over
      all of them).

  Raises:
    records.RecordError: the workdir records no model, or an explicit key
      contradicts it.
    checkpoint.CheckpointError: no readable checkpoint (or no such step).
  """
  workdir, path_step = locate(path)
  if step is None:
    step = path_step
  logging.info(
      "Loading the model of %s (step %s) on %d device(s).",
      workdir,
      "latest" if step is None else step,
      jax.device_count(),
  )
  if config is None:
    config = records.recorded_config(workdir)
  elif records.has_record(workdir):
    config = records.adopt_model_settings(config, workdir, explicit)
  mesh = mesh or parallel.make_mesh(1)
  dtype = jnp.dtype(config.eval.dtype)
  module = state_lib.build_model(config).clone(dtype=dtype, remat=False)
  directory = str(workdir_layout.Workdir(workdir).checkpoints)
  variables, restored = ckpt.restore_model(
      directory,
      abstract_variables(
          module, config.data.image_size, parallel.replicated(mesh)
      ),
      step,
  )
  devices = parallel.data_parallel_size(mesh)
  batch_size = -(-int(config.eval.batch_size) // devices) * devices
  return Model(
      workdir=workdir,
      step=restored,
      config=config,
      module=module,
      variables=variables,
      mesh=mesh,
      norm_stats=ckpt.restore_quality(directory, restored),
      batch_size=batch_size,
  )


def load_model_from_python(
    path: str, step: Optional[int] = None, **kwargs
) -> Model:
  """`load_model` with errors that speak Python rather than the commands'
  flags: a path that does not exist, or is no workdir of a model."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  workdir, _ = locate(path)
  if not epath.Path(os.fspath(path)).exists():
    raise ModelNotFoundError(
        f"load_model({os.fspath(path)!r}): no such file or folder"
    )
  if kwargs.get("config") is None and not records.has_record(workdir):
    raise ModelNotFoundError(
        f"load_model({os.fspath(path)!r}): {workdir} holds no model record "
        f"({workdir_layout.CONFIG_RECORD} of a training run, or "
        f"{workdir_layout.CONVERTED_RECORD} of qgjt_jax.convert); pass such a "
        "workdir, its checkpoints folder or one of its step folders"
    )
  from qgjt_jax import config_checks  # pylint: disable=g-import-not-at-top

  if kwargs.get("config") is None:  # the record's values, checked as the
    config_checks.check_values(records.recorded_config(workdir))  # CLI does
  return load_model(path, step, **kwargs)
