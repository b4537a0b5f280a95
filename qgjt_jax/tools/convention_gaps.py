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

import argparse
import json
import sys

import numpy as np

from qgjt_jax.eval import ijb
from qgjt_jax.eval import reject

FARS = (1e-6, 1e-5, 1e-4, 1e-3)


def tar_rule_gaps(seed: int, genuine: int, impostors: int) -> dict:
  rng = np.random.default_rng(seed)
  labels = np.r_[np.ones(genuine), np.zeros(impostors)]
  scores = np.r_[rng.normal(0.55, 0.15, genuine),
                 rng.normal(0.0, 0.1, impostors)]
  ours = ijb.tar_at_far(labels, scores, FARS, rule="insightface")
  theirs = ijb.tar_at_far(labels, scores, FARS, rule="authors")
  return {f"{far:.0e}": 100 * (ours[far] - theirs[far]) for far in FARS}


def reject_numbers(seed: int, pairs: int = 3000) -> dict:
  rng = np.random.default_rng(seed)
  quality = rng.uniform(0, 1, 2 * pairs)
  issame = np.r_[np.ones(pairs, bool), np.zeros(pairs, bool)]
  scores = np.where(issame, 0.2 + 0.5 * quality + rng.normal(0, 0.1,
                                                             2 * pairs),
                    rng.normal(0.0, 0.1, 2 * pairs))
  out = reject.reject_metrics(scores, issame, quality)
  return {"edc_pauc": out["edc_pauc"], "erc_auc": out["erc_auc"]}


def _summary(name: str, rows: list[dict]) -> dict:
  summary = {"summary": name, "draws": len(rows)}
  for key in rows[0]:
    values = np.array([r[key] for r in rows])
    summary[key] = {"mean": float(values.mean()),
                    "std": float(values.std(ddof=1)),
                    "min": float(values.min()), "max": float(values.max())}
  return summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--draws", type=int, default=8)
  parser.add_argument("--genuine", type=int, default=10_270)
  parser.add_argument("--impostors", type=int, default=8_010_270)
  args = parser.parse_args(argv)
  if args.draws < 2:
    parser.error("--draws must be 2 or more (the spread needs two)")
  for name, measure in (
      ("tar_rule", lambda s: tar_rule_gaps(s, args.genuine, args.impostors)),
      ("reject", reject_numbers)):
    rows = []
    for seed in range(args.draws):
      rows.append(measure(seed))
      print(json.dumps({name: rows[-1], "seed": seed}), flush=True)
    print(json.dumps(_summary(name, rows)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
