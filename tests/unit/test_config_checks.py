"""Bad configs fail at start with one message naming the key and the fix."""

from __future__ import annotations


import jax
import pytest

from configs import ms1m
from configs import ms1m_ir100
from configs import synthetic
from qgjt_jax import config_checks
from qgjt_jax.config_checks import ConfigError
from tests.helpers import commands
from tests.helpers import tiny_runs

ROOT = tiny_runs.ROOT


def _config(**changes):
  config = synthetic.get_config()
  for dotted, value in changes.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _error(config, **kwargs) -> str:
  with pytest.raises(ConfigError) as e:
    config_checks.check_train_config(config, **kwargs)
  message = str(e.value)
  assert "\n" not in message, message  # one message
  return message


def test_the_shipped_recipes_pass(tmp_path):
  config_checks.check_train_config(synthetic.get_config(), num_classes=64)
  for recipe in (ms1m, ms1m_ir100):
    config = recipe.get_config()
    config.data.rec_dir = str(tmp_path)
    config_checks.check_train_config(config)


# (override, words the message must contain: the key, and the fix)
BAD = [
    ({"head.b": 1.5}, ["config.head.b=1.5", "[0.0, 1.0]"]),
    ({"contrastive.b": -0.1}, ["config.contrastive.b=-0.1", "[0.0, 1.0]"]),
    (
        {"queue.capacity": 100},
        [
            "config.queue.capacity=100",
            "at least 128",
            "--config.queue.capacity=128",
        ],
    ),
    (
        {"queue.kind": "moco", "queue.capacity": 32},
        ["config.queue.capacity=32", "at least 64"],
    ),
    ({"queue.kind": "fifo"}, ["config.queue.kind='fifo'", "'proxy'"]),
    (
        {"head.kind": "sphereface"},
        ["config.head.kind='sphereface'", "'adaface'"],
    ),
    (
        {"optim.schedule": "linear"},
        ["config.optim.schedule='linear'", "'cosine'"],
    ),
    (
        {"model.dtype": "float64"},
        ["config.model.dtype='float64'", "'bfloat16'"],
    ),
    ({"data.kind": "csv"}, ["config.data.kind='csv'", "'rec'"]),
    (
        {"data.view.recipe": "mine"},
        ["config.data.view.recipe='mine'", "'qgface'"],
    ),
    ({"model.name": "resnet50"}, ["config.model.name='resnet50'", "ir50"]),
    ({"global_batch_size": 0}, ["config.global_batch_size=0", "positive"]),
    ({"optim.lr": -0.1}, ["config.optim.lr=-0.1", "positive"]),
    ({"num_epochs": 0.0}, ["config.num_epochs=0.0", "positive"]),
    ({"num_train_steps": -1}, ["config.num_train_steps=-1", "a step count"]),
    (
        {"max_consecutive_nonfinite": 0},
        ["config.max_consecutive_nonfinite=0", "positive"],
    ),
    ({"optim.momentum": 1.5}, ["config.optim.momentum=1.5"]),
    (
        {"optim.milestones": (20, 12)},
        ["config.optim.milestones=(20, 12)", "increasing"],
    ),
    (
        {"data.synthetic.num_identities": 1},
        ["config.data.synthetic.num_identities=1", "at least 2"],
    ),
    ({"eval.fusion": "max"}, ["config.eval.fusion='max'", "'pre_norm_add'"]),
    (
        {"data.kind": "rec"},
        ["config.data.rec_dir is not set", "--config.data.rec_dir="],
    ),
    (
        {"data.kind": "rec", "data.rec_dir": "/no/such/faces_emore"},
        ["config.data.rec_dir='/no/such/faces_emore'", "does not exist"],
    ),
    (
        {"data.kind": "tfds"},
        ["config.data.tfds_name is not set", "qgjt_jax.data.prepare"],
    ),
    (
        {"eval.bin_sets": ("/no/such/lfw.bin",)},
        ["config.eval.bin_sets", "'/no/such/lfw.bin'", "does not exist"],
    ),
    (
        {"eval.tinyface_root": "/no/such/tinyface"},
        ["config.eval.tinyface_root='/no/such/tinyface'", "does not exist"],
    ),
    (
        {"eval.tinyface_root": str(ROOT)},
        [
            "config.eval.tinyface_aligned_dir='aligned_pad_0.1_pad_high'",
            "--config.eval.tinyface_aligned_dir=''",
        ],
    ),
    # An anchor would meet its own just-enqueued copy (cosine 1) unmasked.
    ({"contrastive.mask": "none"}, ["config.contrastive.mask='none'", "'own'"]),
    ({"contrastive.coupling": "D2D"}, ["config.contrastive.coupling='D2D'"]),
    (
        {"contrastive.b_warmup_epochs": 2.0, "head.b": 0.3},
        [
            "config.head.b=0.3",
            "--config.head.b=0.4",
            "--config.contrastive.b_warmup=step",
        ],
    ),
    (
        {"contrastive.start_epoch": 3.0, "contrastive.end_epoch": 2.0},
        ["config.contrastive.end_epoch=2.0", "0 for no end"],
    ),
    (
        {"optim.clip_each_loss": True, "optim.grad_clip_norm": 0.0},
        ["config.optim.clip_each_loss=True", "grad_clip_norm=5.0"],
    ),
    ({"model.remat": "layer"}, ["config.model.remat='layer'", "'block'"]),
    ({"num_epochs": float("nan")}, ["config.num_epochs=nan", "finite"]),
    ({"optim.lr": float("inf")}, ["config.optim.lr=inf", "finite"]),
    ({"quality.init_mean": float("nan")}, ["config.quality.init_mean=nan"]),
    (
        {"optim.milestones": ("abc",)},
        ["config.optim.milestones=('abc',)", "--config.optim.milestones="],
    ),
    (
        {"profile_steps": (5, 5)},
        ["config.profile_steps=(5, 5)", "START < STOP"],
    ),
    ({"profile_steps": (3,)}, ["config.profile_steps=(3,)", "(START, STOP)"]),
    ({"eval.dtype": "float64"}, ["config.eval.dtype='float64'"]),
]


@pytest.mark.parametrize(
    "changes, words", BAD, ids=[",".join(c) for c, _ in BAD]
)
def test_an_impossible_value_is_named_with_its_fix(changes, words):
  message = _error(_config(**changes))
  for word in words:
    assert word in message, message


def test_a_batch_that_does_not_split_over_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  message = _error(_config(global_batch_size=64, **{"queue.capacity": 1024}))
  assert "config.global_batch_size=64" in message
  assert "3 processes" in message and "multiple of 3" in message


class _FakeMesh:
  """parallel.data_parallel_size reads mesh.shape['data'] only."""

  def __init__(self, data: int):
    self.shape = {"data": data, "model": 1}


def test_a_batch_that_does_not_split_over_devices():
  config = _config(global_batch_size=64, **{"eval.batch_size": 96})
  config_checks.check_mesh(config, _FakeMesh(8))
  with pytest.raises(
      ConfigError,
      match=r"config.global_batch_size=64 is not "
      r"divisible by the 3 data-parallel devices; use a "
      r"multiple of 3",
  ):
    config_checks.check_mesh(config, _FakeMesh(3))
  with pytest.raises(ConfigError, match="config.eval.batch_size=96 .* 5 "):
    config_checks.check_mesh(config, _FakeMesh(5), train=False)


def test_too_few_identities():
  with pytest.raises(ConfigError, match="1 identities"):
    config_checks.check_train_config(synthetic.get_config(), num_classes=1)


def test_eval_mode_checks_values_and_paths_but_not_training_data():
  config = _config(**{"data.kind": "rec"})  # no rec_dir: fine for eval
  config_checks.check_eval_config(config)
  config.eval.ijb_root = "/no/such/ijb"
  with pytest.raises(ConfigError, match="config.eval.ijb_root"):
    config_checks.check_eval_config(config)


def _cli(*flags) -> commands.Result:
  return commands.main(
      "--config=configs/synthetic.py",
      "--workdir=unused_workdir",
      *flags,
      timeout=300,
  )


def test_cli_names_an_unknown_key_and_a_bad_value_without_a_traceback():
  result = _cli("--config.optim.lr=0.1", "--config.optim.lrr=1")
  assert result.returncode == 1
  assert "--config.optim.lrr=1: unknown config key 'lrr'" in result.stderr
  assert 'Did you mean "lr"' in result.stderr
  assert "Traceback" not in result.stderr, result.stderr

  result = _cli("--config.nope=1")
  assert result.returncode == 1
  assert "--config.nope=1: unknown config key 'nope'" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr

  result = _cli("--config.head.b=1.5")
  assert result.returncode == 1
  assert "ERROR: config.head.b=1.5 must be in [0.0, 1.0]" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  assert not (ROOT / "unused_workdir").exists()


def test_the_defaults_follow_the_authors_code():
  """docs/FIDELITY.md's table: their QGFace head has no positive margin
  (margin_method=None), they evaluate in float32 and score TinyFace on its
  aligned copies, their running statistics start at 0."""
  from qgjt_jax import base_config as common  # pylint: disable=g-import-not-at-top

  config = common.get_base_config()
  assert config.contrastive.margin == "none"
  assert config.eval.dtype == "float32" and config.model.dtype == "bfloat16"
  assert config.eval.tinyface_aligned_dir == "aligned_pad_0.1_pad_high"
  assert (config.quality.init_mean, config.quality.init_std) == (0.0, 0.0)
  assert (config.queue.kind, config.contrastive.mask) == ("proxy", "zero")
  assert config.contrastive.b_warmup == "epoch"


def _leaves(tree, prefix=""):
  for name, value in tree.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{name}.")
    else:
      yield prefix + name


def test_every_key_is_declared_once_with_its_meaning():
  """The base config's keys are exactly the declared ones, each with a
  meaning; every key a check names exists; choice keys state their
  values."""
  from qgjt_jax import base_config

  meanings = base_config.meanings()
  keys = list(_leaves(base_config.get_base_config()))
  assert len(keys) == len(set(keys))
  assert set(keys) == set(meanings)
  assert all(len(meanings[k]) > 8 for k in keys), [
      k for k in keys if len(meanings[k]) <= 8
  ]
  checked = [
      *config_checks._CHOICES,
      *config_checks._POSITIVE,
      *(r[0] for r in config_checks._RANGES),
  ]
  assert set(checked) <= set(keys), set(checked) - set(keys)
  assert config_checks.allowed("eval.fusion").startswith("one of pre_norm_add")
  assert config_checks.allowed("queue.kind").startswith("one of ")
  assert config_checks.allowed("optim.grad_clip_norm") == "in [0.0, inf]"


def test_keys_mode_prints_each_key_value_and_meaning(tmp_path):
  result = commands.main(
      f"--config={ROOT / 'configs' / 'finetune.py'}",
      "--mode=keys",
      "--config.optim.lr=0.05",
      cwd=tmp_path,
  )
  assert result.returncode == 0, result.output[-2000:]
  lines = result.stdout.splitlines()
  assert "optim.lr = 0.05  [> 0]" in lines
  at = lines.index("optim.grad_clip_norm = 5.0  [in [0.0, inf]]")
  assert "clipped" in lines[at + 1]
  assert "data.kind = 'tfds'  [one of rec, tfds, synthetic]" in lines
  assert len(lines) == 2 * len(list(_leaves(ms1m.get_config())))
  refused = commands.main("--mode=keys", cwd=tmp_path)
  commands.assert_refused(refused, "--mode=keys needs --config")


def test_a_registered_data_kind_is_checked_and_opened(monkeypatch):
  """Dataset kinds are a registry: a new one is an allowed value, its own
  problems are the config check's message, and it opens the source."""
  from qgjt_jax.data import sources  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(sources, "_KINDS", dict(sources._KINDS))
  sources.register_kind(
      sources.DataKind(
          "lines",
          open=lambda data: ["a", "b"] * data.image_size,
          problem=lambda data, files: (
              "config.data.rec_dir names no lines file"
              if files and not data.rec_dir
              else None
          ),
      )
  )
  assert "lines" in config_checks.allowed("data.kind")
  config = _config(**{"data.kind": "lines"})
  config_checks.check_values(config)
  assert "names no lines file" in _error(config, num_classes=64)
  assert sources.train_source(config) == ["a", "b"] * config.data.image_size
  config = _config(**{"data.kind": "rows"})
  assert "config.data.kind='rows'" in _error(config, num_classes=64)
