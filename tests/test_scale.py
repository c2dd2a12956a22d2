"""Results independent of the layout: 1 device, 8 devices, FSDP, accumulation, 2 processes.

The in-process tests build meshes over subsets of this process's 8 virtual CPU
devices and run the real train step on the real input pipeline. The
multi-process test runs the real launcher, `python -m vit_jax.main`, as two
processes of 4 devices each joined with jax.distributed on 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax.config import defaults
from tests.conftest import REPO, xla_flags
from vit_jax import checkpoint
from vit_jax.data import pipeline
from vit_jax.training import sharding
from vit_jax.training import loop

STEPS = 4
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # float32 rounding of differently ordered sums.


def base_config(data_dir):
  """configs/base.py (the tiny model on digits) with augmentation on and no dropout.

  SGD rather than Adam: Adam divides each gradient by its own running scale,
  so an element whose gradient is rounding noise (e.g. attention key biases,
  whose exact gradient is zero) moves by up to the learning rate whatever the
  layout. SGD passes gradients through linearly, so any layout-dependent
  difference beyond rounding would show in the parameters.
  """
  config = defaults.get_config()
  config.dataset.data_dir = data_dir
  config.batch_size = 32
  config.total_steps = STEPS  # The learning-rate schedule depends on it.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  config.optimizer.warmup_steps = 1
  config.mesh.fsdp_min_size = 16  # Small enough that the tiny model's arrays really split.
  return config


@pytest.fixture
def config(data_dir):
  """`base_config`, for a test to change."""
  return base_config(data_dir)


def train_steps(config, devices, num_steps, state=None, keep_at=None):
  """Runs `num_steps` real train steps on a mesh over `devices`; returns (state, losses), and with
  `keep_at` also a host copy of the state after that many steps (the step donates its input) and its
  shardings."""
  mesh = sharding.make_mesh(config, devices)
  run = loop.setup(config, mesh)
  init_rng, dropout_rng = loop.seed_rngs(config)
  if state is None:
    state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(init_rng)
  split = pipeline.open_split(config.dataset, config.dataset.train_split)
  batches = pipeline.train_iterator(config, split, int(state.step), 0, 1)
  losses, kept = [], None
  for i in range(num_steps):
    state, metrics = run.step_fn(state, sharding.global_batch(next(batches), run.batch_sharding),
                                 dropout_rng)
    losses.append(float(metrics['train/loss']))
    if i + 1 == keep_at:
      kept = jax.device_get(state), jax.tree.map(lambda x: x.sharding, state)
  return (state, losses) if keep_at is None else (state, losses, kept)


def assert_same_params(actual, expected):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOLERANCE,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def one_device_run(data_dir):
  """The reference: STEPS steps of `base_config` on a single device (once: the tests only read it),
  and a host copy of its state after STEPS // 2 steps."""
  return train_steps(base_config(data_dir), jax.devices()[:1], STEPS, keep_at=STEPS // 2)


def test_eight_devices_equal_one(config, one_device_run):
  state, losses = train_steps(config, jax.devices(), STEPS)
  assert len(state.params['head']['kernel'].sharding.device_set) == 8
  np.testing.assert_allclose(losses, one_device_run[1], **TOLERANCE)
  assert_same_params(state.params, one_device_run[0].params)
  # The run really moved: equality above is not of two untouched inits.
  assert losses[-1] != losses[0]


def test_fsdp_equals_replicated(config, one_device_run):
  config.mesh.fsdp = 4  # data = 2 x fsdp = 4.
  state, losses = train_steps(config, jax.devices(), STEPS)
  kernel = state.params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 4)
  momentum = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
  assert momentum and all(x.sharding.spec == kernel.sharding.spec for x in momentum)  # Split alike.
  np.testing.assert_allclose(losses, one_device_run[1], **TOLERANCE)
  assert_same_params(state.params, one_device_run[0].params)


def test_accumulation_equals_full_batch(config, one_device_run):
  config.accumulation_steps = 4  # 4 micro-batches of 8: one example per device each.
  state, losses = train_steps(config, jax.devices(), STEPS)
  np.testing.assert_allclose(losses, one_device_run[1], **TOLERANCE)
  assert_same_params(state.params, one_device_run[0].params)


def test_checkpoint_from_one_device_resumes_on_eight(config, one_device_run, tmp_path):
  # The single-device run's state at its step STEPS // 2, put back as it was.
  state = jax.device_put(*one_device_run[2])
  assert int(state.step) == STEPS // 2 and state.params['head']['kernel'].sharding.device_set == {jax.devices()[0]}
  manager = checkpoint.create_manager(str(tmp_path), config)
  checkpoint.save(manager, STEPS // 2, state)
  manager.wait_until_finished()

  mesh = sharding.make_mesh(config)  # All 8 devices.
  run = loop.setup(config, mesh)
  abstract = sharding.placed(run.abstract_state, run.state_sharding)
  restored = checkpoint.restore_latest(checkpoint.create_manager(str(tmp_path), config), abstract)
  assert int(restored.step) == STEPS // 2
  assert len(restored.params['head']['kernel'].sharding.device_set) == 8
  state, losses = train_steps(config, jax.devices(), STEPS - STEPS // 2, restored)
  np.testing.assert_allclose(losses, one_device_run[1][STEPS // 2:], **TOLERANCE)
  assert_same_params(state.params, one_device_run[0].params)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_equal_one_device(config, one_device_run, tmp_path):
  """The real launcher in 2 processes x 4 devices: same losses and parameters as 1 device.

  Its 8-device checkpoint is then restored here onto a single device, and its
  train step compiled exactly once.
  """
  workdir = tmp_path / 'run'
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             TF_CPP_MIN_LOG_LEVEL='2', JAX_LOG_COMPILES='1')
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'vit_jax.main', '--config', 'configs/base.py', '--workdir', str(workdir),
       f'--config.dataset.data_dir={config.dataset.data_dir}', '--config.batch_size=32',
       '--config.optimizer.warmup_steps=1', '--config.optimizer.name=sgd', '--config.optimizer.learning_rate=0.1', f'--config.total_steps={STEPS}', '--config.log_every_steps=1',
       '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2',
       '--coordinator_address', f'127.0.0.1:{port}', '--num_processes', '2', '--process_id', str(i),
       '--verbose'],  # JAX's compile log lines on the console (vit_jax/console.py).
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (stdout, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  stdout, stderr = outputs[0]
  assert '8 devices (mesh data=8, fsdp=1), 2 processes' in stdout
  assert 'Memory per device: params' in stdout
  assert stderr.count('Finished XLA compilation of jit(train_step)') == 1
  assert stderr.count('Finished XLA compilation of jit(eval_step)') == 1
  assert outputs[1][0].count('step ') == 0  # Only process 0 logs.

  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  np.testing.assert_allclose(losses, one_device_run[1], **TOLERANCE)
  eval_rows = [r for r in rows if 'eval/accuracy' in r]
  assert [r['eval/num_examples'] for r in eval_rows] == [360, 360]

  # The checkpoint written by 2 processes on 8 devices, restored onto 1 device.
  run = loop.setup(config, sharding.make_mesh(config, jax.devices()[:1]))
  abstract = sharding.placed(run.abstract_state, run.state_sharding)
  restored = checkpoint.restore_latest(checkpoint.create_manager(str(workdir), config), abstract)
  assert int(restored.step) == STEPS
  assert restored.params['head']['kernel'].sharding.device_set == {jax.devices()[0]}
  assert_same_params(restored.params, one_device_run[0].params)
  assert_same_params(restored.opt_state, one_device_run[0].opt_state)


def test_saving_a_replicated_state_compiles_nothing(tmp_path, caplog):
  """Orbax would slice each replicated array once per CPU device to copy it to host: a compilation per
  shape and device (seconds at a process's first save). Here each array is copied from one replica."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {f'w{i}': jax.device_put(np.full((8 + i, 3), i, np.float32), replicated) for i in range(4)}
  config = defaults.get_config()
  manager = checkpoint.create_manager(str(tmp_path), config)
  with jax.log_compiles(), caplog.at_level('WARNING'):
    checkpoint.save(manager, 1, state)
    manager.wait_until_finished()
  compiled = [r.getMessage() for r in caplog.records if 'Finished XLA compilation' in r.getMessage()]
  assert not compiled, compiled
  restored = manager.restore(1)
  manager.close()
  for name, value in state.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))
