"""Training-curve plots from metrics.jsonl."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.trained_run import trained_workdir
from vit_jax.tools import plots
from vit_jax.errors import UsageError


def fake_run(path, steps, resumed_at=None):
  """A metrics.jsonl as the trainer writes it, optionally with a resumed stretch and a torn last line."""
  path.mkdir(parents=True)
  rows = []
  for step in steps:
    rows.append({'step': step, 'train/loss': 2.0 / step, 'train/lr': 1e-3, 'train/grad_norm': 1.0,
                 'train/images_per_sec': 500.0})
    if step % 20 == 0:
      rows.append({'step': step, 'eval/accuracy': step / 100, 'eval/loss': 1.0 / step, 'eval/num_examples': 360.0})
  if resumed_at:
    rows.append({'step': resumed_at, 'train/loss': 123.0, 'train/lr': 1e-3, 'train/images_per_sec': 1.0})
  text = ''.join(json.dumps(row) + '\n' for row in rows)
  (path / 'metrics.jsonl').write_text(text + '{"step": 9')  # A live run: half-written last line.
  return path


def test_plot_of_a_real_and_a_fake_run_is_written(tiny_config, tmp_path):
  real = trained_workdir(tiny_config)
  other = fake_run(tmp_path / 'other', range(10, 101, 10))
  out = tmp_path / 'plots' / 'curves.png'
  plots.plot_curves([real, str(other)], str(out))
  assert out.stat().st_size > 20_000  # Four panels with lines, not an empty canvas.
  with Image.open(out) as image:
    assert image.format == 'PNG' and image.size == (800, 520)
    pixels = np.asarray(image.convert('L'))
  assert (pixels < 250).mean() > 0.05


def test_command_writes_the_png(tmp_path, run_command):
  run = fake_run(tmp_path / 'run', range(10, 61, 10))
  out = tmp_path / 'curves.png'
  result = run_command('plots', str(run), '--out', str(out))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == f'wrote {out}' and out.stat().st_size > 10_000


def test_series_is_in_step_order_and_a_resumed_step_keeps_its_last_value(tmp_path):
  rows = plots.read_metrics(str(fake_run(tmp_path / 'run', [10, 20, 30], resumed_at=20)))
  steps, losses = plots.series(rows, 'train/loss')
  assert steps.tolist() == [10, 20, 30] and losses.tolist() == [0.2, 123.0, 2.0 / 30]
  assert plots.series(rows, 'eval/accuracy')[0].tolist() == [20]


def test_bad_workdirs_are_usage_errors(tmp_path):
  with pytest.raises(UsageError, match='No metrics.jsonl'):
    plots.plot_curves([str(tmp_path)], str(tmp_path / 'x.png'))
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1\n{"step": 2}\n')
  with pytest.raises(UsageError, match='line 1 is not JSON'):
    plots.read_metrics(str(tmp_path))
  assert plots.run_labels(['a/run', 'b/run', ]) == ['a/run', 'b/run']
  assert plots.run_labels(['a/run1', 'b/run2/']) == ['run1', 'run2']
