"""IResNet: shapes, parameter counts, dtypes, train-mode state, input sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax.models import build_backbone
from qgjt_jax.models import IResNet
from qgjt_jax.models import normalize_images
from qgjt_jax.models.layers import count_params
from qgjt_jax.models.layers import PReLU

DEPTHS = (18, 34, 50, 100, 152, 200)


def _abstract(model, image_size=(112, 112), batch=2):
  """(variables, (embeddings, norms)) as shapes, from one trace, no compute."""
  return _abstract_cached(model, tuple(image_size), batch)


@functools.lru_cache(maxsize=None)
def _abstract_cached(model, image_size, batch):
  images = jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.float32)
  outputs, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False),
      images,
  )
  return variables, outputs


def _shapes(model, image_size=(112, 112)):
  return _abstract(model, image_size)[0]


def random_variables(model, image_size, seed=0):
  """Random (not initial) variables, drawn in numpy: compiling `init` costs
  more than the tests that use it."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    if name == "negative_slope":
      return rng.uniform(0, 0.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)  # bias, mean

  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(draw(p, x), jnp.float32),
      _shapes(model, image_size),
  )


# One small network (IR-18 at width 4 on 56x56 images) serves the tests that
# compute, each jitted once.
TINY = IResNet(18, base_width=4, embedding_size=16)
TINY_SIZE = (56, 56)


@pytest.fixture(scope="module")
def tiny():
  variables = random_variables(TINY, TINY_SIZE)
  images = jax.random.normal(jax.random.key(1), (3, *TINY_SIZE, 3))
  return variables, images


@functools.partial(jax.jit, static_argnames=("model",))
def _eval(model, variables, images):
  return model.apply(variables, images, train=False)


@jax.jit
def _train(variables, images, key):
  return TINY.apply(
      variables,
      images,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": key},
  )


@pytest.mark.parametrize(
    "depth,use_se", [(d, False) for d in DEPTHS] + [(50, True), (200, True)]
)
def test_output_shapes_and_dtypes(depth, use_se):
  # The published models, so the parameter-count tests reuse these traces.
  variables, (embeddings, norms) = _abstract(IResNet(depth, use_se=use_se))
  assert embeddings.shape == (2, 512) and embeddings.dtype == jnp.float32
  assert norms.shape == (2,) and norms.dtype == jnp.float32
  assert set(variables) == {"params", "batch_stats"}


def test_embeddings_are_unit_vectors_with_their_norms(tiny):
  variables, images = tiny
  embeddings, norms = _eval(TINY, variables, images)
  assert embeddings.shape == (3, 16) and norms.shape == (3,)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(norms) > 0)


def _reference_param_count(
    stage_units, bottleneck, use_se, width=64, embedding=512, side=7
):
  """Parameter count of the published architecture, counted layer by layer.

  Written from the architecture description (not from our module): conv
  weights, BatchNorm scale+offset, per-channel PReLU slopes, the SE 1x1 convs,
  the final Linear with bias; the last BatchNorm1d has no parameters.
  """
  bn = lambda c: 2 * c
  total = 3 * 3 * 3 * width + bn(width) + width  # stem
  in_c = width
  for stage, units in enumerate(stage_units):
    out_c = width * (4 if bottleneck else 1) * 2**stage
    for u in range(units):
      c_in = in_c if u == 0 else out_c
      if c_in != out_c:
        total += c_in * out_c + bn(out_c)  # conv1x1 shortcut
      if bottleneck:
        r = out_c // 4
        total += (
            bn(c_in)
            + c_in * r
            + bn(r)
            + r
            + 9 * r * r
            + bn(r)
            + r
            + r * out_c
            + bn(out_c)
        )
      else:
        total += (
            bn(c_in)
            + 9 * c_in * out_c
            + bn(out_c)
            + out_c
            + 9 * out_c * out_c
            + bn(out_c)
        )
      if use_se:
        total += 2 * out_c * (out_c // 16)
    in_c = out_c
  total += bn(in_c) + in_c * side * side * embedding + embedding
  return total


@pytest.mark.parametrize(
    "name,stage_units,bottleneck,use_se",
    [
        ("ir50", (3, 4, 14, 3), False, False),
        ("ir100", (3, 13, 30, 3), False, False),
        ("ir_se50", (3, 4, 14, 3), False, True),
        ("ir200", (3, 24, 36, 3), True, False),
    ],
)
def test_parameter_count_matches_architecture(
    name, stage_units, bottleneck, use_se
):
  params = _shapes(build_backbone(name))["params"]
  assert count_params(params) == _reference_param_count(
      stage_units, bottleneck, use_se
  )


def test_published_parameter_counts():
  # IR-50 and IR-100 are widely quoted at 43.6M and 65.2M parameters.
  assert (
      round(count_params(_shapes(build_backbone("ir50"))["params"]), -5)
      == 43_600_000
  )
  assert (
      round(count_params(_shapes(build_backbone("ir100"))["params"]), -5)
      == 65_200_000
  )


def test_ir18_counts_match_pytorch_state_dict(reference_dir):
  with np.load(reference_dir / "iresnet18_eval.weights.npz") as weights:
    shapes = {k: weights[k].shape for k in weights.files}
  torch_params = sum(
      int(np.prod(s))
      for k, s in shapes.items()
      if not k.endswith(("running_mean", "running_var"))
  )
  torch_stats = sum(
      int(np.prod(s))
      for k, s in shapes.items()
      if k.endswith(("running_mean", "running_var"))
  )
  variables = _shapes(build_backbone("ir18"))
  assert count_params(variables["params"]) == torch_params
  assert count_params(variables["batch_stats"]) == torch_stats


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
  model = IResNet(18, base_width=8, embedding_size=32, dtype=jnp.bfloat16)
  variables, (embeddings, norms) = _abstract(model)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert embeddings.dtype == jnp.float32 and norms.dtype == jnp.float32

  # And it computes nearly what float32 computes.
  variables, images = tiny
  e32, n32 = _eval(TINY, variables, images)
  e16, n16 = _eval(TINY.clone(dtype=jnp.bfloat16), variables, images)
  assert e16.dtype == jnp.float32 and n16.dtype == jnp.float32
  cosine = np.sum(np.asarray(e16) * np.asarray(e32), axis=1)
  assert np.all(cosine > 0.99), cosine
  np.testing.assert_allclose(n16, n32, rtol=0.05)


def test_train_mode_updates_batch_stats_and_uses_dropout(tiny):
  variables, images = tiny
  (e1, n1), updates = _train(variables, images, jax.random.key(1))
  (e2, _), _ = _train(variables, images, jax.random.key(2))
  assert e1.shape == (3, 16) and np.all(np.isfinite(e1))
  np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, rtol=1e-5)
  old = variables["batch_stats"]
  new = updates["batch_stats"]
  assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
  for a, b in zip(
      jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)
  ):
    assert not np.allclose(a, b)
  # The stem BN moves 10% of the way to the batch mean (PyTorch momentum 0.1).
  stem = jax.lax.conv_general_dilated(
      images,
      variables["params"]["input_layer"]["conv"]["kernel"],
      (1, 1),
      [(1, 1), (1, 1)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(
      new["input_layer"]["bn"]["mean"],
      0.9 * old["input_layer"]["bn"]["mean"] + 0.1 * np.mean(stem, (0, 1, 2)),
      rtol=1e-4,
      atol=1e-6,
  )
  # ... and to the *unbiased* batch variance, as torch.nn.BatchNorm2d.
  count = stem.shape[0] * stem.shape[1] * stem.shape[2]
  np.testing.assert_allclose(
      new["input_layer"]["bn"]["var"],
      0.9 * old["input_layer"]["bn"]["var"]
      + 0.1 * np.var(stem, (0, 1, 2)) * count / (count - 1),
      rtol=1e-4,
  )
  # Dropout draws from the 'dropout' rng; eval mode is deterministic.
  assert not np.allclose(e1, e2)
  e3, _ = _eval(TINY, variables, images)
  e4, _ = _eval(TINY, variables, images)
  np.testing.assert_array_equal(e3, e4)


@pytest.mark.parametrize("size,side", [(56, 4), (64, 4), (112, 7), (36, 3)])
def test_any_input_size(size, side):
  # Each stage halves with ceil, like PyTorch's stride-2 convs with padding 1.
  variables, (embeddings, _) = _abstract(build_backbone("ir18"), (size, size))
  kernel = variables["params"]["output_layer"]["fc"]["kernel"]
  assert kernel.shape == (side * side * 512, 512)
  assert embeddings.shape == (2, 512)


def test_prelu_is_per_channel_with_slope_quarter():
  layer = PReLU()
  x = -jnp.ones((1, 2, 2, 3))
  variables = layer.init(jax.random.key(0), x)
  slopes = variables["params"]["negative_slope"]
  np.testing.assert_array_equal(slopes, [0.25] * 3)
  out = layer.apply(
      {"params": {"negative_slope": jnp.array([0.1, 0.2, 0.3])}},
      jnp.concatenate([x, -x], axis=1),
  )
  np.testing.assert_allclose(out[0, 0, 0], [-0.1, -0.2, -0.3])
  np.testing.assert_allclose(out[0, 2, 0], [1.0, 1.0, 1.0])


def test_normalize_images():
  pixels = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
  out = normalize_images(pixels)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
      out.ravel(), (pixels.ravel() / 255 - 0.5) / 0.5, rtol=1e-6
  )
  assert normalize_images(pixels, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "name,depth,use_se",
    [
        ("ir18", 18, False),
        ("ir34", 34, False),
        ("ir50", 50, False),
        ("ir100", 100, False),
        ("ir200", 200, False),
        ("ir_se50", 50, True),
        ("ir_se100", 100, True),
        ("IR_SE_50", 50, True),
        ("ir_101", 100, False),
    ],
)
def test_build_backbone(name, depth, use_se):
  model = build_backbone(name, dtype=jnp.bfloat16, base_width=16)
  assert (model.num_layers, model.use_se) == (depth, use_se)
  assert model.dtype == jnp.bfloat16 and model.base_width == 16


@pytest.mark.parametrize("name", ["resnet50", "ir51", "ir_se", ""])
def test_build_backbone_rejects_unknown_names(name):
  with pytest.raises(ValueError, match="ir_se50"):
    build_backbone(name)


def test_rematerialised_blocks_give_the_plain_gradients(tiny):
  variables, images = tiny
  remat = IResNet(18, base_width=4, embedding_size=16, remat=True)

  def loss(model, params):
    (emb, norms), _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(3)},
    )
    return jnp.sum(emb[:, 0]) + 1e-2 * jnp.sum(norms)

  grad = lambda model: jax.jit(jax.grad(functools.partial(loss, model)))(
      variables["params"]
  )
  plain, rematerialised = grad(TINY), grad(remat)
  assert jax.tree.structure(plain) == jax.tree.structure(rematerialised)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  # The backward pass does recompute: the rematerialised program has more
  # convolutions than the plain one.
  hlo = (
      lambda model: jax.jit(jax.grad(functools.partial(loss, model)))
      .lower(variables["params"])
      .as_text()
  )
  assert hlo(remat).count("convolution(") > hlo(TINY).count("convolution(")
