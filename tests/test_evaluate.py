"""The evaluation report: agreement with training's eval, the JSON, the PNGs, and the summary maths."""

import json
import os

import numpy as np
import pytest

from tests.trained_run import trained_run, trained_workdir
from vit_jax.tools import evaluate
from vit_jax.errors import UsageError


def test_report_of_the_trained_run(tiny_config, tmp_path):
  workdir = trained_workdir(tiny_config)
  run = trained_run(tiny_config)
  out = tmp_path / 'eval'
  report = evaluate.evaluate_run(run, str(out), num_confused=5)

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last_eval = [row for row in map(json.loads, f) if 'eval/accuracy' in row][-1]
  # Same split, same preprocessing, same parameters as the trainer's last eval.
  assert report['num_examples'] == 360 and report['step'] == last_eval['step'] == 6
  assert report['accuracy'] == pytest.approx(last_eval['eval/accuracy'], abs=1e-9)
  assert report['accuracy'] <= report['top5_accuracy'] <= 1.0

  saved = json.loads((out / 'report.json').read_text())
  assert saved['accuracy'] == report['accuracy'] and saved['dataset'] == 'sklearn_digits'
  assert [c['class'] for c in saved['per_class']] == [str(d) for d in range(10)]
  assert sum(c['count'] for c in saved['per_class']) == 360
  matrix = np.load(out / 'confusion_matrix.npy')
  assert matrix.shape == (10, 10) and matrix.sum() == 360
  assert np.trace(matrix) == round(report['accuracy'] * 360)
  for c in saved['per_class']:
    assert c['count'] == matrix[c['index']].sum()
  mistakes = saved['most_confident_mistakes']
  assert len(mistakes) == min(5, 360 - np.trace(matrix))
  assert [m['probability'] for m in mistakes] == sorted((m['probability'] for m in mistakes), reverse=True)
  for name in ('confusion_matrix.png', 'most_confused.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG' and (out / name).stat().st_size > 5000


def test_summary_of_hand_made_predictions():
  probs = np.array([[0.7, 0.2, 0.1],   # true 0: right
                    [0.1, 0.3, 0.6],   # true 0: wrong (2), 60% sure
                    [0.1, 0.8, 0.1],   # true 1: right
                    [0.9, 0.05, 0.05],  # true 1: wrong (0), 90% sure
                    [0.2, 0.5, 0.3]])  # true 2: wrong (1), top-2 would catch it
  predictions = {'probabilities': probs, 'labels': np.array([0, 0, 1, 1, 2]), 'indices': np.arange(5)}
  report = evaluate.summarize(predictions, ['a', 'b', 'c'], num_confused=2)
  assert report['accuracy'] == pytest.approx(0.4)
  assert report['top3_accuracy'] == 1.0  # Three classes: top-5 becomes top-3.
  assert [c['accuracy'] for c in report['per_class']] == [0.5, 0.5, 0.0]
  np.testing.assert_array_equal(report['confusion_matrix'], [[1, 0, 1], [1, 1, 0], [0, 1, 0]])
  assert report['most_confident_mistakes'] == [
      {'index': 3, 'true': 'b', 'predicted': 'a', 'probability': 0.9},
      {'index': 1, 'true': 'a', 'predicted': 'c', 'probability': 0.6}]
  assert len(report['most_confused_pairs']) == 2 and all(p['count'] == 1 for p in report['most_confused_pairs'])


def test_negative_num_confused_is_refused(tiny_config, tmp_path):
  with pytest.raises(UsageError, match='--num_confused=-1'):
    evaluate.evaluate_run(trained_run(tiny_config), str(tmp_path), num_confused=-1)
