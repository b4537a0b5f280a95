"""Evaluation of a model state: what the config lists, as a table.

Used periodically by the trainer and by `--mode=eval`, which restores the
backbone of a checkpoint (any device count) and runs the same evaluations.
Results go to stdout as a table, to WORKDIR/eval/*.json and to the metric
writer.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import parallel
from qgjt_jax import reporting
from qgjt_jax import state as state_lib
from qgjt_jax.align import faces
from qgjt_jax.data import degrade
from qgjt_jax.eval import extract
from qgjt_jax.eval import ijb
from qgjt_jax.eval import own_data
from qgjt_jax.eval import report
from qgjt_jax.eval import scface
from qgjt_jax.eval import tinyface
from qgjt_jax.eval import verification
from qgjt_jax.models.iresnet import normalize_images


def eval_forward(model, dtype: Any, mesh: Mesh):
  """The jitted eval forward pass: (variables, uint8 images) -> (unit
  embeddings, norms). The images are split over every device of the mesh,
  as in training; the results come back replicated (B x D floats: a small
  all-gather)."""
  def forward(variables, images):
    emb, norms = model.apply(variables, normalize_images(images, dtype),
                             train=False)
    return emb.astype(jnp.float32), norms.astype(jnp.float32)

  return jax.jit(forward, in_shardings=(parallel.replicated(mesh),
                                        parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def make_embed_fn(model, dtype: Any, mesh: Mesh,
                  variables: Any) -> extract.ShardedEmbedFn:
  """The eval forward pass of `variables`, for `extract.extract_embeddings`:
  each process passes its rows of a global batch (see `eval_forward`)."""
  forward = eval_forward(model, dtype, mesh)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  return extract.ShardedEmbedFn(
      lambda local: forward(variables, parallel.host_to_global(local, mesh)),
      extract.HostShard(jax.process_index(), jax.process_count()))


class Evaluator:
  """Runs the evaluations of `config.eval` (and the synthetic pairs)."""

  def __init__(self, config: ml_collections.ConfigDict, model, mesh: Mesh):
    self.config = config
    self.mesh = mesh
    self.model = model
    self._synthetic_sets = None

  def _synthetic_pairs(self):
    if self._synthetic_sets is None:
      from qgjt_jax.data import synthetic
      spec = self.config.data.synthetic
      self._synthetic_sets = synthetic.synthetic_verification_sets(
          spec.eval_identities, spec.eval_pairs,
          image_size=self.config.data.image_size, seed=spec.seed,
          view_config=degrade.view_config_from(self.config.data.view))
    return self._synthetic_sets

  def evaluate_variables(self, variables: Any) -> dict[str, dict]:
    """{set name: metrics} for the backbone `variables`."""
    cfg = self.config.eval
    # Evaluation has its own compute dtype (float32 by default, as the
    # authors evaluate), whatever the dtype the model was trained in.
    dtype = jnp.dtype(cfg.dtype)
    embed_fn = make_embed_fn(self.model.clone(dtype=dtype), dtype, self.mesh,
                             variables)
    common = dict(batch_size=cfg.batch_size, fusion=cfg.fusion)
    results = {}
    if self.config.data.kind == "synthetic":
      for name, (images, issame) in self._synthetic_pairs().items():
        results[f"synthetic_{name}"] = verification.evaluate_pairs(
            embed_fn, images, issame, desc=name,
            clean_then_degraded=name == "hq_lq", **common)
    size = self.config.data.image_size
    for path in cfg.bin_sets:
      for low_res in (None, *cfg.low_res):
        metrics = verification.evaluate_bin(
            embed_fn, path, low_res=low_res, image_size=size, **common)
        name = _set_name(path) + (f"@{low_res}px" if low_res else "")
        results[name] = metrics
    if cfg.tinyface_root:
      aligned = cfg.tinyface_aligned_dir or None
      results["tinyface"] = tinyface.evaluate_tinyface(
          embed_fn, cfg.tinyface_root, aligned_dir=aligned, image_size=size,
          **common)
      results["tinyface"]["images"] = aligned or "raw Testing_Set"
    if cfg.scface_root:
      results["scface"] = scface.evaluate_scface(
          embed_fn, cfg.scface_root, aligned_dir=cfg.scface_aligned_dir,
          image_size=size, **common)
      results["scface"]["images"] = cfg.scface_aligned_dir or "the root"
    if cfg.ijb_root:
      results[cfg.ijb_target.lower()] = ijb.evaluate_ijb(
          embed_fn, cfg.ijb_root, subset=cfg.ijb_target, image_size=size,
          use_norm_score=cfg.ijb_pooling == "norm", tar_rule=cfg.tar_rule,
          **common)
    results.update(self._own_data(embed_fn, common))
    return results

  def _own_data(self, embed_fn, common) -> dict[str, dict]:
    """config.eval.folders and pairs_files (eval/own_data.py)."""
    cfg, size = self.config.eval, self.config.data.image_size
    load = (faces.photo_loader(size) if cfg.align == "detect" else None)
    results = {}
    for folder in cfg.folders:
      results[f"folder_{_set_name(os.path.normpath(folder))}"] = (
          own_data.evaluate_folder(embed_fn, folder, image_size=size,
                                   load=load, tar_rule=cfg.tar_rule,
                                   **common))
    for path in cfg.pairs_files:
      results[f"pairs_{_set_name(path)}"] = own_data.evaluate_pairs_file(
          embed_fn, path, image_size=size, load=load, tar_rule=cfg.tar_rule,
          **common)
    return results

  def run(self, state, step: int, writer, workdir: str) -> dict[str, dict]:
    variables = {"params": state.params["backbone"],
                 "batch_stats": state.batch_stats}
    return self.publish(self.evaluate_variables(variables), step, writer,
                        workdir)

  def publish(self, results, step: int, writer, workdir: str):
    if not results:
      return results
    reporting.note(
        f"\nEvaluation at step {step} (computed in {self.config.eval.dtype}):"
        f"\n{report.format_table(results)}\n")
    if jax.process_index() == 0:
      report.write_results(workdir, f"step_{step}", results)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in
                                report.scalar_metrics(results).items()})
    writer.flush()
    return results


def _set_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def with_recorded_input_order(config: ml_collections.ConfigDict,
                              workdir: str) -> ml_collections.ConfigDict:
  """`config` with the model.input_order the workdir recorded, if any."""
  recorded = ckpt.recorded_model_settings(workdir).get("model.input_order")
  return with_input_order(config, recorded, f"The model in {workdir}")


def with_input_order(config: ml_collections.ConfigDict, order: Any,
                     whose: str) -> ml_collections.ConfigDict:
  """`config` with model.input_order `order` (None: unchanged), saying so."""
  if not order or order == config.model.input_order:
    return config
  reporting.note(f"{whose} reads {order} images: config.model.input_order="
                 f"{config.model.input_order!r} is overridden.")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.input_order = order
  return config


def abstract_model_variables(config: ml_collections.ConfigDict, model,
                             mesh: Mesh) -> Any:
  """Shapes of {'params', 'batch_stats'}, replicated on this mesh."""
  size = config.data.image_size
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         train=False))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: Optional[int] = None,
                        checkpoint_dir: Optional[str] = None) -> dict:
  """--mode=eval: restores a checkpoint's backbone and evaluates it.

  The channel order the weights expect comes from the workdir's record (a
  converted insightface model reads RGB), whatever the config says.
  """
  config = with_recorded_input_order(config, workdir)
  mesh = parallel.make_mesh(1)
  model = state_lib.build_model(config)
  directory = checkpoint_dir or f"{workdir}/checkpoints"
  variables, restored_step = ckpt.restore_model(
      directory, abstract_model_variables(config, model, mesh), step)
  reporting.note(
      f"Restored the model of step {restored_step} from {directory}.")
  evaluator = Evaluator(config, model, mesh)
  writer = reporting.create_writer(f"{workdir}/eval")
  results = evaluator.publish(evaluator.evaluate_variables(variables),
                              restored_step, writer, workdir)
  if not results:
    reporting.note("Nothing to evaluate: set config.eval.bin_sets (or "
                   "tinyface_root, scface_root, ijb_root).")
  return results
