"""Result tables and JSON files."""

import json

import numpy as np

from qgjt_jax.eval import report

RESULTS = {
    'lfw': {
        'accuracy_mean': 0.99733,
        'accuracy_std': np.float32(0.0025),
        'fold_accuracies': [1.0, 0.99],
        'num_pairs': 6000,
        'low_res': None,
    },
    'tinyface': {'rank1': 0.7, 'rank5': np.float64(0.75), 'num_probes': 3728},
}


def test_scalar_metrics_flattens_and_drops_non_scalars():
  flat = report.scalar_metrics(RESULTS)
  assert flat == {
      'lfw/accuracy_mean': 0.99733,
      'lfw/accuracy_std': float(np.float32(0.0025)),
      'lfw/num_pairs': 6000.0,
      'tinyface/rank1': 0.7,
      'tinyface/rank5': 0.75,
      'tinyface/num_probes': 3728.0,
  }
  assert all(type(v) is float for v in flat.values())


def test_format_table_aligns_rows_and_columns():
  text = report.format_table(RESULTS)
  lines = text.splitlines()
  assert len(lines) == 4  # header, rule, two sets
  assert len({len(line) for line in lines}) == 1  # every line equally wide
  header = lines[0].split()
  assert header == [
      'set',
      'accuracy_mean',
      'accuracy_std',
      'num_pairs',
      'rank1',
      'rank5',
      'num_probes',
  ]
  assert lines[2].split() == ['lfw', '0.9973', '0.0025', '6000', '-', '-', '-']
  assert lines[3].split() == [
      'tinyface',
      '-',
      '-',
      '-',
      '0.7000',
      '0.7500',
      '3728',
  ]
  single = report.format_table({'rank1': 0.5}).splitlines()
  assert single[2].split() == ['result', '0.5000']


def test_a_convention_every_set_shares_is_said_once():
  results = {
      name: {
          'edc_pauc': 0.1,
          'edc_convention': 'EDC: genuine',
          'images': name + ' crops',
      }
      for name in ('a', 'b')
  }
  lines = report.format_table(results).splitlines()[4:]
  assert lines == [
      'edc_convention: EDC: genuine',
      'a images: a crops',
      'b images: b crops',
  ]
  alone = report.format_table({'a': results['a']}).splitlines()[3:]
  assert alone == ['a edc_convention: EDC: genuine', 'a images: a crops']


def test_write_results(tmp_path):
  path = report.write_results(str(tmp_path / 'run'), 'step_1000', RESULTS)
  assert path == str(tmp_path / 'run' / 'eval' / 'step_1000.json')
  data = json.loads(open(path).read())
  assert data['lfw']['fold_accuracies'] == [1.0, 0.99]
  assert data['lfw']['low_res'] is None
  assert abs(data['lfw']['accuracy_std'] - 0.0025) < 1e-7
  assert data['tinyface']['num_probes'] == 3728
  # Writing again keeps the earlier result, whole, beside the new one.
  again = report.write_results(str(tmp_path / 'run'), 'step_1000', {'x': 1})
  assert again == str(tmp_path / 'run' / 'eval' / 'step_1000.2.json')
  assert json.loads(open(again).read()) == {'x': 1}
  assert json.loads(open(path).read())['tinyface']['num_probes'] == 3728
  assert sorted(p.name for p in (tmp_path / 'run' / 'eval').iterdir()) == [
      'step_1000.2.json',
      'step_1000.json',
  ]  # no temporary file left


def test_results_are_drawn_beside_their_json(tmp_path):
  from qgjt_jax.eval import reject
  from qgjt_jax.eval import verification

  rng = np.random.default_rng(0)
  emb = rng.normal(size=(400, 8))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  metrics = verification.verification_metrics(emb, rng.random(200) < 0.5)
  metrics.update(
      reject.reject_metrics(
          rng.normal(0.3, 0.2, 200), rng.random(200) < 0.5, rng.random(200)
      )
  )
  metrics['norm_histogram'] = verification.norm_histogram(
      rng.normal(20, 2, 50), rng.normal(15, 2, 50)
  )
  path = report.write_results(str(tmp_path), 'step_7', {'lfw': metrics})
  for suffix in ('roc', 'reject', 'norms'):
    png = tmp_path / 'eval' / f'step_7.{suffix}.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', suffix
  assert json.loads(open(path).read())['lfw']['roc'] == metrics['roc']
  again = report.write_results(str(tmp_path), 'step_7', {'x': {'a': 1.0}})
  assert again.endswith('step_7.2.json')  # nothing to draw: no PNGs
  assert not list((tmp_path / 'eval').glob('step_7.2.*.png'))


def test_a_name_whose_pictures_remain_is_not_reused(tmp_path):
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'step_3.roc.png').write_bytes(b'kept')
  path = report.write_results(str(tmp_path), 'step_3', {'x': {'a': 1.0}})
  assert path.endswith('step_3.2.json')
  assert (tmp_path / 'eval' / 'step_3.roc.png').read_bytes() == b'kept'
