"""The conventions benchmark runs and summarises its draws."""

import json

from qgjt_jax.tools import convention_gaps


def test_it_prints_a_line_per_draw_and_a_spread():
  # Each record is a JSON line of the command.
  lines = [
      json.loads(json.dumps(r))
      for r in convention_gaps.records(draws=2, genuine=300, impostors=20000)
  ]
  summaries = {line["summary"]: line for line in lines if "summary" in line}
  assert set(summaries) == {"tar_rule", "reject"}
  gaps = [line["tar_rule"]["1e-04"] for line in lines if "tar_rule" in line]
  spread = summaries["tar_rule"]["1e-04"]
  assert spread["min"] == min(gaps) and spread["max"] == max(gaps)
  # insightface's rule never reads below the authors'.
  assert all(
      g >= 0
      for line in lines
      if "tar_rule" in line
      for g in line["tar_rule"].values()
  )
