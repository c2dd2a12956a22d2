"""Training through the launcher's code path (`vit-jax train`) on 8 virtual CPU devices, resume, and bad input."""

import json
import re
import os
import subprocess

import jax
import numpy as np
import pytest

from tests.conftest import REPO
from vit_jax.training import loop
from vit_jax.errors import UsageError


def train_flags(workdir, data_dir, *overrides):
  """`vit-jax train` flags of configs/base.py (the tiny model) with short cadences, then `overrides`."""
  return ['--config', os.path.join(REPO, 'configs/base.py'), '--workdir', str(workdir),
          f'--config.dataset.data_dir={data_dir}', '--config.batch_size=32', '--config.eval_batch_size=64',
          '--config.log_every_steps=2', '--config.eval_every_steps=4', '--config.checkpoint_every_steps=2',
          *overrides]


def train_in_process(run_command, workdir, data_dir, *overrides) -> subprocess.CompletedProcess:
  """`vit-jax train` with `train_flags`, in this process (conftest's `run_command`, 8 devices): its exit
  code and output, as a launcher process would give them."""
  return run_command('train', *train_flags(workdir, data_dir, *overrides))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_launcher_trains_writes_workdir_and_resumes(tmp_path, data_dir, run_command):
  workdir = tmp_path / 'run'
  # `vit-jax train` in this process: the launcher's whole code path from argv on. Launcher processes
  # (`python -m vit_jax.main`) are started by test_fault_tolerance.py and the sweep tests.
  first = train_in_process(run_command, workdir, data_dir, '--config.total_steps=4')
  assert first.returncode == 0, first.stderr[-3000:]
  assert '8 devices' in first.stdout
  assert "XLA:CPU scheduler: concurrency-optimised, XLA:CPU's default" in first.stdout  # Its plan fits.
  assert 'step 4/4' in first.stdout and 'eval at step 4' in first.stdout
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'metrics.jsonl', 'tensorboard']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tensorboard'))
  config = json.loads((workdir / 'config.json').read_text())
  assert config['total_steps'] == 4 and config['model']['variant'] == 'tiny/2'
  rows = read_metrics(workdir)
  train_rows = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in train_rows] == [2, 4]
  for row in train_rows:
    assert np.isfinite(row['train/loss']) and row['train/lr'] > 0 and row['train/images_per_sec'] > 0
  eval_row = [r for r in rows if 'eval/accuracy' in r][-1]
  assert eval_row['eval/num_examples'] == 360 and 0.0 <= eval_row['eval/accuracy'] <= 1.0

  # Same command, longer schedule: continues from step 4 rather than starting over, also
  # with rematerialisation switched on (how the model is computed, not which model it is).
  second = train_in_process(run_command, workdir, data_dir, '--config.total_steps=6', '--config.model.remat=full')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 4' in second.stdout
  assert 'step 2/6' not in second.stdout and 'step 6/6' in second.stdout
  assert [r['step'] for r in read_metrics(workdir) if 'train/loss' in r] == [2, 4, 6]
  assert '6' in os.listdir(workdir / 'checkpoints')

  # Finished run: running it again trains nothing more.
  third = train_in_process(run_command, workdir, data_dir, '--config.total_steps=6')
  assert third.returncode == 0 and 'is finished' in third.stdout
  assert not re.search(r'step \d+/\d+', third.stdout)  # No step was trained.


# More bad inputs, against a workdir that holds a run: tests/test_fault_tolerance.py.
@pytest.mark.parametrize('override,message', [
    ('--config.batch_size=12', 'batch_size=12 is not divisible by the 8 devices'),
    ('--config.dataset.name=cifar10', "'cifar10' is not prepared"),
])
def test_launcher_rejects_bad_input_before_writing(tmp_path, data_dir, override, message, capsys):
  from vit_jax import cli
  workdir = tmp_path / 'run'
  with pytest.raises(SystemExit) as exit_info:  # The launcher's code path, in this process.
    cli.main(['train', '--config', os.path.join(REPO, 'configs/base.py'), '--workdir', str(workdir),
              f'--config.dataset.data_dir={data_dir}', '--config.batch_size=32', '--config.total_steps=2',
              override])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def test_in_process_training_learns(tiny_config, tmp_path):
  """A few dozen steps of the tiny model beat chance on digits (the loop really trains)."""
  tiny_config.total_steps = 60
  tiny_config.batch_size = 64
  tiny_config.eval_every_steps = 60
  tiny_config.checkpoint_every_steps = 60
  tiny_config.log_every_steps = 20
  tiny_config.input.image_size = 8
  tiny_config.model.variant = 'tiny/2'
  tiny_config.optimizer.learning_rate = 3e-3
  final = loop.train_and_evaluate(tiny_config, str(tmp_path))
  assert final['eval/num_examples'] == 360
  assert final['eval/accuracy'] > 0.2  # Chance is 0.1.
  losses = [json.loads(line)['train/loss'] for line in open(tmp_path / 'metrics.jsonl')
            if 'train/loss' in line]
  assert losses[-1] < losses[0]
  assert jax.device_count() == 8


def test_nonpositive_durations_are_rejected(tiny_config, tmp_path):
  tiny_config.log_every_steps = 0
  with pytest.raises(UsageError, match='log_every_steps=0 must be a positive'):
    loop.train_and_evaluate(tiny_config, str(tmp_path))


def test_a_finished_run_returns_its_final_metrics(tiny_config):
  """Run again (a notebook cell run twice), a finished run trains nothing and returns the metrics it
  finished with, not {} (the notebook printed `eval accuracy: nan%`)."""
  from tests.trained_run import trained_workdir
  from vit_jax.training import loop
  workdir = trained_workdir(tiny_config)
  final = loop.train_and_evaluate(tiny_config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  last_eval = [row for row in rows if 'eval/accuracy' in row][-1]
  assert last_eval['step'] == tiny_config.total_steps
  assert final['eval/accuracy'] == last_eval['eval/accuracy'] and 'train/loss' in final
