"""Pictures of an evaluation, beside its JSON: what a table cannot show.

From the results themselves (so a JSON can be drawn again later):

  NAME.roc.png     TAR against FAR (log scale) of every set with a ROC
  NAME.reject.png  the EDC and ERC curves of the norm (eval/reject.py)
  NAME.norms.png   the norms of clean and degraded faces (HQ-LQ pairs)

Drawn with matplotlib (no display needed); each file is written whole or
not at all.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Callable

from qgjt_jax import outputs
from qgjt_jax.eval import reject as reject_lib

KINDS = ("roc", "reject", "norms")


def _figure(draw: Callable[[Any], bool], path: str) -> bool:
  """Draws on one axes with `draw(ax)`; writes `path` if it drew anything."""
  # A bare Figure, not pyplot: no display, and the caller's backend (a
  # notebook's inline one) is left as it is.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(6, 4.5), dpi=100)
  ax = fig.subplots()
  if not draw(ax):
    return False
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  buffer = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buffer, format="png")
  outputs.write(path, buffer.getvalue(), overwrite=False)
  return True


def _sets_with(results: Mapping[str, Any], key: str):
  return [
      (name, m[key])
      for name, m in results.items()
      if isinstance(m, Mapping) and m.get(key)
  ]


def write_plots(results: Mapping[str, Any], stem: str) -> list[str]:
  """The pictures of `results` as STEM.*.png; returns the paths written."""

  def roc(ax):
    curves = _sets_with(results, "roc")
    for name, points in curves:
      ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set(
        xscale="log",
        xlabel="false accept rate",
        ylabel="true accept rate",
        title="ROC",
    )
    return bool(curves)

  def reject(ax):
    # Both conventions of eval/reject.py, each line named by its own.
    edc = _sets_with(results, "edc_curve")
    for name, points in edc:
      ax.plot(
          [100 * p[0] for p in points],
          [p[1] for p in points],
          drawstyle="steps-post",
          label=f"{name}: EDC of {results[name]['edc_genuine']} "
          f"genuine, pAUC {results[name]['edc_pauc']:.4f}",
      )
    for name, points in _sets_with(results, "erc_curve"):
      auc = results[name]["erc_auc"]
      ax.plot(
          [100 * p[0] for p in points],
          [p[1] for p in points],
          "--",
          label=f"{name}: ERC at FMR {reject_lib.ERC_FMR:.0e}, "
          + (
              f"AUC {auc:.4f}"
              if auc is not None
              else f"unresolved by {results[name]['erc_impostors']} "
              "impostors"
          ),
      )
    ax.set(
        xlabel="comparisons set aside, lowest feature norm first (%)",
        ylabel="false non-match rate",
        title="EDC (fixed threshold, genuine only)\nand ERC "
        "(recomputed threshold)",
    )
    return bool(edc)

  def norms(ax):
    found = _sets_with(results, "norm_histogram")
    for name, hist in found:
      centres = [
          (a + b) / 2 for a, b in zip(hist["edges"][:-1], hist["edges"][1:])
      ]
      for view in ("clean", "degraded"):
        ax.plot(
            centres, hist[view], drawstyle="steps-mid", label=f"{name}: {view}"
        )
    ax.set(
        xlabel="feature norm",
        ylabel="faces",
        title="Norms of clean and degraded faces",
    )
    return bool(found)

  written = []
  for suffix, draw in zip(KINDS, (roc, reject, norms)):
    path = f"{stem}.{suffix}.png"
    if _figure(draw, path):
      written.append(path)
  return written
