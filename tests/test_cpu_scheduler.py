"""vit_jax.cpu.scheduler: the train step is compiled with the XLA:CPU scheduler whose plan fits in free memory."""

import os

import jax
import numpy as np
import pytest

from vit_jax.cpu import scheduler
from vit_jax.errors import UsageError
from vit_jax.training import loop, sharding
from vit_jax.training import setup as setup_lib

GIB = 2**30


def test_free_memory_is_the_kernels_available_memory_or_a_cgroup_limit_below_it(tmp_path):
  meminfo = tmp_path / 'meminfo'
  meminfo.write_text('MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\nSwapFree:        1000 kB\n')
  root = tmp_path / 'cgroup'
  (root / 'job').mkdir(parents=True)
  cgroup = tmp_path / 'self_cgroup'  # What /proc/self/cgroup says: this process's cgroup.
  assert scheduler.free_host_memory(str(meminfo), str(root), str(cgroup)) == (20000000 * 1024, 1000 * 1024)
  # This process's own cgroup, limited to 8 GiB with 3 GiB in use: 5 GiB free.
  cgroup.write_text('0::/job\n')
  (root / 'job' / 'memory.max').write_text(f'{8 * GIB}\n')
  (root / 'job' / 'memory.current').write_text(f'{3 * GIB}\n')
  assert scheduler.free_host_memory(str(meminfo), str(root), str(cgroup))[0] == 5 * GIB
  (root / 'job' / 'memory.max').write_text('max\n')
  assert scheduler.free_host_memory(str(meminfo), str(root), str(cgroup))[0] == 20000000 * 1024
  none = str(tmp_path / 'none')
  assert scheduler.free_host_memory(none, none, none) == (None, 0)


@pytest.fixture(scope='module')
def lowered_step():
  """The launcher's train step of a two-block ViT-Ti/16 (batch 8 at 32 px), lowered over one CPU device."""
  from vit_jax.bench.workload import benchmark_config
  config = benchmark_config('Ti/16', 32, 8, 'float32')
  config.model.num_layers = 2
  config.mesh.data = 1
  mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
  run = setup_lib.setup(config, mesh)
  state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({'image': rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
                                 'label': rng.integers(0, 1000, 8).astype(np.int32)}, run.batch_sharding)
  return run.step_fn.lower(state, batch, jax.random.key(1)), run, state, batch


def test_auto_keeps_the_default_where_it_fits_and_switches_where_it_does_not(lowered_step):
  lowered, run, state, batch = lowered_step
  roomy = scheduler.compile_within_memory(lowered, platform='cpu', free=(64 * GIB, 0))
  assert not roomy.memory_optimized and "XLA:CPU's default" in roomy.reason
  default = scheduler.planned_bytes(roomy.program, 1)
  low = scheduler.planned_bytes(lowered.compile(scheduler.MEMORY_OPTIMIZED), 1)
  assert low < 0.8 * default  # The memory-optimised plan is smaller (by ~30% for a ViT-B/16 step).

  # Free memory between the two plans: the default would not fit, the memory-optimised plan does.
  tight = scheduler.compile_within_memory(lowered, platform='cpu', free=(int(default), 0))
  assert tight.memory_optimized and scheduler.planned_bytes(tight.program, 1) == low
  assert 'memory-optimised' in tight.reason and 'the default plans' in tight.reason
  # Same computation: the step gives the default's loss from the same state and batch.
  copy = jax.tree.map(lambda x: x.copy(), state)
  _, metrics_default = roomy.program(state, batch, jax.random.key(1))
  _, metrics_low = tight.program(copy, batch, jax.random.key(1))
  for name in ('train/loss', 'train/grad_norm'):
    np.testing.assert_allclose(float(metrics_low[name]), float(metrics_default[name]), rtol=1e-5)

  # Another process short of memory: all processes compile the memory-optimised program.
  others = [True, False]  # Another process: 'needs the memory-optimised plan', then 'it fits'.
  agreed = scheduler.compile_within_memory(lowered, platform='cpu', free=(64 * GIB, 0),
                                           agree=lambda flag: others.pop(0) or flag)
  assert agreed.memory_optimized


def test_a_step_that_cannot_fit_is_a_one_line_error_before_it_runs(lowered_step):
  lowered = lowered_step[0]
  with pytest.raises(UsageError) as error:
    scheduler.compile_within_memory(lowered, platform='cpu', free=(2**20, 2**20), fix='Use fewer images.')
  message = str(error.value)
  assert '\n' not in message and 'MiB of host memory' in message and '1.0 MiB free and 1.0 MiB of swap' in message
  assert 'Use fewer images.' in message and "config.cpu_scheduler='memory'" in message
  # Asked for explicitly, it compiles without the check; other platforms are left to XLA.
  assert scheduler.compile_within_memory(lowered, platform='cpu', choice='memory',
                                         free=(2**20, 0)).memory_optimized
  with pytest.raises(UsageError, match="config.cpu_scheduler='fast'; use one of 'auto'"):
    scheduler.compile_within_memory(lowered, platform='cpu', choice='fast')


def test_a_scheduler_in_xla_flags_stands(lowered_step, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') +
                     ' --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED')
  result = scheduler.compile_within_memory(lowered_step[0], platform='cpu', free=(2**20, 0))
  assert not result.memory_optimized and 'XLA_FLAGS' in result.reason


def test_the_launcher_stops_before_its_first_step_when_the_step_cannot_fit(tiny_config, tmp_path, monkeypatch):
  bad = tiny_config.copy_and_resolve_references()
  bad.cpu_scheduler = 'fast'  # A bad choice fails with the config's other checks, before the workdir is made.
  with pytest.raises(UsageError, match="config.cpu_scheduler='fast'"):
    loop.train_and_evaluate(bad, str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad').exists()
  monkeypatch.setattr(scheduler, 'free_host_memory', lambda: (2**20, 0))  # 1 MiB free, no swap.
  workdir = tmp_path / 'run'
  with pytest.raises(UsageError) as error:
    loop.train_and_evaluate(tiny_config, str(workdir))
  assert 'config.accumulation_steps=2' in str(error.value) and 'config.model.remat=True' in str(error.value)
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')
