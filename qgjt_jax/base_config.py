"""Defaults shared by every recipe; each recipe file overrides what it changes.

A recipe (configs/*.py, or a file of your own anywhere) starts from
`base_config.get_base_config()`; it imports only the installed package, so
it loads from any working directory. Each key is declared once, with its
default and what it means (`meanings()`; `python -m qgjt_jax.main
--config=RECIPE --mode=keys` prints them with their values and allowed
values), and `--config.KEY=VALUE` overrides any of them.
"""

import ast
import importlib.util
import os
import sys
from typing import Any

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
      root not in sys.path
  ):
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
  return any(
      isinstance(node, ast.FunctionDef) and node.name == "get_config"
      for node in tree.body
  )


# Every key's meaning, filled as get_base_config declares the keys.
_MEANINGS: dict[str, str] = {}


def _keys(
    prefix: str, **declared: tuple[Any, str]
) -> ml_collections.ConfigDict:
  """A config section from KEY=(default, meaning), each key declared once;
  a default that is a type declares an optional key of that type, unset."""
  section = ml_collections.ConfigDict()
  for name, (default, meaning) in declared.items():
    _MEANINGS[prefix + name] = meaning
    section[name] = (
        ml_collections.FieldReference(None, field_type=default)
        if isinstance(default, type)
        else default
    )
  return section


def get_base_config() -> ml_collections.ConfigDict:
  """The defaults (see module); `meanings()` says what each key means."""
  config = _keys(
      "",
      seed=(0, "the run's seed: initialisation, data order, augmentation"),
      init_from=(
          str,
          "fine-tuning (qgjt_jax/finetune.py): start a fresh "
          "run from the backbone of a workdir or of a weight file "
          "(.pth, .ckpt, .npz, .safetensors, .onnx)",
      ),
      init_classifier=(
          "random",
          "with init_from: random, or class_means "
          "(each class's mean embedding through that "
          "backbone)",
      ),
      init_quality=(
          "config",
          "with init_from: config (quality.init_mean "
          "and init_std) or measured (the pretrained model's "
          "norms on the training images' two views)",
      ),
      num_epochs=(26.0, "epochs to train"),
      num_train_steps=(
          0,
          "steps to train, whatever the set's size (0: num_epochs decides; "
          "else num_epochs is set to these steps in epochs of the set)",
      ),
      global_batch_size=(
          512,
          "faces a step over all devices (each seen in two views)",
      ),
      model_parallelism=(
          1,
          "devices the classifier's class axis is split "
          "over (>1 for very many identities; resuming "
          "needs the same padded width)",
      ),
      log_every_steps=(100, "steps between logged metrics"),
      checkpoint_every_steps=(2000, "steps between checkpoints"),
      keep_checkpoints=(3, "checkpoints kept in the workdir"),
      eval_every_steps=(
          10000,
          "steps between evaluations; 0 at the end only",
      ),
      max_consecutive_nonfinite=(
          20,
          "consecutive non-finite steps (each "
          "skipped) after which the run stops",
      ),
      profile_steps=(
          (),
          "a jax.profiler trace of steps [START, STOP) into "
          "WORKDIR/profile (process 0), e.g. (100, 110); () "
          "traces nothing (README, Speed)",
      ),
  )
  # Encoder (docs/METHOD.md section 1).
  config.model = _keys(
      "model.",
      name=(
          "ir50",
          "a backbone of the registry (qgjt_jax.models.backbone_names())",
      ),
      base_width=(64, "the first stage's channels (families that have it)"),
      embedding_size=(512, "the embedding's dimension"),
      dropout_rate=(
          0.4,
          "dropout before the embedding layer (families that have it)",
      ),
      dtype=(
          "bfloat16",
          "the compute dtype; parameters and the loss math stay float32",
      ),
      remat=(
          "none",
          "block recomputes each residual unit's activations in "
          "the backward pass (less memory, about a third more compute)",
      ),
      input_order=(
          "BGR",
          "the channel order the weights expect (RGB for "
          "insightface's published models); images are BGR "
          "everywhere else",
      ),
      batch_norm=(
          "batch",
          "batch: each batch's statistics, the running "
          "ones updated (PyTorch's train mode); frozen: the running "
          "statistics throughout (fine-tuning on few faces)",
      ),
  )
  config.data = _keys(
      "data.",
      kind=(
          "rec",
          "where the training images come from: rec (insightface "
          "train.rec/train.idx read directly), tfds (a prepared "
          "ArrayRecord set) or synthetic (the generated face-like set)",
      ),
      rec_dir=(str, "kind rec: the folder of train.rec and train.idx"),
      tfds_name=(
          str,
          "kind tfds: the set's name, e.g. face_image_folder/NAME",
      ),
      tfds_data_dir=(
          str,
          "kind tfds: the folder data.prepare wrote it to (default: TFDS's)",
      ),
      image_size=(112, "the crop's side in pixels"),
      worker_count=(8, "input processes; 0 reads in-process"),
  )
  # The degraded (L) view, docs/METHOD.md section 6 (data/degrade.py): every
  # field of degrade.ViewConfig; unset takes the recipe's value.
  config.data.view = _keys(
      "data.view.",
      recipe=(
          "qgface",
          "qgface: always downscaled, JPEG'd and upscaled; "
          "adaface: AdaFace's augmenter, each step with its "
          "probability",
      ),
      min_scale=(float, "the smallest downscale factor"),
      max_scale=(float, "the largest downscale factor"),
      jpeg_quality=(int, "the JPEG quality of the degraded view (0: none)"),
      crop_p=(float, "the probability of a random crop"),
      crop_scale=(tuple, "the crop's area range"),
      crop_ratio=(tuple, "the crop's aspect-ratio range"),
      jitter_p=(float, "the probability of colour jitter"),
      jitter=(float, "the colour jitter's strength"),
      rotate_p=(float, "the probability of a rotation"),
      max_rotation=(float, "the largest rotation in degrees"),
      flip_p=(float, "the probability of a horizontal flip"),
      lowres_p=(
          float,
          "the probability of the low-resolution step (adaface)",
      ),
  )
  config.data.synthetic = _keys(
      "data.synthetic.",
      num_identities=(100, "kind synthetic: training identities"),
      images_per_identity=(40, "kind synthetic: images of each"),
      eval_identities=(
          40,
          "kind synthetic: identities of the evaluation pairs",
      ),
      eval_pairs=(300, "kind synthetic: evaluation pairs (half genuine)"),
      seed=(
          0,
          "kind synthetic: which faces exist, apart from the run's seed",
      ),
  )
  # The method: quality indicator, margin head (HQ branch), contrastive loss
  # (LQ branch) and negatives queue, declared in qgjt_jax/method/settings.py.
  for section in settings.SECTIONS:
    config[section.NAME] = section.defaults()
  # SGD with momentum, coupled weight decay (PyTorch's order) on everything
  # but BatchNorm parameters.
  config.optim = _keys(
      "optim.",
      lr=(0.1, "the learning rate at global_batch_size"),
      momentum=(0.9, "SGD momentum"),
      weight_decay=(5e-4, "weight decay (not on BatchNorm parameters)"),
      schedule=("multistep", "the learning rate's schedule after warm-up"),
      milestones=(
          (12, 20, 24),
          "multistep: the epochs at which the rate is multiplied by gamma",
      ),
      gamma=(0.1, "multistep: the factor at each milestone"),
      warmup_epochs=(0.0, "epochs of linear warm-up"),
      grad_clip_norm=(
          0.0,
          "the gradient's global norm is clipped to this; "
          "0 disables clipping",
      ),
      clip_each_loss=(
          False,
          "clip the margin loss's and the contrastive loss's gradients to "
          "grad_clip_norm each, then add them (the sum is not clipped "
          "again), so neither takes the other's share of the step",
      ),
      backbone_lr_scale=(
          1.0,
          "multiplies the backbone's learning rate "
          "(below 1 when fine-tuning; 0 freezes it)",
      ),
  )
  config.eval = _keys(
      "eval.",
      bin_sets=(
          (),
          "insightface .bin verification sets (paths), run "
          "periodically and by --mode=eval",
      ),
      low_res=(
          (),
          "pixel sizes: low-resolution variants of the sets and own folders",
      ),
      batch_size=(256, "faces per forward pass"),
      fusion=(
          "pre_norm_add",
          "how a face and its mirror image combine "
          "(docs/DECISIONS.md: decisions use pre_norm_add)",
      ),
      dtype=(
          "float32",
          "evaluation's compute dtype, float32 as the "
          "authors' (whatever the training dtype)",
      ),
      tinyface_root=(
          str,
          "TinyFace's root, scored on the aligned copies "
          "under it as the authors do",
      ),
      tinyface_aligned_dir=(
          "aligned_pad_0.1_pad_high",
          "the aligned "
          "copies' folder under tinyface_root (empty: the "
          "raw images, which the table then says)",
      ),
      scface_root=(str, "SCface's root"),
      scface_aligned_dir=(
          "",
          "the aligned copies' folder under "
          "scface_root (empty: the raw images)",
      ),
      ijb_root=(str, "the IJB-B/C root (insightface's layout)"),
      ijb_target=("IJBC", "which IJB set"),
      ijb_pooling=(
          "norm",
          "how IJB templates pool their images: norm "
          "weights each by its fused norm (insightface's), unit "
          "pools unit features (the authors' in-training path)",
      ),
      tar_rule=(
          "insightface",
          "which ROC point of several at one FAR "
          "counts (docs/FIDELITY.md); own-data sets too",
      ),
      ijb_detector_score=(
          False,
          "also weight each IJB image by its "
          "detector score (insightface's scripts do)",
      ),
      folders=(
          (),
          "your own folders of people (one sub-folder per person; "
          "qgjt_jax/eval/own_data.py)",
      ),
      pairs_files=((), "your own text files of 'A B LABEL' pairs"),
      calibration_folders=(
          (),
          "folders of people kept out of any gallery: "
          "compare and identify take their thresholds "
          "from these first (docs/DECISIONS.md)",
      ),
      align=(
          "none",
          "detect finds and aligns each photo's face first (the "
          ".[align] extra); none takes the images as aligned crops",
      ),
  )
  # What a file handed to us may declare before it is refused
  # (qgjt_jax/files/limits.py).
  config.limits = ml_collections.ConfigDict(dict(limits.DEFAULTS))
  return config


def meanings() -> dict[str, str]:
  """{"section.key": what it means} of every key of the base config (the
  method's sections from their settings, the limits from theirs)."""
  get_base_config()
  found = dict(_MEANINGS)
  for section in settings.SECTIONS:
    found.update(section.meanings())
  found.update({f"limits.{k}": v for k, v in limits.HELP.items()})
  return found
