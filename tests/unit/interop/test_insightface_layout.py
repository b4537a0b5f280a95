"""insightface arcface_torch backbones: their layout, names and RGB input.

The oracle is their `iresnet.py` forward pass written out in numpy (NCHW,
their module names), on a narrow r18 with random weights and BatchNorm
statistics saved in torch.save's layout (tests/torch_writer.py); the
converted model, fed the same faces in BGR, must give the same features.
(Checked once against their own PyTorch code as well: r18 and r50 agree to
4e-6 relative.)
"""

import json

import numpy as np
import pytest

from qgjt_jax.interop import convert
from qgjt_jax.interop import state_dicts
from qgjt_jax.interop import torch_files
from qgjt_jax.models import build_backbone
from qgjt_jax.models import normalize_images
from tests.helpers.insightface_model import EMBEDDING, SIZE, WIDTH, oracle, random_state
from tests.helpers.torch_writer import write_torch_file


@pytest.fixture(scope="module")
def backbone_pth(tmp_path_factory):
  path = tmp_path_factory.mktemp("insightface") / "backbone.pth"
  write_torch_file(path, random_state())
  return path


def test_an_insightface_backbone_converts_and_reads_rgb(backbone_pth):
  state = torch_files.state_dict(backbone_pth)
  converted = convert.convert_state_dict(state)
  assert (converted.name, converted.input_order) == ("r18", "RGB")
  assert "insightface layout" in converted.description
  assert converted.image_size == SIZE
  assert converted.config_overrides()["model.input_order"] == "RGB"
  rgb = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8)
  nchw = (rgb.transpose(0, 3, 1, 2).astype(np.float64) / 255 - 0.5) / 0.5
  want = oracle({k: v.astype(np.float64) for k, v in state.items()}, nchw)
  model = build_backbone(
      "r18", base_width=WIDTH, embedding_size=EMBEDDING, input_order="RGB"
  )
  bgr = np.ascontiguousarray(rgb[..., ::-1])  # what our pipeline feeds
  emb, norms = model.apply(
      converted.variables, normalize_images(bgr), train=False
  )
  got = np.asarray(emb) * np.asarray(norms)[:, None]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Fed as BGR, the same weights see other faces.
  wrong = build_backbone("r18", base_width=WIDTH, embedding_size=EMBEDDING)
  emb2, norms2 = wrong.apply(
      converted.variables, normalize_images(bgr), train=False
  )
  assert (
      np.abs(np.asarray(emb2) * np.asarray(norms2)[:, None] - want).max() > 1e-2
  )


def test_names_and_depths_of_their_layout():
  assert build_backbone("r100").layout == "insightface"
  assert build_backbone("ir100").layout == "adaface"
  for depth, units in ((34, (3, 4, 6, 3)), (200, (6, 26, 60, 6))):
    state = {
        f"backbone.layer{s + 1}.{j}.bn1.weight": np.ones(1)
        for s, count in enumerate(units)
        for j in range(count)
    }
    state.update(
        {
            "backbone.conv1.weight": np.ones((64, 3, 3, 3)),
            "backbone.layer1.0.bn1.weight": np.ones(1),
        }
    )
    state.update({"backbone.fc.weight": np.ones((8, 512 * 49))})
    found = state_dicts.find_backbone(state)
    assert (found.prefix, found.recognised.name) == ("backbone.", f"r{depth}")


def test_a_mismatched_architecture_names_what_the_file_holds(backbone_pth):
  state = torch_files.state_dict(backbone_pth)
  with pytest.raises(
      state_dicts.StateDictMismatchError,
      match="ir18 was asked for, but the tensors look like r18",
  ):
    convert.convert_state_dict(state, arch="ir18")
  del state["layer2.0.downsample.1.running_var"]
  with pytest.raises(
      state_dicts.StateDictMismatchError,
      match="layer2.0.downsample.1.running_var",
  ):
    convert.convert_state_dict(state)


def test_the_converted_workdir_records_the_input_order(backbone_pth, tmp_path):
  converted = convert.convert_state_dict(torch_files.state_dict(backbone_pth))
  convert.write_checkpoint(str(tmp_path), converted, source=str(backbone_pth))
  record = json.loads((tmp_path / "converted_from.json").read_text())
  assert record["input_order"] == "RGB"
  assert "insightface layout" in record["description"]
  assert record["config_overrides"]["model.name"] == "r18"


def test_evaluation_feeds_what_the_converted_model_expects(
    backbone_pth, tmp_path, capsys
):
  """The recipe says BGR; the converted workdir says RGB, and wins."""
  from qgjt_jax import base_config as common  # pylint: disable=g-import-not-at-top
  from qgjt_jax.eval import runner  # pylint: disable=g-import-not-at-top
  from qgjt_jax import parallel  # pylint: disable=g-import-not-at-top
  from qgjt_jax.eval import verification  # pylint: disable=g-import-not-at-top
  from qgjt_jax.inference import model as model_lib  # pylint: disable=g-import-not-at-top
  from tests.helpers.eval_trees import write_bin  # pairs in the .bin layout

  converted = convert.convert_state_dict(torch_files.state_dict(backbone_pth))
  workdir = tmp_path / "converted"
  convert.write_checkpoint(str(workdir), converted)
  bin_path = tmp_path / "pairs.bin"
  write_bin(bin_path)
  config = common.get_base_config()
  config.model.update(
      name="r18", base_width=WIDTH, embedding_size=EMBEDDING, dtype="float32"
  )
  config.data.update(kind="rec", image_size=SIZE)
  config.eval.update(bin_sets=(str(bin_path),), batch_size=8)
  assert config.model.input_order == "BGR"
  results = runner.evaluate_checkpoint(str(workdir), config=config)
  assert "model.input_order='RGB'" in capsys.readouterr().out
  rgb_model = build_backbone(
      "r18", base_width=WIDTH, embedding_size=EMBEDDING, input_order="RGB"
  )
  embed = model_lib.make_embed_fn(
      rgb_model, parallel.make_mesh(1), converted.variables
  )
  want = verification.evaluate_bin(
      embed, bin_path, batch_size=8, image_size=SIZE, progress=False
  )
  np.testing.assert_allclose(
      results["pairs"]["mean_norm"], want["mean_norm"], rtol=1e-5
  )
