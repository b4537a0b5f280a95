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

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

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
        x, k, (1, 1), [(0, 0), (0, 0)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return {
      "depthwise_3x3": (
          lambda x, k: layers._grouped_conv_native(x, k, *depthwise),  # pylint: disable=protected-access
          lambda x, k: layers._grouped_conv_by_shifts(x, k, *depthwise),  # pylint: disable=protected-access
          (3, 3, 1, channels)),
      "pointwise_1x1": (
          conv1x1, lambda x, k: jnp.einsum("bhwc,cd->bhwd", x, k[0, 0]),
          (1, 1, channels, channels)),
  }


def run(batch: int, side: int, channels: int, repeats: int
        ) -> Iterator[dict]:
  """The records, each as soon as it is measured."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, side, side, channels)),
                  jnp.float32)
  for name, (native, ours, shape) in _forms(channels).items():
    kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
    diff = float(jnp.max(jnp.abs(native(x, kernel) - ours(x, kernel))))
    for form, function in (("xla_convolution", native), ("ours", ours)):
      loss = lambda x, k, f=function: jnp.sum(f(x, k) ** 2)
      for part, timed in (("forward", function),
                          ("input_gradient", jax.grad(loss, 0)),
                          ("kernel_gradient", jax.grad(loss, 1))):
        yield {
            "convolution": name, "form": form, "pass": part,
            "seconds": float(
                f"{_seconds(timed, x, kernel, repeats=repeats):.4g}"),
            "shape": [batch, side, side, channels], "max_abs_diff": diff,
            "device": jax.devices()[0].device_kind}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m qgjt_jax.tools.conv_bench",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--side", type=int, default=56)
  parser.add_argument("--channels", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  a = parser.parse_args(sys.argv[1:] if argv is None else argv)
  for record in run(a.batch, a.side, a.channels, a.repeats):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
