"""Fine-tuning: a converted PyTorch backbone trained on a small image folder.

The backbone is a narrow insightface r18 in torch.save's layout (RGB input),
converted into a workdir; the folder holds generated faces of 6 identities,
prepared into an ArrayRecord set as a user would.
"""

import shutil

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import checkpoint as ckpt
from qgjt_jax import config_checks
from qgjt_jax import finetune
from qgjt_jax import records
from qgjt_jax import stack as stack_lib
from qgjt_jax import state as state_lib
from qgjt_jax.data import prepare
from qgjt_jax.data import sources
from qgjt_jax.data import synthetic
from qgjt_jax.files import images as images_lib
from qgjt_jax.interop import convert
from qgjt_jax.interop import torch_files
from qgjt_jax.models import normalize_images
from tests.helpers import insightface_model as insightface
from tests.helpers.tiny_runs import compile_cache, run_in_process, tiny_config
from tests.helpers.torch_writer import write_torch_file

IDENTITIES, PER_IDENTITY = 6, 4


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  write_torch_file(root / "backbone.pth", insightface.random_state())
  converted = convert.convert_state_dict(
      torch_files.state_dict(root / "backbone.pth")
  )
  convert.write_checkpoint(str(root / "workdir"), converted)
  return root / "workdir", root / "backbone.pth", converted


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory):
  """The prepared image folder: (data_dir, TFDS name)."""
  root = tmp_path_factory.mktemp("faces")
  for identity in range(IDENTITIES):
    person = root / "folder" / f"person_{identity}"
    person.mkdir(parents=True)
    for view in range(PER_IDENTITY):
      photo = synthetic.render_photo(0, identity, view, 64)
      cv2.imwrite(str(person / f"{view}.jpg"), photo)
  prepare.prepare(
      "image_folder",
      src=str(root / "folder"),
      data_dir=str(root / "tfds"),
      name="mine",
  )
  return root / "tfds", "face_image_folder/mine"


def _config(folder_set, **changes):
  data_dir, name = folder_set
  return tiny_config(
      **{
          "model.name": "r18",
          "model.base_width": insightface.WIDTH,
          "model.embedding_size": insightface.EMBEDDING,
          "data.image_size": insightface.SIZE,
          "data.kind": "tfds",
          "data.tfds_name": name,
          "data.tfds_data_dir": str(data_dir),
          "global_batch_size": 8,
          "num_epochs": 2.0,
          **changes,
      }
  )


def test_the_backbone_and_class_means_are_what_the_run_starts_from(
    converted_dir, folder_set
):
  workdir, _, converted = converted_dir
  config = finetune.check_source(
      _config(folder_set, init_from=str(workdir), init_classifier="class_means")
  )
  assert config.model.input_order == "RGB"  # the weights' own convention
  source = sources.train_source(config)
  with compile_cache():
    stack = stack_lib.build_stack(
        config, num_classes=source.num_classes, steps_per_epoch=3
    )
    state = finetune.initialise(
        stack.init_state(jax.random.key(0)), stack, config, source
    )
  for a, b in zip(
      jax.tree.leaves(converted.variables["params"]),
      jax.tree.leaves(state.params["backbone"]),
  ):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(
      jax.tree.leaves(converted.variables["batch_stats"]),
      jax.tree.leaves(state.batch_stats),
  ):
    np.testing.assert_array_equal(a, b)
  # Each column: the normalised mean of its class's unit embeddings.
  images = np.stack(
      [images_lib.decode_image(source[i]["image"]) for i in range(len(source))]
  )
  images = np.stack(
      [
          cv2.resize(x, (insightface.SIZE,) * 2, interpolation=cv2.INTER_AREA)
          for x in images
      ]
  )
  labels = np.array([int(source[i]["label"]) for i in range(len(source))])
  emb, _ = stack.model.apply(
      converted.variables, normalize_images(images), train=False
  )
  kernel = np.asarray(state.params["classifier"]["kernel"])
  for c in range(source.num_classes):
    mean = np.asarray(emb)[labels == c].mean(0)
    np.testing.assert_allclose(
        kernel[:, c], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
def test_fine_tuning_end_to_end_then_resuming_without_the_source(
    converted_dir, folder_set, tmp_path
):
  workdir, pth, converted = converted_dir
  # The .pth itself works as well as its converted workdir.
  source_copy = tmp_path / "backbone.pth"
  shutil.copy(pth, source_copy)
  # A recipe naming another model than the source's: the source's is
  # trained, and the rerun below takes it from the run's own record.
  other_model = {"model.name": "ir18", "model.embedding_size": 512}
  config = _config(
      folder_set,
      init_from=str(source_copy),
      init_classifier="class_means",
      **{"optim.backbone_lr_scale": 0.0, "num_epochs": 1.0, **other_model},
  )
  run = tmp_path / "run"
  _, output = run_in_process(config, run)
  assert "Starting from the weights of" in output
  assert "model.input_order='RGB'" in output and "step 3/3 " in output
  state = _saved_state(run)
  # A zero backbone learning rate: the weights are the pretrained ones (the
  # BatchNorm statistics moved), the classifier trained.
  for a, b in zip(
      jax.tree.leaves(converted.variables["params"]),
      jax.tree.leaves(state["params"]["backbone"]),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert records.recorded_model_settings(str(run))["model.input_order"] == "RGB"
  # Longer, with the source gone: the run resumes from its own checkpoint.
  source_copy.unlink()
  longer = _config(
      folder_set,
      init_from=str(source_copy),
      init_classifier="class_means",
      **{"optim.backbone_lr_scale": 0.0, "num_epochs": 2.0, **other_model},
  )
  _, output = run_in_process(longer, run)
  assert "Resumed from step 3 " in output and "Starting from" not in output
  assert "step 6/6 " in output


def _saved_state(workdir):
  from tests.helpers.tiny_runs import load_state  # pylint: disable=g-import-not-at-top

  manager = ckpt.make_manager(str(workdir / "checkpoints"))
  return load_state(workdir, manager.latest_step())


def test_the_source_s_model_is_adopted_unless_a_flag_says_otherwise(
    converted_dir, folder_set, tmp_path
):
  workdir, _, _ = converted_dir
  recipe = _config(
      folder_set,
      init_from=str(workdir),
      **{"model.name": "ir18", "model.embedding_size": 512},
  )
  adopted = finetune.check_source(recipe)
  assert (
      adopted.model.name,
      adopted.model.embedding_size,
      adopted.model.input_order,
  ) == ("r18", insightface.EMBEDDING, "RGB")
  with pytest.raises(
      config_checks.ConfigError,
      match=r"--config.model.name='ir18' contradicts the model "
      r"in config.init_from=.*model.name = 'r18'",
  ):
    finetune.check_source(recipe, explicit=("model.name",))
  with pytest.raises(config_checks.ConfigError, match="does not exist"):
    finetune.check_source(
        _config(folder_set, init_from=str(tmp_path / "nope.pth"))
    )
  (tmp_path / "garbage.pth").write_text("text")
  with pytest.raises(
      config_checks.ConfigError, match="garbage.pth is not a PyTorch checkpoint"
  ):
    finetune.check_source(
        _config(folder_set, init_from=str(tmp_path / "garbage.pth"))
    )


def test_a_rerun_builds_the_model_its_record_holds(
    converted_dir, folder_set, tmp_path
):
  """A fine-tune stopped before its first checkpoint (or resumed after
  one) is rerun with the model its config.json records, the source's,
  though the recipe names another and the source is gone; a flag typed
  against the record is refused."""
  from qgjt_jax import train  # pylint: disable=g-import-not-at-top

  workdir, _, _ = converted_dir
  other_model = {"model.name": "ir18", "model.embedding_size": 512}
  first = finetune.check_source(
      _config(folder_set, init_from=str(workdir), **other_model)
  )
  run = tmp_path / "run"
  records.record_config(str(run), first.to_dict(), "test")
  gone = _config(folder_set, init_from=str(tmp_path / "gone"), **other_model)
  rerun = train._weights_config(gone, str(run), ())
  for key in ("name", "embedding_size", "input_order"):
    assert rerun.model[key] == first.model[key], key
  assert rerun.model.name == "r18"
  with pytest.raises(config_checks.ConfigError, match="model.name='ir18'"):
    train._weights_config(gone, str(run), ("model.name",))


def test_the_backbone_learning_rate_scale():
  from qgjt_jax import optim  # pylint: disable=g-import-not-at-top

  config = tiny_config(
      **{
          "optim.backbone_lr_scale": 0.25,
          "optim.weight_decay": 0.0,
          "optim.momentum": 0.0,
      }
  )
  tx = optim.make_optimizer(config.optim, lambda step: 0.1)
  params = {
      "backbone": {"w": jnp.ones(3)},
      "classifier": {"kernel": jnp.ones(2)},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["backbone"]["w"], -0.025)
  np.testing.assert_allclose(updates["classifier"]["kernel"], -0.1)


def test_measured_quality_is_the_pretrained_norms_of_both_views(
    converted_dir, folder_set
):
  """The statistics an imported model starts from: the mean and unbiased
  std of its norms on the first epoch's two views, in the mode training
  runs (frozen BatchNorms here: the evaluation's norms)."""
  from qgjt_jax.data import degrade, pipeline  # pylint: disable=g-import-not-at-top

  workdir, _, converted = converted_dir
  config = finetune.check_source(
      _config(
          folder_set, init_from=str(workdir), **{"model.batch_norm": "frozen"}
      )
  )
  source = sources.train_source(config)
  model = state_lib.build_model(config)
  stats = finetune.measured_quality(config, model, converted.variables, source)
  views = pipeline.TwoViews(
      source,
      config.seed,
      degrade.view_config_from(config.data.view),
      config.data.image_size,
  )
  order = np.random.default_rng(config.seed).permutation(len(source))
  batch = config.global_batch_size
  items = [views((0, int(i))) for i in order[: len(order) // batch * batch]]
  images = np.concatenate(
      [np.stack([b[k] for b in items]) for k in ("image_h", "image_l")]
  )
  _, norms = model.apply(
      converted.variables, normalize_images(images), train=False
  )
  assert float(stats.mean) == pytest.approx(float(np.mean(norms)), rel=1e-4)
  assert float(stats.std) == pytest.approx(
      float(np.std(norms, ddof=1)), rel=1e-3
  )


def test_frozen_batch_norm_trains_on_the_running_statistics(converted_dir):
  """model.batch_norm="frozen": the train-mode forward normalises as
  evaluation does and leaves the statistics as they were."""
  from qgjt_jax.models import layers  # pylint: disable=g-import-not-at-top

  _, _, converted = converted_dir
  model = state_lib.build_model(
      tiny_config(
          **{
              "model.name": "r18",
              "model.base_width": insightface.WIDTH,
              "model.embedding_size": insightface.EMBEDDING,
              "model.dtype": "float32",
              "model.dropout_rate": 0.0,
          }
      )
  )
  images = normalize_images(
      np.random.default_rng(0).integers(
          0, 256, (4, insightface.SIZE, insightface.SIZE, 3), np.uint8
      )
  )
  apply = lambda: model.apply(
      converted.variables, images, train=True, mutable=["batch_stats"]
  )
  with layers.frozen_statistics():
    (emb, norms), updates = apply()
  want_emb, want_norms = model.apply(converted.variables, images, train=False)
  np.testing.assert_allclose(emb, want_emb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
  jax.tree.map(
      np.testing.assert_array_equal,
      updates["batch_stats"],
      converted.variables["batch_stats"],
  )
  (_, moved), updates = apply()  # outside: batch statistics, updated
  assert np.abs(np.asarray(moved) - np.asarray(want_norms)).max() > 1e-3
  assert not np.array_equal(
      updates["batch_stats"]["output_layer"]["feature_bn"]["mean"],
      converted.variables["batch_stats"]["output_layer"]["feature_bn"]["mean"],
  )
