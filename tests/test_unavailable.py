"""A checkpoint that cannot be read now stops the run and moves nothing; only damage is set aside.

Faults are injected into real orbax and tensorstore reads and writes by a
FUSE file system (tests/faultfs.py) that mirrors a temporary directory and
fails chosen operations on chosen paths with an errno (EIO, EACCES, ...);
running out of memory is an error raised inside the restore. One tiny run
(checkpoints at steps 3 and 6) is trained once; each test works on a copy
through the mount, and compares the copy's files before and after.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_fault_tolerance import environment, snapshot
from vit_jax.training import loop

_CACHE: dict = {}
ARRAYS = 'run/checkpoints/*/d/*'  # The array data files of every step (orbax's OCDBT 'd/' folders).


def fuse_missing() -> str:
  """Why tests/faultfs.py cannot mount here ('' where it can): libfuse 2 and /dev/fuse, as root."""
  import ctypes.util
  if not ctypes.util.find_library('fuse'):
    return 'libfuse2 is not installed (.ci/system_packages installs it)'
  if not os.path.exists('/dev/fuse') or os.geteuid() != 0:
    return 'mounting tests/faultfs.py needs /dev/fuse and root'
  return ''


class FaultFS:
  """tests/faultfs.py mounted over `root`: `fail(rule, ...)` switches faults on, `fail()` off."""

  def __init__(self, root, mount, rules):
    reason = fuse_missing()
    if reason and not os.environ.get('CI'):  # In CI ($CI set) these tests fail instead, saying why.
      pytest.skip(reason)
    assert not reason, reason
    self.root, self.mount, self.rules = root, mount, rules
    self.fail()
    self.process = subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'faultfs.py'), str(root),
                                     str(mount), str(rules)], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
      if os.path.ismount(mount) or self.process.poll() is not None:
        break
      time.sleep(0.05)
    assert os.path.ismount(mount), self.process.stderr.read() if self.process.poll() is not None else 'no mount'

  def fail(self, *rules):
    with open(self.rules, 'w') as f:
      json.dump(list(rules), f)

  def close(self):
    self.fail()
    subprocess.run(['umount', str(self.mount)], check=False)
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      subprocess.run(['umount', '-l', str(self.mount)], check=False)
      self.process.kill()


@pytest.fixture
def disk(tiny_config, tmp_path):
  """A FaultFS whose `run` folder is a copy of a tiny run trained to step 6 (checkpoints at 3 and 6)."""
  if 'trained' not in _CACHE:
    from tests.conftest import built_once
    _CACHE['trained'] = built_once('unavailable_run', lambda path: loop.train_and_evaluate(
        tiny_config.copy_and_resolve_references(), os.path.join(path, 'run')))
  root, mount = tmp_path / 'disk', tmp_path / 'mount'
  mount.mkdir()
  shutil.copytree(os.path.join(_CACHE['trained'], 'run'), root / 'run')
  fs = FaultFS(root, mount, tmp_path / 'rules.json')
  yield fs
  fs.close()


def train(run_command, data_dir, workdir, *flags, total_steps=6):
  """`vit-jax train` of the trained run's config in `workdir`: (exit code, stdout, error lines)."""
  result = run_command('train', *config_flags(data_dir), '--workdir', str(workdir),
                       f'--config.total_steps={total_steps}', *flags)
  return result.returncode, result.stdout, [line for line in result.stderr.splitlines() if line.startswith('error: ')]


def config_flags(data_dir):
  """The trained run's config (its config.json, outside the mount) with this run's data directory."""
  return ['--config', os.path.join(_CACHE['trained'], 'run', 'config.json'), f'--config.dataset.data_dir={data_dir}']


FAULTS = [  # (rule, the error's reason, a part of the file it names)
    ({'path': ARRAYS, 'errno': 'EIO', 'ops': ['read']}, 'Input/output error', '/d/'),
    ({'path': ARRAYS, 'errno': 'EACCES', 'ops': ['open']}, 'Permission denied', '/d/'),
    ({'path': ARRAYS, 'errno': 'ETIMEDOUT', 'ops': ['read']}, 'Connection timed out', '/d/'),
    ({'path': 'run/checkpoints/*/_METADATA', 'errno': 'EIO', 'ops': ['read']}, 'Input/output error', '/_METADATA'),
    ({'path': 'run/checkpoints/*/_METADATA', 'errno': 'EACCES', 'ops': ['open']}, 'Permission denied', '/_METADATA'),
    ({'path': 'run/checkpoints*', 'errno': 'EIO'}, 'Input/output error', '/run/checkpoints. '),
    ({'path': 'run/checkpoints*', 'errno': 'EACCES'}, 'Permission denied', '/run/checkpoints. '),
    # A network file system whose server is gone; a step folder listed but gone when read.
    ({'path': 'run/checkpoints*', 'errno': 'ENOTCONN'}, 'Transport endpoint is not connected', '/run/checkpoints. '),
    ({'path': 'run/checkpoints/6*', 'errno': 'ENOENT', 'ops': ['getattr', 'open']}, 'No such file or directory',
     '/run/checkpoints/6'),
]


def test_a_checkpoint_that_cannot_be_read_stops_the_run_and_changes_nothing(disk, data_dir, run_command):
  before = snapshot(disk.root / 'run')
  for rule, reason, file in FAULTS:
    disk.fail(rule)
    rc, _, errors = train(run_command, data_dir, disk.mount / 'run')
    assert rc == 2 and len(errors) == 1, (rule, errors)
    assert 'Cannot read the checkpoint' in errors[0] and f'now: {reason} on ' in errors[0], (rule, errors)
    assert file in errors[0].split(f'{reason} on ')[1], (rule, errors)
    assert 'not damage' in errors[0] and 'nothing in the workdir was moved or written' in errors[0]
    assert snapshot(disk.root / 'run') == before, rule  # No metrics row, config history, TensorBoard file.
  disk.fail()
  rc, out, errors = train(run_command, data_dir, disk.mount / 'run')  # The fault gone: resumes at step 6.
  assert rc == 0 and not errors and 'its checkpoint is at step 6' in out, (errors, out[-2000:])


@pytest.mark.parametrize('kind', ['MemoryError', 'thread'])
def test_running_out_of_memory_while_restoring_stops_the_run(disk, data_dir, run_command, monkeypatch, kind):
  """The restore fails for want of memory, as on a machine too small for the run. (Lowering RLIMIT_AS in a
  launcher process gives the 'thread' form, but whether the tiny run's restore still fits depends on the
  threads already running: not a test that passes every time, hence the error raised here.)"""
  import orbax.checkpoint as ocp

  def restore(self, *args, **kwargs):
    if kind == 'MemoryError':
      raise MemoryError('Unable to allocate 5.2 GiB for an array with shape (1400000000,) and data type float32')
    try:  # What orbax raised under RLIMIT_AS with 16 MiB to spare: its wrapper of a thread that could not start.
      raise RuntimeError("can't start new thread")
    except RuntimeError as e:
      raise Exception('Encountered error while reading array index: (slice(0, 32, 1),).') from e
  before = snapshot(disk.root / 'run')
  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, 'restore', restore)
    rc, _, errors = train(run_command, data_dir, disk.mount / 'run')
  assert rc == 2 and len(errors) == 1 and 'out of memory while restoring' in errors[0], errors
  assert 'more host (or device) memory' in errors[0]
  assert snapshot(disk.root / 'run') == before
  rc, out, errors = train(run_command, data_dir, disk.mount / 'run')
  assert rc == 0 and 'its checkpoint is at step 6' in out, errors


def _garble(step_dir):
  for root, _, names in os.walk(step_dir):
    for name in names:
      if os.path.basename(root) == 'd':  # Array data files: their bytes replaced, their sizes kept.
        path = os.path.join(root, name)
        with open(path, 'r+b') as f:
          f.write(bytes(range(256)) * (os.path.getsize(path) // 256 + 1))
          f.truncate(os.path.getsize(path))


def test_damage_is_set_aside_in_one_line_and_all_damaged_stops(disk, data_dir, run_command):
  run = disk.root / 'run'
  _garble(run / 'checkpoints' / '6')
  rc, out, errors = train(run_command, data_dir, disk.mount / 'run', total_steps=7)
  assert rc == 0 and not errors, errors
  assert 'Checkpoint at step 6 is damaged' in out and 'Resuming from the checkpoint at step 3' in out, out
  assert os.listdir(run / 'corrupt_checkpoints') == ['6']
  assert sorted(os.listdir(run / 'checkpoints')) == ['3', '6', '7']  # 6 again, from the resumed run.

  # Every checkpoint damaged: one line, nothing moved, until the start over is asked for.
  for step in ('3', '6', '7'):
    _garble(run / 'checkpoints' / step)
  before = snapshot(run)
  rc, out, errors = train(run_command, data_dir, disk.mount / 'run', total_steps=8)
  assert rc == 2 and len(errors) == 1 and 'Every checkpoint in' in errors[0], errors
  assert all(f'step {step}: ' in errors[0] for step in (7, 6, 3)) and '--discard_damaged' in errors[0]
  assert snapshot(run) == before
  rc, out, errors = train(run_command, data_dir, disk.mount / 'run', '--discard_damaged', total_steps=2)
  assert rc == 0 and not errors, errors
  assert sorted(os.listdir(run / 'corrupt_checkpoints')) == ['3', '6', '6+', '7']
  assert sorted(os.listdir(run / 'checkpoints')) == ['2']


def test_two_processes_where_one_cannot_read_both_stop(disk, data_dir, run_command):
  """Process 0 reads the run's files directly, process 1 through the mount, which fails its reads: both
  stop with one line and nothing moves (without the fault, the next start resumes at step 6)."""
  def launch():
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, '-m', 'vit_jax.main', *config_flags(data_dir), '--workdir', str(workdir),
         '--config.total_steps=6', '--coordinator_address', f'127.0.0.1:{port}',
         '--num_processes', '2', '--process_id', str(i)],
        cwd=REPO, env=environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, workdir in enumerate([disk.root / 'run', disk.mount / 'run'])]
    return [(p.returncode, *outputs) for p, outputs in ((p, p.communicate(timeout=300)) for p in processes)]

  before = snapshot(disk.root / 'run')
  disk.fail({'path': ARRAYS, 'errno': 'EIO', 'ops': ['read']})
  results = launch()
  for i, (rc, _, stderr) in enumerate(results):
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert rc == 2 and len(errors) == 1 and 'Cannot read the checkpoint at step 6' in errors[0], (i, stderr[-3000:])
  assert 'Input/output error on ' in results[1][2] and 'another process' in results[0][2]
  assert snapshot(disk.root / 'run') == before
  disk.fail()
  rc, out, errors = train(run_command, data_dir, disk.mount / 'run')  # One process, in this one.
  assert rc == 0 and 'its checkpoint is at step 6' in out, errors


def test_an_io_error_while_saving_stops_and_keeps_the_previous_checkpoints(disk, data_dir, run_command):
  before = {path: digest for path, (digest, _) in snapshot(disk.root / 'run').items()
            if path.startswith('checkpoints/')}
  disk.fail({'path': 'run/checkpoints/*', 'errno': 'EIO', 'ops': ['write']})
  rc, _, errors = train(run_command, data_dir, disk.mount / 'run', total_steps=9)
  assert rc == 2 and len(errors) == 1, errors
  assert 'Cannot write a checkpoint to' in errors[0] and 'Input/output error' in errors[0], errors
  assert 'the checkpoints written before (steps 6, 3) read back intact' in errors[0], errors
  after = snapshot(disk.root / 'run')
  assert all(after[path][0] == digest for path, digest in before.items())
  disk.fail()
  rc, out, errors = train(run_command, data_dir, disk.mount / 'run', total_steps=9)
  assert rc == 0 and 'Resuming from the checkpoint at step 6' in out, errors


def test_readers_name_the_unreadable_file_and_move_nothing(disk, data_dir, run_command, tmp_path):
  before = snapshot(disk.root / 'run')
  workdir = str(disk.mount / 'run')
  out = str(tmp_path / 'exported.npz')
  image = str(tmp_path / 'digit.png')
  from PIL import Image
  Image.new('RGB', (8, 8)).save(image)
  disk.fail({'path': ARRAYS, 'errno': 'EIO', 'ops': ['read']})
  for command in (['export', '--workdir', workdir, '--out', out],
                  ['evaluate', '--workdir', workdir, '--step', '3'],
                  ['predict', '--workdir', workdir, image]):
    result = run_command(*command)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert result.returncode == 2 and len(errors) == 1, (command, result.stderr[-3000:])
    assert 'Input/output error on ' in errors[0] and 'not damage' in errors[0], errors
  disk.fail({'path': 'run/checkpoints/*/metrics/metrics', 'errno': 'EIO', 'ops': ['read']})
  result = run_command('export', '--workdir', workdir, '--out', out, '--step', 'best')
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert result.returncode == 2 and len(errors) == 1 and 'Input/output error on ' in errors[0], result.stderr[-3000:]
  assert snapshot(disk.root / 'run') == before and not os.path.exists(out)
  disk.fail()
  result = run_command('export', '--workdir', workdir, '--out', out)
  assert result.returncode == 0 and json.loads(open(tmp_path / 'exported.json').read())['step'] == 6


def test_checkpoints_on_an_unmounted_file_system_stop_the_run(disk, data_dir, run_command):
  """`checkpoints` is a link into a file system that is not mounted: an error, not a new run from step 0."""
  run, volume = disk.root / 'run', disk.root / 'volume'
  volume.mkdir()
  shutil.move(run / 'checkpoints', volume / 'checkpoints')
  before = snapshot(run)
  os.symlink(disk.root / 'mnt' / 'checkpoints', run / 'checkpoints')
  rc, _, errors = train(run_command, data_dir, run)
  assert rc == 2 and len(errors) == 1 and 'which does not exist' in errors[0], errors
  os.remove(run / 'checkpoints')
  assert snapshot(run) == before  # Nothing else written.
  os.symlink(disk.root / 'mnt' / 'checkpoints', run / 'checkpoints')
  os.rename(volume, disk.root / 'mnt')  # Mounted again.
  rc, out, errors = train(run_command, data_dir, run)
  assert rc == 0 and 'its checkpoint is at step 6' in out, errors
