r"""How far apart the literature's conventions put one model, over draws.

  python -m qgjt_jax.tools.convention_gaps [--draws=8] [--impostors=8010270]

Simulates score sets and prints one JSON line per draw and convention pair,
then one summary line each (mean, standard deviation, smallest and largest
gap over the draws): the numbers docs/FIDELITY.md quotes.

* `tar_rule`: IJB TAR at FAR under insightface's tie rule less the
  authors' (`ijb.tar_at_far`), on an IJB-B-sized 1:1 set (10,270 genuine
  and 8,010,270 impostor template pairs; genuine cosine N(0.55, 0.15),
  impostor N(0, 0.1)), in points.
* `reject`: EDC pAUC and ERC AUC of one informative quality indicator
  (`eval/reject.py`) on an LFW-sized set (3,000 genuine and 3,000
  impostor pairs whose genuine scores fall with quality): not a gap
  between two readings of one number but two different numbers, printed
  so their sizes can be compared with published tables.
"""

from __future__ import annotations

import json
from typing import Iterator

from absl import app
from absl import flags

import numpy as np

from qgjt_jax.eval import ijb
from qgjt_jax.eval import reject

FARS = (1e-6, 1e-5, 1e-4, 1e-3)


def tar_rule_gaps(seed: int, genuine: int, impostors: int) -> dict:
  rng = np.random.default_rng(seed)
  labels = np.r_[np.ones(genuine), np.zeros(impostors)]
  scores = np.r_[
      rng.normal(0.55, 0.15, genuine), rng.normal(0.0, 0.1, impostors)
  ]
  ours = ijb.tar_at_far(labels, scores, FARS, rule="insightface")
  theirs = ijb.tar_at_far(labels, scores, FARS, rule="authors")
  return {f"{far:.0e}": 100 * (ours[far] - theirs[far]) for far in FARS}


def reject_numbers(seed: int, pairs: int = 3000) -> dict:
  rng = np.random.default_rng(seed)
  quality = rng.uniform(0, 1, 2 * pairs)
  issame = np.r_[np.ones(pairs, bool), np.zeros(pairs, bool)]
  scores = np.where(
      issame,
      0.2 + 0.5 * quality + rng.normal(0, 0.1, 2 * pairs),
      rng.normal(0.0, 0.1, 2 * pairs),
  )
  out = reject.reject_metrics(scores, issame, quality)
  return {"edc_pauc": out["edc_pauc"], "erc_auc": out["erc_auc"]}


def _summary(name: str, rows: list[dict]) -> dict:
  summary = {"summary": name, "draws": len(rows)}
  for key in rows[0]:
    values = np.array([r[key] for r in rows])
    summary[key] = {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)),
        "min": float(values.min()),
        "max": float(values.max()),
    }
  return summary


def records(draws: int, genuine: int, impostors: int) -> Iterator[dict]:
  """A line per draw and convention, then each convention's summary."""
  for name, measure in (
      ("tar_rule", lambda seed: tar_rule_gaps(seed, genuine, impostors)),
      ("reject", reject_numbers),
  ):
    rows = []
    for seed in range(draws):
      rows.append(measure(seed))
      yield {name: rows[-1], "seed": seed}
    yield _summary(name, rows)


_DRAWS = flags.DEFINE_integer(
    "draws",
    8,
    "Draws of each score set (the spread needs two).",
    lower_bound=2,
)
_GENUINE = flags.DEFINE_integer(
    "genuine",
    10_270,
    "Genuine template pairs of the 1:1 set.",
    lower_bound=1,
)
_IMPOSTORS = flags.DEFINE_integer(
    "impostors",
    8_010_270,
    "Impostor template pairs of the 1:1 set.",
    lower_bound=1,
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for record in records(_DRAWS.value, _GENUINE.value, _IMPOSTORS.value):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main)
