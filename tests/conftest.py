"""Test setup: 8 virtual CPU devices, one compilation cache per run, and the bundled digits prepared once.

The suite runs on `pytest-xdist` workers (`-n auto`, one per core, whole files
per worker: see pyproject.toml), as most of its time is XLA compilation and
process start-up, which use one core each.
"""

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
import uuid

# Must happen before JAX initialises its backends.
# XLA's LLVM optimisation level 0 and XLA:CPU's older fusion emitters for every program the suite
# compiles: compilation, most of the suite's time, takes about 55% less (the tiny train step 1.9 s
# instead of 4.3 s), and the tiny models run no slower (docs/testing.md).
# Processes the tests start with their own device count take the same setting from `xla_flags`.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a process the tests start: `devices` CPU devices, the suite's compiler setting."""
  return f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}'


os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags(8)).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# JAX's persistent compilation cache in a directory of this run, shared by its workers and by the commands
# the tests start (the launcher's default path, pointed away from the user's cache): a program that
# several tests or launcher processes compile alike is compiled once. The controller removes it at the end.
# Workers inherit the controller's environment, so they find its directory.
RUN_DIR = os.environ.setdefault('VIT_JAX_TESTS_RUN_DIR', os.path.join(tempfile.gettempdir(),
                                                                      f'vit_jax_tests_{uuid.uuid4().hex}'))
COMPILATION_CACHE = os.path.join(RUN_DIR, 'jax_cache')
os.environ['VIT_JAX_COMPILATION_CACHE'] = '1'
os.environ['VIT_JAX_COMPILATION_CACHE_DIR'] = COMPILATION_CACHE
# The libraries' log lines of the commands the tests run (vit_jax/console.py), out of the user's cache.
os.environ['VIT_JAX_LOG_DIR'] = os.path.join(RUN_DIR, 'logs')

import pytest  # noqa: E402

from vit_jax import cli  # noqa: E402

cli.enable_compilation_cache(COMPILATION_CACHE)  # This process's own compilations too.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: two workers more than cores, at most 4 (each holds a few GB and 8 virtual devices). The
  extra workers use the time the others spend waiting: on processes they start, on SLURM, on the shared
  run another worker builds."""
  return max(1, min(len(os.sched_getaffinity(0)) + 2, 4))


# The files that take longest (wall time in the suite, longest first), started first so that no worker is
# left with one at the end. test_docs_quickstart.py waits for test_docs.py's README run: it starts later.
SLOW_FILES = ('test_fault_tolerance.py', 'test_storage.py', 'test_slurm.py', 'test_autodiff.py', 'test_models.py',
              'test_sweep.py', 'test_scale.py', 'test_unavailable.py', 'test_ema.py', 'test_flexivit.py',
              'test_naflex.py', 'test_hybrid.py', 'test_docs.py', 'test_selfcheck.py', 'test_cli.py',
              'test_package.py', 'test_docs_quickstart.py', 'test_train.py', 'test_accelerators.py',
              'test_benchmark.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.path))
    return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)
  items.sort(key=rank)  # Stable: the order within each file stays.


# VIT_JAX_TESTS_CPU_LOG=PATH: each test's CPU seconds (its process and the processes it started and
# waited for, user + system) appended to PATH as "seconds nodeid worker start end" lines (start and end
# in seconds since the epoch: the workers' timeline). CPU time, unlike wall time,
# ranks the tests on a machine that other work shares (docs/testing.md).
CPU_LOG = os.environ.get('VIT_JAX_TESTS_CPU_LOG')


def _cpu_seconds() -> float:
  import resource
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  start, began = (_cpu_seconds(), time.time()) if CPU_LOG else (0.0, 0.0)
  yield
  if CPU_LOG:
    worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
    with open(CPU_LOG, 'a') as f:
      f.write(f'{_cpu_seconds() - start:.1f} {item.nodeid} {worker} {began:.1f} {time.time():.1f}\n')


def pytest_sessionfinish(session):
  if not hasattr(session.config, 'workerinput'):  # The controller (or a run without workers).
    shutil.rmtree(RUN_DIR, ignore_errors=True)


def built_once(name: str, build) -> str:
  """A directory of this run, filled by `build(path)` once for all workers and then only read.

  The first worker to ask builds it holding a file lock; the others wait for the lock and reuse it.
  A build that fails leaves no mark, so the next worker to ask builds it again."""
  path = os.path.join(RUN_DIR, name)
  os.makedirs(RUN_DIR, exist_ok=True)
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not os.path.exists(path + '.done'):
      shutil.rmtree(path, ignore_errors=True)
      os.makedirs(path)
      build(path)
      open(path + '.done', 'w').close()
  return path


@pytest.fixture(scope='session')
def data_dir():
  """A tfds data directory holding the prepared sklearn_digits dataset (prepared once per run)."""
  def prepare(path):
    from vit_jax.data.builders.sklearn_digits import SklearnDigits
    SklearnDigits(data_dir=path, file_format='array_record').download_and_prepare()
  return built_once('tfds', prepare)


@pytest.fixture
def tiny_config(data_dir):
  """The quickstart config shrunk to the tiny variant and a few steps."""
  from configs import quickstart
  config = quickstart.get_config()
  config.dataset.data_dir = data_dir
  config.model.variant = 'tiny/4'
  config.model.hidden_size = None
  config.model.num_layers = None
  config.model.mlp_dim = None
  config.model.num_heads = None
  config.batch_size = 16
  config.eval_batch_size = 64
  config.total_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.optimizer.warmup_steps = 2
  return config


@pytest.fixture
def run_command(capfd):
  """Runs `vit-jax ARGS...` in this process (8 devices) and returns a `subprocess.CompletedProcess` with
  its exit code and what it wrote to stdout and stderr: the command's whole code path from argv on,
  without the seconds of a process start. Tests where the process itself is the point start one."""
  def run(*args: str) -> subprocess.CompletedProcess:
    from vit_jax import cli
    capfd.readouterr()
    try:
      code = cli.main(list(args))
    except SystemExit as e:  # Usage errors, and absl's app.run, which ends in sys.exit also on success.
      code = e.code or 0
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(['vit-jax', *args], code, out, err)
  return run
