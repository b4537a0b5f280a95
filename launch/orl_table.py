"""The table of launch/orl_finetune.sh: every run's last evaluation, and
each method's mean and spread (population std) over its seeds.

  python launch/orl_table.py OUT   # writes OUT/results.json, prints Markdown
"""

import glob
import json
import os
import statistics
import sys

COLUMNS = [
    (f"{size} {metric}", f"folder_test_photos{suffix}", key)
    for size, suffix in (("clean", ""), ("12px", "@12px"), ("8px", "@8px"))
    for metric, key in (
        ("acc", "accuracy_mean"),
        ("TAR@1e-2", "tar@far=1e-02"),
        ("TAR@1e-3", "tar@far=1e-03"),
    )
]


def last_evaluation(eval_dir):
  last = max(
      glob.glob(f"{eval_dir}/step_*.json"),
      key=lambda p: int(os.path.basename(p)[5:].split(".")[0]),
  )
  with open(last) as f:
    return json.load(f)


def main(out):
  runs = {}
  for eval_dir in sorted(glob.glob(f"{out}/*/eval")):
    results = last_evaluation(eval_dir)
    runs[os.path.basename(os.path.dirname(eval_dir))] = {
        column: results[key][metric] for column, key, metric in COLUMNS
    }
  by_method = {}
  for name, row in runs.items():  # qgface_0, qgface_1 -> qgface
    stem, _, seed = name.rpartition("_")
    by_method.setdefault(stem if seed.isdigit() else name, []).append(row)
  methods = {
      method: {"runs": len(rows)}
      | {
          column: [
              statistics.mean(r[column] for r in rows),
              statistics.pstdev(r[column] for r in rows),
          ]
          for column, _, _ in COLUMNS
      }
      for method, rows in by_method.items()
  }
  with open(f"{out}/results.json", "w") as f:
    json.dump({"runs": runs, "methods": methods}, f, indent=2)
  print("| run | " + " | ".join(c for c, _, _ in COLUMNS) + " |")
  print("|---" * (len(COLUMNS) + 1) + "|")
  for name, row in runs.items():
    print(
        f"| {name} | "
        + " | ".join(f"{row[c]:.4f}" for c, _, _ in COLUMNS)
        + " |"
    )
  for method, stats in methods.items():
    print(
        f"| **{method}**, mean ± std of {stats['runs']} | "
        + " | ".join(
            f"{stats[c][0]:.3f} ± {stats[c][1]:.3f}" for c, _, _ in COLUMNS
        )
        + " |"
    )


if __name__ == "__main__":
  main(sys.argv[1])
