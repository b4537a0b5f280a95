"""The optimiser: PyTorch's SGD order, no decay on BatchNorm, the schedules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgjt_jax import optim
from qgjt_jax.models import build_backbone
from tests.helpers.tiny_runs import tiny_config


def _optim(**changes):
  config = tiny_config()
  config.optim.update(**changes)
  return config.optim


def test_no_weight_decay_on_any_batchnorm_and_on_everything_else():
  model = build_backbone("ir_se18", base_width=4, embedding_size=8)
  params = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
      )
  )["params"]
  params = {"backbone": params, "classifier": {"kernel": jnp.zeros((8, 3))}}
  mask = jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(params))
  decayed = {jax.tree_util.keystr(p): m for p, m in mask[0]}
  batchnorm = [k for k in decayed if "bn" in k]
  assert batchnorm and not any(decayed[k] for k in batchnorm)
  others = [k for k in decayed if "bn" not in k]
  assert all(decayed[k] for k in others)
  # Convolutions, PReLU slopes, SE gates, the head and the classifier decay.
  for part in (
      "conv1']['kernel",
      "negative_slope",
      "['se']['fc1']",
      "['fc']['kernel']",
      "['classifier']['kernel']",
  ):
    assert any(part in k and decayed[k] for k in others), part


def test_sgd_matches_pytorch_order():
  """buf = mu * buf + g + wd * w; w -= lr * buf (torch.optim.SGD)."""
  opt = _optim(
      lr=0.1,
      momentum=0.9,
      weight_decay=0.01,
      grad_clip_norm=0.0,
      warmup_epochs=0.0,
      milestones=(100,),
  )
  tx = optim.make_optimizer(opt, optim.make_lr_schedule(opt, 10, 10))
  w = {
      "backbone": {
          "conv": {"kernel": jnp.array([1.0, -2.0])},
          "bn": {"scale": jnp.array([3.0])},
      },
      "classifier": {"kernel": jnp.array([0.5])},
  }
  state = tx.init(w)
  buf = jax.tree.map(jnp.zeros_like, w)
  rng = np.random.default_rng(0)
  for _ in range(3):
    g = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), w
    )
    updates, state = tx.update(g, state, w)
    new = jax.tree.map(lambda a, u: a + u, w, updates)
    decay = {
        "backbone": {"conv": {"kernel": 0.01}, "bn": {"scale": 0.0}},
        "classifier": {"kernel": 0.01},
    }
    buf = jax.tree.map(
        lambda b, gr, x, wd: 0.9 * b + gr + wd * x, buf, g, w, decay
    )
    want = jax.tree.map(lambda x, b: x - 0.1 * b, w, buf)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    w = new


def test_multistep_schedule_with_warm_up():
  opt = _optim(
      lr=0.1,
      schedule="multistep",
      milestones=(2, 4),
      gamma=0.1,
      warmup_epochs=1.0,
  )
  schedule = optim.make_lr_schedule(opt, steps_per_epoch=10, num_epochs=5)
  want = {
      0: 0.1 * 1 / 10,
      4: 0.1 * 5 / 10,
      9: 0.1,
      19: 0.1,
      20: 0.01,
      39: 0.01,
      40: 0.001,
      49: 0.001,
  }
  for step, lr in want.items():
    np.testing.assert_allclose(schedule(step), lr, rtol=1e-6, err_msg=step)


def test_cosine_schedule():
  opt = _optim(lr=0.2, schedule="cosine", warmup_epochs=0.0)
  schedule = optim.make_lr_schedule(opt, steps_per_epoch=10, num_epochs=4)
  for step in (0, 10, 20, 30, 40, 60):
    progress = min(step / 40, 1.0)
    np.testing.assert_allclose(
        schedule(step),
        0.2 * 0.5 * (1 + math.cos(math.pi * progress)),
        rtol=1e-5,
        atol=1e-7,
        err_msg=step,
    )


def test_clipping_comes_first():
  opt = _optim(
      lr=1.0,
      momentum=0.0,
      weight_decay=0.0,
      grad_clip_norm=1.0,
      warmup_epochs=0.0,
      milestones=(100,),
  )
  tx = optim.make_optimizer(opt, lambda step: 1.0)
  w = {"backbone": {"w": jnp.zeros(2)}, "classifier": {"kernel": jnp.zeros(1)}}
  g = {
      "backbone": {"w": jnp.array([3.0, 4.0])},
      "classifier": {"kernel": jnp.array([0.0])},
  }
  updates, _ = tx.update(g, tx.init(w), w)
  np.testing.assert_allclose(updates["backbone"]["w"], [-0.6, -0.8], rtol=1e-6)


def test_an_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="config.optim.schedule='linear'"):
    optim.make_lr_schedule(_optim(schedule="linear"), 10, 2)
