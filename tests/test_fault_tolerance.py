"""Killed, preempted, damaged, diverged or badly configured runs never lose work.

The kill-and-resume test runs the real launcher in subprocesses and kills it
with SIGKILL and SIGTERM at random steps, then resumes it and runs it
uninterrupted in the test's process; the other tests use real orbax
checkpoints in temporary workdirs.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax.config import defaults
from tests.conftest import REPO, xla_flags
from vit_jax import checkpoint
from vit_jax.training import sharding
from vit_jax.training import loop, preemption, steps
from vit_jax.errors import UsageError
from vit_jax.models import model_from_config

TOTAL_STEPS = 20  # Room for two signals at random steps between checkpoints (every 4) before the end.
BATCH_SIZE = 32  # Global: 16 examples per device, cheaper steps than the default 128.
RUN_FLAGS = (f'--config.batch_size={BATCH_SIZE}', '--config.log_every_steps=1', '--config.eval_every_steps=16',
             '--config.checkpoint_every_steps=4', '--config.model.dropout_rate=0.1',
             f'--config.total_steps={TOTAL_STEPS}')
DEVICES = 2  # Per launcher of the kill-and-resume test, and its reference's mesh: sharded, less to compile than 8.


def command(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'vit_jax.main', '--config', 'configs/base.py', '--workdir', str(workdir),
          f'--config.dataset.data_dir={data_dir}', *overrides]


def environment(devices=8):
  return dict(os.environ, XLA_FLAGS=xla_flags(devices),
              TF_CPP_MIN_LOG_LEVEL='2')


def run_until(workdir, data_dir, stop_step, sig):
  """Starts the launcher and sends `sig` once it reports step >= `stop_step`; returns (rc, stdout)."""
  process = subprocess.Popen(command(workdir, data_dir, *RUN_FLAGS), cwd=REPO, env=environment(DEVICES),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith('step ') and int(line.split()[1].split('/')[0]) >= stop_step:
      process.send_signal(sig)
      break
  stdout, stderr = process.communicate(timeout=300)
  return process.returncode, ''.join(lines) + stdout, stderr


def run_config(data_dir):
  """The config the launcher builds from RUN_FLAGS, for restoring its checkpoints here."""
  config = defaults.get_config()
  config.dataset.data_dir = data_dir
  config.batch_size = BATCH_SIZE
  config.total_steps = TOTAL_STEPS
  config.model.dropout_rate = 0.1
  return config


def final_state(workdir, config):
  run = loop.setup(config, sharding.make_mesh(config))
  abstract = sharding.placed(run.abstract_state, run.state_sharding)
  return checkpoint.restore_latest(checkpoint.create_manager(str(workdir), config), abstract)


def metric_rows(workdir):
  """metrics.jsonl rows without the wall-clock throughput, which no two runs share."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [{k: v for k, v in row.items() if k != 'train/images_per_sec'} for row in rows]


def test_killed_and_preempted_run_resumes_to_identical_params_and_metrics(tmp_path, data_dir, monkeypatch,
                                                                           run_command):
  # SIGKILL, then SIGTERM (preemption), each at a random step; then a run to the end.
  rng = random.Random()
  first, second = sorted(rng.sample(range(2, TOTAL_STEPS - 4), 2))
  plan = f'(signals at steps {first}, {second})'
  interrupted = tmp_path / 'interrupted'
  rc, stdout, stderr = run_until(interrupted, data_dir, first, signal.SIGKILL)
  assert rc == -signal.SIGKILL and f'step {TOTAL_STEPS}/' not in stdout, plan

  rc, stdout, stderr = run_until(interrupted, data_dir, second, signal.SIGTERM)
  assert rc == preemption.STOPPED_EXIT_CODE, (plan, stderr[-3000:])
  saved = int(stdout.split('saved the checkpoint of step ')[1].split()[0])
  assert 'Received SIGTERM' in stdout and saved >= second, plan
  assert str(saved) in os.listdir(interrupted / 'checkpoints'), plan

  # The rest of the run, and the same run uninterrupted: `vit-jax train` in this process (two launcher
  # starts spared), on DEVICES of its devices as the launchers above.
  make_mesh, meshes = sharding.make_mesh, []
  def launcher_mesh(config, devices=None):
    meshes.append(make_mesh(config, jax.devices()[:DEVICES] if devices is None else devices))
    return meshes[-1]
  reference = tmp_path / 'reference'
  with monkeypatch.context() as patch:
    patch.setattr(sharding, 'make_mesh', launcher_mesh)
    patch.chdir(REPO)
    result = run_command('train', *command(interrupted, data_dir, *RUN_FLAGS)[3:])
    finished = run_command('train', *command(reference, data_dir, *RUN_FLAGS)[3:])
  assert result.returncode == 0, (plan, result.stderr[-3000:])
  assert f'Resuming from the checkpoint at step {saved}' in result.stdout, plan
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert len(meshes) >= 2 and all(mesh.size == DEVICES for mesh in meshes)
  config = run_config(data_dir)
  expected, actual = final_state(reference, config), final_state(interrupted, config)
  assert int(actual.step) == int(expected.step) == TOTAL_STEPS
  for a, b in zip(jax.tree.leaves((actual.params, actual.opt_state)),
                  jax.tree.leaves((expected.params, expected.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=plan)  # Bitwise.
  assert metric_rows(interrupted) == metric_rows(reference), plan


def caught_signals(pid):
  """The signals process `pid` has handlers for, from /proc (SigCgt), or None once it has exited."""
  try:
    with open(f'/proc/{pid}/status') as f:
      mask = int(next(line for line in f if line.startswith('SigCgt:')).split()[1], 16)
  except (OSError, StopIteration):
    return None
  return {s for s in signal.Signals if mask >> (s - 1) & 1}


def signalled_at_start(workdir, data_dir, sig, *overrides):
  """Starts `vit-jax train` and sends `sig` as soon as the process handles it; returns (rc, stdout, stderr).

  The launcher takes its stop signals first of all, before its seconds of imports and compilation:
  the signal comes during its start-up."""
  process = subprocess.Popen([sys.executable, '-m', 'vit_jax', 'train', '--config', 'configs/base.py',
                              '--workdir', str(workdir), f'--config.dataset.data_dir={data_dir}', *overrides],
                             cwd=REPO, env=environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  try:
    caught = set()
    while process.poll() is None and sig not in caught:
      caught = caught_signals(process.pid) or set()
      time.sleep(0.005)
    if sig in caught:
      process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
  finally:
    if process.poll() is None:
      process.kill()
  assert sig in caught, f'the launcher never handled {sig.name}: {stdout[-2000:]} {stderr[-2000:]}'
  return process.returncode, stdout, stderr


def test_a_stop_signal_during_start_up_is_a_clean_stop(data_dir, tmp_path):
  """SIGUSR1 (SLURM's time-limit warning) while the launcher imports and compiles: no crash, nothing saved,
  one line, exit 75. (A finished run warned so exits 0: tests/test_slurm.py.)"""
  workdir = tmp_path / 'run'
  rc, stdout, stderr = signalled_at_start(workdir, data_dir, signal.SIGUSR1, '--config.batch_size=32',
                                          '--config.total_steps=4')
  assert rc == preemption.STOPPED_EXIT_CODE, stderr[-3000:]
  assert (f'Received SIGUSR1 before the first step: nothing new was saved in {workdir}; run the same '
          'command to resume.') in stdout.splitlines(), stdout
  assert 'step 1/' not in stdout and 'Traceback' not in stderr
  assert not list(workdir.glob('checkpoints/*'))


def test_ctrl_c_twice_quits_at_once_with_one_line(capsys, monkeypatch):
  """The first Ctrl-C is a stop request (saved at the next step); a second one quits at once, as Ctrl-C
  does without the launcher, and `vit-jax` says so in one line with status 130."""
  from vit_jax import cli
  before = signal.getsignal(signal.SIGINT)  # Python's default, or what pytest-xdist's worker set.
  preemption.catch_early()
  try:
    signal.raise_signal(signal.SIGINT)  # Recorded, nothing raised.
    assert 'Ctrl-C again to quit now' in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    preemption.release_early()
  assert signal.getsignal(signal.SIGINT) is before  # Put back.

  def interrupted(name, argv):
    raise KeyboardInterrupt
  monkeypatch.setattr(cli, 'run', interrupted)  # The command, interrupted the second time.
  assert cli.main(['train']) == 130
  assert capsys.readouterr().err.splitlines() == [
      'Interrupted: stopped without saving; the checkpoints saved before are kept.']


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path, capsys):
  workdir = str(tmp_path)
  loop.train_and_evaluate(tiny_config, workdir)  # Checkpoints at steps 3 and 6.
  # Truncate the array data of step 6, and leave the kind of temporary
  # directory that a crash in the middle of a write leaves.
  for root, _, names in os.walk(os.path.join(workdir, 'checkpoints', '6')):
    for name in names:
      if os.path.basename(root) == 'd':  # Array data files.
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(os.path.getsize(f.name) // 2)
  os.makedirs(os.path.join(workdir, 'checkpoints', '9.orbax-checkpoint-tmp-1700000000000000'))
  capsys.readouterr()

  tiny_config.total_steps = 9
  final = loop.train_and_evaluate(tiny_config, workdir)
  out = capsys.readouterr().out
  assert 'Checkpoint at step 6 is damaged' in out
  assert 'Resuming from the checkpoint at step 3' in out
  assert os.listdir(os.path.join(workdir, 'corrupt_checkpoints')) == ['6']
  assert final['eval/num_examples'] == 360
  assert '9' in os.listdir(os.path.join(workdir, 'checkpoints'))


def test_divergence_stops_with_the_step_and_keeps_only_finite_checkpoints(tiny_config, tmp_path):
  tiny_config.optimizer.name = 'sgd'
  tiny_config.optimizer.learning_rate = 1e8  # Forces an overflow within a few steps.
  tiny_config.optimizer.grad_clip_norm = 0.0
  tiny_config.total_steps = 30
  tiny_config.log_every_steps = 5
  tiny_config.checkpoint_every_steps = 1
  tiny_config.eval_every_steps = 100
  with pytest.raises(steps.DivergenceError, match=r'diverged at step (\d+)') as error:
    loop.train_and_evaluate(tiny_config, str(tmp_path))
  diverged = int(str(error.value).split('diverged at step ')[1].split(':')[0])
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert saved and saved[-1] == diverged - 1  # Every step before is kept, the bad one never saved.
  state = final_state(tmp_path, tiny_config)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# --- Bad input: a clear one-line error, exit code 2, and the saved run untouched. ---


def snapshot(directory):
  """Path -> (sha256, mtime) of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, directory)] = (hashlib.sha256(f.read()).hexdigest(),
                                                   os.stat(path).st_mtime_ns)
  return files


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory, data_dir):
  """A finished 4-step run of configs/base.py, and a snapshot of its files."""
  workdir = tmp_path_factory.mktemp('saved') / 'run'
  config = defaults.get_config()
  config.dataset.data_dir = data_dir
  config.batch_size = 32
  config.total_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  loop.train_and_evaluate(config, str(workdir))
  return workdir, snapshot(workdir)


def launch_bad(workdir, data_dir, *overrides, prefix=()):
  result = subprocess.run([*prefix, *command(workdir, data_dir, '--config.batch_size=32',
                                             '--config.total_steps=6', *overrides)],
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  if len(errors) != 1:  # What the process printed instead, for the assertion's message.
    errors.append(f'(stdout ends: {result.stdout[-1500:]!r}; stderr ends: {result.stderr[-1500:]!r})')
  return result.returncode, errors


@pytest.mark.parametrize('override,message', [
    ('--config.batch_sise=32', 'unknown config key \'batch_sise\' (did you mean "batch_size"?)'),
    ('--config.batch_size=many', "--config.batch_size=many: invalid literal for int() with base 10: 'many'"),
    ('--config.model.pool=cls', "config.model.pool='cls'; use one of token, gap, map."),
    ('--config.input.image_size=9', 'image_size=9 is not divisible by the patch size 2'),
    ('--config.batch_size=12', 'batch_size=12 is not divisible by the 8 devices; use a multiple of 8'),
    ('--config.model.hidden_size=48', 'model.hidden_size None -> 48'),  # Named among the changed keys.
    # Not a model key, but one optax stage fewer: the optimizer state's tree differs.
    ('--config.optimizer.grad_clip_norm=0', 'optimizer.grad_clip_norm 1.0 -> 0.0'),
    ('--config.dataset.name=cifar10', "'cifar10' is not prepared"),
])
def test_bad_flags_leave_the_saved_run_untouched(saved_run, data_dir, override, message, capsys):
  # The launcher's own code path in this process (`vit-jax train`), to spare a process start per case;
  # test_two_processes_take_the_same_resume_decisions and the tests below run it as real processes.
  from vit_jax import cli
  workdir, before = saved_run
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['train', '--config', os.path.join(REPO, 'configs/base.py'), '--workdir', str(workdir),
              f'--config.dataset.data_dir={data_dir}', '--config.batch_size=32', '--config.total_steps=6',
              override])
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
  assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
  assert snapshot(workdir) == before


def test_two_processes_take_the_same_resume_decisions(saved_run, data_dir, tmp_path):
  """The real launcher in 2 processes: both refuse an optimizer tree the checkpoints cannot fill, then
  both set aside a damaged latest checkpoint and resume from the previous one (none hangs)."""
  workdir = tmp_path / 'run'
  shutil.copytree(saved_run[0], workdir)

  def launch(*overrides):
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    # Python's fault handler: a process that crashes, or that the test aborts below, prints its stacks.
    env = dict(environment(1), PYTHONFAULTHANDLER='1')  # 1 device each.
    processes = [subprocess.Popen(
        command(workdir, data_dir, '--config.batch_size=32', '--config.total_steps=6', *overrides,
                '--coordinator_address', f'127.0.0.1:{port}', '--num_processes', '2', '--process_id', str(i)),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
      outputs = [p.communicate(timeout=300) for p in processes]
    except subprocess.TimeoutExpired:
      for p in processes:  # Hung: each one still running says where, then all end.
        if p.poll() is None:
          p.send_signal(signal.SIGABRT)
      outputs = [p.communicate(timeout=60) for p in processes]
      raise AssertionError('a process hung; exit codes, then stderr ends: ' + repr(
          [(p.returncode, stderr[-4000:]) for p, (_, stderr) in zip(processes, outputs)])) from None
    finally:
      for p in processes:
        if p.poll() is None:
          p.kill()
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]

  before = snapshot(workdir)
  for rc, _, stderr in launch('--config.optimizer.grad_clip_norm=0'):
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert rc == 2 and len(errors) == 1 and 'optimizer.grad_clip_norm 1.0 -> 0.0' in errors[0], stderr[-3000:]
  assert snapshot(workdir) == before

  for root, _, names in os.walk(workdir / 'checkpoints' / '4'):
    for name in names:
      if os.path.basename(root) == 'd':  # Array data files.
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(os.path.getsize(f.name) // 2)
  earlier = [row for row in metric_rows(workdir) if row['step'] <= 2]
  results = launch()
  for rc, _, stderr in results:
    assert rc == 0, stderr[-3000:]
  stdout = results[0][1]
  assert 'Checkpoint at step 4 is damaged' in stdout and 'Resuming from the checkpoint at step 2' in stdout
  assert os.listdir(workdir / 'corrupt_checkpoints') == ['4']
  rows = metric_rows(workdir)
  assert rows[:len(earlier)] == earlier and rows[-1]['step'] == 6


def test_read_only_workdir_is_refused_untouched(saved_run, data_dir):
  workdir, before = saved_run
  modes = {}
  for root, dirs, _ in os.walk(workdir):
    for path in [root] + [os.path.join(root, d) for d in dirs]:
      modes[path] = os.stat(path).st_mode
      os.chmod(path, 0o555)
  try:
    # As root, permissions bind only without CAP_DAC_OVERRIDE: drop it for the child.
    rc, errors = launch_bad(workdir, data_dir, prefix=(
        'setpriv', '--bounding-set=-dac_override,-dac_read_search', '--inh-caps=-all', '--'))
  finally:
    for path, mode in modes.items():
      os.chmod(path, mode)
  assert rc == 2 and len(errors) == 1 and 'is not writable (Permission denied)' in errors[0], errors
  assert snapshot(workdir) == before


def test_full_workdir_fails_cleanly_and_keeps_the_previous_checkpoints(saved_run, data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(saved_run[0], workdir)
  before = snapshot(workdir)
  # Bytes per file: config.json (2 KB) and the metrics fit; every checkpoint's _sharding and _METADATA
  # files (about 50 KB each) do not. (64 KiB let a checkpoint through when orbax happened to split its
  # arrays into data files under 64 KiB each.)
  limit = 32 * 1024
  rc, errors = launch_bad(workdir, data_dir, '--config.checkpoint_every_steps=2',
                          prefix=('prlimit', f'--fsize={limit}', '--'))
  assert rc == 2 and len(errors) == 1, errors
  assert 'Cannot write a checkpoint to' in errors[0] and 'File too large' in errors[0], errors
  after = snapshot(workdir)
  for path, (digest, _) in before.items():
    if path.startswith('checkpoints/'):
      assert after[path][0] == digest, path
  assert json.loads((workdir / 'config.json').read_text())['total_steps'] == 6  # Whole, not cut.
  # The next run with room resumes from the last good checkpoint.
  assert int(final_state(workdir, run_config(data_dir)).step) == 4


def test_free_space_is_checked_against_the_checkpoint_size(tmp_path):
  huge = {'params': jax.ShapeDtypeStruct((2**50,), np.float32)}
  with pytest.raises(UsageError, match='MiB free, but two checkpoints of this model need'):
    checkpoint.check_workdir(str(tmp_path / 'run'), defaults.get_config(), huge)
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('write,message', [
    (None, 'does not exist'),
    (lambda path: path.write_bytes(b'not a zip file'), 'Cannot read'),
    ('wrong_shapes', 'does not fit the model'),
])
def test_bad_pretrained_file_fails_before_the_workdir_is_created(tiny_config, tmp_path, write, message):
  path = tmp_path / 'pretrained.npz'
  if write == 'wrong_shapes':  # A complete published-layout file of a wider model.
    tiny_config.model.hidden_size = 48
    model = model_from_config(tiny_config)
    params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))['params']
    checkpoint.save_npz(params, str(path))
    tiny_config.model.hidden_size = None
  elif write is not None:
    write(path)
  tiny_config.init.path = str(path)
  workdir = tmp_path / 'run'
  with pytest.raises(UsageError, match=message):
    loop.train_and_evaluate(tiny_config, str(workdir))
  assert not workdir.exists()
