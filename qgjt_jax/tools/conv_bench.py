r"""Times the two forms of a grouped and of a 1x1 convolution on this
machine: what `models.layers.GroupedConv` and `PointwiseConv` choose
between.

  python -m qgjt_jax.tools.conv_bench [--batch=64] [--side=56] \
      [--channels=128] [--repeats=3]

One JSON line per (convolution, form, pass): the median seconds of the
forward pass, the input gradient and the kernel gradient of a sum of
squares, jitted, after a warm-up call. The forms compute the same numbers
(the line says how far apart, `max_abs_diff`).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Iterator

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from qgjt_jax.models import layers


def _seconds(function: Callable, *args, repeats: int) -> float:
  jitted = jax.jit(function)
  jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _forms(channels: int) -> dict[str, tuple[Callable, Callable, tuple]]:
  """{convolution: (XLA's convolution, our form, kernel shape)}."""
  depthwise = (1, 1, channels)

  def conv1x1(x, k):
    return jax.lax.conv_general_dilated(
        x,
        k,
        (1, 1),
        [(0, 0), (0, 0)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  return {
      "depthwise_3x3": (
          lambda x, k: layers._grouped_conv_native(x, k, *depthwise),  # pylint: disable=protected-access
          lambda x, k: layers._grouped_conv_by_shifts(x, k, *depthwise),  # pylint: disable=protected-access
          (3, 3, 1, channels),
      ),
      "pointwise_1x1": (
          conv1x1,
          lambda x, k: jnp.einsum("bhwc,cd->bhwd", x, k[0, 0]),
          (1, 1, channels, channels),
      ),
  }


def run(batch: int, side: int, channels: int, repeats: int) -> Iterator[dict]:
  """The records, each as soon as it is measured."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, side, side, channels)), jnp.float32)
  for name, (native, ours, shape) in _forms(channels).items():
    kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
    diff = float(jnp.max(jnp.abs(native(x, kernel) - ours(x, kernel))))
    for form, function in (("xla_convolution", native), ("ours", ours)):
      loss = lambda x, k, f=function: jnp.sum(f(x, k) ** 2)
      for part, timed in (
          ("forward", function),
          ("input_gradient", jax.grad(loss, 0)),
          ("kernel_gradient", jax.grad(loss, 1)),
      ):
        yield {
            "convolution": name,
            "form": form,
            "pass": part,
            "seconds": float(
                f"{_seconds(timed, x, kernel, repeats=repeats):.4g}"
            ),
            "shape": [batch, side, side, channels],
            "max_abs_diff": diff,
            "device": jax.devices()[0].device_kind,
        }


_BATCH = flags.DEFINE_integer("batch", 64, "Images a call.", lower_bound=1)
_SIDE = flags.DEFINE_integer("side", 56, "Pixels a side.", lower_bound=1)
_CHANNELS = flags.DEFINE_integer(
    "channels", 128, "Channels in and out.", lower_bound=1
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Timed calls; the median is printed.", lower_bound=1
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for record in run(_BATCH.value, _SIDE.value, _CHANNELS.value, _REPEATS.value):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main)
