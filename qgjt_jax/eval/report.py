"""Evaluation results as an aligned text table and as JSON in the workdir."""

from collections.abc import Mapping
import hashlib
import io
import json
import numbers
from typing import Any

from etils import epath
import numpy as np

from qgjt_jax import outputs
from qgjt_jax import workdir as workdir_layout
from qgjt_jax.eval import identification
from qgjt_jax.eval import plots

# Where a set's numbers come from (kind of faces, scoring, step): kept in the
# JSON for the decisions that read it, not a metric.
PROVENANCE = 'provenance'
# A folder's photos kept as searches for identify (`write_results`).
SEARCHES = 'searches'


def _flatten(results: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'set/metric': value} for every scalar leaf (numbers, not bools)."""
  flat = {}
  for key, value in results.items():
    if key == PROVENANCE:
      continue
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}/'))
    elif isinstance(value, (numbers.Number, np.number)) and not isinstance(
        value, (bool, np.bool_)
    ):
      flat[f'{prefix}{key}'] = value
  return flat


def scalar_metrics(results: Mapping[str, Any]) -> dict[str, float]:
  """Flattens {set: {metric: value}} to {'set/metric': float}, scalars only.

  Lists and arrays (per-fold values, ROC curves) and None are left out, so
  the result can go straight to a metric writer.
  """
  return {k: float(v) for k, v in _flatten(results).items()}


def format_table(results: Mapping[str, Any], digits: int = 4) -> str:
  """An aligned table: one row per evaluated set, one column per metric.

  `results` maps set names to metric dicts ({'lfw': {'accuracy_mean': ...}});
  a flat {metric: value} mapping becomes a single row named 'result'. Scalar
  metrics are columns; integers (counts) print as integers. Text entries
  (which images a set was scored on, the convention a number follows)
  follow the table, one line each, once when every set has the same.
  """
  if not any(isinstance(v, Mapping) for v in results.values()):
    results = {'result': results}
  rows = {
      name: _flatten(m) for name, m in results.items() if isinstance(m, Mapping)
  }
  columns = []
  for metrics in rows.values():
    columns += [c for c in metrics if c not in columns]

  def cell(value):
    if value is None:
      return '-'
    if isinstance(value, (numbers.Integral, np.integer)):
      return str(int(value))
    return f'{float(value):.{digits}f}'

  header = ['set'] + columns
  body = [
      [name] + [cell(metrics.get(c)) for c in columns]
      for name, metrics in rows.items()
  ]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  lines = [
      '  '.join(
          h.ljust(w) if i == 0 else h.rjust(w)
          for i, (h, w) in enumerate(zip(r, widths))
      )
      for r in [header] + body
  ]
  lines.insert(1, '  '.join('-' * w for w in widths))
  texts = {
      name: [(k, v) for k, v in metrics.items() if isinstance(v, str)]
      for name, metrics in results.items()
      if isinstance(metrics, Mapping)
  }
  # A text every set shares (the convention a number follows) once.
  shared = (
      set.intersection(*map(set, texts.values())) if len(texts) > 1 else set()
  )
  lines += [f'{key}: {value}' for key, value in sorted(shared)]
  for name, entries in texts.items():
    lines += [f'{name} {k}: {v}' for k, v in entries if (k, v) not in shared]
  return '\n'.join(lines)


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.floating):
    return float(value)
  return value


def write_results(workdir: str, name: str, results: Mapping[str, Any]) -> str:
  """Writes `results` to <workdir>/eval/<name>.json, and its pictures beside
  it (`plots.write_plots`: <name>.roc.png...); returns the JSON's path.

  A set's stored searches (`identification.Searches`) go to
  <name>.<k>.searches.npy (float32 embeddings, k counting the sets),
  landing with the JSON or not at all; the JSON names the file, its
  SHA-256 and each row's person.
  An earlier result of the same name is kept: the new one goes to
  <name>.2.json (then .3 ...). Local files are written whole or not at all.
  """
  remote = '://' in workdir  # object storage: each object is written whole
  directory = workdir_layout.Workdir(workdir).eval
  directory.mkdir(parents=True, exist_ok=True)
  base, n = name, 1
  if not remote:
    # The first of NAME, NAME.2, ... with neither a JSON nor pictures (a
    # JSON deleted by hand leaves its pictures, which are kept too).
    while (directory / f'{base}.json').exists() or any(
        (directory / f'{base}.{kind}.png').exists() for kind in plots.KINDS
    ):
      n += 1
      base = f'{name}.{n}'
  files, results = {}, dict(results)
  for set_name, metrics in results.items():
    searches = metrics.get(SEARCHES) if isinstance(metrics, Mapping) else None
    if isinstance(searches, identification.Searches):
      array = io.BytesIO()
      np.save(
          array, np.asarray(searches.embeddings, np.float32), allow_pickle=False
      )
      data = array.getvalue()
      file = f'{base}.{len(files) + 1}.searches.npy'  # set names are free
      files[str(directory / file)] = data
      results[set_name] = {
          **metrics,
          SEARCHES: {
              'file': file,
              'sha256': hashlib.sha256(data).hexdigest(),
              'people': np.asarray(searches.people).tolist(),
          },
      }
  path = str(directory / f'{base}.json')
  files[path] = json.dumps(_jsonable(results), indent=2, sort_keys=True)
  if remote:
    for where, data in files.items():
      if isinstance(data, bytes):
        epath.Path(where).write_bytes(data)
      else:
        epath.Path(where).write_text(data)
    return path
  outputs.write_together(files, overwrite=False)
  try:
    plots.write_plots(results, path[: -len('.json')])
  except ImportError:  # matplotlib missing: the JSON holds the curves
    pass
  return path
