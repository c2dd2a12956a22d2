"""Runs and sweeps on a real one-node SLURM cluster (tests/slurm_cluster.py), not a mock.

The job script is the repository's `slurm/train.sbatch` as docs/scaling.md
shows it, submitted without its GPUs: two tasks of one run equal one process;
a run warned before its time limit saves, requeues itself and ends with the
parameters of an uninterrupted run; a sweep runs as a job array, resubmits
what was cancelled and reports as a local sweep does.

In CI ($CI set) these tests fail where the cluster cannot start; elsewhere a
machine without SLURM's packages skips them, saying so.
"""

import json
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
import pytest

from tests.conftest import REPO, xla_flags
from tests.slurm_cluster import Cluster, ClusterError, missing_programs
from tests.test_scale import STEPS, TOLERANCE, assert_same_params, config, one_device_run  # noqa: F401
from vit_jax import checkpoint
from vit_jax.training import loop, sharding

TRAIN_SCRIPT = os.path.join(REPO, 'slurm', 'train.sbatch')


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
  """`srun -n2 vit-jax train --multihost` through slurm/train.sbatch: the one-process losses and parameters."""
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
