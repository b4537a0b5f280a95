"""Defaults shared by every recipe; each recipe file overrides what it changes.

A recipe (configs/*.py, or a file of your own anywhere) starts from
`base_config.get_base_config()`; it imports only the installed package, so
it loads from any working directory. Every key here is documented where it
is used; `python -m qgjt_jax.main --config=configs/NAME.py
--config.KEY=VALUE` overrides any of them.
"""
import ast
import importlib.util
import os
import sys

import ml_collections

from qgjt_jax.files import limits
from qgjt_jax.method import settings


def make_siblings_importable(recipe: str) -> None:
  """Puts the folder above a recipe's package on sys.path, so that a recipe
  builds on another (`from configs import ms1m`) whatever the working
  directory: a recipe's own folder is a package when it holds __init__.py."""
  folder = os.path.dirname(os.path.abspath(recipe))
  root = os.path.dirname(folder)
  if os.path.isfile(os.path.join(folder, "__init__.py")) and (
      root not in sys.path):
    sys.path.insert(0, root)


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of a recipe as --config names it: PATH, or PATH:ARG for
  `get_config(ARG)`. The file is Python and runs as code."""
  path, _, arg = spec.partition(":")
  make_siblings_importable(path)
  name = f"_recipe_{os.path.splitext(os.path.basename(path))[0]}"
  spec_ = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def defines_get_config(path: str) -> bool:
  """Whether a recipe file defines get_config (read, not run)."""
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
  except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
    return True  # its own error says more
  return any(isinstance(node, ast.FunctionDef) and node.name == "get_config"
             for node in tree.body)


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Fine-tuning (qgjt_jax/finetune.py): start a fresh run from the backbone
  # of a workdir or of a weight file (.pth, .ckpt, .npz, .safetensors,
  # .onnx); init_classifier "random", or "class_means" (each class's mean
  # embedding through that backbone); init_quality "config"
  # (quality.init_mean/init_std) or "measured" (the pretrained model's norms
  # on the training images' two views).
  config.init_from = ml_collections.FieldReference(None, field_type=str)
  config.init_classifier = "random"
  config.init_quality = "config"

  # Encoder (docs/METHOD.md section 1): a name of the backbone registry
  # (qgjt_jax.models.backbone_names(); base_width and dropout_rate are
  # settings of the families that have them, ignored by the others). dtype is
  # the compute dtype; parameters and the loss math stay float32. remat:
  # "none", or "block" to recompute each residual unit's activations in the
  # backward pass (less memory for deep models or big batches, about a third
  # more compute). input_order: the channel order the weights expect ("RGB"
  # for insightface's published models); images are BGR everywhere else.
  # batch_norm: "batch" (training normalises with each batch's statistics
  # and updates the running ones, as PyTorch's train mode) or "frozen" (the
  # running statistics throughout, never updated: fine-tuning on few faces).
  config.model = ml_collections.ConfigDict(dict(
      name="ir50", base_width=64, embedding_size=512, dropout_rate=0.4,
      dtype="bfloat16", remat="none", input_order="BGR", batch_norm="batch"))

  # Where the training images come from. kind: "rec" (insightface
  # train.rec/train.idx read directly), "tfds" (a prepared ArrayRecord set) or
  # "synthetic" (the generated face-like set).
  config.data = ml_collections.ConfigDict(dict(
      kind="rec",
      rec_dir=ml_collections.FieldReference(None, field_type=str),
      tfds_name=ml_collections.FieldReference(None, field_type=str),
      tfds_data_dir=ml_collections.FieldReference(None, field_type=str),
      image_size=112,
      worker_count=8,
      # The degraded (L) view, docs/METHOD.md section 6 (data/degrade.py). Every
      # field of degrade.ViewConfig; None takes the recipe's value
      # ("qgface": always downscaled, JPEG'd and upscaled; "adaface":
      # AdaFace's augmenter, each step with its probability).
      view=ml_collections.ConfigDict(
          {"recipe": "qgface",
           **{name: ml_collections.FieldReference(None, field_type=kind)
              for name, kind in (
                  ("min_scale", float), ("max_scale", float),
                  ("jpeg_quality", int), ("crop_p", float),
                  ("crop_scale", tuple), ("crop_ratio", tuple),
                  ("jitter_p", float), ("jitter", float),
                  ("rotate_p", float), ("max_rotation", float),
                  ("flip_p", float), ("lowres_p", float))}}),
  ))
  # Synthetic set sizes (used when data.kind == "synthetic").
  config.data.synthetic = ml_collections.ConfigDict(dict(
      num_identities=100, images_per_identity=40, eval_identities=40,
      eval_pairs=300, seed=0))

  # The method: quality indicator, margin head (HQ branch), contrastive loss
  # (LQ branch) and negatives queue. Each section's keys, defaults, allowed
  # values and meaning are in qgjt_jax/method/settings.py, one class each.
  for section in settings.SECTIONS:
    config[section.NAME] = section.defaults()

  # Optimiser: SGD with momentum, coupled weight decay (PyTorch order) on
  # everything but BatchNorm parameters. backbone_lr_scale multiplies the
  # backbone's learning rate (below 1 when fine-tuning; 0 freezes it).
  config.optim = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, weight_decay=5e-4,
      schedule="multistep", milestones=(12, 20, 24), gamma=0.1,
      warmup_epochs=0.0, grad_clip_norm=0.0, backbone_lr_scale=1.0))
  config.num_epochs = 26.0
  config.global_batch_size = 512
  # Split the classifier's class axis over this many devices (>1 for very
  # many identities; the batch is split over all devices either way). W gets
  # zero columns up to a multiple of it, so resuming with another value
  # needs the same padded width.
  config.model_parallelism = 1

  # Loop.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval_every_steps = 10000
  # Stop after this many consecutive non-finite steps (each is skipped).
  config.max_consecutive_nonfinite = 20
  # A jax.profiler trace of steps [START, STOP) into WORKDIR/profile (process
  # 0), e.g. (100, 110); () traces nothing. Open it with TensorBoard's
  # profile plugin or xprof (README, "Speed").
  config.profile_steps = ()

  # Evaluation: insightface .bin verification sets to run periodically and in
  # --mode=eval (paths), plus low-resolution variants of them (pixel sizes).
  # TinyFace and SCface are scored on the aligned copies under their roots,
  # as the authors do (tinyface_aligned_dir is their TinyFace default; an
  # empty name means the raw images, which the table then says). dtype: the
  # compute dtype of evaluation, float32 as the authors' (whatever the
  # training dtype).
  config.eval = ml_collections.ConfigDict(dict(
      bin_sets=(), low_res=(), batch_size=256, fusion="pre_norm_add",
      dtype="float32",
      tinyface_root=ml_collections.FieldReference(None, field_type=str),
      tinyface_aligned_dir="aligned_pad_0.1_pad_high",
      scface_root=ml_collections.FieldReference(None, field_type=str),
      scface_aligned_dir="",
      ijb_root=ml_collections.FieldReference(None, field_type=str),
      ijb_target="IJBC",
      # How IJB templates pool their images' features: "norm" weights each
      # by its fused norm (insightface's and the authors' standalone
      # script's), "unit" pools unit features (the authors' in-training
      # path). tar_rule: which ROC point of several at one FAR counts,
      # "insightface" or "authors" (docs/FIDELITY.md); own-data sets too.
      # ijb_detector_score: also weight each image by its detector score
      # (insightface's scripts do; AdaFace and QGFace do not); every IJB
      # result names the choice.
      ijb_pooling="norm", tar_rule="insightface", ijb_detector_score=False,
      # Your own faces (qgjt_jax/eval/own_data.py): folders of one
      # sub-folder per person, and text files of "A B LABEL" pairs. align
      # "detect" finds and aligns the face of each photo first (the
      # `.[align]` extra); "none" takes the images as aligned crops.
      # calibration_folders are scored as folders are, and are where
      # compare and identify take their thresholds from first: photos of
      # people who are not in any gallery you will search
      # (qgjt_jax/inference/decisions.py).
      folders=(), pairs_files=(), calibration_folders=(), align="none"))

  # What a file handed to us may declare before it is refused (checkpoints,
  # .bin/.rec sets, image folders, embed/compare images): qgjt_jax/files/limits.py.
  config.limits = ml_collections.ConfigDict(dict(limits.DEFAULTS))
  return config
