"""Runs and sweeps on a real one-node SLURM cluster (tests/slurm_cluster.py), not a mock.

The job script is the repository's `experiments/slurm/train.sbatch` as docs/scaling.md
shows it, submitted without its GPUs: two tasks of one run equal one process;
a run warned before its time limit saves, requeues itself and ends with the
parameters of an uninterrupted run; a sweep runs as a job array, resubmits
what was cancelled and reports as a local sweep does.

In CI ($CI set) these tests fail where the cluster cannot start; elsewhere a
machine without SLURM's packages skips them, saying so.
"""

import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO, xla_flags
from tests.slurm_cluster import CHECK_PERIOD_S, Cluster, ClusterError, missing_programs
from tests.test_scale import STEPS, TOLERANCE, assert_same_params, config, one_device_run  # noqa: F401
from vit_jax import checkpoint
from vit_jax.config import defaults
from vit_jax.sweeps import slurm, sweep as sweep_lib
from vit_jax.training import loop, sharding

TRAIN_SCRIPT = os.path.join(REPO, 'experiments', 'slurm', 'train.sbatch')


@pytest.fixture(scope='module')
def cluster():
  """One cluster for the file: munged, slurmctld and slurmd started here, stopped by PID at the end."""
  missing = missing_programs()
  if missing and not os.environ.get('CI'):
    pytest.skip(f'SLURM is not installed (missing {", ".join(missing)}); .ci/install_slurm installs it')
  # Not under pytest's tmp_path: munged wants every folder above its socket searchable by all users.
  root = tempfile.mkdtemp(prefix='vit_jax_slurm_')
  cluster = Cluster(root)
  try:
    try:
      cluster.start()
    except ClusterError as e:
      pytest.fail(f'the one-node SLURM cluster did not start: {e}')
    yield cluster
  finally:
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def job_env(cluster, devices=1):
  """What a submitted job inherits: this environment's vit-jax first on PATH, `devices` CPU devices."""
  return dict(cluster.env, PATH=os.path.dirname(sys.executable) + os.pathsep + cluster.env['PATH'],
              XLA_FLAGS=xla_flags(devices))


def sbatch(cluster, *args, env=None):
  """`sbatch --parsable ARGS` from the repository root; returns the job id."""
  result = cluster.run('sbatch', '--parsable', f'--chdir={REPO}', *args, env=env or job_env(cluster))
  return result.stdout.strip().split(';')[0]


def restore(workdir, config):
  run = loop.setup(config, sharding.make_mesh(config, jax.devices()[:1]))
  abstract = sharding.placed(run.abstract_state, run.state_sharding)
  return checkpoint.restore_latest(checkpoint.create_manager(str(workdir), config), abstract)


def test_two_tasks_equal_one_process(cluster, config, one_device_run, tmp_path):
  """`srun -n2 vit-jax train --multihost` through experiments/slurm/train.sbatch: the one-process losses and parameters."""
  workdir, output = tmp_path / 'run', tmp_path / 'job.out'
  job = sbatch(cluster, '--nodes=1', '--ntasks-per-node=2', '--gpus-per-node=0', f'--output={output}',
               TRAIN_SCRIPT, 'configs/base.py', str(workdir), f'--config.dataset.data_dir={config.dataset.data_dir}',
               '--config.batch_size=32', '--config.optimizer.warmup_steps=1', '--config.optimizer.name=sgd',
               '--config.optimizer.learning_rate=0.1', f'--config.total_steps={STEPS}', '--config.log_every_steps=1',
               '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2')
  assert cluster.wait_jobs([job]) == {job: 'COMPLETED'}, output.read_text()[-3000:]
  log = output.read_text()
  assert f'job {job} start 0' in log
  assert '2 devices (mesh data=2, fsdp=1), 2 processes' in log, log[-3000:]
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  np.testing.assert_allclose([r['train/loss'] for r in rows if 'train/loss' in r], one_device_run[1], **TOLERANCE)
  restored = restore(workdir, config)
  assert int(restored.step) == STEPS
  assert_same_params(restored.params, one_device_run[0].params)
  assert_same_params(restored.opt_state, one_device_run[0].opt_state)


# The time-limit run: on an idle core its start-up (about 8 s) and training (about 25 s) outlast the 28 s
# to its warning; on a loaded one it may need a third start. Evaluated and saved only at its end and when
# stopped.
LIMITED_STEPS = 900
LIMITED_FLAGS = ('--config.batch_size=32', f'--config.total_steps={LIMITED_STEPS}', '--config.log_every_steps=50',
                 f'--config.eval_every_steps={LIMITED_STEPS}', f'--config.checkpoint_every_steps={LIMITED_STEPS}',
                 '--config.model.dropout_rate=0.1')
# sbatch --time=1 --signal=B:USR1@10: warned at slurmctld's first time-limit check >= 20 s into the job
# (60 - 10 - 30 s: the checks come every 30 s). Submitted 28 s before a check, the job is warned there
# even if it starts up to 8 s late; requeued, it starts again about 11 s after that check (the cluster's
# cred_expire=10), so the next check is only 19 s into it, and its warning comes 30 s later.
WARNING_S = 10
FIRST_CHECK_S = 28


def test_time_limit_warning_saves_requeues_and_resumes_bitwise(cluster, data_dir, tmp_path):
  """A 1-minute job warned before its limit: saves, requeues itself, ends equal to an uninterrupted run."""
  workdir, reference, output = tmp_path / 'limited', tmp_path / 'reference', tmp_path / 'job.out'
  data_flag = f'--config.dataset.data_dir={data_dir}'
  uninterrupted = subprocess.Popen(
      [sys.executable, '-m', 'vit_jax', 'train', '--config', 'configs/base.py', '--workdir', str(reference),
       data_flag, *LIMITED_FLAGS], cwd=REPO, env=job_env(cluster), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    # slurmctld checks time limits every 30 s from its start: submit FIRST_CHECK_S before a check, so
    # that the warning comes at that check, well into the training and well before its end.
    last = (cluster.time_limit_checks() or [cluster.controller_started])[-1]
    check = last + datetime.timedelta(seconds=CHECK_PERIOD_S)
    while (check - datetime.datetime.now()).total_seconds() < FIRST_CHECK_S:
      check += datetime.timedelta(seconds=CHECK_PERIOD_S)
    time.sleep(max(0.0, (check - datetime.datetime.now()).total_seconds() - FIRST_CHECK_S))
    job = sbatch(cluster, '--time=1', f'--signal=B:USR1@{WARNING_S}', '--nodes=1', '--ntasks-per-node=1',
                 '--gpus-per-node=0', f'--output={output}', TRAIN_SCRIPT, 'configs/base.py', str(workdir),
                 data_flag, *LIMITED_FLAGS)
    assert cluster.wait_jobs([job], timeout_s=600) == {job: 'COMPLETED'}, output.read_text()[-3000:]
    _, stderr = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, stderr[-3000:]
  finally:
    if uninterrupted.poll() is None:
      uninterrupted.kill()
  log = output.read_text()
  restarts = int(cluster.run('scontrol', 'show', 'job', job).stdout.split('Restarts=')[1].split()[0])
  assert restarts >= 1 and f'job {job} start {restarts} ' in log, log[-3000:]
  assert f'time-limit warning: stopping and requeueing job {job}' in log
  saved = int(log.split('Received SIGUSR1: saved the checkpoint of step ')[1].split()[0])
  assert 0 < saved < LIMITED_STEPS
  assert f'Resuming from the checkpoint at step {saved}' in log
  assert f'step {LIMITED_STEPS}/{LIMITED_STEPS}' in log

  config = defaults.get_config()
  config.dataset.data_dir = data_dir
  config.batch_size, config.total_steps, config.model.dropout_rate = 32, LIMITED_STEPS, 0.1
  expected, actual = restore(reference, config), restore(workdir, config)
  assert int(actual.step) == int(expected.step) == LIMITED_STEPS
  for a, b in zip(jax.tree.leaves((actual.params, actual.opt_state)),
                  jax.tree.leaves((expected.params, expected.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Bitwise.


# A 2x2 sweep of the tiny model, 8 steps a trial: its trials are mostly launcher start-up.
SWEEP = '''
BASE_CONFIG = 'configs/base.py'
OVERRIDES = {{'total_steps': 8, 'batch_size': 16, 'eval_batch_size': 120, 'log_every_steps': 4,
             'eval_every_steps': 8, 'checkpoint_every_steps': 8, 'optimizer.warmup_steps': 2,
             'dataset.data_dir': {data_dir!r}}}
GRID = {{'model.posemb': ['learn', 'none'], 'model.pool': ['token', 'gap']}}
'''


def table_without_wall(workdir):
  """results.csv's rows without the wall time, which no two runs share."""
  with open(workdir / 'results.csv') as f:
    return [{k: v for k, v in row.items() if k != 'wall s per trial'} for row in csv.DictReader(f)]


def test_sweep_as_job_array_resubmits_a_cancelled_trial_and_reports_as_locally(
    cluster, data_dir, tmp_path, monkeypatch, run_command):
  monkeypatch.chdir(REPO)
  for key, value in job_env(cluster).items():  # This process submits; its jobs inherit the environment.
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(slurm, 'POLL_S', 0.5)
  sweep_file = tmp_path / 'tiny.py'
  sweep_file.write_text(SWEEP.format(data_dir=data_dir))
  workdir, local_workdir = tmp_path / 'on_slurm', tmp_path / 'local'
  command = ['sweep', str(sweep_file), '--workdir', str(workdir), '--executor', 'slurm', '--detach']

  # The same sweep run locally beside it, for the report to equal.
  local = subprocess.Popen([sys.executable, '-m', 'vit_jax', 'sweep', str(sweep_file), '--workdir', str(local_workdir),
                            '--parallel', '2'], cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    first = run_command(*command)
    assert first.returncode == 0, first.stderr
    assert f'4 trials in {workdir}: 4 new.' in first.stdout
    array = first.stdout.split('Submitted job array ')[1].split(':')[0]
    assert f'Submitted job array {array}: trial(s) 0,1,2,3' in first.stdout
    # The node has 2 CPUs: trials 0 and 1 run, 2 and 3 wait. Trial 3's job is cancelled before it starts.
    cluster.run('scancel', f'{array}_3')

    again = run_command(*command)  # Progress, and only the cancelled trial goes back to the queue.
    assert again.returncode == 0, again.stderr
    counts = again.stdout.split('\n')[0].split(': ')[-1]  # E.g. `2 running, 1 pending, 1 vanished.`
    assert counts.endswith('1 vanished.') and 'new' not in counts and 'finished' not in counts
    plan = sweep_lib.load_sweep(str(sweep_file))
    assert f'resubmitting trial 3 {plan.trials[3].name} (vanished)' in again.stdout
    second_array = again.stdout.split('Submitted job array ')[1].split(':')[0]
    assert f'Submitted job array {second_array}: trial(s) 3 ' in again.stdout
    cluster.wait_jobs([f'{array}_{i}' for i in range(3)] + [f'{second_array}_3'])

    last = run_command(*command)  # All ended: the report.
    assert last.returncode == 0, last.stderr
    assert f'4 trials in {workdir}: 4 finished.' in last.stdout and 'Submitted' not in last.stdout
    stdout, stderr = local.communicate(timeout=600)
    assert local.returncode == 0, stderr[-3000:]
  finally:
    if local.poll() is None:
      local.kill()
  assert table_without_wall(workdir) == table_without_wall(local_workdir)
  assert (workdir / 'results.md').read_text() in last.stdout
  for png in ('eval_accuracy_by_key.png', 'eval_accuracy_by_point.png', 'curves.png'):
    assert (workdir / png).stat().st_size > 10_000
  # The layout of a local sweep, and each array task's output beside the scripts.
  for trial in plan.trials:
    attempts = [json.loads(line) for line in open(workdir / trial.name / sweep_lib.ATTEMPTS_FILE)]
    assert [a['status'] for a in attempts] == ['finished']
    assert attempts[0]['slurm_job'] == f'{second_array if trial.index == 3 else array}_{trial.index}'
  assert (workdir / 'slurm' / f'{second_array}_3.out').read_text().count('trial finished at step 8') == 1


def test_mistakes_are_one_line_errors(tmp_path, data_dir, monkeypatch, run_command):
  """Bad stop signals and SLURM options fail before anything runs (no cluster needed)."""
  monkeypatch.chdir(REPO)
  for value, message in (('TERM,FOO', "'FOO' is not a signal"), ('KILL', 'SIGKILL and SIGSTOP cannot be')):
    result = run_command('train', '--config', 'configs/base.py', '--workdir', str(tmp_path / 'run'),
                         f'--stop_signals={value}')
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count('\n') == 1 and not (tmp_path / 'run').exists()
  sweep_file = tmp_path / 'tiny.py'
  sweep_file.write_text(SWEEP.format(data_dir=data_dir))
  for flags, message in ((['--detach'], '--detach is an option of --executor slurm'),
                         (['--executor', 'slurm', '--nodes', '0'], '--nodes 0: a trial runs on 1 or more nodes'),
                         (['--executor', 'slurm', '--sbatch', 'qos=high'], "--sbatch 'qos=high': give an sbatch")):
    result = run_command('sweep', str(sweep_file), '--workdir', str(tmp_path / 'sweep'), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / 'sweep').exists()
  monkeypatch.setenv('PATH', str(tmp_path))  # No squeue, no sbatch.
  result = run_command('sweep', str(sweep_file), '--workdir', str(tmp_path / 'sweep'), '--executor', 'slurm')
  assert result.returncode == 2 and 'squeue is not on PATH' in result.stderr, result.stderr


def test_docs_show_the_script_the_tests_submit():
  """docs/scaling.md's sbatch script is experiments/slurm/train.sbatch without its comment lines."""
  with open(TRAIN_SCRIPT) as f:
    script = [line for line in f.read().splitlines() if not line.startswith('# ') and line != '#']
  with open(os.path.join(REPO, 'docs', 'scaling.md')) as f:
    docs = f.read()
  shown = docs.split('```bash\n#!/bin/bash\n', 1)[1].split('```', 1)[0].splitlines()
  assert ['#!/bin/bash'] + shown == script
