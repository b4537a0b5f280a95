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
from qgjt_jax import reporting
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.align import faces
from qgjt_jax.data import degrade
from qgjt_jax.eval import extract
from qgjt_jax.eval import ijb
from qgjt_jax.eval import own_data
from qgjt_jax.eval import report
from qgjt_jax.eval import scface
from qgjt_jax.eval import tinyface
from qgjt_jax.eval import verification
from qgjt_jax.inference import model as model_lib


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
          spec.eval_identities,
          spec.eval_pairs,
          image_size=self.config.data.image_size,
          seed=spec.seed,
          view_config=degrade.view_config_from(self.config.data.view),
      )
    return self._synthetic_sets

  def evaluate_variables(self, variables: Any) -> dict[str, dict]:
    """{set name: metrics} for the backbone `variables` (training's)."""
    # Evaluation has its own compute dtype (float32 by default, as the
    # authors evaluate), whatever the dtype the model was trained in.
    module = self.model.clone(dtype=jnp.dtype(self.config.eval.dtype))
    return self.evaluate(
        model_lib.make_embed_fn(module, self.mesh, variables),
        self.config.eval.batch_size,
    )

  def evaluate(self, embed_fn, batch_size: int) -> dict[str, dict]:
    """{set name: metrics} of the forward pass `embed_fn` (one view of
    `batch_size` faces; the flip fusion of config.eval.fusion is applied
    here). Each set's "provenance" says what its thresholds are worth: the
    kind of faces, the scoring and (once published) the step
    (inference/decisions.py)."""
    cfg = self.config.eval
    common = dict(batch_size=batch_size, fusion=cfg.fusion)
    scoring = extract.scoring_name(cfg.fusion)
    results = {}

    def add(name, kind, metrics, folder=None, align=None):
      metrics["provenance"] = {"kind": kind, "scoring": scoring}
      if folder:
        metrics["provenance"]["folder"] = os.path.abspath(folder)
      if align:  # how photos became faces: decisions must do the same
        metrics["provenance"]["align"] = align
      results[name] = metrics

    if self.config.data.kind == "synthetic":
      for name, (images, issame) in self._synthetic_pairs().items():
        add(
            f"synthetic_{name}",
            "generated",
            verification.evaluate_pairs(
                embed_fn,
                images,
                issame,
                desc=name,
                clean_then_degraded=name == "hq_lq",
                **common,
            ),
        )
    size = self.config.data.image_size
    for path in cfg.bin_sets:
      for low_res in (None, *cfg.low_res):
        add(
            _set_name(path) + (f"@{low_res}px" if low_res else ""),
            "bin",
            verification.evaluate_bin(
                embed_fn, path, low_res=low_res, image_size=size, **common
            ),
        )
    if cfg.tinyface_root:
      aligned = cfg.tinyface_aligned_dir or None
      add(
          "tinyface",
          "identification",
          tinyface.evaluate_tinyface(
              embed_fn,
              cfg.tinyface_root,
              aligned_dir=aligned,
              image_size=size,
              **common,
          ),
      )
      results["tinyface"]["images"] = aligned or "raw Testing_Set"
    if cfg.scface_root:
      add(
          "scface",
          "identification",
          scface.evaluate_scface(
              embed_fn,
              cfg.scface_root,
              aligned_dir=cfg.scface_aligned_dir,
              image_size=size,
              **common,
          ),
      )
      results["scface"]["images"] = cfg.scface_aligned_dir or "the root"
    if cfg.ijb_root:
      add(
          cfg.ijb_target.lower(),
          "ijb_template",
          ijb.evaluate_ijb(
              embed_fn,
              cfg.ijb_root,
              subset=cfg.ijb_target,
              image_size=size,
              use_norm_score=cfg.ijb_pooling == "norm",
              tar_rule=cfg.tar_rule,
              use_detector_score=cfg.ijb_detector_score,
              **common,
          ),
      )
    load = faces.photo_loader(size) if cfg.align == "detect" else None
    own = dict(image_size=size, load=load, tar_rule=cfg.tar_rule, **common)
    for kind, folders in (
        ("calibration", cfg.calibration_folders),
        ("own_folder", cfg.folders),
    ):
      prefix = "calibration_" if kind == "calibration" else "folder_"
      for folder in folders:
        name = prefix + _set_name(os.path.normpath(folder))
        # Decisions stand on the clean faces only; the low-resolution
        # variants are measurements.
        for suffix, metrics in own_data.evaluate_folder(
            embed_fn,
            folder,
            low_res=cfg.low_res if kind == "own_folder" else (),
            **own,
        ).items():
          add(
              name + suffix,
              kind if not suffix else "low_res_folder",
              metrics,
              folder,
              cfg.align,
          )
    for path in cfg.pairs_files:
      add(
          f"pairs_{_set_name(path)}",
          "own_pairs",
          own_data.evaluate_pairs_file(embed_fn, path, **own),
          align=cfg.align,
      )
    return results

  def run(self, state, step: int, writer, workdir: str) -> dict[str, dict]:
    variables = {
        "params": state.params["backbone"],
        "batch_stats": state.batch_stats,
    }
    return self.publish(
        self.evaluate_variables(variables), step, writer, workdir
    )

  def publish(self, results, step: int, writer, workdir: str):
    if not results:
      return results
    for metrics in results.values():
      metrics["provenance"]["step"] = step
    reporting.note(
        f"\nEvaluation at step {step} (computed in {self.config.eval.dtype}):"
        f"\n{report.format_table(results)}\n"
    )
    if jax.process_index() == 0:
      report.write_results(workdir, f"step_{step}", results)
    writer.write_scalars(
        step,
        {f"eval/{k}": v for k, v in report.scalar_metrics(results).items()},
    )
    writer.flush()
    return results


def _set_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def evaluate_checkpoint(
    path: str,
    step: Optional[int] = None,
    config: Optional[ml_collections.ConfigDict] = None,
    explicit=(),
    results_dir: Optional[str] = None,
) -> dict:
  """--mode=eval: evaluates the model of a workdir (or its checkpoints
  folder, or a step folder) with `config`'s evaluations (default: the ones
  its record names); results go to RESULTS_DIR/eval (default: the
  workdir's)."""
  model = model_lib.load_model(path, step, config=config, explicit=explicit)
  reporting.note(
      f"Restored the model of step {model.step} from "
      f"{ckpt.checkpoints_dir(model.workdir)} on "
      f"{jax.device_count()} device(s)."
  )
  evaluator = Evaluator(model.config, model.module, model.mesh)
  results_dir = results_dir or model.workdir
  workdir_layout.check_writes_stay_inside(results_dir)
  writer = reporting.create_writer(f"{results_dir}/{workdir_layout.EVAL}")
  results = evaluator.publish(
      evaluator.evaluate(model.embed_fn, model.batch_size),
      model.step,
      writer,
      results_dir,
  )
  if not results:
    reporting.note(
        "Nothing to evaluate: set config.eval.bin_sets (or "
        "folders, pairs_files, tinyface_root, scface_root, "
        "ijb_root)."
    )
  return results
