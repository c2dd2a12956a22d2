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
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO, xla_flags
from tests.slurm_cluster import CHECK_PERIOD_S, ENDED_STATES, Cluster, ClusterError, missing_programs
from tests.test_fault_tolerance import caught_signals
from tests.test_scale import STEPS, TOLERANCE, assert_same_params, config, one_device_run  # noqa: F401
from vit_jax import checkpoint
from vit_jax.config import defaults
from vit_jax.sweeps import slurm, sweep as sweep_lib
from vit_jax.training import loop, preemption, sharding

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


# The time-limit run: the tiny model for LIMITED_STEPS steps, evaluated and saved only at its end and when
# stopped, beside an uninterrupted run of the same flags. Once the job trains, the test pauses its launcher
# (SIGSTOP, as a debugger would) until SLURM's warning has come, then lets it go on (SIGCONT): the warning
# lands mid-training on a machine of any speed, without training through the 30 s between slurmctld's
# time-limit checks.
LIMITED_STEPS = 40


def limited_flags(steps):
  return ('--config.batch_size=32', f'--config.total_steps={steps}', '--config.log_every_steps=5',
          f'--config.eval_every_steps={steps}', f'--config.checkpoint_every_steps={steps}',
          '--config.model.dropout_rate=0.1')


# The job is submitted with a 10-minute limit and --signal=B:USR1@WARNING_S: it would be warned 9 min 20 s
# in. While its launcher is paused, the test brings its end forward (`scontrol update EndTime`, as an
# administrator may) to END_AFTER_CHECK_S after the next of slurmctld's time-limit checks (every 30 s),
# at least LEAD_S away: that check warns it (check + 30 s + WARNING_S >= end), and the one after, which would
# time it out, comes after it has saved and requeued itself.
WARNING_S = 10
END_AFTER_CHECK_S = 35
LEAD_S = 2


def progress(log):
  """The step of the job log's last progress line, or None before the first."""
  lines = [line for line in log.splitlines() if line.startswith('step ')]
  return int(lines[-1].split()[1].split('/')[0]) if lines else None


def next_check(cluster, after):
  """The first time-limit check of slurmctld at or after `after` (they come every CHECK_PERIOD_S)."""
  check = (cluster.time_limit_checks() or [cluster.controller_started])[-1]
  while check < after:
    check += datetime.timedelta(seconds=CHECK_PERIOD_S)
  return check


def warn_while_training(cluster, job, output, steps):
  """Once the job trains, pauses its launcher, brings the job's end forward so that the next time-limit
  check warns it, and lets the launcher go on once the job script has taken the warning."""
  deadline = time.time() + 300
  while (progress(output.read_text() if output.exists() else '') is None
         and cluster.job_states().get(job, 'PENDING') not in ENDED_STATES and time.time() < deadline):
    time.sleep(0.1)
  pid = launcher_pid(job)
  assert pid, f'job {job} has no launcher process: {output.read_text()[-3000:]}'
  os.kill(pid, signal.SIGSTOP)
  try:
    paused_at = progress(output.read_text())
    assert paused_at is not None and paused_at < steps, output.read_text()[-3000:]
    check = next_check(cluster, datetime.datetime.now() + datetime.timedelta(seconds=LEAD_S))
    end = check + datetime.timedelta(seconds=END_AFTER_CHECK_S)
    cluster.run('scontrol', 'update', f'JobId={job}', f'EndTime={end:%Y-%m-%dT%H:%M:%S}')
    limit = check + datetime.timedelta(seconds=CHECK_PERIOD_S)
    while 'time-limit warning' not in output.read_text() and datetime.datetime.now() < limit:
      time.sleep(0.2)
    assert 'time-limit warning' in output.read_text(), (cluster.controller_log()[-3000:], output.read_text())
  finally:
    os.kill(pid, signal.SIGCONT)
  # Warned: the job saves and requeues itself; its next start gets its 10 minutes back.
  cluster.run('scontrol', 'update', f'JobId={job}', 'TimeLimit=10')


def run_limited(cluster, data_dir, directory, steps):
  """The job and the uninterrupted run of `steps` steps in `directory`, the job warned by SLURM while it
  trains; returns (job, its log, the finished job's id and log).

  The finished job: the uninterrupted run, once finished, submitted too and warned by hand while its
  launcher starts (it overlaps the warned job's restart)."""
  data_flag = f'--config.dataset.data_dir={data_dir}'
  directory.mkdir()
  output, finished_output = directory / 'job.out', directory / 'finished.out'
  uninterrupted = subprocess.Popen(
      [sys.executable, '-m', 'vit_jax', 'train', '--config', 'configs/base.py', '--workdir',
       str(directory / 'reference'), data_flag, *limited_flags(steps)], cwd=REPO, env=job_env(cluster),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    job = sbatch(cluster, '--time=10', f'--signal=B:USR1@{WARNING_S}', '--nodes=1', '--ntasks-per-node=1',
                 '--gpus-per-node=0', f'--output={output}', TRAIN_SCRIPT, 'configs/base.py',
                 str(directory / 'limited'), data_flag, *limited_flags(steps))
    warn_while_training(cluster, job, output, steps)
    _, stderr = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, stderr[-3000:]
    finished = sbatch(cluster, '--time=10', '--nodes=1', '--ntasks-per-node=1', '--gpus-per-node=0',
                      f'--output={finished_output}', TRAIN_SCRIPT, 'configs/base.py', str(directory / 'reference'),
                      data_flag, *limited_flags(steps))
    assert launcher_handling(finished, signal.SIGUSR1), finished_output.read_text()[-3000:]
    cluster.run('scancel', '--signal=USR1', '--batch', finished)
    states = cluster.wait_jobs([job, finished], timeout_s=600)
    assert states == {job: 'COMPLETED', finished: 'COMPLETED'}, (output.read_text()[-3000:],
                                                                 finished_output.read_text()[-3000:])
  finally:
    if uninterrupted.poll() is None:
      uninterrupted.kill()
  return job, output.read_text(), finished, finished_output.read_text()


def launcher_pids(job):
  """{pid: the signals it handles} of job `job`'s launcher processes (`vit-jax train`), from /proc."""
  pids = {}
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/comm') as f:
        if not f.read().startswith('vit-jax'):
          continue
      with open(f'/proc/{pid}/environ', 'rb') as f:
        if f'SLURM_JOB_ID={job}'.encode() not in f.read().split(b'\0'):
          continue
    except OSError:
      continue
    caught = caught_signals(pid)
    if caught is not None:  # Not exited meanwhile.
      pids[int(pid)] = caught
  return pids


def launcher_pid(job):
  """The PID of job `job`'s one launcher process, or None."""
  pids = launcher_pids(job)
  return next(iter(pids)) if len(pids) == 1 else None


def launcher_handling(job, sig, timeout_s=120):
  """Waits until job `job`'s launcher process (`vit-jax train`) handles `sig`; False if it did not within
  `timeout_s`."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if any(sig in caught for caught in launcher_pids(job).values()):
      return True
    time.sleep(0.05)
  return False


def test_time_limit_warning_saves_requeues_and_resumes_bitwise(cluster, data_dir, tmp_path):
  """A job warned by SLURM before its time limit while it trains: saves, requeues itself, ends equal to an
  uninterrupted run. A job whose run is finished, warned: ends, not requeued."""
  steps, directory = LIMITED_STEPS, tmp_path / 'run'
  result = run_limited(cluster, data_dir, directory, steps)
  job, log, finished, finished_log = result
  # SLURM's own warning, at a time-limit check.
  assert f'warning signal 10 to JobId={job}\n' in cluster.controller_log()
  restarts = int(cluster.run('scontrol', 'show', 'job', job).stdout.split('Restarts=')[1].split()[0])
  assert restarts == 1 and f'job {job} start 1 ' in log, log[-3000:]
  assert f'time-limit warning: stopping job {job}' in log
  saved = int(log.split('Received SIGUSR1: saved the checkpoint of step ')[1].split()[0])
  assert 0 < saved < steps, log[-3000:]
  assert f'launcher exit status {preemption.STOPPED_EXIT_CODE}: requeueing job {job}' in log
  assert f'Resuming from the checkpoint at step {saved}' in log
  assert f'step {steps}/{steps}' in log

  config = defaults.get_config()
  config.dataset.data_dir = data_dir
  config.batch_size, config.total_steps, config.model.dropout_rate = 32, steps, 0.1
  expected, actual = restore(directory / 'reference', config), restore(directory / 'limited', config)
  assert int(actual.step) == int(expected.step) == steps
  for a, b in zip(jax.tree.leaves((actual.params, actual.opt_state)),
                  jax.tree.leaves((expected.params, expected.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Bitwise.

  # The finished run: its launcher says so and exits 0, and the job ends.
  assert f'time-limit warning: stopping job {finished}' in finished_log
  assert f'The run in {directory / "reference"} is finished' in finished_log, finished_log[-3000:]
  assert f'the run is finished: job {finished} ends' in finished_log and 'requeueing' not in finished_log
  assert 'Restarts=0' in cluster.run('scontrol', 'show', 'job', finished).stdout


# A sweep of two points of the tiny model, 8 steps a trial: its trials are mostly launcher start-up. Each
# trial asks for both of the node's CPUs, so one runs while the other waits in the queue.
SWEEP = '''
BASE_CONFIG = 'configs/base.py'
OVERRIDES = {{'total_steps': 8, 'batch_size': 16, 'eval_batch_size': 120, 'log_every_steps': 4,
             'eval_every_steps': 8, 'checkpoint_every_steps': 8, 'optimizer.warmup_steps': 2,
             'dataset.data_dir': {data_dir!r}}}
TRIALS = [{{'model.posemb': 'learn'}}, {{'model.posemb': 'none'}}]
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
  command = ['sweep', str(sweep_file), '--workdir', str(workdir), '--executor', 'slurm', '--detach',
             '--sbatch=--cpus-per-task=2']

  # The same sweep run locally beside it, for the report to equal.
  local = subprocess.Popen([sys.executable, '-m', 'vit_jax', 'sweep', str(sweep_file), '--workdir', str(local_workdir)],
                           cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    first = run_command(*command)
    assert first.returncode == 0, first.stderr
    assert f'2 trials in {workdir}: 2 new.' in first.stdout
    array = first.stdout.split('Submitted job array ')[1].split(':')[0]
    assert f'Submitted job array {array}: trial(s) 0,1' in first.stdout
    # Trial 0 takes the node's 2 CPUs, 1 waits. Trial 1's job is cancelled before it starts.
    cluster.run('scancel', f'{array}_1')

    again = run_command(*command)  # Progress, and only the cancelled trial goes back to the queue.
    assert again.returncode == 0, again.stderr
    counts = again.stdout.split('\n')[0].split(': ')[-1]  # E.g. `1 running, 1 vanished.`
    assert counts.endswith('1 vanished.') and 'new' not in counts and 'finished' not in counts, counts
    plan = sweep_lib.load_sweep(str(sweep_file))
    assert f'resubmitting trial 1 {plan.trials[1].name} (vanished)' in again.stdout
    second_array = again.stdout.split('Submitted job array ')[1].split(':')[0]
    assert f'Submitted job array {second_array}: trial(s) 1 ' in again.stdout
    cluster.wait_jobs([f'{array}_0', f'{second_array}_1'])

    last = run_command(*command)  # All ended: the report.
    assert last.returncode == 0, last.stderr
    assert f'2 trials in {workdir}: 2 finished.' in last.stdout and 'Submitted' not in last.stdout
    stdout, stderr = local.communicate(timeout=600)
    assert local.returncode == 0, stderr[-3000:]
  finally:
    if local.poll() is None:
      local.kill()
  assert table_without_wall(workdir) == table_without_wall(local_workdir)
  assert (workdir / 'results.md').read_text() in last.stdout
  for png in ('eval_accuracy_by_key.png', 'eval_accuracy_by_point.png', 'curves.png'):
    assert (workdir / png).read_bytes()[:4] == b'\x89PNG' and (workdir / png).stat().st_size > 5_000
  # The layout of a local sweep, and each array task's output beside the scripts.
  for trial in plan.trials:
    attempts = [json.loads(line) for line in open(workdir / trial.name / sweep_lib.ATTEMPTS_FILE)]
    assert [a['status'] for a in attempts] == ['finished']
    assert attempts[0]['slurm_job'] == f'{second_array if trial.index == 1 else array}_{trial.index}'
  assert (workdir / 'slurm' / f'{second_array}_1.out').read_text().count('trial finished at step 8') == 1


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
