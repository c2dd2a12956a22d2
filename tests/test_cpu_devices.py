"""vit_jax.cpu.devices: the CPU split into several JAX devices, and its errors."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TEST_XLA_FLAGS
from vit_jax.cpu import devices as cpu_devices
from vit_jax.errors import UsageError


def clean_env(**extra: str) -> dict[str, str]:
  """The environment without the suite's 8 devices (set by conftest): XLA_FLAGS asks for no device count."""
  env = {k: v for k, v in os.environ.items() if k != cpu_devices.ENV}
  return {**env, 'XLA_FLAGS': TEST_XLA_FLAGS, **extra}


# One process per case, forked from one that has imported JAX but started no backend (the seconds of
# imports once, not per case): each case sets its environment, splits the CPU and counts JAX's devices.
SPLIT_CASES = """
import json, os, sys
import jax  # The module only: each forked case starts the backends after its own split.
from vit_jax.cpu import devices as cpu_devices
for code, env in json.loads(sys.argv[1]):
  pid = os.fork()
  if pid == 0:
    os.environ.update(env)
    exec(code)
    print(jax.device_count(), flush=True)
    os._exit(0)
  assert os.waitpid(pid, 0)[1] == 0, code
"""


def device_counts_after(*cases: tuple[str, dict]) -> list[list[str]]:
  """For each (code, environment): what `code` printed, then JAX's device count, in a process of its own."""
  out = subprocess.run([sys.executable, '-c', SPLIT_CASES, json.dumps(cases)], env=clean_env(),
                       capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
  return [out[i:i + 2] for i in range(0, len(out), 2)]


def test_split_cpu_gives_jax_that_many_devices():
  assert device_counts_after(('print(cpu_devices.split_cpu(3))', {}),
                             ('print(cpu_devices.split_cpu())', {'VIT_JAX_CPU_DEVICES': '2'}),
                             ('print(cpu_devices.split_cpu())', {})) == [['3', '3'], ['2', '2'], ['1', '1']]


def test_existing_xla_flag_stands_and_conflicts_are_errors(monkeypatch):
  # conftest set --xla_force_host_platform_device_count=8 for this process.
  assert cpu_devices.split_cpu(8) == 8
  assert cpu_devices.split_cpu(1) == 8  # The default asks for nothing.
  flags = os.environ['XLA_FLAGS']
  with pytest.raises(UsageError, match='cpu_devices=2 conflicts with XLA_FLAGS.*count=8.*drop one'):
    cpu_devices.split_cpu(2)
  assert os.environ['XLA_FLAGS'] == flags
  with pytest.raises(UsageError, match='cpu_devices=0 must be at least 1'):
    cpu_devices.split_cpu(0)
  monkeypatch.setenv(cpu_devices.ENV, 'two')
  with pytest.raises(UsageError, match="VIT_JAX_CPU_DEVICES='two' is not an integer"):
    cpu_devices.split_cpu()


def test_benchmark_runs_on_split_cpu():
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax', 'benchmark', '--variant', 'tiny/16', '--image_size', '32',
       '--batch_size', '4', '--steps', '1', '--repeats', '1', '--ceiling_sizes', '0',
       '--cpu_devices', '2', '--json'],
      env=clean_env(), capture_output=True, text=True, check=True, cwd=REPO).stdout
  result = json.loads(out)
  assert result['devices'] == '2 x cpu'
  assert '--xla_force_host_platform_device_count=2' in result['xla_flags']
