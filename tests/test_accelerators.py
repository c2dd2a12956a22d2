"""One model for CPU, GPU and TPU: the train and eval steps export for cuda and tpu on this CPU machine.

`jax.export` lowers for a platform without its hardware. The B/16 train and
eval steps of `vit_jax.training.setup` built for cuda or tpu (8-device FSDP
mesh, bfloat16 and float32) must lower, be plain programs (none of
vit_jax/cpu/kernels.py's rules, which only steps built for CPU devices hold:
vit_jax/training/platform.py), and keep the parameter shardings. Without
JAX's CUDA plugin (this environment) the cuda step takes XLA's attention, as
a GPU host without it would; tests/cuda lowers the cuDNN one in an
environment with the plugin. Also: host-memory settings stay off where JAX
will use an accelerator, and `vit-jax devices`.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax.config import defaults
from vit_jax.cpu import hostmem, kernels
from vit_jax.training import platform as platform_lib
from vit_jax.training.platform import attention_implementation

# What only a CPU lowering may hold: the barriers of the XLA:CPU backward rules, and
# any op under their name scope (in the ops' locations). Remat, which also emits
# optimization barriers, is off in these configs.
CPU_MARKERS = ('stablehlo.optimization_barrier', kernels.SCOPE)


def b16_config(dtype: str):
  config = defaults.get_config()
  config.model.variant, config.model.dtype = 'B/16', dtype
  config.input.image_size, config.dataset.num_classes = 224, 1000
  config.batch_size = config.eval_batch_size = 8
  config.mesh.data, config.mesh.fsdp = 1, 8
  return config


@functools.lru_cache(maxsize=None)
def b16_steps(dtype: str, platform: str):
  """(setup, mesh, abstract train-step args, abstract eval-step args) of B/16 on the 8 CPU devices,
  the steps built for `platform`."""
  from vit_jax.training import loop, sharding
  config = b16_config(dtype)
  mesh = sharding.make_mesh(config)
  run = loop.setup(config, mesh, platform)
  state = sharding.placed(run.abstract_state, run.state_sharding)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=run.batch_sharding)  # noqa: E731
  batch = {'image': spec((8, 224, 224, 3), jnp.float32), 'label': spec((8,), jnp.int32)}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  eval_batch = {**batch, 'mask': spec((8,), jnp.float32)}
  return run, mesh, (state, batch, rng), (state.params, eval_batch)


def unpadded(spec: P) -> tuple:
  """A PartitionSpec's entries without trailing Nones (P('fsdp') == P('fsdp', None))."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_train_and_eval_steps_export_for_gpu_and_tpu(dtype):
  for platform in ('cuda', 'tpu'):
    run, mesh, train_args, eval_args = b16_steps(dtype, platform)
    assert run.model.dot_general is None and run.model.attention_fn is None  # The plain model.
    expected = [unpadded(s.spec) for s in jax.tree.leaves(run.state_sharding)]
    assert sum('fsdp' in s for s in expected) >= 12 * 6  # Every block's large kernels are split.
    for name, step, args, num_state in (('train', run.step_fn, train_args, len(expected)),
                                        ('eval', run.eval_fn, eval_args, len(jax.tree.leaves(eval_args[0])))):
      exported = jax.export.export(step, platforms=[platform])(*args)
      text = exported.mlir_module()
      assert exported.platforms == (platform,) and exported.nr_devices == 8
      for marker in CPU_MARKERS:
        assert marker not in text, f'{name} step for {platform} holds CPU-only code ({marker})'
      assert 'cudnn' not in text  # XLA's attention: no CUDA plugin here, and never on TPU.
      shardings = exported.in_shardings_jax(mesh)[:num_state]
      state_specs = expected if name == 'train' else [
          unpadded(s.spec) for s in jax.tree.leaves(run.state_sharding.params)]
      assert [unpadded(s.spec) for s in shardings] == state_specs, f'{name} step for {platform}'


def test_cpu_lowering_holds_the_cpu_backward_rules():
  run, _, train_args, eval_args = b16_steps('float32', 'cpu')
  text = jax.export.export(run.step_fn, platforms=['cpu'])(*train_args).mlir_module()
  # Per block: the attention backward and the six projections' weight gradients, as CPU_RULES keep them.
  rules = platform_lib.CPU_RULES
  per_block = 6 * ('dense_backward' in rules) + ('attention_backward' in rules)
  assert text.count('stablehlo.optimization_barrier') == 12 * per_block
  assert (kernels.SCOPE in text) == bool(per_block)
  # Inference has no backward: nothing CPU-specific in the eval step.
  eval_text = jax.export.export(run.eval_fn, platforms=['cpu'])(*eval_args).mlir_module()
  assert not any(marker in eval_text for marker in CPU_MARKERS)


def test_startup_line_names_the_attention_that_runs():
  config = b16_config('bfloat16')
  cpu = attention_implementation(config, 'cpu')
  if 'attention_backward' in platform_lib.CPU_RULES:
    assert 'XLA:CPU backward of vit_jax/cpu/kernels.py' in cpu
  else:
    assert cpu.endswith('autodiff backward')
  # No CUDA plugin here: JAX's cuDNN path refuses to trace, and says why.
  assert attention_implementation(config, 'gpu') == (
      'attention on gpu: XLA: explicit softmax attention on head-major operands, autodiff backward '
      "(not cuDNN: cuDNN is not detected. (JAX's CUDA plugin is not installed: pip install -e .[cuda12]))")
  config.model.attention = 'xla'
  assert "(not cuDNN: config.model.attention='xla')" in attention_implementation(config, 'gpu')
  assert attention_implementation(config, 'tpu') == (
      'attention on tpu: XLA: explicit softmax attention on head-major operands, autodiff backward')
  config.model.attention = 'reference'
  assert 'attention=reference' in attention_implementation(config, 'cpu')


@pytest.mark.parametrize('environ,expected', [
    ({'JAX_PLATFORMS': 'cuda'}, 'JAX_PLATFORMS=cuda names cuda'),
    ({'JAX_PLATFORMS': 'tpu,cpu'}, 'JAX_PLATFORMS=tpu,cpu names tpu'),
    ({'JAX_PLATFORMS': 'cpu'}, None),
])
def test_host_memory_settings_stay_off_for_accelerators(monkeypatch, environ, expected):
  # As in a fresh process: commands run in this one by earlier tests may have switched the settings on.
  monkeypatch.setattr(hostmem, '_retaining', False)
  for key, value in environ.items():
    monkeypatch.setenv(key, value)
  assert hostmem.accelerator_in_use() == expected
  if expected:  # Returns before touching the allocator or JAX.
    assert hostmem.retain_freed_memory() is False
    assert hostmem.reason().startswith(f'off: {expected}') and not hostmem.retaining()


def test_an_installed_accelerator_plugin_turns_host_memory_settings_off(monkeypatch, tmp_path):
  (tmp_path / 'libtpu').mkdir()
  (tmp_path / 'libtpu' / '__init__.py').write_text('')  # What `pip install jax[tpu]` installs.
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  assert hostmem.accelerator_in_use() == 'the JAX accelerator plugin libtpu is installed'
  assert hostmem.retain_freed_memory() is False
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # A CPU run on that host opts back in.
  assert hostmem.accelerator_in_use() is None


def test_devices_command_reports_the_backend(capsys):
  from vit_jax.tools import devices
  assert devices.main(['--expect', 'cpu']) == 0
  out = capsys.readouterr().out
  assert 'backend: cpu, 8 device(s)' in out and 'attention on cpu' in out
  assert devices.main(['--expect', 'gpu']) == 2
  assert 'error: expected the gpu backend, but JAX runs on cpu' in capsys.readouterr().err
