"""Resuming a workdir with a changed config, and choosing its checkpoint (--step latest, best, N).

One tiny run is trained once (checkpoints and evals at steps 3 and 6,
keep_checkpoints=1, the best by the highest eval/loss kept: step 3, as the loss
falls); each test works on a copy of its workdir with real orbax checkpoints.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.test_fault_tolerance import snapshot
from vit_jax import checkpoint
from vit_jax.checkpoint import run as run_lib
from vit_jax.errors import UsageError
from vit_jax.training import loop, sharding

_CACHE: dict = {}


@pytest.fixture
def config(tiny_config):
  """`tiny_config` keeping the latest checkpoint only, and the best by the highest eval/loss."""
  tiny_config.keep_checkpoints = 1
  tiny_config.best_metric = 'eval/loss'  # With 'max': the first eval, at step 3.
  tiny_config.best_mode = 'max'
  return tiny_config


@pytest.fixture
def workdir(config, tmp_path_factory, tmp_path):
  """A copy of the trained run's workdir, for one test to resume, damage or read."""
  if 'workdir' not in _CACHE:
    trained = str(tmp_path_factory.mktemp('resume') / 'run')
    loop.train_and_evaluate(config.copy_and_resolve_references(), trained)
    _CACHE['workdir'] = trained
  copy = str(tmp_path / 'run')
  shutil.copytree(_CACHE['workdir'], copy)
  return copy


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# --- A config whose train state the checkpoints cannot fill: one line, nothing touched. ---


@pytest.mark.parametrize('section,key,value,change', [
    ('optimizer', 'grad_clip_norm', 0.0, 'optimizer.grad_clip_norm 1.0 -> 0.0'),  # One optax stage fewer.
    ('optimizer', 'name', 'sgd', "optimizer.name 'adamw' -> 'sgd'"),
    ('dataset', 'num_classes', 12, 'dataset.num_classes 10 -> 12'),
])
def test_a_state_the_checkpoints_cannot_fill_is_refused_untouched(config, workdir, section, key, value, change):
  before = snapshot(workdir)
  config[section][key] = value
  with pytest.raises(UsageError) as error:
    loop.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert '\n' not in message and 'cannot continue' in message, message
  assert f'config keys changed from its config.json: {change}.' in message
  assert 'Resume with the original values' in message and f'--config.init.path={workdir}' in message
  assert snapshot(workdir) == before  # Hashes and modification times of every file.


def test_an_unreadable_checkpoint_is_set_aside_and_the_previous_decides(config, workdir, capsys):
  os.remove(os.path.join(workdir, 'checkpoints', '6', 'default', '_METADATA'))
  corrupt = os.path.join(workdir, 'corrupt_checkpoints')
  config.optimizer.grad_clip_norm = 0.0
  with pytest.raises(UsageError, match=r'holds checkpoints \(step 3\)'):  # 6 unreadable: 3 decides.
    loop.train_and_evaluate(config, workdir)
  assert not os.path.exists(corrupt)  # Refused before anything moved.

  config.optimizer.grad_clip_norm = 1.0
  run = loop.setup(config, sharding.make_mesh(config))
  manager = checkpoint.create_manager(workdir, config)
  state = checkpoint.restore_latest(manager, sharding.placed(run.abstract_state, run.state_sharding), config)
  manager.close()
  assert int(state.step) == 3 and os.listdir(corrupt) == ['6']
  assert 'Checkpoint at step 6 is damaged (Metadata file (named _METADATA) does not exist' in capsys.readouterr().out


def test_a_checkpoint_without_a_field_added_since_restores_by_path(config, workdir):
  """A state saved before TrainState had `ema_params` (no such key on disk) restores, not set aside."""
  run = loop.setup(config, sharding.make_mesh(config))
  abstract = sharding.placed(run.abstract_state, run.state_sharding)
  manager = checkpoint.create_manager(workdir, config)
  state = checkpoint.restore_latest(manager, abstract, config)
  checkpoint.save(manager, 7, {'step': state.step, 'params': state.params, 'opt_state': state.opt_state})
  manager.wait_until_finished()
  restored = checkpoint.restore_latest(manager, abstract, config)
  manager.close()
  assert not os.path.exists(os.path.join(workdir, 'corrupt_checkpoints'))
  assert restored.ema_params is None and type(restored.opt_state) is type(state.opt_state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- Changes the saved state can take. ---


def test_changes_the_state_can_take_resume_and_keep_the_earlier_metrics(config, workdir, capsys):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    earlier = f.read()
  config.total_steps = 9
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = 'linear'
  config.log_every_steps = 1
  config.model.remat = True
  config.model.dtype = 'bfloat16'
  loop.train_and_evaluate(config, workdir)
  assert 'Resuming from the checkpoint at step 6' in capsys.readouterr().out
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    text = f.read()
  assert text.startswith(earlier)  # The rows of steps 1-6, byte for byte.
  assert [json.loads(line)['step'] for line in text[len(earlier):].splitlines()] == [7, 8, 9, 9]  # 9: eval.

  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['total_steps'] == 9 and recorded['model']['remat'] is True
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert len(history) == 1 and history[0]['step'] == 6
  assert history[0]['changes']['total_steps'] == [6, 9]
  assert history[0]['changes']['optimizer.learning_rate'] == [1e-3, 2e-3]

  # The best checkpoint survives the resume, older than the one latest kept.
  losses = {row['step']: row['eval/loss'] for row in rows(workdir) if 'eval/loss' in row}
  best = max(losses, key=losses.get)
  assert best < 9 and sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == sorted([str(best), '9'])


def test_a_finished_run_rerun_with_another_setting_changes_nothing(config, workdir, capsys):
  before = snapshot(workdir)
  config.optimizer.learning_rate = 0.01
  assert 'eval/loss' in loop.train_and_evaluate(config, workdir)  # The finished run's metrics, read back.
  out = capsys.readouterr().out
  assert 'is finished' in out and 'Not applied: optimizer.learning_rate 0.001 -> 0.01' in out, out
  assert snapshot(workdir) == before


# --- The best checkpoint. ---


@pytest.mark.parametrize('metric', ['eval/acuracy', 'train/loss'])
def test_a_best_metric_the_run_does_not_write_fails_at_start(tiny_config, tmp_path, metric):
  tiny_config.best_metric = metric
  with pytest.raises(UsageError, match=f"best_metric='{metric}' is not an eval metric this run writes; "
                                       'use one of eval/accuracy, eval/loss'):
    loop.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_step_picks_the_latest_the_best_or_a_number(workdir):
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']  # Best kept beside the 1.
  latest, best, third = (run_lib.load_workdir(workdir, step=step) for step in ('latest', 'best', '3'))
  assert (latest.step, best.step, third.step) == (6, 3, 3)
  for a, b in zip(jax.tree.leaves(best.params), jax.tree.leaves(third.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(best.params),
                                                      jax.tree.leaves(latest.params)))
  # They are the parameters evaluated at step 3: the same accuracy as that row of metrics.jsonl.
  from vit_jax.tools import evaluate
  report = evaluate.summarize(evaluate.collect_predictions(best), best.class_names, 0)
  evals = {row['step']: row['eval/accuracy'] for row in rows(workdir) if 'eval/accuracy' in row}
  assert report['accuracy'] == pytest.approx(evals[3])

  with pytest.raises(UsageError, match='keeps no checkpoint of that step; kept steps: 3, 6'):
    run_lib.load_workdir(workdir, step='4')
  with pytest.raises(UsageError, match="--step='first': use 'latest', 'best' or a step number"):
    run_lib.load_workdir(workdir, step='first')
  with pytest.raises(UsageError, match='picks a checkpoint of a --workdir'):
    run_lib.run_from_flags(None, 'exported.npz', None, step='best')


def test_export_step_best_through_the_command(workdir, tmp_path, run_command):
  out = tmp_path / 'best.npz'
  result = run_command('export', '--workdir', workdir, '--out', str(out), '--step', 'best')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(out.with_suffix('.json').read_text())['step'] == 3
