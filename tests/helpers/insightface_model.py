"""A narrow insightface r18: random weights in their names, and their
forward pass written out in numpy (NCHW, float64), for the tests."""

import numpy as np

WIDTH, SIZE, EMBEDDING = 4, 32, 8


def _conv(x, w, stride=1):
  """NCHW convolution with padding k // 2, by patches."""
  k = w.shape[-1]
  pad = k // 2
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, c, h, width = x.shape
  out_h, out_w = (h - k) // stride + 1, (width - k) // stride + 1
  out = np.zeros((n, w.shape[0], out_h, out_w))
  for i in range(k):
    for j in range(k):
      patch = x[
          :, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride
      ]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out


def _bn(x, state, name):
  shape = (1, -1) + (1,) * (x.ndim - 2)
  mean, var = state[f"{name}.running_mean"], state[f"{name}.running_var"]
  scale, bias = state[f"{name}.weight"], state[f"{name}.bias"]
  return (x - mean.reshape(shape)) / np.sqrt(
      var.reshape(shape) + 1e-5
  ) * scale.reshape(shape) + bias.reshape(shape)


def _prelu(x, slope):
  return np.where(x >= 0, x, slope.reshape(1, -1, 1, 1) * x)


def oracle(state, rgb_nchw, units=(2, 2, 2, 2)):
  """insightface IResNet.forward (eval mode), in float64."""
  x = _prelu(
      _bn(_conv(rgb_nchw, state["conv1.weight"]), state, "bn1"),
      state["prelu.weight"],
  )
  for stage, count in enumerate(units, start=1):
    for j in range(count):
      p = f"layer{stage}.{j}"
      stride = 2 if j == 0 else 1
      out = _bn(x, state, f"{p}.bn1")
      out = _bn(_conv(out, state[f"{p}.conv1.weight"]), state, f"{p}.bn2")
      out = _prelu(out, state[f"{p}.prelu.weight"])
      out = _bn(
          _conv(out, state[f"{p}.conv2.weight"], stride), state, f"{p}.bn3"
      )
      identity = x
      if f"{p}.downsample.0.weight" in state:
        identity = _bn(
            _conv(x, state[f"{p}.downsample.0.weight"], stride),
            state,
            f"{p}.downsample.1",
        )
      x = out + identity
  x = _bn(x, state, "bn2").reshape(len(x), -1)  # NCHW flatten
  x = x @ state["fc.weight"].T + state["fc.bias"]
  return _bn(x, state, "features")


def random_state(seed=0, units=(2, 2, 2, 2)):
  """An r18 state dict in insightface's names, narrow, random."""
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, cout, cin, k):
    state[name] = rng.normal(0, np.sqrt(1 / (cin * k * k)), (cout, cin, k, k))

  def bn(name, c):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
    state[f"{name}.bias"] = rng.uniform(-0.1, 0.1, c)
    state[f"{name}.running_mean"] = rng.uniform(-0.1, 0.1, c)
    state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c)
    state[f"{name}.num_batches_tracked"] = np.array(5, np.int64)

  conv("conv1.weight", WIDTH, 3, 3)
  bn("bn1", WIDTH)
  state["prelu.weight"] = rng.uniform(0, 0.5, WIDTH)
  cin = WIDTH
  for stage, count in enumerate(units, start=1):
    cout = WIDTH * 2 ** (stage - 1)
    for j in range(count):
      p = f"layer{stage}.{j}"
      bn(f"{p}.bn1", cin)
      conv(f"{p}.conv1.weight", cout, cin, 3)
      bn(f"{p}.bn2", cout)
      state[f"{p}.prelu.weight"] = rng.uniform(0, 0.5, cout)
      conv(f"{p}.conv2.weight", cout, cout, 3)
      bn(f"{p}.bn3", cout)
      if j == 0:  # every stage starts with a stride-2 projection
        conv(f"{p}.downsample.0.weight", cout, cin, 1)
        bn(f"{p}.downsample.1", cout)
      cin = cout
  side = SIZE // 16
  bn("bn2", cin)
  state["fc.weight"] = rng.normal(
      0, np.sqrt(1 / (cin * side * side)), (EMBEDDING, cin * side * side)
  )
  state["fc.bias"] = rng.normal(0, 0.1, EMBEDDING)
  bn("features", EMBEDDING)
  state["features.weight"] = np.ones(EMBEDDING)  # fixed to 1 in theirs
  return {
      k: v.astype(np.float32) if v.dtype == np.float64 else v
      for k, v in state.items()
  }
