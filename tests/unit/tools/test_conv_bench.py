"""The convolution benchmark: one line per (convolution, form, pass), and
both forms of each convolution computing the same numbers."""

import json

from qgjt_jax.tools import conv_bench


def test_every_form_and_pass_is_timed_and_the_forms_agree():
  records = [json.loads(json.dumps(r)) for r in conv_bench.run(2, 6, 4, 1)]
  assert {(r["convolution"], r["form"], r["pass"]) for r in records} == {
      (conv, form, part)
      for conv in ("depthwise_3x3", "pointwise_1x1")
      for form in ("xla_convolution", "ours")
      for part in ("forward", "input_gradient", "kernel_gradient")
  }
  for record in records:
    assert record["seconds"] > 0 and record["shape"] == [2, 6, 6, 4]
    assert record["max_abs_diff"] < 1e-4, record
