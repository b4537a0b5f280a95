"""insightface's ONNX recognisers in: `convert --src=FILE.onnx`.

Held to onnxruntime running the very file: insightface's released buffalo_s
recogniser (../shared/fixtures/pretrained/w600k_mbf.onnx, BatchNorms
folded, its own head), and graphs exported by make_fixtures.py from
insightface's arcface_torch iresnet (folded, and with BatchNorm nodes kept)
and mobilefacenet, whose weights `zoo.refill` seeds. Hostile and mistaken
files end in one ERROR line through the command.
"""

import pathlib

import numpy as np
import pytest

import qgjt_jax
from qgjt_jax import errors
from qgjt_jax.interop import convert
from qgjt_jax.interop import onnx_import
from tests.helpers import commands
from tests.helpers import tiny_runs
from tests.helpers import zoo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

W600K = "w600k_mbf.onnx"
# 1 - cos of the unit embeddings (the issue's bar) and the norms' relative
# error; measured: 1.2e-7 and 2.4e-7 at most.
_COSINE_TOLERANCE = 1e-5


def _refilled(name: str, folder: pathlib.Path) -> pathlib.Path:
  model = onnx.load(zoo.FIXTURES / f"{name}.skeleton.pb")
  zoo.refill(model)
  path = folder / f"{name}.onnx"
  onnx.save(model, path)
  return path


def _onnxruntime_fused(path, bgr: np.ndarray):
  """What insightface's client computes for BGR crops, fused with the
  mirror images as `Model.embed` scores: (unit embeddings, mean norms)."""
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  x = (bgr[..., ::-1].astype(np.float32) - 127.5) / 127.5
  views = [
      session.run(None, {name: np.ascontiguousarray(v.transpose(0, 3, 1, 2))})[
          0
      ]
      for v in (x, x[:, :, ::-1])
  ]
  fused = views[0] + views[1]
  norms = [np.linalg.norm(v, axis=1) for v in views]
  return (
      fused / np.linalg.norm(fused, axis=1, keepdims=True),
      (norms[0] + norms[1]) / 2,
  )


def _assert_embeds_as_onnxruntime(workdir, path, bgr):
  with tiny_runs.compile_cache():
    got, norms = qgjt_jax.load_model(str(workdir)).embed(bgr)
  want, want_norms = _onnxruntime_fused(path, bgr)
  assert np.max(1 - np.sum(got * want, axis=1)) <= _COSINE_TOLERANCE
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)


@pytest.fixture(scope="module")
def aligned_faces(faces_dir):
  """Ten ORL photos aligned to the 112 px template (BGR)."""
  from qgjt_jax.align import faces  # pylint: disable=g-import-not-at-top

  load = faces.photo_loader(112)
  photos = (
      sorted((faces_dir / "s1").iterdir())[:5]
      + sorted((faces_dir / "s2").iterdir())[:5]
  )
  return np.stack([load(p) for p in photos])


def test_buffalo_s_recogniser_embeds_as_onnxruntime(
    pretrained_dir, aligned_faces, tmp_path
):
  """The released file through the command: recognised as its
  MobileFaceNet, and every use of the workdir scores as onnxruntime."""
  workdir = tmp_path / "w600k"
  result = commands.run(
      "qgjt_jax.convert",
      f"--src={pretrained_dir / W600K}",
      f"--workdir={workdir}",
      check=True,
  )
  assert "architecture    mbf_buffalo" in result.stdout
  assert "3,410,368" in result.stdout and "input           RGB" in (
      result.stdout
  )
  _assert_embeds_as_onnxruntime(workdir, pretrained_dir / W600K, aligned_faces)


@pytest.mark.parametrize(
    "name, want",
    [
        pytest.param(
            "r18", "r18", marks=pytest.mark.slow
        ),  # folded: as buffalo_s
        # The fast suite reads insightface's graphs through the released
        # buffalo_s file (folded) and the hostile corpus; these three, full
        # IResNets and a MobileFaceNet at 112 px, run in the full suite.
        pytest.param("r18_bn", "r18", marks=pytest.mark.slow),
        # MobileFaceNet's graph is also the released buffalo_s test's.
        pytest.param("mbf", "mbf", marks=pytest.mark.slow),
    ],
)
def test_graphs_exported_from_their_pytorch_code(name, want, tmp_path):
  """BatchNorms folded into the convolutions or kept as nodes; arcface_torch
  iresnet and mobilefacenet (GDC head, a MatMul without bias)."""
  path = _refilled(name, tmp_path)
  converted = convert.convert_file(str(path))
  assert (converted.name, converted.image_size, converted.input_order) == (
      want,
      112,
      "RGB",
  )
  convert.write_checkpoint(str(tmp_path / "w"), converted, source=str(path))
  faces = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), np.uint8)
  _assert_embeds_as_onnxruntime(tmp_path / "w", path, faces)


def test_a_deeper_iresnet_is_told_from_its_layers(tmp_path):
  """r50's graph is r18's ops in other numbers: what must differ is the
  model read from them (running it adds nothing r18 does not check)."""
  converted = convert.convert_file(str(_refilled("r50", tmp_path)))
  assert (converted.name, converted.embedding_size) == ("r50", 512)


def _w600k(pretrained_dir):
  return onnx.load(pretrained_dir / W600K)


def _attribute(node, name, value):
  for attribute in node.attribute:
    if attribute.name == name:
      attribute.ints[:] = value


def _first(model, op):
  return next(n for n in model.graph.node if n.op_type == op)


def _save(model, path) -> pathlib.Path:
  onnx.save(model, path)
  return path


# Each writes a bad file at the path given.
_HOSTILE = {
    "garbage": lambda d, p: p.write_bytes(b"\x08\x07junk" * 100),
    "truncated": lambda d, p: p.write_bytes((d / W600K).read_bytes()[:100_000]),
    "empty": lambda d, p: p.write_bytes(b""),
    "a_folder": lambda d, p: p.mkdir(),
}


def _changed(pretrained_dir, path, change):
  model = _w600k(pretrained_dir)
  change(model)
  return _save(model, path)


def _declared_bigger(model):
  tensor = model.graph.initializer[10]
  tensor.dims[0] = 10**9


def _external(model):
  tensor = model.graph.initializer[10]
  tensor.ClearField("raw_data")
  tensor.data_location = onnx.TensorProto.EXTERNAL
  entry = tensor.external_data.add()
  entry.key, entry.value = "location", "/etc/passwd"


def _strided(model):
  _attribute(_first(model, "Conv"), "strides", [1, 1])


def _extra_weight(model):
  model.graph.initializer.append(
      onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "unused_weight")
  )


def _unknown_op(model):
  node = _first(model, "PRelu")
  node.op_type = "Softsign"
  del node.input[1:]


def _headless(model):
  """The graph cut after its last convolution, weights and all."""
  while model.graph.node[-1].op_type != "Conv":
    model.graph.node.pop()
  used = {i for n in model.graph.node for i in n.input}
  kept = [t for t in model.graph.initializer if t.name in used]
  del model.graph.initializer[:]
  model.graph.initializer.extend(kept)


def _posing_as_ours(settings):
  """The released file claiming to be this project's export."""

  def change(model):
    model.producer_name = "qgjt_jax"
    entry = model.metadata_props.add()
    entry.key, entry.value = "qgjt_jax.model_settings", settings

  return change


_OWN_SETTINGS = (
    '{"model.name": "mbf_buffalo", "model.embedding_size": 512, '
    '"data.image_size": 112, "model.input_order": "RGB"}'
)

_CHANGES = {
    "declares_a_billion_rows": (_declared_bigger, "max_tensor_bytes"),
    "external_data": (_external, "another file"),
    "other_strides": (_strided, "strides"),
    "unconsumed_weight": (_extra_weight, "unused_weight"),
    "unknown_operator": (_unknown_op, "Softsign"),
    "no_head": (_headless, "not a recogniser"),
    "ours_with_garbled_settings": (
        _posing_as_ours("[" * 100_000),
        "not the record of model settings",
    ),
    "ours_without_our_weights": (
        _posing_as_ours(_OWN_SETTINGS),
        "its weights are not those of the mbf_buffalo it records: missing",
    ),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE) + sorted(_CHANGES))
def test_a_hostile_or_mistaken_onnx_file_is_refused_by_name(
    case, pretrained_dir, tmp_path
):
  path = tmp_path / "model.onnx"
  if case in _HOSTILE:
    _HOSTILE[case](pretrained_dir, path)
    named = str(path)
  else:
    change, named = _CHANGES[case]
    path = _changed(pretrained_dir, path, change)
  with pytest.raises(errors.UserError) as error:
    convert.convert_file(str(path))
  assert str(path) in str(error.value) and named in str(error.value)


def test_the_command_refuses_in_one_line(pretrained_dir, tmp_path):
  path = _changed(pretrained_dir, tmp_path / "model.onnx", _strided)
  result = commands.run(
      "qgjt_jax.convert", f"--src={path}", f"--workdir={tmp_path / 'out'}"
  )
  commands.assert_refused(result, path, "strides", max_rss_mib=2048)
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_nothing_runs_and_sizes_are_checked_before_reading(
    pretrained_dir, tmp_path
):
  """The size limits apply to the file and to each initialiser."""
  from qgjt_jax.files import limits  # pylint: disable=g-import-not-at-top

  limits.configure({"max_tensor_bytes": 1 << 20})
  try:
    with pytest.raises(limits.LimitError, match="max_tensor_bytes"):
      onnx_import.read_onnx(str(pretrained_dir / W600K))
  finally:
    limits.configure({})
