"""Evaluation of a model state: what the config lists, as a table.

Each protocol (the generated pairs, .bin sets, TinyFace, SCface, IJB, one's
own folders and pairs files) is a registered function (`register_protocol`)
that reads its own keys of `config.eval` and measures its sets with one
`Embedder`; the evaluator runs them all and adds each set's provenance.
Used periodically by the trainer and by `--mode=eval`, which restores the
backbone of a checkpoint (any device count) and runs the same evaluations.
Results go to stdout as a table, to WORKDIR/eval/*.json and to the metric
writer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

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


@dataclasses.dataclass(frozen=True)
class Embedder:
  """What every protocol embeds faces with: the forward pass of one view
  (`embed_fn`), in batches of `batch_size`, fused with its mirror image by
  `fusion` (config.eval.fusion), for faces of `image_size` pixels."""

  embed_fn: Callable
  batch_size: int
  fusion: Optional[str]
  image_size: int

  @property
  def common(self) -> dict[str, Any]:
    """The keywords every protocol's evaluation takes."""
    return dict(batch_size=self.batch_size, fusion=self.fusion)


@dataclasses.dataclass
class Measured:
  """One set's metrics, and what they were measured on: `kind` (the
  provenance that decisions read), the `folder` of photos and how they
  were aligned, where those apply."""

  name: str
  kind: str
  metrics: dict
  folder: Optional[str] = None
  align: Optional[str] = None


# (embedder, the whole config) -> the sets it measured. A protocol reads its
# own keys of config.eval and measures nothing when they are unset.
Protocol = Callable[[Embedder, ml_collections.ConfigDict], Iterable[Measured]]
_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str) -> Callable[[Protocol], Protocol]:
  """Decorator: an evaluation every run does (in registration order)."""

  def register(protocol: Protocol) -> Protocol:
    _PROTOCOLS[name] = protocol
    return protocol

  return register


# The generated pairs of the last config evaluated (a periodic evaluation
# measures the same pairs at every step): {its key: the sets}.
_SYNTHETIC_SETS: dict[str, Any] = {}


def _synthetic_sets(config: ml_collections.ConfigDict) -> dict[str, Any]:
  from qgjt_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  data = config.data
  key = repr((data.synthetic.to_dict(), data.image_size, data.view.to_dict()))
  if key not in _SYNTHETIC_SETS:
    _SYNTHETIC_SETS.clear()
    _SYNTHETIC_SETS[key] = synthetic.synthetic_verification_sets(
        data.synthetic.eval_identities,
        data.synthetic.eval_pairs,
        image_size=data.image_size,
        seed=data.synthetic.seed,
        view_config=degrade.view_config_from(data.view),
    )
  return _SYNTHETIC_SETS[key]


@register_protocol("synthetic")
def _synthetic(embedder: Embedder, config) -> Iterable[Measured]:
  """The generated set's pairs, when it is the training data."""
  if config.data.kind != "synthetic":
    return
  sets = _synthetic_sets(config)
  for name, (images, issame) in sets.items():
    yield Measured(
        f"synthetic_{name}",
        "generated",
        verification.evaluate_pairs(
            embedder.embed_fn,
            images,
            issame,
            desc=name,
            clean_then_degraded=name == "hq_lq",
            **embedder.common,
        ),
    )


@register_protocol("bin_sets")
def _bin_sets(embedder: Embedder, config) -> Iterable[Measured]:
  cfg = config.eval
  for path in cfg.bin_sets:
    for low_res in (None, *cfg.low_res):
      yield Measured(
          _set_name(path) + (f"@{low_res}px" if low_res else ""),
          "bin",
          verification.evaluate_bin(
              embedder.embed_fn,
              path,
              low_res=low_res,
              image_size=embedder.image_size,
              **embedder.common,
          ),
      )


@register_protocol("tinyface")
def _tinyface(embedder: Embedder, config) -> Iterable[Measured]:
  cfg = config.eval
  if not cfg.tinyface_root:
    return
  aligned = cfg.tinyface_aligned_dir or None
  metrics = tinyface.evaluate_tinyface(
      embedder.embed_fn,
      cfg.tinyface_root,
      aligned_dir=aligned,
      image_size=embedder.image_size,
      **embedder.common,
  )
  metrics["images"] = aligned or "raw Testing_Set"
  yield Measured("tinyface", "identification", metrics)


@register_protocol("scface")
def _scface(embedder: Embedder, config) -> Iterable[Measured]:
  cfg = config.eval
  if not cfg.scface_root:
    return
  metrics = scface.evaluate_scface(
      embedder.embed_fn,
      cfg.scface_root,
      aligned_dir=cfg.scface_aligned_dir,
      image_size=embedder.image_size,
      **embedder.common,
  )
  metrics["images"] = cfg.scface_aligned_dir or "the root"
  yield Measured("scface", "identification", metrics)


@register_protocol("ijb")
def _ijb(embedder: Embedder, config) -> Iterable[Measured]:
  cfg = config.eval
  if not cfg.ijb_root:
    return
  yield Measured(
      cfg.ijb_target.lower(),
      "ijb_template",
      ijb.evaluate_ijb(
          embedder.embed_fn,
          cfg.ijb_root,
          subset=cfg.ijb_target,
          image_size=embedder.image_size,
          use_norm_score=cfg.ijb_pooling == "norm",
          tar_rule=cfg.tar_rule,
          use_detector_score=cfg.ijb_detector_score,
          **embedder.common,
      ),
  )


def _own_keywords(embedder: Embedder, cfg) -> dict[str, Any]:
  load = (
      faces.photo_loader(embedder.image_size) if cfg.align == "detect" else None
  )
  return dict(
      image_size=embedder.image_size,
      load=load,
      tar_rule=cfg.tar_rule,
      **embedder.common,
  )


@register_protocol("folders")
def _folders(embedder: Embedder, config) -> Iterable[Measured]:
  """Folders of one's own people: calibration folders (what decisions cut
  their thresholds on) and folders measured."""
  cfg = config.eval
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
          embedder.embed_fn,
          folder,
          low_res=cfg.low_res if kind == "own_folder" else (),
          **_own_keywords(embedder, cfg),
      ).items():
        yield Measured(
            name + suffix,
            kind if not suffix else "low_res_folder",
            metrics,
            folder,
            cfg.align,
        )


@register_protocol("pairs_files")
def _pairs_files(embedder: Embedder, config) -> Iterable[Measured]:
  cfg = config.eval
  for path in cfg.pairs_files:
    yield Measured(
        f"pairs_{_set_name(path)}",
        "own_pairs",
        own_data.evaluate_pairs_file(
            embedder.embed_fn, path, **_own_keywords(embedder, cfg)
        ),
        align=cfg.align,
    )


class Evaluator:
  """Runs the registered protocols on the sets `config.eval` (and the
  synthetic training data) names."""

  def __init__(self, config: ml_collections.ConfigDict, model, mesh: Mesh):
    self.config = config
    self.mesh = mesh
    self.model = model

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
    embedder = Embedder(
        embed_fn,
        batch_size,
        self.config.eval.fusion,
        self.config.data.image_size,
    )
    scoring = extract.scoring_name(embedder.fusion)
    results = {}
    for protocol in _PROTOCOLS.values():
      for measured in protocol(embedder, self.config):
        provenance = {"kind": measured.kind, "scoring": scoring}
        if measured.folder:
          provenance["folder"] = os.path.abspath(measured.folder)
        if measured.align:  # how photos became faces: decisions do the same
          provenance["align"] = measured.align
        results[measured.name] = {**measured.metrics, "provenance": provenance}
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
      report.write_results(
          workdir, workdir_layout.eval_result_name(step), results
      )
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
      f"{workdir_layout.Workdir(model.workdir).checkpoints} on "
      f"{jax.device_count()} device(s)."
  )
  evaluator = Evaluator(model.config, model.module, model.mesh)
  results_dir = results_dir or model.workdir
  workdir_layout.check_writes_stay_inside(results_dir)
  writer = reporting.create_writer(
      str(workdir_layout.Workdir(results_dir).eval)
  )
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
