"""PyTorch -> Flax weight import, checked against the authors' IR-18 outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax.interop import convert
from qgjt_jax.interop import state_dicts
from qgjt_jax.interop import weight_files
from qgjt_jax.models import build_backbone
from qgjt_jax.models import IResNet
from qgjt_jax.models.iresnet import ResidualUnit
from qgjt_jax.models.layers import init_shapes


def _to_flax(
    state, num_layers=18, use_se=False, width=64, embedding=512, size=112
):
  """The state dict (its backbone found by `find_backbone`) as the
  variables of the AdaFace-layout IResNet named, whatever the tensors
  say."""
  found = state_dicts.find_backbone(state)
  model = IResNet(
      num_layers, use_se=use_se, base_width=width, embedding_size=embedding
  )
  return state_dicts.to_flax(found.tensors, model, size)


def _recognised(state):
  return state_dicts.find_backbone(state).recognised


@pytest.fixture(scope="module")
def ir18_state(reference_dir):
  return weight_files.read_state_dict(
      reference_dir / "iresnet18_eval.weights.npz"
  )


@pytest.fixture(scope="module")
def ir18_variables(ir18_state):
  return _to_flax(ir18_state)


def test_ir18_matches_pytorch_reference(reference_dir, ir18_variables):
  variables = ir18_variables
  with np.load(reference_dir / "iresnet18_eval.npz") as case:
    images = case["in/images_nchw"].transpose(0, 2, 3, 1)
    want_embedding = case["out/embedding"]
    want_norm = case["out/norm"][:, 0]
  embedding, norm = jax.jit(lambda v, x: IResNet(18).apply(v, x, train=False))(
      variables, images
  )
  np.testing.assert_allclose(embedding, want_embedding, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(norm, want_norm, rtol=1e-4, atol=1e-5)


def _tree_spec(tree):
  return jax.tree_util.tree_map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)


def test_converted_tree_is_the_module_tree(ir18_state, ir18_variables):
  variables = ir18_variables
  assert _tree_spec(variables) == _tree_spec(init_shapes(IResNet(18)))
  # The PReLU slopes and BN statistics land unchanged (float16 -> float32).
  np.testing.assert_array_equal(
      variables["params"]["body_3"]["prelu1"]["negative_slope"],
      ir18_state["body.3.res_layer.3.weight"].astype(np.float32),
  )
  np.testing.assert_array_equal(
      variables["batch_stats"]["output_layer"]["feature_bn"]["var"],
      ir18_state["output_layer.4.running_var"].astype(np.float32),
  )
  # Conv OIHW -> HWIO.
  torch_kernel = ir18_state["body.2.res_layer.4.weight"]
  np.testing.assert_array_equal(
      variables["params"]["body_2"]["conv2"]["kernel"][2, 0, 5, 7],
      np.float32(torch_kernel[7, 5, 2, 0]),
  )


def test_linear_rows_follow_nchw_flatten(ir18_state, ir18_variables):
  # PyTorch flattens (C, H, W): feature c*49 + h*7 + w. Ours flattens
  # (H, W, C): feature (h*7 + w)*512 + c.
  kernel = ir18_variables["params"]["output_layer"]["fc"]["kernel"]
  weight = ir18_state["output_layer.3.weight"]
  for out, c, h, w in [(0, 0, 0, 1), (5, 300, 6, 2), (511, 511, 3, 6)]:
    assert kernel[(h * 7 + w) * 512 + c, out] == np.float32(
        weight[out, c * 49 + h * 7 + w]
    )


def test_recognise_the_architecture(ir18_state):
  recognised = _recognised(ir18_state)
  assert (
      recognised.name,
      recognised.embedding_size,
      recognised.image_size,
      recognised.settings,
  ) == ("ir18", 512, 112, {"base_width": 64})
  truncated = {
      k: v for k, v in ir18_state.items() if not k.startswith("body.7.")
  }
  with pytest.raises(
      state_dicts.StateDictMismatchError, match="7 residual units"
  ):
    state_dicts.find_backbone(truncated)


@pytest.mark.parametrize("prefix", ["model.", "backbone.", "module."])
def test_lightning_prefixes_and_extras_are_handled(
    ir18_state, ir18_variables, prefix
):
  wrapped = {prefix + k: v for k, v in ir18_state.items()}
  wrapped[prefix + "input_layer.1.num_batches_tracked"] = np.array(7)
  wrapped["head.kernel"] = np.zeros((512, 10), np.float32)
  # What a QGFace Lightning module also stores beside its backbone.
  wrapped["queue_embeds"] = np.zeros((4, 512), np.float32)
  wrapped["moco_backbone.input_layer.0.weight"] = np.zeros((64, 3, 3, 3))
  assert _recognised(wrapped).name == "ir18"
  converted = _to_flax(wrapped)
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, converted, ir18_variables
  )


def test_bare_state_dict_ignores_head_and_counters(ir18_state):
  state = dict(ir18_state)
  state["head.kernel"] = np.zeros((512, 10), np.float32)
  state["body.0.res_layer.0.num_batches_tracked"] = np.array(3)
  converted = _to_flax(state)
  want = _to_flax(ir18_state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, want)


def test_missing_keys_are_listed(ir18_state):
  state = dict(ir18_state)
  del state["body.5.res_layer.3.weight"]
  del state["output_layer.4.running_mean"]
  with pytest.raises(state_dicts.StateDictMismatchError) as error:
    _to_flax(state)
  message = str(error.value)
  assert "missing (2)" in message
  assert "body.5.res_layer.3.weight" in message
  assert "output_layer.4.running_mean" in message
  assert "unexpected" not in message


def test_unexpected_keys_are_listed(ir18_state):
  state = dict(ir18_state)
  state["body.1.res_layer.se_block.fc1.weight"] = np.zeros((4, 64, 1, 1))
  with pytest.raises(
      state_dicts.StateDictMismatchError,
      match=r"unexpected \(1\): body\.1\.res_layer\.se_block",
  ):
    _to_flax(state)


def test_wrong_depth_is_reported(ir18_state):
  with pytest.raises(
      state_dicts.StateDictMismatchError, match=r"missing \(\d+\): .*body\.8\."
  ):
    _to_flax(ir18_state, num_layers=34)


def test_shape_mismatch_is_listed(ir18_state):
  state = dict(ir18_state)
  state["body.3.res_layer.1.weight"] = np.zeros((128, 128, 1, 1), np.float16)
  with pytest.raises(
      state_dicts.StateDictMismatchError,
      match=r"shape mismatch \(1\): body\.3\.res_layer\.1\."
      r"weight: got \(128, 128, 1, 1\), want \(128, 128, 3, 3\)",
  ):
    _to_flax(state)


def test_no_backbone_is_an_error():
  with pytest.raises(
      state_dicts.StateDictMismatchError, match="no backbone found"
  ):
    state_dicts.find_backbone({"head.kernel": np.zeros((2, 2))})


# --- SE and bottleneck units, against an NCHW forward written directly on
# the PyTorch names (the reference's `res_layer` / `shortcut_layer` order).


def _pytorch_names(num_layers, use_se, width, embedding, side):
  """name -> shape of the reference module's state dict, from its layout."""
  stage_units = {18: (2, 2, 2, 2), 50: (3, 4, 14, 3), 200: (3, 24, 36, 3)}
  bottleneck = num_layers >= 152
  names = {}

  def bn(prefix, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      names[f"{prefix}.{leaf}"] = (c,)

  names["input_layer.0.weight"] = (width, 3, 3, 3)
  bn("input_layer.1", width)
  names["input_layer.2.weight"] = (width,)
  unit, c_in = 0, width
  for stage, count in enumerate(stage_units[num_layers]):
    c_out = width * (4 if bottleneck else 1) * 2**stage
    for _ in range(count):
      p = f"body.{unit}"
      if c_in != c_out:
        names[f"{p}.shortcut_layer.0.weight"] = (c_out, c_in, 1, 1)
        bn(f"{p}.shortcut_layer.1", c_out)
      bn(f"{p}.res_layer.0", c_in)
      if bottleneck:
        r = c_out // 4
        names[f"{p}.res_layer.1.weight"] = (r, c_in, 1, 1)
        bn(f"{p}.res_layer.2", r)
        names[f"{p}.res_layer.3.weight"] = (r,)
        names[f"{p}.res_layer.4.weight"] = (r, r, 3, 3)
        bn(f"{p}.res_layer.5", r)
        names[f"{p}.res_layer.6.weight"] = (r,)
        names[f"{p}.res_layer.7.weight"] = (c_out, r, 1, 1)
        bn(f"{p}.res_layer.8", c_out)
      else:
        names[f"{p}.res_layer.1.weight"] = (c_out, c_in, 3, 3)
        bn(f"{p}.res_layer.2", c_out)
        names[f"{p}.res_layer.3.weight"] = (c_out,)
        names[f"{p}.res_layer.4.weight"] = (c_out, c_out, 3, 3)
        bn(f"{p}.res_layer.5", c_out)
      if use_se:
        names[f"{p}.res_layer.se_block.fc1.weight"] = (c_out // 16, c_out, 1, 1)
        names[f"{p}.res_layer.se_block.fc2.weight"] = (c_out, c_out // 16, 1, 1)
      unit, c_in = unit + 1, c_out
  bn("output_layer.0", c_in)
  names["output_layer.3.weight"] = (embedding, c_in * side * side)
  names["output_layer.3.bias"] = (embedding,)
  names["output_layer.4.running_mean"] = (embedding,)
  names["output_layer.4.running_var"] = (embedding,)
  return names


def _random_state(names, seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in names.items():
    if name.endswith("running_var"):
      state[name] = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 4:
      state[name] = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
    else:
      state[name] = rng.normal(0.2, 0.3, shape)
    state[name] = state[name].astype(np.float32)
  return state


def _conv_nchw(x, w, stride, pad):
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  k = w.shape[-1]
  h = (x.shape[2] - k) // stride + 1
  v = (x.shape[3] - k) // stride + 1
  out = 0
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i : i + stride * h : stride, j : j + stride * v : stride]
      out = out + np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out


def _unit_nchw(state, p, x, stride, bottleneck, use_se):
  """One residual unit in the reference's NCHW layout and names."""

  def bn(prefix, y):
    scale = state[f"{prefix}.weight"] / np.sqrt(
        state[f"{prefix}.running_var"] + 1e-5
    )
    shift = state[f"{prefix}.bias"] - state[f"{prefix}.running_mean"] * scale
    return y * scale[:, None, None] + shift[:, None, None]

  def prelu(prefix, y):
    return np.where(y >= 0, y, state[f"{prefix}.weight"][:, None, None] * y)

  r = f"{p}.res_layer"
  conv = lambda i, y, s, pad: _conv_nchw(y, state[f"{r}.{i}.weight"], s, pad)
  y = bn(f"{r}.0", x)
  if bottleneck:
    y = prelu(f"{r}.3", bn(f"{r}.2", conv(1, y, 1, 0)))
    y = prelu(f"{r}.6", bn(f"{r}.5", conv(4, y, 1, 1)))
    y = bn(f"{r}.8", conv(7, y, stride, 0))
  else:
    y = prelu(f"{r}.3", bn(f"{r}.2", conv(1, y, 1, 1)))
    y = bn(f"{r}.5", conv(4, y, stride, 1))
  if use_se:
    s = y.mean(axis=(2, 3))
    s = np.maximum(s @ state[f"{r}.se_block.fc1.weight"][:, :, 0, 0].T, 0)
    s = s @ state[f"{r}.se_block.fc2.weight"][:, :, 0, 0].T
    y = y / (1 + np.exp(-s))[:, :, None, None]
  if f"{p}.shortcut_layer.0.weight" in state:
    shortcut = bn(
        f"{p}.shortcut_layer.1",
        _conv_nchw(x, state[f"{p}.shortcut_layer.0.weight"], stride, 0),
    )
  else:
    shortcut = x[:, :, ::stride, ::stride]
  return y + shortcut


@pytest.mark.parametrize(
    "num_layers,use_se,width",
    [
        (18, True, 16),  # basic units with SE
        (200, True, 4),  # bottleneck units with SE
    ],
)
def test_se_and_bottleneck_units_match_nchw_reference(
    num_layers, use_se, width
):
  names = _pytorch_names(num_layers, use_se, width, embedding=8, side=2)
  state = _random_state(names)
  recognised = _recognised(state)
  assert recognised.name == f"ir{'_se' if use_se else ''}{num_layers}"
  assert (recognised.image_size, recognised.settings) == (
      32,
      {"base_width": width},
  )
  variables = _to_flax(state, num_layers, use_se, width, embedding=8, size=32)
  assert variables["params"]["output_layer"]["fc"]["kernel"].shape == (
      names["output_layer.3.weight"][1],
      8,
  )

  bottleneck = num_layers >= 152
  # The stem's output. body_0 widens it (conv shortcut) in bottleneck nets and
  # keeps the width (subsampling shortcut) in basic ones; body_1 has stride 1.
  x = np.random.default_rng(1).normal(size=(2, width, 6, 6)).astype(np.float32)
  for unit, stride in [(0, 2), (1, 1)]:
    in_x = (
        x
        if unit == 0
        else _unit_nchw(state, "body.0", x, 2, bottleneck, use_se)
    )
    want = _unit_nchw(state, f"body.{unit}", in_x, stride, bottleneck, use_se)
    layer = ResidualUnit(
        want.shape[1], stride, bottleneck=bottleneck, use_se=use_se
    )
    got = layer.apply(
        {c: variables[c][f"body_{unit}"] for c in variables},
        jnp.asarray(in_x.transpose(0, 2, 3, 1)),
        train=False,
    )
    np.testing.assert_allclose(
        np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4
    )


def test_npz_round_trip(tmp_path, ir18_state):
  path = tmp_path / "weights.npz"
  np.savez(path, **ir18_state)
  loaded = weight_files.read_state_dict(path)
  assert sorted(loaded) == sorted(ir18_state)


def test_pytorch_files_are_read_without_torch(tmp_path, ir18_state):
  from tests.helpers.torch_writer import write_torch_file

  tensors = {"model." + k: v.astype(np.float32) for k, v in ir18_state.items()}
  write_torch_file(
      tmp_path / "lightning.ckpt", {"state_dict": tensors, "epoch": 3}
  )
  loaded = weight_files.read_state_dict(tmp_path / "lightning.ckpt")
  converted = _to_flax(loaded)
  want = _to_flax(ir18_state)
  np.testing.assert_array_equal(
      converted["params"]["body_3"]["conv1"]["kernel"],
      want["params"]["body_3"]["conv1"]["kernel"],
  )


def test_torch_checkpoints(tmp_path, ir18_state):
  torch = pytest.importorskip("torch")
  tensors = {
      k: torch.from_numpy(v.astype(np.float32)) for k, v in ir18_state.items()
  }
  torch.save(tensors, tmp_path / "plain.pth")
  torch.save(
      {"state_dict": {"model." + k: v for k, v in tensors.items()}, "epoch": 3},
      tmp_path / "lightning.ckpt",
  )
  for name in ("plain.pth", "lightning.ckpt"):
    loaded = weight_files.read_state_dict(tmp_path / name)
    converted = _to_flax(loaded)
    assert converted["params"]["input_layer"]["conv"]["kernel"].shape == (
        3,
        3,
        3,
        64,
    )


# --- safetensors, both directions.


def _exported(state):
  """The state dict converted and exported again (the model it holds)."""
  found = state_dicts.find_backbone(state)
  recognised = found.recognised
  model = build_backbone(
      recognised.name,
      embedding_size=recognised.embedding_size,
      **recognised.settings,
  )
  variables = state_dicts.to_flax(found.tensors, model, recognised.image_size)
  return state_dicts.to_torch(variables, model, recognised.image_size)


def _assert_is_their_state_dict(exported, state):
  """The names of their module's state_dict() (a BatchNorm counter beside
  each BatchNorm, as a strict load_state_dict wants) and the very values."""
  counters = {
      k[: -len("running_mean")] + "num_batches_tracked"
      for k in state
      if k.endswith("running_mean")
  }
  plain = {
      k: v for k, v in state.items() if not k.endswith("num_batches_tracked")
  }
  assert set(exported) == set(plain) | counters
  for name, value in plain.items():
    assert exported[name].dtype == np.float32
    np.testing.assert_array_equal(
        exported[name], np.asarray(value, np.float32), name
    )


def test_export_gives_back_the_authors_ir18_state_dict(ir18_state):
  _assert_is_their_state_dict(_exported(ir18_state), ir18_state)


@pytest.mark.parametrize(
    "num_layers,use_se,width", [(18, True, 16), (200, True, 4)]
)
def test_export_of_se_and_bottleneck_units(num_layers, use_se, width):
  state = _random_state(
      _pytorch_names(num_layers, use_se, width, embedding=8, side=2)
  )
  _assert_is_their_state_dict(_exported(state), state)


def test_export_in_insightface_names_runs_in_their_forward():
  from tests.helpers import insightface_model as theirs

  state = theirs.random_state()
  exported = _exported(state)
  _assert_is_their_state_dict(exported, state)
  images = np.random.default_rng(3).uniform(
      -1, 1, (2, 3, theirs.SIZE, theirs.SIZE)
  )
  want = theirs.oracle(state, images)
  got = theirs.oracle(
      {k: v.astype(np.float64) for k, v in exported.items()}, images
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_cvlface_hub_file_converts(tmp_path, ir18_state, ir18_variables):
  """CVLFace's model.safetensors: AdaFace names under `model.net.`."""
  from safetensors.numpy import save_file

  save_file(
      {
          f"model.net.{k}": np.asarray(v, np.float32)
          for k, v in ir18_state.items()
      },
      tmp_path / "model.safetensors",
  )
  converted = convert.convert_state_dict(
      weight_files.read_state_dict(tmp_path / "model.safetensors")
  )
  assert (converted.name, converted.input_order) == ("ir18", "BGR")
  jax.tree.map(
      np.testing.assert_array_equal, converted.variables, ir18_variables
  )


def _safetensors_with_header(path, header: dict, data: bytes):
  import json
  import struct

  text = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: _safetensors_with_header(
                p,
                {"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}},
                b"\0" * 4,
            ),
            "holds BF16 values",
        ),
        (
            lambda p: _safetensors_with_header(
                p,
                {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                b"\0" * 8,
            ),
            "cannot read .* as safetensors",
        ),
        (
            lambda p: p.write_bytes(b"\xff" * 8 + b"{}"),
            "cannot read .* as safetensors",
        ),
        (
            lambda p: _safetensors_with_header(
                p,
                {
                    "w": {
                        "dtype": "F32",
                        "shape": [300, 300],
                        "data_offsets": [0, 360000],
                    }
                },
                b"\0" * 360000,
            ),
            "max_tensor_bytes",
        ),
    ],
    ids=["bf16", "cut_short", "header_length", "over_limit"],
)
def test_a_bad_safetensors_file_is_refused_by_name(tmp_path, make, message):
  from qgjt_jax.files import limits
  from qgjt_jax.interop import torch_files

  path = tmp_path / "w.safetensors"
  make(path)
  limits.configure({"max_tensor_bytes": 100_000})
  try:
    with pytest.raises(
        (torch_files.TorchFileError, limits.LimitError), match=message
    ):
      weight_files.read_state_dict(path)
  finally:
    limits.configure({})
