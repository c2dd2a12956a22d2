"""vit_jax.bench.benchmark on the tiny variant, and the side-by-side script without torch."""

import json
import os
import stat
import sys
import textwrap

import pytest

from tests.conftest import TEST_XLA_FLAGS
from vit_jax.bench import benchmark, workload
from vit_jax.bench import side_by_side as benchmark_timm
from vit_jax.models import create_model

# A small program: its XLA FLOP count is dominated by the matmuls, as a real model's.
TINY = ['--variant', 'tiny/4', '--image_size', '32', '--batch_size', '8', '--steps', '1',
        '--repeats', '2', '--ceiling_sizes', '128,256', '--json']

FIELDS = {'variant', 'mode', 'dtype', 'image_size', 'batch_size', 'images_per_second',
          'images_per_second_spread', 'step_seconds', 'step_seconds_all', 'compile_seconds',
          'flops_per_image', 'matmul_flops_per_image', 'achieved_flops_per_second',
          'ceiling_flops_per_second', 'mfu', 'peak_memory_bytes', 'peak_memory_source', 'devices',
          'num_params', 'xla_flags', 'jax_version', 'date', 'warmup_steps', 'page_faults_per_step',
          'host_memory_retained', 'gelu', 'loop', 'cpu_scheduler'}


@pytest.mark.parametrize('mode', ['train', 'inference'])
def test_benchmark_json_has_every_field_and_counts_flops(mode, capsys):
  # Train with a remat policy under nn.scan: the options reach the model.
  # Inference: the memory-optimised XLA:CPU scheduler, asked for.
  options = (['--scan', '--remat', 'dots_saveable'] if mode == 'train' else
             ['--gelu', 'exact', '--cpu_scheduler', 'memory'])
  assert benchmark.main([*TINY, '--mode', mode, *options]) == 0
  result = json.loads(capsys.readouterr().out)
  assert FIELDS <= set(result)
  assert result['cpu_scheduler'].startswith('concurrency' if mode == 'train' else 'memory-optimised')
  assert result['mode'] == mode and result['num_params'] > 0
  assert result['scan'] == (mode == 'train') and result['gelu'] == ('tanh' if mode == 'train' else 'exact')
  assert len(result['step_seconds_all']) == 2
  assert result['step_seconds']['min'] <= result['step_seconds']['median'] <= result['step_seconds']['max']
  assert result['images_per_second'] > 0 and 0 < result['mfu']
  assert result['peak_memory_bytes'] > 0
  assert 1 <= result['warmup_steps'] <= workload.MAX_WARMUP_STEPS
  assert len(result['page_faults_per_step']) == 2 and min(result['page_faults_per_step']) >= 0
  # XLA counts the whole program (softmax, GELU, LayerNorm, the optimizer);
  # the analytic count only the products. Same order of magnitude, XLA's above.
  ratio = result['flops_per_image'] / result['matmul_flops_per_image']
  assert 1.0 <= ratio < 2.5, ratio
  assert result['achieved_flops_per_second'] == pytest.approx(
      result['flops_per_image'] * result['images_per_second'])


def test_the_library_loop_is_a_notebook_step_on_the_public_api():
  """`--loop library` times create_model + optax + jax.jit, which trains, with the launcher's model."""
  import jax
  import numpy as np

  from vit_jax.bench import notebook
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, 1000, 8).astype(np.int32)}
  program = notebook.build('tiny/4', batch, 'float32', 'train')
  state, losses = program.state, []
  for step in range(30):  # One batch, learnt by heart: the loss falls (in the warm-up, slowly).
    state, loss = program.function(state, batch, jax.random.fold_in(program.rng, step))
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(1000), rel=1e-4)  # The zero-initialised head.
  assert all(b < a for a, b in zip(losses[1:], losses[2:])) and losses[-1] < losses[0] - 0.1, losses
  # The whole workload as `--loop library` times it: the notebook's model, one device.
  timed = workload.Workload('tiny/4', 32, 8, loop='library')
  assert timed.devices.startswith('1 x') and timed.run(1) > 0
  assert timed.num_params == sum(x.size for x in jax.tree.leaves(program.state.params))


def test_analytic_flops_of_b16():
  """The published ViT-B/16 forward cost: 17.6 GFLOPs as multiply-adds, i.e. ~35 G operations."""
  model = create_model('B/16', 1000)
  forward = workload.matmul_flops_per_image(model, 224, 'inference')
  assert forward / 2 == pytest.approx(17.56e9, rel=0.01)
  assert workload.matmul_flops_per_image(model, 224, 'train') == pytest.approx(3 * forward, rel=0.01)


def test_benchmark_text_output_and_bad_flags(capsys):
  result = {'variant': 'tiny/4', 'mode': 'train', 'dtype': 'float32', 'batch_size': 8, 'image_size': 32,
            'remat': 'none', 'scan': False, 'gelu': 'tanh',
            'attention': 'fused', 'num_params': 1000, 'devices': '8 x cpu', 'images_per_second': 10.0,
            'images_per_second_spread': {'min': 9.0, 'max': 11.0}, 'repeats': 2, 'steps': 1,
            'step_seconds': {'median': 0.8, 'min': 0.7, 'max': 0.9}, 'compile_seconds': 1.5,
            'warmup_steps': 2, 'page_faults_per_step': [0.0, 12.0], 'host_memory_retained': True,
            'flops_per_image': 2e9, 'matmul_flops_per_image': 1.8e9, 'achieved_flops_per_second': 2e10,
            'ceiling_flops_per_second': {'median': 1e11, 'min': 9e10, 'max': 1.1e11},
            'ceiling_matmul_sizes': [1024, 2048], 'mfu': 0.2, 'peak_memory_bytes': 2**30,
            'peak_memory_source': 'plan', 'process_peak_rss_bytes': 2**31}
  text = benchmark.format_result(result)
  assert 'images/s: 10.00' in text and 'MFU 20.0%' in text and '1.000 GiB' in text
  assert 'warm-up: 2 steps; page faults per step: 6 (host memory retained' in text
  assert benchmark.main(['--steps', '0']) == 2
  assert '--steps=0 must be positive' in capsys.readouterr().err
  assert benchmark.main(['--variant', 'tiny/4', '--image_size', '32', '--remat', 'dots']) == 2
  assert "Unknown remat policy 'dots'" in capsys.readouterr().err
  assert benchmark.main(['--steps', '0']) == 2
  assert '--steps=0 must be positive' in capsys.readouterr().err
  assert benchmark.main(['--variant', 'Q/16', '--image_size', '32']) == 2
  assert 'Unknown model variant' in capsys.readouterr().err
  # A flag XLA does not know would abort the process (`F... Unknown flag`) once JAX starts: one line.
  assert benchmark.main(['--xla_flags=--xla_no_such_flag=1']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --xla_flags=") and 'xla_no_such_flag' in err[0]


def test_side_by_side_rows_and_table():
  row = benchmark_timm.make_row('B/16', 'train', 8, [2.0, 4.0, 5.0], [1.0, 1.6, 3.0], flops_per_image=1e9)
  assert row['vit_jax_images_per_second'] == 2.0 and row['timm_images_per_second'] == 5.0
  assert row['ratio'] == pytest.approx(0.4)  # vit_jax / timm images per second.
  assert row['vit_jax_step_seconds'] == {'median': 4.0, 'min': 2.0, 'max': 5.0}
  assert row['timm_flops_per_second'] == 5e9
  row['vit_jax_devices'] = '2 x cpu'  # As compare() adds it from the worker.
  faster = benchmark_timm.make_row('Ti/16', 'inference', 8, [0.5], [1.0])
  table = benchmark_timm.format_table([row, faster]).splitlines()
  row.update(loop='library', vit_jax_peak_rss_bytes=3 * 2**29, timm_peak_rss_bytes=2**30)
  assert len(table) == 4 and 'vit_jax/timm' in table[0] and 'jax devices' in table[0]
  table = benchmark_timm.format_table([row, faster]).splitlines()
  assert table[2].split()[:7] == ['B/16', 'train', 'library', '8', '2.00', '5.00', '0.40x']
  assert table[2].split()[-2:] == ['2', '1.50/1.00']  # Devices; peak RSS in GiB of each side.
  # No loop (the launcher's), FLOP count, devices or memory given.
  assert table[3].split()[2] == 'launcher' and table[3].split()[6:] == ['2.00x', '-', '-', '-', '-/-']
  options = benchmark_timm.timm_model_options(
      dict(hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3, patch_size=16), 224)
  assert options == dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                         mlp_ratio=4.0, num_classes=1000)


def test_side_by_side_protocol_with_a_fake_timm(tmp_path, capsys):
  """The real vit_jax worker against a stand-in for timm's python that answers as the torch worker."""
  fake = tmp_path / 'python'
  fake.write_text(textwrap.dedent(f'''\
      #!{sys.executable}
      import json, sys
      print('a library banner that is not JSON')
      print(json.dumps({{'ready': True, 'torch': 'fake', 'timm': 'fake', 'threads': 2, 'num_params': 1}}), flush=True)
      for line in sys.stdin:
        if line.strip() != 'run':
          break
        print(json.dumps({{'seconds': 0.5, 'peak_rss_bytes': 2**20}}), flush=True)
      '''))
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = os.environ.copy()
  try:  # The worker is a fresh process, here on a CPU split in two (--cpu_devices).
    os.environ['XLA_FLAGS'] = TEST_XLA_FLAGS
    assert benchmark_timm.main(['--variants', 'tiny/4', '--modes', 'inference', '--image_size', '32',
                                '--steps', '2', '--repeats', '3', '--timm_python', str(fake),
                                '--cpu_devices', '2', '--loops', 'launcher,library-plain', '--json']) == 0
  finally:
    os.environ.clear()
    os.environ.update(env)
  row, library = map(json.loads, capsys.readouterr().out.splitlines())
  # A notebook's own forward pass, in a worker without the README's host-memory call.
  assert library['loop'] == 'library-plain' and library['vit_jax_host_memory_retained'] is False
  assert library['vit_jax_num_params'] == row['vit_jax_num_params'] and library['ratio'] > 0
  assert row['loop'] == 'launcher' and row['vit_jax_host_memory_retained'] is True
  assert row['timm_peak_rss_bytes'] == 2**20 and row['vit_jax_peak_rss_bytes'] > 2**27
  assert row['timm_step_seconds']['median'] == 0.25  # 0.5 s per run of 2 steps.
  assert row['timm_images_per_second'] == 32.0 and row['torch'] == 'fake'
  assert row['vit_jax_images_per_second'] > 0 and row['vit_jax_flops_per_second'] > 0
  assert row['ratio'] == pytest.approx(row['vit_jax_images_per_second'] / 32.0)
  assert len(row['vit_jax_page_faults_per_step']) == 3  # Per timed run of the vit_jax worker.
  assert row['vit_jax_devices'] == '2 x cpu'
  assert row['cpu'].startswith(benchmark_timm.cpu_model()) and 'cores' in row['cpu']
  assert 'torch' not in sys.modules


def test_cpu_model_tells_cpu_kinds_with_one_name_apart(tmp_path):
  """VMs report a bare 'AMD EPYC' for different generations: the rows carry family, model and features."""
  block = ('processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n'
           'model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\n')
  kinds = [(25, 17, 'avx512_bf16', 'AMD EPYC (family 25 model 17; avx2 avx512f avx512_bf16)'),
           (26, 2, 'avx512_vnni', 'AMD EPYC (family 26 model 2; avx2 avx512f)')]
  for family, model, extra, expected in kinds:
    cpuinfo = tmp_path / f'cpuinfo_{family}'
    cpuinfo.write_text(''.join(block.format(n=n, family=family, model=model, extra=extra) for n in range(2)))
    assert benchmark_timm.cpu_model(str(cpuinfo)) == expected
  intel = tmp_path / 'intel'
  intel.write_text('model name\t: Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz\ncpu family\t: 6\n'
                   'model\t\t: 207\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n')
  assert benchmark_timm.cpu_model(str(intel)) == ('Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz '
                                                  '(family 6 model 207; avx2 avx512f avx512_bf16 amx_bf16)')
  assert benchmark_timm.cpu_model(str(tmp_path / 'missing'))  # No /proc: platform's name.


def test_side_by_side_bad_input(capsys):
  assert benchmark_timm.main(['--timm_python', '/nonexistent/python']) == 2
  assert 'no python with torch and timm found (looked at --timm_python=/nonexistent/python)' in capsys.readouterr().err
  assert benchmark_timm.main(['--timm_python', sys.executable, '--modes', 'train,eval']) == 2
  assert '--modes has eval' in capsys.readouterr().err
  assert benchmark_timm.main(['--timm_python', sys.executable, '--variants', 'R50+B/16']) == 2
  assert "the hybrid 'R50+B/16'" in capsys.readouterr().err


def test_timm_python_is_found_without_a_hard_coded_path(monkeypatch, tmp_path):
  """The flag, then $TIMM_PYTHON, then this python if it has torch and timm; else where it looked."""
  import importlib.util
  python = tmp_path / 'python'
  python.write_text('')
  monkeypatch.setenv('TIMM_PYTHON', str(python))
  assert benchmark_timm.find_timm_python('/elsewhere/python') == (None, '--timm_python=/elsewhere/python')
  assert benchmark_timm.find_timm_python(None) == (str(python), f'$TIMM_PYTHON={python}')
  monkeypatch.delenv('TIMM_PYTHON')
  has_timm = bool(importlib.util.find_spec('torch') and importlib.util.find_spec('timm'))
  found, looked = benchmark_timm.find_timm_python(None)
  assert found == (sys.executable if has_timm else None)
  assert has_timm or 'which has no torch/timm' in looked


def test_the_torch_worker_script_does_not_shadow_torch_or_timm():
  """The timm python runs this file as a script, so its folder comes first on that python's sys.path:
  a module there named like a package the worker imports would be imported instead of it."""
  folder = os.path.dirname(os.path.abspath(benchmark_timm.__file__))
  for package in ('torch', 'timm'):
    assert not os.path.exists(os.path.join(folder, f'{package}.py')), package
    assert not os.path.isdir(os.path.join(folder, package)), package
