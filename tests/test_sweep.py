"""Sweeps: plan, run through the real launcher, interruption and resume, failures, the report."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, xla_flags
from vit_jax.sweeps import sweep
from vit_jax.sweeps import report as sweep_report
from vit_jax.errors import UsageError

# The tiny model for 60 steps: long enough that a SIGTERM sent after its first
# log lands mid-training, short enough that a trial takes ~20 s on 2 cores.
TINY_SWEEP = '''
BASE_CONFIG = 'configs/base.py'
OVERRIDES = {{'total_steps': 60, 'batch_size': 32, 'eval_batch_size': 120, 'log_every_steps': 5,
             'eval_every_steps': 30, 'checkpoint_every_steps': 30, 'dataset.data_dir': {data_dir!r}}}
{points}
METRIC = 'eval/accuracy'
'''
GRID = "GRID = {'config.model.posemb': ['learn', 'none'], 'model.pool': ['token', 'gap']}"
# Three of the grid's points, for the sweep that runs: one finished and skipped, one interrupted and
# resumed, one started only on the resume; each key varied on its own (for the plot against it).
THREE_TRIALS = ("TRIALS = [{'model.posemb': 'learn', 'model.pool': 'token'}, "
                "{'model.posemb': 'learn', 'model.pool': 'gap'}, {'model.posemb': 'none', 'model.pool': 'token'}]")


def sweep_command(sweep_file, workdir, *flags):
  return [sys.executable, '-m', 'vit_jax', 'sweep', str(sweep_file), '--workdir', str(workdir), *flags]


def one_device_env():
  # One CPU device per trial instead of conftest's 8: each launch starts ~10 s faster.
  return dict(os.environ, XLA_FLAGS=xla_flags(1))


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_plan_lists_trials_without_running_them(tmp_path, data_dir, monkeypatch, run_command):
  sweep_file = tmp_path / 'tiny.py'
  sweep_file.write_text(TINY_SWEEP.format(data_dir=data_dir, points=GRID))
  workdir = tmp_path / 'sweep'
  monkeypatch.chdir(REPO)
  result = run_command(*sweep_command(sweep_file, workdir, '--plan')[3:])  # `vit-jax sweep`, in this process.
  assert result.returncode == 0, result.stderr
  names = ['model.posemb=learn,model.pool=token,seed=0', 'model.posemb=learn,model.pool=gap,seed=0',
           'model.posemb=none,model.pool=token,seed=0', 'model.posemb=none,model.pool=gap,seed=0']
  for index, name in enumerate(names):
    assert f'{index:4d}  {name}  [new]' in result.stdout
  assert '--config.model.pool=gap --config.seed=0' in result.stdout
  assert not workdir.exists()


def test_sweep_runs_survives_interruption_and_reports(tmp_path, data_dir, monkeypatch, run_command):
  monkeypatch.chdir(REPO)
  sweep_file = tmp_path / 'tiny.py'
  sweep_file.write_text(TINY_SWEEP.format(data_dir=data_dir, points=THREE_TRIALS))
  workdir = tmp_path / 'sweep'
  plan = sweep.load_sweep(str(sweep_file))
  first, second = (workdir / plan.trials[i].name for i in (0, 1))

  # Interrupt the sweep (a real process: it takes the SIGTERM) once trial 1 is training (trial 0 has
  # finished by then).
  process = subprocess.Popen(sweep_command(sweep_file, workdir), cwd=REPO, env=one_device_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  def training(metrics=second / 'metrics.jsonl'):
    # The launcher creates the file before its loop; a first row means the loop has started.
    return metrics.exists() and metrics.read_text().count('\n') >= 1

  deadline = time.time() + 120
  while not training() and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, stdout + stderr
  assert 'Interrupted by SIGTERM' in stdout
  assert (first / sweep.DONE_FILE).exists() and not (second / sweep.DONE_FILE).exists()
  stopped_at = max(row['step'] for row in read_rows(second / 'metrics.jsonl'))
  assert 0 < stopped_at < 60  # The launcher saved a checkpoint and stopped mid-run.
  assert not (workdir / plan.trials[2].name).exists()
  done_mtime = (first / sweep.DONE_FILE).stat().st_mtime_ns
  metrics_mtime = (first / 'metrics.jsonl').stat().st_mtime_ns

  # The same command again (`vit-jax sweep` in this process; its trials are launcher processes):
  # trial 0 is skipped, trial 1 resumes and 2 runs (both at once: start-up is mostly single-threaded),
  # the report is built.
  monkeypatch.setenv('XLA_FLAGS', one_device_env()['XLA_FLAGS'])  # For the trials this process starts.
  result = run_command(*sweep_command(sweep_file, workdir, '--parallel', '2')[3:])
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert '1 already finished (skipped), 2 to run' in result.stdout
  assert (first / sweep.DONE_FILE).stat().st_mtime_ns == done_mtime
  assert (first / 'metrics.jsonl').stat().st_mtime_ns == metrics_mtime
  assert f'Resuming from the checkpoint at step {stopped_at}' in (second / sweep.STDOUT_FILE).read_text()
  train_steps = [r['step'] for r in read_rows(second / 'metrics.jsonl') if 'train/loss' in r]
  # Every 5 steps plus the step it stopped at (the launcher logs it): none twice, none missing.
  assert train_steps == sorted({*range(5, 61, 5), stopped_at})
  assert len(read_rows(second / sweep.ATTEMPTS_FILE)) == 2
  assert all((workdir / t.name / sweep.DONE_FILE).exists() for t in plan.trials)

  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['model.posemb'], r['model.pool']) for r in rows] == [
      ('learn', 'token'), ('learn', 'gap'), ('none', 'token')]
  for row in rows:
    assert row['seeds'] == '1' and 0 <= float(row['eval/accuracy mean']) <= 1
    assert row['best step'] in ('30', '60') and int(row['params']) > 10_000
  assert int(rows[0]['params']) - int(rows[2]['params']) == 17 * 32  # Learned posemb: 16 patches + cls.
  markdown = (workdir / 'results.md').read_text()
  assert markdown in result.stdout and markdown.count('\n') == 5
  for png in ('eval_accuracy_by_key.png', 'eval_accuracy_by_point.png', 'curves.png'):
    assert (workdir / png).stat().st_size > 10_000

  # Finished: a third run launches nothing.
  again = run_command(*sweep_command(sweep_file, workdir, '--trial', '1')[3:])
  assert again.returncode == 0 and '1 already finished (skipped), 0 to run' in again.stdout


def test_failed_trials_are_reported_and_do_not_stop_the_others(tmp_path, data_dir, monkeypatch, run_command):
  sweep_file = tmp_path / 'bad.py'
  sweep_file.write_text(f'BASE_CONFIG = "configs/base.py"\nOVERRIDES = {{"dataset.data_dir": {data_dir!r}}}\n'
                        'TRIALS = [{"input.image_size": 9}, {"input.image_size": 7}]\n')
  monkeypatch.chdir(REPO)
  monkeypatch.setenv('XLA_FLAGS', one_device_env()['XLA_FLAGS'])  # For the trials this process starts.
  result = run_command(*sweep_command(sweep_file, tmp_path / 'sweep', '--parallel', '2')[3:])
  assert result.returncode == 1
  for size in (9, 7):
    assert f'input.image_size={size},seed=0: failed' in result.stdout
    assert f'image_size={size} is not divisible by the patch size 2' in result.stdout  # The stderr tail.
  assert '2 trial(s) did not finish' in result.stderr
  assert 'Not finished (2)' in (tmp_path / 'sweep' / 'results.md').read_text()


def write_finished_trial(plan, trial, workdir, finals):
  """A trial workdir as a finished run leaves it: metrics with two evals, the done file."""
  trial_dir = workdir / trial.name
  trial_dir.mkdir(parents=True)
  rows = [{'step': 50, 'train/loss': 1.0}, {'step': 50, 'eval/accuracy': finals[0]},
          {'step': 100, 'train/loss': 0.5}, {'step': 100, 'eval/accuracy': finals[1]}]
  (trial_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (trial_dir / sweep.ATTEMPTS_FILE).write_text(json.dumps({'wall_s': 10.0 * (trial.seed + 1)}) + '\n')
  (trial_dir / sweep.DONE_FILE).write_text(json.dumps({'base_config': plan.base_config,
                                                       'overrides': trial.overrides}))


def test_report_pools_seeds(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  sweep_file = tmp_path / 'seeds.py'
  sweep_file.write_text("BASE_CONFIG = 'configs/base.py'\nGRID = {'optimizer.learning_rate': [1e-3, 3e-4]}\n"
                        "SEEDS = 3\nOVERRIDES = {'total_steps': 100}\n")
  plan = sweep.load_sweep(str(sweep_file))
  assert [t.name for t in plan.trials[:3]] == [f'optimizer.learning_rate=0.001,seed={s}' for s in range(3)]
  workdir = tmp_path / 'sweep'
  finals = {0: (0.6, 0.8), 1: (0.9, 0.7), 2: (0.5, 0.9)}  # (step 50, step 100) per seed.
  for trial in plan.trials[:3]:
    write_finished_trial(plan, trial, workdir, finals[trial.seed])
  write_finished_trial(plan, plan.trials[3], workdir, (0.1, 0.2))  # Point 2: only one seed finished.
  text = sweep_report.build_report(plan, str(workdir))
  with open(workdir / 'results.csv') as f:
    first, second = list(csv.DictReader(f))
  assert first['seeds'] == '3' and float(first['eval/accuracy mean']) == pytest.approx(0.8)
  assert float(first['eval/accuracy std']) == pytest.approx(0.1)  # Sample std of 0.8, 0.7, 0.9.
  assert (float(first['best eval/accuracy']), first['best step']) == (0.9, '50')
  assert float(first['wall s per trial']) == 20.0 and second['seeds'] == '1'
  assert '| `0.001` | 3/3 | **80.00% ± 10.00%** | 90.00% (50) | 20 s |' in text
  assert 'Not finished (2): `optimizer.learning_rate=0.0003,seed=1`' in text


@pytest.mark.parametrize('body,message', [
    ("GRID = {'model.pooling': ['gap']}", "config.model.pooling='gap' does not fit the config"),
    ("GRID = {'total_steps': [10.5]}", 'config.total_steps=10.5 does not fit'),
    ("TRIALS = [{'model.hidden_size': None}]", 'cannot take None'),
    ("GRID = {'seed': [1, 2]}", 'set seeds with SEEDS'),
    ("GRID = {'model.pool': 'gap'}", "GRID['model.pool'] must be a non-empty list"),
    ("TRIAL = [{}]", "unknown names ['TRIAL']"),
])
def test_bad_sweep_files_fail_before_running(tmp_path, monkeypatch, body, message):
  monkeypatch.chdir(REPO)
  sweep_file = tmp_path / 'bad.py'
  sweep_file.write_text(f"BASE_CONFIG = 'configs/base.py'\n{body}\n")
  with pytest.raises(UsageError, match=message.replace('[', r'\[').replace('(', r'\(').replace('.', r'\.')):
    sweep.load_sweep(str(sweep_file))


def test_values_format_for_the_launcher_and_names_are_safe():
  assert [sweep.format_value(v) for v in (True, 3e-4, 'Ti/4', (0.0, 1.0), 12)] == [
      'true', '0.0003', 'Ti/4', '(0.0,1.0)', '12']
  assert sweep.trial_name({'model.variant': 'Ti/4', 'input.value_range': (0.0, 1.0)}, 1) == (
      'model.variant=Ti_4,input.value_range=_0.0,1.0_,seed=1')
  assert len(sweep.trial_name({'k': 'x' * 500}, 0)) == sweep.MAX_NAME_LENGTH


def test_only_keys_varied_on_their_own_get_a_plot_against_them():
  def points(*values):
    return [{'values': dict(zip(('patch', 'width', 'lr'), v))} for v in values]
  grid_like = points((4, 96, 1), (4, 96, 3), (8, 96, 1), (8, 96, 3))
  assert sweep_report.independent_keys(grid_like) == ['patch', 'lr']  # width never changes alone.
  assert sweep_report.independent_keys(points((4, 96, 1), (8, 192, 1), (2, 48, 1))) == []


def test_progress_names_trials_by_their_index_and_a_finished_trial_as_finished(capsys):
  """`--trial 2` prints as trial 2 (not [3/10]); a trial whose last step was saved before the sweep's
  stop signal reached it is finished; one trial to run under --parallel 2 says so."""
  trial = sweep.Trial(2, 'model.pool=gap,seed=0', {'model.pool': 'gap'}, 0, {'model.pool': 'gap', 'seed': 0})
  sweep.print_outcome({'trial': trial, 'status': 'finished', 'wall_s': 31.0, 'last_step': 8}, 1, 1)
  assert capsys.readouterr().out == '[1/1 run] trial 2 model.pool=gap,seed=0: finished after 31 s (step 8)\n'
  assert sweep.trial_status(-15, 8, 8, stopped=True, saved_last=True) == 'finished'
  assert sweep.trial_status(-15, 8, 8, stopped=True, saved_last=False) == 'interrupted'
  assert sweep.trial_status(0, 5, 8, stopped=True, saved_last=False) == 'interrupted'
  # Stopped by a signal the sweep did not pass on (a cluster's, sent to the launcher itself): saved, exit 75.
  assert sweep.trial_status(75, 5, 8, stopped=False, saved_last=False) == 'interrupted'
  assert sweep.trial_status(1, 8, 8, stopped=False, saved_last=True) == 'failed'
  assert sweep.trial_status(0, 8, 8, stopped=False, saved_last=True) == 'finished'
  line = sweep.progress_line(10, 0, 1, 2, 'sw')
  assert line == '10 trials: 0 already finished (skipped), 1 to run, 1 at a time (--parallel 2), in sw.'
  assert sweep.progress_line(4, 4, 0, 2, 'sw') == '4 trials: 4 already finished (skipped), 0 to run, in sw.'
