"""Every backbone family against insightface's own PyTorch code, and the
registry that is the only door to them.

tests/fixtures/zoo/*.npz were written by make_fixtures.py there, which runs
arcface_torch's `backbones.get_model(name)` in eval mode with seeded
weights (tests/helpers/zoo.py) on two seeded images. Here the same weights
are built from the PyTorch names our family declares, converted, and run
through our module: the names and shapes must be theirs exactly, the
features theirs to float32 rounding.
"""

import functools

import jax
import numpy as np
import pytest

from qgjt_jax import models
from qgjt_jax.interop import state_dicts
from qgjt_jax.models import layers
from tests.helpers import zoo

# Measured: 6e-8 at most (1 - cos), 6e-7 on the norms.
_COSINE_TOLERANCE = 1e-5


def _fixture(name):
  path = zoo.FIXTURES / f"{name}.npz"
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def seeded_state(model, image_size: int) -> dict:
  """The seeded state dict of `model` under its family's PyTorch names."""
  family = models.family_of_module(model)
  shapes = layers.init_shapes(model, (image_size, image_size))
  return {
      t.torch: zoo.tensor(t.torch, t.torch_shape, layer.kind)
      for layer in family.torch_layers(model, image_size)
      for t in state_dicts.tensors_of(layer, shapes)
  }


@functools.lru_cache(maxsize=None)
def _forward(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


@pytest.mark.parametrize(
    "name",
    [
        "mbf",
        "mbf_large",
        "vit_t",
        "vit_s",
        pytest.param("vit_b", marks=pytest.mark.slow),
        pytest.param("vit_l", marks=pytest.mark.slow),
    ],
)
def test_matches_arcface_torch(name):
  fixture = _fixture(name)
  theirs = {
      str(n): tuple(int(d) for d in s.split(",") if d)
      for n, s in zip(fixture["names"], fixture["shapes"])
  }
  model = models.build_backbone(name, input_order="RGB")
  state = seeded_state(model, zoo.IMAGE_SIZE)
  assert {k: v.shape for k, v in state.items()} == theirs
  found = state_dicts.find_backbone(state)
  assert found.recognised.name == name
  assert (found.recognised.image_size, found.recognised.embedding_size) == (
      zoo.IMAGE_SIZE,
      512,
  )
  variables = state_dicts.to_flax(found.tensors, model, zoo.IMAGE_SIZE)
  rgb = zoo.images(seed=int(fixture["image_seed"]))
  bgr = np.ascontiguousarray(rgb.transpose(0, 2, 3, 1)[..., ::-1])
  embeddings, norms = _forward(model)(variables, bgr)
  want = fixture["features"]
  want_norms = np.linalg.norm(want, axis=1)
  cosine = np.sum(np.asarray(embeddings) * want / want_norms[:, None], 1)
  assert np.max(1 - cosine) <= _COSINE_TOLERANCE
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)


_SMALL = {
    "ir18": (32, dict(base_width=4, embedding_size=8)),
    "r50": (32, dict(base_width=4, embedding_size=8)),
    "ir_se50": (32, dict(base_width=8, embedding_size=8)),
    "ir152": (32, dict(base_width=4, embedding_size=8)),
    "mbf": (40, {}),
    "mbf_large": (40, {}),
    "mbf_buffalo": (40, {}),
    "vit_t": (27, {}),
}


@pytest.mark.parametrize("name", sorted(_SMALL))
def test_every_variable_has_one_pytorch_name_both_ways(name):
  """to_torch then to_flax is the identity, every leaf covered once."""
  size, settings = _SMALL[name]
  model = models.build_backbone(name, **settings)
  shapes = layers.init_shapes(model, (size, size))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      {c: shapes[c] for c in ("params", "batch_stats")},
  )
  state = state_dicts.to_torch(variables, model, size)
  leaves = len(jax.tree.leaves(variables))
  counters = sum(k.endswith("num_batches_tracked") for k in state)
  assert len(state) - counters == leaves
  found = state_dicts.find_backbone(
      {f"module.{k}": v for k, v in state.items()}
  )
  assert found.recognised.name == name
  back = state_dicts.to_flax(found.tensors, model, size)
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_registry_names_and_refusals():
  names = models.backbone_names()
  assert len(names) == len(set(names))
  assert {
      "ir50",
      "r100",
      "mbf",
      "mbf_large",
      "mbf_buffalo",
      "vit_t",
      "vit_s",
      "vit_b",
      "vit_l",
  } <= set(names)
  assert models.family_of("IR_101") == (models.family_of("ir100")[0], "ir100")
  with pytest.raises(ValueError, match="mbf_buffalo.*vit_l|vit_l.*mbf"):
    models.build_backbone("resnet50")
  with pytest.raises(ValueError, match="mbf .*has no setting base_width"):
    models.build_backbone("mbf", base_width=16)


def test_grouped_convolutions_compute_the_same_on_every_branch():
  """The CPU's sum of shifted slices and XLA's grouped convolution (what
  accelerators and the ONNX file run) agree, for depthwise and for the
  two-channel groups of mbf's second layer, strided or not."""
  rng = np.random.default_rng(0)
  for groups, per_group, stride in ((8, 1, 1), (8, 1, 2), (4, 2, 1)):
    x = rng.normal(size=(2, 9, 9, groups * per_group)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, per_group, groups * per_group)).astype(
        np.float32
    )
    args = (stride, 1, groups)
    np.testing.assert_allclose(
        layers._grouped_conv_by_shifts(x, kernel, *args),  # pylint: disable=protected-access
        layers._grouped_conv_native(x, kernel, *args),  # pylint: disable=protected-access
        rtol=1e-5,
        atol=1e-5,
    )
