"""`vit-jax selfcheck` passes on the 8 CPU devices without TensorFlow (as on a GPU host
without the data pipeline's packages), and each of its checks fails when what it checks is wrong."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.conftest import REPO, xla_flags
from vit_jax.tools import selfcheck
from vit_jax.training.platform import ATTENTION_IMPLEMENTATIONS

TINY = ['--variant', 'tiny/2', '--image_size', '8', '--batch_size', '16', '--steps', '3', '--ceiling_sizes', '256']
# The data pipeline's packages, often missing on an accelerator image: none can be imported in the
# subprocess (a None entry in sys.modules makes `import` raise ImportError).
MISSING = ('tensorflow', 'tensorflow_datasets', 'matplotlib', 'sklearn')
BLOCK = f"import sys\nfor name in {MISSING!r}:\n  sys.modules[name] = None\n"
SCRIPT = ("import sys\nfrom vit_jax import cli\ncode = cli.main(['selfcheck', *sys.argv[1:]])\n"
          "print('loaded:', sorted(m for m in ('tensorflow', 'tensorflow_datasets') if sys.modules.get(m)))\n"
          "sys.exit(code)")


def test_selfcheck_passes_on_8_cpu_devices_without_tensorflow(tmp_path):
  """On an accelerator host this is the first command to run: it must not need the data pipeline's packages."""
  (tmp_path / 'sitecustomize.py').write_text(BLOCK)  # Runs at the subprocess's start.
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), REPO]), 'XLA_FLAGS': xla_flags(8)}
  result = subprocess.run([sys.executable, '-c', SCRIPT, *TINY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  out = result.stdout
  assert out.splitlines()[-1] == 'loaded: []', out
  assert 'FAIL' not in out and 'error:' not in result.stderr, out + result.stderr
  assert out.startswith('jax ') and '8 x cpu (cpu); ViT-tiny/2, bfloat16, batch 16' in out
  implementations = ATTENTION_IMPLEMENTATIONS
  for layout in selfcheck.LAYOUTS:
    for implementation in implementations:
      assert any(line.split()[:2] == [layout, implementation] and 'img/s' in line for line in out.splitlines()), \
          (layout, implementation, out)
  assert len(re.findall(r'MFU \d', out)) == len(selfcheck.LAYOUTS) * len(implementations)
  assert 'peak device memory: n/a (cpu devices report none); process peak RSS' in out
  passed = [line for line in out.splitlines() if line.startswith('PASS ')]
  assert len(passed) == 5, out  # Runs, losses, two save/restore round trips, FSDP splits the parameters.
  assert 'of 40 parameter arrays split over devices' in out and '(0 of 40' in out  # Data-parallel replicates.
  assert f'selfcheck passed: {len(selfcheck.LAYOUTS) * len(implementations)} runs, 5 checks' in out


def run(layout: str, losses: list[float]) -> selfcheck.Run:
  return selfcheck.Run(layout, 'fused', losses, 1.0, 1.0, 1.0, None, None, None, None)


def test_losses_that_disagree_do_not_fall_or_are_not_finite_fail():
  reference = run('data-parallel', [2.30, 2.10, 1.90])
  close = run('fsdp', [2.30, 2.11, 1.91])  # Within bfloat16's 0.01 + 0.005 x loss.
  assert selfcheck.loss_failures([reference, close], 'bfloat16')[0] == []
  assert selfcheck.loss_failures([reference, close], 'float32')[0] != []  # float32 is held tighter.
  failures, largest = selfcheck.loss_failures([reference, run('fsdp', [2.30, 2.25, 1.90])], 'bfloat16')
  assert len(failures) == 1 and 'fsdp/fused: loss 2.25000 at step 2, but 2.10000' in failures[0]
  assert abs(largest - 0.15) < 1e-9
  failures, _ = selfcheck.loss_failures([run('data-parallel', [2.3, 2.3, 2.4])], 'bfloat16')
  assert failures == ['data-parallel/fused: the loss did not fall on a batch it trains on (2.3000 -> 2.4000)']
  failures, _ = selfcheck.loss_failures([reference, run('fsdp', [2.3, float('nan'), 1.9])], 'bfloat16')
  assert len(failures) == 1 and 'non-finite loss' in failures[0]


def test_a_restored_state_that_differs_in_one_bit_or_its_sharding_is_named():
  mesh = jax.make_mesh((8,), ('fsdp',))
  split, replicated = NamedSharding(mesh, P('fsdp')), NamedSharding(mesh, P())
  saved = {'w': jax.device_put(jnp.arange(16, dtype=jnp.float32), split), 'b': jax.device_put(jnp.ones(3), replicated)}
  assert selfcheck.differing_arrays(saved, {k: v.copy() for k, v in saved.items()}) == []
  flipped = np.arange(16, dtype=np.float32)
  flipped.view(np.uint32)[5] ^= 1  # The last bit of one value.
  assert selfcheck.differing_arrays(saved, {**saved, 'w': jax.device_put(flipped, split)}) == ["['w'] (values)"]
  moved = selfcheck.differing_arrays(saved, {**saved, 'w': jax.device_put(saved['w'], replicated)})
  assert len(moved) == 1 and moved[0].startswith("['w'] (sharding")
  assert selfcheck.differing_arrays(saved, {'w': saved['w']}) == ["['b'] (missing, or another shape or dtype)"]


def test_a_failed_check_is_a_fail_line_an_error_line_and_exit_code_1(capsys):
  assert selfcheck.report([('losses agree', []), ('round trip', ['fsdp: [w] (values)'])]) == 1
  captured = capsys.readouterr()
  assert captured.out.splitlines() == ['PASS losses agree', 'FAIL round trip', '  FAIL fsdp: [w] (values)']
  assert captured.err == 'error: selfcheck failed 1 of 2 checks (the FAIL lines above).\n'
  assert selfcheck.report([('losses agree', [])]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == 'selfcheck passed: 1 checks'


def test_bad_flags_are_one_error_line(run_command):
  cases = [(['--steps', '1'], '--steps=1: give 2 or more'),
           (['--batch_size', '12'], '--batch_size=12 must be a positive multiple of the 8 devices'),
           (['--attention', 'flash'], f'use one or more of {", ".join(ATTENTION_IMPLEMENTATIONS)}'),
           (['--variant', 'Q/16'], "Unknown model variant 'Q/16'"),
           (['--variant', 'tiny/3', '--image_size', '8'], 'not divisible by the patch size 3')]
  for flags, expected in cases:
    result = run_command('selfcheck', *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (flags, result)
    assert expected in lines[0], (expected, lines[0])
