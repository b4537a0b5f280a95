"""ONNX and StableHLO exports give the JAX model's embeddings.

Tolerance: 1e-5 on the unit embeddings (absolute) and the norms (relative):
the same float32 arithmetic in another order (measured: 2e-6 at most, IR-152
bottleneck units included).
"""

import json
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax.interop import export
from qgjt_jax.models import build_backbone
from tests.helpers import commands
from tests.helpers import tiny_runs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _random_variables(model, size=32, seed=0):
  """Initial weights, with BatchNorm statistics and slopes moved off their
  initial values so every operator matters."""
  variables = model.init(
      jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False
  )
  rng = np.random.default_rng(seed)
  moved = ("var", "mean", "bias", "negative_slope")
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.asarray(x, np.float32)
      + (
          rng.uniform(0.1, 0.5, x.shape).astype(np.float32)
          if path[-1].key in moved
          else 0
      ),
      variables,
  )


def _assert_close(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


@pytest.mark.parametrize("size", [40, 112, 36, 33])
def test_onnx_at_sizes_that_are_not_multiples_of_16(size):
  """40 px (the embedded default) ends in a 3 x 3 map, not 40 // 16 = 2."""
  model = build_backbone("ir18", base_width=4, embedding_size=8)
  variables = _random_variables(model, size)
  images = np.random.default_rng(1).integers(
      0, 256, (2, size, size, 3), np.uint8
  )
  want = [np.asarray(a) for a in export.forward_fn(model, variables)(images)]
  session = ort.InferenceSession(_onnx(model, variables, size))
  _assert_close(session.run(["embeddings", "norms"], {"images": images}), want)


def _onnx(model, variables, size, batch=None, layout="qgjt") -> bytes:
  return export.onnx_proto(
      model, variables, size, batch, {}, layout
  ).SerializeToString()


_IRESNET = dict(base_width=4, embedding_size=8)


@pytest.mark.parametrize(
    "name, size, options",
    [
        ("ir18", 32, _IRESNET),
        ("ir_se18", 32, _IRESNET),
        ("r18", 32, {**_IRESNET, "input_order": "RGB"}),
        ("ir152", 32, _IRESNET),
        # The slowest to translate; mbf_buffalo is the same family.
        pytest.param(
            "mbf",
            40,
            {"input_order": "RGB", "embedding_size": 16},
            marks=pytest.mark.slow,
        ),
        ("mbf_buffalo", 40, {"input_order": "RGB", "embedding_size": 16}),
        ("vit_t", 27, {"input_order": "RGB", "embedding_size": 16}),
    ],
    ids=[
        "ir18",
        "se",
        "insightface_rgb",
        "bottleneck",
        "mbf",
        "mbf_buffalo",
        "vit_t",
    ],
)
def test_every_backbone_in_onnxruntime_and_reloaded_stablehlo(
    name, size, options
):
  """The ONNX graph is the jaxpr of the function that embeds, for every
  family: both layouts, a dynamic and a fixed batch."""
  model = build_backbone(name, **options)
  variables = _random_variables(model, size)
  images = np.random.default_rng(1).integers(
      0, 256, (3, size, size, 3), np.uint8
  )
  want = [np.asarray(a) for a in export.forward_fn(model, variables)(images)]
  for batch in (None, 3):
    session = ort.InferenceSession(_onnx(model, variables, size, batch))
    _assert_close(
        session.run(["embeddings", "norms"], {"images": images}), want
    )
  insightface = ort.InferenceSession(
      _onnx(model, variables, size, layout="insightface")
  )
  rgb = ((images[..., ::-1].astype(np.float32) - 127.5) / 127.5).transpose(
      0, 3, 1, 2
  )
  feature = insightface.run(["embedding"], {"input.1": rgb})[0]
  norms = np.linalg.norm(feature, axis=1)
  _assert_close([feature / norms[:, None], norms], want)
  reloaded = jax.export.deserialize(
      export.stablehlo_bytes(model, variables, size, platforms=("cpu",))
  )
  _assert_close(
      [np.asarray(a) for a in reloaded.call(images[:2])], [w[:2] for w in want]
  )


def test_stablehlo_for_every_platform_asked_and_no_source_paths():
  """One file for cpu, cuda and tpu (MobileFaceNet's convolutions take a
  CPU-only form on CPU: each platform gets its branch), runnable here, and
  nothing in it names a file of this machine."""
  model = build_backbone("mbf", input_order="RGB", embedding_size=16)
  variables = _random_variables(model, 40)
  images = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3), np.uint8)
  data = export.stablehlo_bytes(
      model, variables, 40, platforms=("cpu", "cuda", "tpu")
  )
  reloaded = jax.export.deserialize(data)
  assert reloaded.platforms == ("cpu", "cuda", "tpu")
  _assert_close(
      [np.asarray(a) for a in reloaded.call(images)],
      [np.asarray(a) for a in export.forward_fn(model, variables)(images)],
  )
  assert b".py" not in data and b"qgjt_jax" not in data
  assert export.parse_platforms("tpu, cuda,tpu") == ("tpu", "cuda")
  for bad in ("", "gpu", "cpu,metal"):
    with pytest.raises(export.errors.UserError, match="--platforms="):
      export.parse_platforms(bad)


def test_the_onnx_graph_holds_no_hand_written_network():
  """Every node comes from a primitive of the traced function: a grouped
  convolution is one Conv node (the accelerators' branch), not its CPU
  form."""
  model = build_backbone("mbf", input_order="RGB", embedding_size=16)
  graph = onnx.load_from_string(
      _onnx(model, _random_variables(model, 40), 40)
  ).graph
  grouped = [
      n
      for n in graph.node
      if n.op_type == "Conv"
      and any(a.name == "group" and a.i > 1 for a in n.attribute)
  ]
  # layers.1 and one depthwise conv per DepthWise unit, and the GDC.
  assert len(grouped) == 1 + (1 + 4 + 1 + 6 + 1 + 2) + 1


def test_convert_reads_its_own_onnx_back_exactly(tmp_path):
  """The export holds the variables under their own names beside the
  settings that rebuild the model: convert restores them bit for bit, and
  refuses a file whose records and weights disagree, naming it."""
  from qgjt_jax.interop import carried  # pylint: disable=g-import-not-at-top
  from qgjt_jax.interop import convert  # pylint: disable=g-import-not-at-top

  model = build_backbone(
      "ir18", base_width=4, embedding_size=8, input_order="RGB"
  )
  variables = _random_variables(model, 32)
  settings = {
      "model.name": "ir18",
      "model.base_width": 4,
      "model.embedding_size": 8,
      "data.image_size": 32,
      "model.input_order": "RGB",
  }

  def exported(name, changes=None, nan=False):
    v = jax.tree.map(lambda x: x.copy(), variables)
    if nan:
      jax.tree.leaves(v["params"])[0].flat[0] = np.nan
    metadata = {
        carried.MODEL_SETTINGS_KEY: json.dumps({**settings, **(changes or {})})
    }
    path = tmp_path / name
    path.write_bytes(
        export.onnx_proto(
            model, v, 32, None, metadata, "insightface"
        ).SerializeToString()
    )
    return str(path)

  back = convert.convert_file(exported("m.onnx"))
  assert (back.name, back.image_size, back.input_order) == ("ir18", 32, "RGB")
  assert back.settings == {"base_width": 4}
  jax.tree.map(np.testing.assert_array_equal, back.variables, variables)
  for path, said in (
      (exported("wide.onnx", {"model.base_width": 8}), "of other shapes"),
      (
          exported("big.onnx", {"model.embedding_size": 2**40}),
          "model.embedding_size=1099511627776",
      ),
      (exported("vit.onnx", {"model.name": "vit_t"}), "missing"),
      (exported("nan.onnx", nan=True), "NaN"),
  ):
    with pytest.raises(ValueError, match=said) as raised:
      convert.convert_file(path)
    assert path in str(raised.value)


@pytest.mark.slow
def test_the_command_exports_a_trained_workdir(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  for fmt, out, batch in (
      ("onnx", "model.onnx", "dynamic"),
      ("onnx", "fixed.onnx", "4"),
      ("stablehlo", "model.stablehlo", "dynamic"),
  ):
    result = commands.run(
        "qgjt_jax.export",
        f"--workdir={workdir}",
        f"--format={fmt}",
        f"--out={tmp_path / out}",
        f"--batch={batch}",
        check=True,
    )
    assert "uint8, BGR" in result.stdout
  assert "for cpu,cuda,tpu" in result.stdout
  loaded, model, variables = export.load(str(workdir))
  assert loaded.step == tiny_runs.STEPS
  images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), np.uint8)
  want = [np.asarray(a) for a in export.forward_fn(model, variables)(images)]
  onnx_model = onnx.load(tmp_path / "model.onnx")
  metadata = {p.key: p.value for p in onnx_model.metadata_props}
  assert "BGR" in metadata["input"] and metadata["qgjt_jax.image_size"] == "32"
  session = ort.InferenceSession(str(tmp_path / "model.onnx"))
  _assert_close(session.run(None, {"images": images}), want)  # any batch
  fixed = ort.InferenceSession(str(tmp_path / "fixed.onnx"))
  assert fixed.get_inputs()[0].shape == [4, 32, 32, 3]
  sidecar = json.loads((tmp_path / "model.stablehlo.json").read_text())
  assert "BGR" in sidecar["input"]
  assert sidecar["qgjt_jax.platforms"] == "cpu,cuda,tpu"
  # The StableHLO file runs in a process that cannot import this project.
  script = textwrap.dedent(f"""
      import sys
      sys.modules["qgjt_jax"] = None
      import jax, numpy as np
      exported = jax.export.deserialize(open({str(tmp_path / 'model.stablehlo')!r}, "rb").read())
      images = np.load({str(tmp_path / 'images.npy')!r})
      emb, norms = exported.call(images)
      np.save({str(tmp_path / 'out.npy')!r}, np.asarray(emb))
  """)
  np.save(tmp_path / "images.npy", images)
  commands.run(None, "-c", script, cwd=tmp_path, check=True)
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want[0], atol=1e-5)


def test_a_workdir_without_a_record_is_one_line(tmp_path):
  result = commands.run(
      "qgjt_jax.export",
      f"--workdir={tmp_path}",
      "--format=onnx",
      f"--out={tmp_path / 'm.onnx'}",
  )
  commands.assert_refused(result, f"--workdir={tmp_path}", "config.json")


def test_platforms_only_for_stablehlo(tmp_path):
  result = commands.run(
      "qgjt_jax.export",
      f"--workdir={tmp_path}",
      "--format=onnx",
      "--platforms=cuda",
      f"--out={tmp_path / 'm.onnx'}",
  )
  commands.assert_refused(result, "--platforms", "--format=onnx")
  result = commands.run(
      "qgjt_jax.export",
      f"--workdir={tmp_path}",
      "--format=stablehlo",
      "--platforms=gpu",
      f"--out={tmp_path / 'm.stablehlo'}",
  )
  commands.assert_refused(result, "--platforms=gpu", "cuda")


def test_a_missing_package_names_the_extra(tmp_path, reference_run):
  """Without onnx installed, --format=onnx says which extra brings it."""
  shim = tmp_path / "no_onnx" / "onnx"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text("raise ImportError('hidden')\n")
  env = tiny_runs.subprocess_env()
  env["PYTHONPATH"] = f"{shim.parent}:{env['PYTHONPATH']}"
  result = commands.run(
      "qgjt_jax.export",
      f"--workdir={reference_run[0]}",
      "--format=onnx",
      f"--out={tmp_path / 'm.onnx'}",
      env=env,
  )
  commands.assert_refused(result)
  assert result.stderr.strip() == (
      "ERROR: --format=onnx needs the onnx package, which is not installed: "
      "pip install 'qgjt_jax[onnx]'"
  )


@pytest.mark.slow
def test_insightface_loads_the_insightface_layout(reference_dir, tmp_path):
  """insightface's own client routes the file to its recognition model and
  its get_feat gives --mode=embed's embeddings (the authors' IR-18 weights,
  112 px, as a converted workdir)."""
  model_zoo = pytest.importorskip("insightface.model_zoo")
  import qgjt_jax  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "ir18"
  commands.run(
      "qgjt_jax.convert",
      f"--src={reference_dir / 'iresnet18_eval.weights.npz'}",
      f"--workdir={workdir}",
      check=True,
  )
  commands.run(
      "qgjt_jax.export",
      f"--workdir={workdir}",
      "--format=onnx",
      "--onnx_layout=insightface",
      f"--out={tmp_path / 'm.onnx'}",
      check=True,
  )
  recognition = model_zoo.get_model(
      str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]
  )
  assert type(recognition).__name__ == "ArcFaceONNX"
  assert (recognition.input_mean, recognition.input_std) == (127.5, 127.5)
  faces = np.random.default_rng(3).integers(0, 256, (3, 112, 112, 3), np.uint8)
  features = recognition.get_feat(list(faces))  # BGR images, as cv2 reads
  got = features / np.linalg.norm(features, axis=1, keepdims=True)
  with tiny_runs.compile_cache():
    want, norms = qgjt_jax.load_model(str(workdir)).embed(faces)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), norms, rtol=1e-5)
