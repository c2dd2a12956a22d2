"""Workdirs, checkpoints and published files in a bucket (gs://), against a storage server on 127.0.0.1.

`tests/storage_server.py` starts a GCS emulator from PyPI behind a small front (credentials,
permissions, faults); every client is pointed at it by its documented settings. One quickstart run
(the tiny model) is trained into the bucket once for the module: killed with SIGKILL, resumed, and
compared bitwise with the same run on local disk; the inspection commands then read it from there,
in this process, under a guard that fails the test if a local-only file call gets a gs:// path.
"""

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from tests.conftest import REPO, xla_flags
from tests.storage_server import TOKEN, StorageServer, client_env, free_port

BUCKET = 'vit-jax-test'
TOTAL_STEPS = 12
FLAGS = ('--config', 'configs/quickstart.py', '--config.model.variant=tiny/4', '--config.model.hidden_size=32',
         '--config.model.num_layers=2', '--config.model.mlp_dim=64', '--config.model.num_heads=2',
         '--config.batch_size=16', '--config.eval_batch_size=64', f'--config.total_steps={TOTAL_STEPS}',
         '--config.log_every_steps=1', '--config.eval_every_steps=3', '--config.checkpoint_every_steps=3',
         '--config.keep_checkpoints=2', '--config.optimizer.warmup_steps=2')


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The server, with this process's clients pointed at it (for the module)."""
  server = StorageServer(str(tmp_path_factory.mktemp('gcs')))
  saved = dict(os.environ)
  os.environ.update(client_env(server.url))
  import fsspec.config  # Read its environment when first imported, maybe before this fixture.
  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'
  try:
    yield server
  finally:
    fsspec.config.conf['gcs'].pop('token', None)
    os.environ.clear()
    os.environ.update(saved)
    server.stop()


def run_in_process(*args):
  """`vit-jax ARGS` through cli.main in this process (as conftest's run_command), with its output."""
  import io
  from vit_jax import cli
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = cli.main(list(args))
    except SystemExit as e:
      code = e.code or 0
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def gcsfs():
  from vit_jax import storage
  return storage._filesystem(f'gs://{BUCKET}')


def objects(prefix: str) -> dict[str, str]:
  """{object name: md5} of every object under `prefix` (a gs:// URL), read fresh from the server."""
  fs = gcsfs()
  fs.invalidate_cache()
  try:
    return {name: info['md5Hash'] for name, info in fs.find(prefix, detail=True).items()}
  except FileNotFoundError:
    return {}


def launcher(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'vit_jax.main', *FLAGS, '--workdir', str(workdir),
          f'--config.dataset.data_dir={data_dir}', *extra]


def launcher_env(server, devices=8, token=TOKEN):
  return dict(os.environ, **client_env(server.url, token), XLA_FLAGS=xla_flags(devices), TF_CPP_MIN_LOG_LEVEL='2')


PACKAGE = os.path.join(REPO, 'vit_jax') + os.sep
STDLIB = os.path.dirname(os.__file__) + os.sep


def _called_from_vit_jax() -> bool:
  """Whether the code that made the current file call is vit_jax's own: the first frame outside this file
  and the standard library. Third-party calls are not judged (orbax asks os.path.islink of a step in a
  bucket, which is harmlessly False)."""
  frame = sys._getframe(2)
  while frame is not None:
    name = frame.f_code.co_filename
    if name != __file__ and not name.startswith((STDLIB, '<frozen')):
      return name.startswith(PACKAGE)
    frame = frame.f_back
  return False


@contextlib.contextmanager
def no_local_file_calls_on_urls():
  """Fails (AssertionError in the call) when vit_jax's code gives a gs:// path to a local-only file call:
  open, os.stat (and so os.path.exists/isdir/isfile/getsize), os.listdir/scandir, mkdir, rename/replace,
  remove, rmdir, shutil.

  An audit hook sees the calls that CPython audits; os.stat and os.lstat, which it does not, are wrapped.
  """
  state = {'on': True}

  def check(path):
    if isinstance(path, (str, bytes, os.PathLike)):
      text = path if isinstance(path, str) else os.fsdecode(os.fspath(path))
      if text.startswith('gs:') and _called_from_vit_jax():
        raise AssertionError(f'a local-only file call got the URL {text!r}')

  def hook(event, args):
    if state['on'] and event in ('open', 'os.listdir', 'os.scandir', 'os.mkdir', 'os.rename', 'os.remove',
                                 'os.rmdir', 'shutil.move', 'shutil.rmtree', 'shutil.copyfile', 'os.truncate'):
      for arg in args[:2]:
        check(arg)

  real_stat, real_lstat = os.stat, os.lstat

  def stat(path, *args, **kwargs):
    check(path)
    return real_stat(path, *args, **kwargs)

  def lstat(path, *args, **kwargs):
    check(path)
    return real_lstat(path, *args, **kwargs)

  sys.addaudithook(hook)  # Cannot be removed: switched off below.
  os.stat, os.lstat = stat, lstat
  try:
    yield
  finally:
    state['on'] = False
    os.stat, os.lstat = real_stat, real_lstat


def test_the_guard_catches_a_local_call_on_a_url():
  # Code compiled under a vit_jax file name stands for vit_jax's own code: the calls the old
  # checkpoint code made on a workdir path.
  calls = ("os.path.exists('gs://b/x')", "open('gs://b/x')", "os.listdir('gs://b')", "os.makedirs('gs://b/x/y')",
           "os.path.isdir('gs://b/x')")
  with no_local_file_calls_on_urls():
    for call in calls:
      code = compile(call, os.path.join(PACKAGE, 'checkpoint', 'manager.py'), 'eval')
      with pytest.raises(AssertionError, match='local-only file call'):
        eval(code, {'os': os})
    assert not os.path.exists('gs://b/x')  # A call of the tests' own (or a library's) is not judged.


def final_state(workdir):
  """The train state of `workdir`'s latest checkpoint (config.json's config), restored on this process."""
  from vit_jax import checkpoint
  from vit_jax.config.files import load_config
  from vit_jax.training import loop, sharding
  from vit_jax import storage
  config = load_config(storage.join(str(workdir), 'config.json'))
  run = loop.setup(config, sharding.make_mesh(config))
  abstract = sharding.placed(run.abstract_state, run.state_sharding)
  return checkpoint.restore_latest(checkpoint.create_manager(str(workdir), config), abstract)


def metric_rows(text):
  rows = [json.loads(line) for line in text.splitlines()]
  return [{k: v for k, v in row.items() if k != 'train/images_per_sec'} for row in rows]


def kill_after(process, step, lines, training):
  """Reads `process`'s output into `lines`, sets the event `training` at its first step (its programs are
  compiled, and in the compilation cache) and sends it SIGKILL once it reports a step >= `step`."""
  for line in process.stdout:
    lines.append(line)
    if line.startswith('step '):
      training.set()
      if int(line.split()[1].split('/')[0]) >= step:
        process.send_signal(signal.SIGKILL)
        break
  training.set()
  process.communicate()


@pytest.fixture(scope='module')
def bucket_run(gcs, data_dir, tmp_path_factory):
  """The quickstart run trained into gs://BUCKET/run by the launcher, SIGKILLed after step 7, left with a
  step folder that a save cut short would leave, and resumed to the end in this process under the guard;
  beside it, the same run on local disk. Returns (URL, local workdir, the resumed run's result).

  The local run starts once the launcher trains, so that it finds the train step in the compilation
  cache instead of compiling it a second time at the same moment."""
  from vit_jax.checkpoint import faults
  url, local = f'gs://{BUCKET}/run', tmp_path_factory.mktemp('local') / 'run'
  killed = subprocess.Popen(launcher(url, data_dir), cwd=REPO, env=launcher_env(gcs), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
  lines, training = [], threading.Event()
  watcher = threading.Thread(target=kill_after, args=(killed, 7, lines, training))
  watcher.start()
  try:
    training.wait(timeout=300)
    reference = run_in_process('train', *FLAGS, '--workdir', str(local), f'--config.dataset.data_dir={data_dir}')
  finally:
    watcher.join(timeout=300)
    if killed.poll() is None:
      killed.kill()
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert killed.returncode == -signal.SIGKILL, ''.join(lines)
  finished = faults.list_steps(f'{url}/checkpoints')
  assert finished and max(finished) < TOTAL_STEPS, finished
  # What a worker preempted in the middle of a save leaves in a bucket: a step folder, under its final
  # name, holding files but no commit_success.txt (orbax writes that last). It must be taken for nothing.
  fs = gcsfs()
  latest = max(finished)
  partial = f'{BUCKET}/run/checkpoints/{latest + 3}'
  fs.copy(f'{BUCKET}/run/checkpoints/{latest}/', partial + '/', recursive=True)
  fs.rm(f'{partial}/{faults.COMMIT_FILE}')
  for name in fs.find(partial):
    if '/d/' in name:
      fs.pipe(name, b'garbage')
  assert faults.list_steps(f'{url}/checkpoints') == finished
  with no_local_file_calls_on_urls():
    resumed = run_in_process('train', *FLAGS, '--workdir', url, f'--config.dataset.data_dir={data_dir}')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resuming from the checkpoint at step {latest} in {url}' in resumed.stdout, resumed.stdout
  return url, local, resumed


def test_killed_bucket_run_resumes_bitwise_equal_to_local_disk(bucket_run):
  url, local, _ = bucket_run
  from vit_jax import storage
  from vit_jax.checkpoint import faults
  with no_local_file_calls_on_urls():
    actual = final_state(url)
    rows = metric_rows(storage.read_text(f'{url}/metrics.jsonl'))
  expected = final_state(local)
  assert int(actual.step) == int(expected.step) == TOTAL_STEPS
  for a, b in zip(jax.tree.leaves((actual.params, actual.opt_state)),
                  jax.tree.leaves((expected.params, expected.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Bitwise.
  assert rows == metric_rows((local / 'metrics.jsonl').read_text())
  # keep-N (2) and the best checkpoint: the same steps kept, the others deleted from the bucket.
  kept = faults.list_steps(f'{url}/checkpoints')
  assert kept == faults.list_steps(str(local / 'checkpoints'))
  names = {name.split('/checkpoints/')[1].split('/')[0] for name in objects(f'{url}/checkpoints')}
  assert names == {str(step) for step in kept}, names  # Nothing left of deleted steps, nor of the partial one.
  assert json.loads(storage.read_text(f'{url}/config.json')) == json.loads((local / 'config.json').read_text())
  assert any(n.split('/')[-1].startswith('events.out.tfevents') for n in objects(f'{url}/tensorboard'))


def test_inspection_commands_read_the_bucket_run(bucket_run, tmp_path, run_command, tiny_config):
  url, local, _ = bucket_run
  from vit_jax import storage
  from vit_jax.checkpoint import manager, run as run_lib
  from vit_jax.data import pipeline
  split = pipeline.open_split(tiny_config.dataset, 'test')
  image = tmp_path / 'digit.png'
  image.write_bytes(split.source[0]['image'])
  best = manager.best_step(str(local), 'eval/accuracy', 'max')
  with no_local_file_calls_on_urls():
    loaded = run_lib.load_workdir(url, step='best')
    assert loaded.step == best
    exported = run_command('export', '--workdir', url, '--step', 'best', '--out', f'{url}/export/tiny.npz')
    assert exported.returncode == 0, exported.stderr
    assert f'(step {best}' in exported.stdout
    evaluated = run_command('evaluate', '--workdir', url)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(storage.read_text(f'{url}/eval/report.json'))
    assert report['step'] == TOTAL_STEPS and report['num_examples'] == 360
    predicted = run_command('predict', '--workdir', url, str(image))
    assert predicted.returncode == 0 and '%' in predicted.stdout, predicted.stderr
    fewshot = run_command('fewshot', f'--workdir={url}', '--dataset=sklearn_digits', '--shots=1', '--seeds=1',
                          f'--data_dir={tiny_config.dataset.data_dir}')
    assert fewshot.returncode == 0, fewshot.stderr
    analyzed = run_command('analyze', '--workdir', url, '--out', str(tmp_path / 'figure7'), '--num_images', '4',
                           '--batch_size', '4')
    assert analyzed.returncode == 0, analyzed.stderr
    plotted = run_command('plots', url, str(local), '--out', f'{url}/curves.png')
    assert plotted.returncode == 0, plotted.stderr
    assert storage.read_bytes(f'{url}/curves.png')[:4] == b'\x89PNG'
    npz = storage.read_bytes(f'{url}/export/tiny.npz')
  # The export from the bucket equals the parameters of the local run's best step.
  local_run = run_lib.load_workdir(str(local), step='best')
  from vit_jax.checkpoint import npz as npz_lib
  (tmp_path / 'tiny.npz').write_bytes(npz)
  np.testing.assert_array_equal(npz_lib.load_npz(str(tmp_path / 'tiny.npz'))['head']['kernel'],
                                np.asarray(local_run.params['head']['kernel']))


def test_a_published_name_downloads_from_the_bucket_into_the_cache(bucket_run, tmp_path, monkeypatch):
  url, local, _ = bucket_run
  from vit_jax import storage
  from vit_jax.checkpoint import published, run as run_lib, save_npz
  for name in (published.ROOT_ENV, published.BIG_VISION_ROOT_ENV):
    monkeypatch.delenv(name, raising=False)  # The real roots: gs://vit_models on the local server.
  monkeypatch.setenv(published.CACHE_ENV, str(tmp_path / 'cache'))
  params = run_lib.load_workdir(str(local)).params
  save_npz(params, 'gs://vit_models/imagenet21k/ViT-tiny.npz')
  with no_local_file_calls_on_urls():
    path, key = published.fetch('imagenet21k/ViT-tiny')
  assert path == str(tmp_path / 'cache' / 'vit_models' / 'imagenet21k' / 'ViT-tiny.npz') and key == ''
  assert open(path, 'rb').read() == storage.read_bytes('gs://vit_models/imagenet21k/ViT-tiny.npz')
  missing = pytest.raises(Exception, published.fetch, 'imagenet21k/ViT-missing')
  assert 'Cannot fetch checkpoint' in str(missing.value) and '\n' not in str(missing.value)


def test_two_processes_write_one_checkpoint_that_one_process_restores(gcs, data_dir):
  url = f'gs://{BUCKET}/two'
  port = free_port()
  env = launcher_env(gcs, devices=1)  # One device per process: what matters is that there are two.
  processes = [subprocess.Popen(
      launcher(url, data_dir, '--config.total_steps=3', '--coordinator_address', f'127.0.0.1:{port}',
               '--num_processes', '2', '--process_id', str(i)),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  assert '2 processes' in outputs[0][0]
  names = objects(f'{url}/checkpoints/3')
  assert any(n.endswith('commit_success.txt') for n in names)
  with no_local_file_calls_on_urls():
    state = final_state(url)
  assert int(state.step) == 3


def test_a_damaged_checkpoint_in_the_bucket_is_set_aside(bucket_run, gcs, run_command):
  url, _, _ = bucket_run
  copy = f'gs://{BUCKET}/damaged'
  fs = gcsfs()
  fs.copy(f'{BUCKET}/run/', f'{BUCKET}/damaged/', recursive=True)
  latest = f'{BUCKET}/damaged/checkpoints/{TOTAL_STEPS}'
  for name in fs.find(latest):
    if '/d/' in name:
      fs.pipe(name, b'garbage')
  before = objects(f'{copy}/checkpoints/9')
  with no_local_file_calls_on_urls():
    result = run_command('train', *FLAGS, '--workdir', copy)  # The same programs as the run: compiled already.
  assert result.returncode == 0, result.stderr
  assert f'Checkpoint at step {TOTAL_STEPS} is damaged' in result.stdout
  assert 'Resuming from the checkpoint at step 9' in result.stdout
  assert objects(f'{copy}/corrupt_checkpoints/{TOTAL_STEPS}'), 'the damaged step was not moved'
  assert before and objects(f'{copy}/checkpoints/9') == before  # The one resumed from is untouched.


@contextlib.contextmanager
def without_credentials(monkeypatch, tmp_path):
  """gcsfs as a user without credentials has it: Application Default Credentials looked for (no file, no
  metadata server), nothing found. Tensorstore's credentials are read once per process, so it keeps its
  test token; the bucket check asks gcsfs first."""
  import fsspec.config
  from etils.epath import backend
  import gcsfs

  def fresh():
    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path / 'gcloud'))
  monkeypatch.delenv('GOOGLE_APPLICATION_CREDENTIALS', raising=False)
  token = fsspec.config.conf['gcs'].pop('token')
  fresh()
  try:
    yield
  finally:
    fsspec.config.conf['gcs']['token'] = token
    fresh()


def test_bucket_errors_are_one_line_before_any_work(gcs, data_dir, run_command, monkeypatch, tmp_path):
  """A missing bucket, no permission and no credentials: one `error:` line, exit 2, nothing written."""
  args = ('train', *FLAGS, f'--config.dataset.data_dir={data_dir}', '--workdir')
  before = objects(f'gs://{BUCKET}')
  results = {}
  with no_local_file_calls_on_urls():
    results['missing'] = run_command(*args, 'gs://no-such-bucket/run')
    gcs.control(deny=[BUCKET])
    try:
      results['denied'] = run_command(*args, f'gs://{BUCKET}/denied')
    finally:
      gcs.reset()
    gcs.control(require_token=True)  # As GCS answers anonymous callers.
    try:
      with without_credentials(monkeypatch, tmp_path):
        results['anonymous'] = run_command(*args, f'gs://{BUCKET}/anonymous')
    finally:
      gcs.reset()
  for case, expected in (('missing', 'bucket gs://no-such-bucket does not exist'),
                         ('denied', f'no permission to write to gs://{BUCKET}'),
                         ('anonymous', 'no valid Google Cloud credentials')):
    result = results[case]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], (case, result.stderr[-2000:])
    assert 'Model ' not in result.stdout, case  # Before any work: nothing compiled, no data read.
  assert objects(f'gs://{BUCKET}') == before  # Nothing written.


def test_a_write_refused_during_a_save_stops_the_run_and_keeps_the_checkpoints(gcs, data_dir, run_command):
  url = f'gs://{BUCKET}/refused'
  # Transient: two uploads of checkpoint 3 answer 503, which the storage libraries retry; persisting:
  # every upload of checkpoint 6 answers 403 (a permission revoked mid-run), which they do not.
  gcs.control(fail_writes=2, fail_writes_matching='refused/checkpoints/3/', deny_writes_matching='refused/checkpoints/6/')
  try:
    with no_local_file_calls_on_urls():
      result = run_command('train', *FLAGS, '--workdir', url, f'--config.dataset.data_dir={data_dir}',
                           '--config.total_steps=6')
  finally:
    gcs.reset()
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Cannot write a checkpoint' in errors[0], result.stderr[-3000:]
  assert '(steps 3) read back intact' in errors[0]
  before = objects(f'{url}/checkpoints/3')
  resumed = run_command('train', *FLAGS, '--workdir', url, f'--config.dataset.data_dir={data_dir}',
                        '--config.total_steps=6')
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resuming from the checkpoint at step 3' in resumed.stdout
  assert objects(f'{url}/checkpoints/3') == before  # Kept (keep_checkpoints=2), untouched.


def test_a_cache_in_the_bucket_downloads_once_and_checks_the_size(bucket_run, monkeypatch, tmp_path):
  """$VIT_JAX_CACHE=gs://...: several fetchers at once download once (the lock is an object), the file
  appears whole, a lock its holder left behind (killed) is taken over, a short download is not kept."""
  import threading
  import time
  url, local, _ = bucket_run
  from vit_jax import storage
  from vit_jax.checkpoint import published, run as run_lib, save_npz
  from vit_jax.checkpoint.npz import flatten_params, load_npz
  for name in (published.ROOT_ENV, published.BIG_VISION_ROOT_ENV):
    monkeypatch.delenv(name, raising=False)
  cache = f'gs://{BUCKET}/cache'
  monkeypatch.setenv(published.CACHE_ENV, cache)
  params = run_lib.load_workdir(str(local)).params
  for name in ('cached', 'short', 'stale'):
    save_npz(params, f'gs://vit_models/imagenet21k/ViT-{name}.npz')
  copies, real = [], published._copy

  def slow(source, dest):  # A slow network: the other fetchers arrive while the first one copies.
    copies.append(source)
    time.sleep(0.3)
    return real(source, dest)
  monkeypatch.setattr(published, '_copy', slow)
  results = []
  with no_local_file_calls_on_urls():
    threads = [threading.Thread(target=lambda: results.append(published.fetch('imagenet21k/ViT-cached')))
               for _ in range(3)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    cached = f'{cache}/vit_models/imagenet21k/ViT-cached.npz'
    assert results == [(cached, '')] * 3
    assert copies == ['gs://vit_models/imagenet21k/ViT-cached.npz']  # One download.
    assert storage.read_bytes(cached) == storage.read_bytes('gs://vit_models/imagenet21k/ViT-cached.npz')
    loaded = flatten_params(load_npz('imagenet21k/ViT-cached'))  # Read from the bucket's cache.
  assert loaded.keys() == flatten_params(params).keys()
  folder = f'{cache}/vit_models/imagenet21k'
  assert list(objects(folder)) == [cached[len('gs://'):]]  # No lock, no temporary object.

  def short(source, dest):  # The real copy, reported one byte short (a connection cut at the end).
    written, expected = real(source, dest)
    return written - 1, expected
  monkeypatch.setattr(published, '_copy', short)
  with pytest.raises(Exception, match=r'stopped after \d+ of \d+ bytes; run again') as error:
    published.fetch('imagenet21k/ViT-short')
  assert '\n' not in str(error.value) and list(objects(folder)) == [cached[len('gs://'):]]  # Nothing kept.

  # A lock object that a killed holder left: no one rewrites it, so after LOCK_STALE_S a fetcher takes over.
  monkeypatch.setattr(published, '_copy', real)
  monkeypatch.setattr(storage, 'LOCK_STALE_S', 1.0)
  stale = f'{cache}/vit_models/imagenet21k/ViT-stale.npz'
  storage.write_text(stale + '.lock', '{"host": "gone", "pid": 1}')
  assert published.fetch('imagenet21k/ViT-stale') == (stale, '')
  assert sorted(objects(folder)) == sorted(name[len('gs://'):] for name in (cached, stale))  # Lock deleted.


# Two seeds of one point: the trials' launchers compile the same programs, the second one reads them
# from the compilation cache.
SWEEP = '''
BASE_CONFIG = 'configs/quickstart.py'
OVERRIDES = {overrides!r}
GRID = {{'model.pool': ['gap']}}
SEEDS = 2
'''


def test_a_sweep_in_the_bucket_reports_and_reruns_only_missing_trials(gcs, data_dir, tmp_path, run_command,
                                                                       monkeypatch):
  """`vit-jax sweep FILE --workdir gs://...`: trial workdirs, done files, logs and the report in the bucket;
  the same command again runs only the trial that had not finished."""
  from vit_jax import storage
  from vit_jax.sweeps import sweep as sweep_lib
  overrides = {flag.split('=')[0][len('--config.'):]: flag.split('=')[1] for flag in FLAGS[2:]}
  overrides = {key: int(value) if value.isdigit() else value for key, value in overrides.items()}
  overrides.update({'total_steps': 2, 'eval_every_steps': 2, 'checkpoint_every_steps': 2,
                    'dataset.data_dir': data_dir})
  sweep_file = tmp_path / 'tiny.py'
  sweep_file.write_text(SWEEP.format(overrides=overrides))
  url = f'gs://{BUCKET}/sweep'
  monkeypatch.chdir(REPO)
  monkeypatch.setenv('XLA_FLAGS', xla_flags(1))  # The trials' launchers: one device each start faster.
  trials = sweep_lib.load_sweep(str(sweep_file)).trials
  with no_local_file_calls_on_urls():
    first = run_command('sweep', str(sweep_file), '--workdir', url, '--trial', '0')
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    done = objects(f'{url}/{trials[0].name}/{sweep_lib.DONE_FILE}')
    assert done and not objects(f'{url}/{trials[1].name}/{sweep_lib.DONE_FILE}')
    again = run_command('sweep', str(sweep_file), '--workdir', url)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    plan = run_command('sweep', str(sweep_file), '--workdir', url, '--plan')
  assert '2 trials: 1 already finished (skipped), 1 to run' in again.stdout
  assert objects(f'{url}/{trials[0].name}/{sweep_lib.DONE_FILE}') == done  # Not run again.
  assert storage.read_text(f'{url}/{trials[0].name}/{sweep_lib.ATTEMPTS_FILE}').count('\n') == 1
  for trial in trials:
    assert f'  {trial.name}  [finished]' in plan.stdout
    assert 'step 2/2' in storage.read_text(f'{url}/{trial.name}/{sweep_lib.STDOUT_FILE}')
  rows = list(csv.DictReader(io.StringIO(storage.read_text(f'{url}/results.csv'))))
  assert [(row['model.pool'], row['seeds']) for row in rows] == [('gap', '2')]
  assert all(0 <= float(value) <= 1 for value in rows[0]['eval/accuracy per seed'].split(';'))
  assert storage.read_text(f'{url}/results.md') in again.stdout
  assert storage.read_bytes(f'{url}/curves.png')[:4] == b'\x89PNG'


def test_s3_and_other_schemes_are_one_line_before_any_work(data_dir, run_command, monkeypatch, tmp_path):
  """orbax-checkpoint writes arrays only to gs:// (docs/storage.md): an s3:// path anywhere is refused."""
  from vit_jax.checkpoint import published
  sweep_file = tmp_path / 'tiny.py'
  sweep_file.write_text(SWEEP.format(overrides={'total_steps': 2}))
  monkeypatch.chdir(REPO)
  train = ('train', *FLAGS, f'--config.dataset.data_dir={data_dir}')
  results = {
      'workdir': run_command(*train, '--workdir', 's3://bucket/run'),
      'init': run_command(*train, '--workdir', str(tmp_path / 'run'), '--config.init.path=s3://bucket/x.npz'),
      'sweep': run_command('sweep', str(sweep_file), '--workdir', 's3://bucket/sweep'),
  }
  monkeypatch.setenv(published.CACHE_ENV, 's3://bucket/cache')
  results['cache'] = run_command(*train, '--workdir', str(tmp_path / 'cached'),
                                 '--config.init.path=imagenet21k/ViT-tiny')
  for case, result in results.items():
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.returncode == 2 and len(errors) == 1, (case, result.stderr[-2000:])
    assert 's3:// is not supported, only local paths and gs://BUCKET/... URLs' in errors[0], (case, errors)
    assert 'Model ' not in result.stdout, case
  assert not (tmp_path / 'run').exists() and not os.path.exists('s3:')


def test_a_held_lock_is_rewritten_and_not_taken_over(gcs, monkeypatch):
  """A lock object whose holder lives is rewritten every LOCK_STALE_S / 4 seconds, so a waiter does not
  take it over however long the holder works; the waiter gets it once the holder lets go."""
  import threading
  import time
  from vit_jax import storage
  monkeypatch.setattr(storage, 'LOCK_STALE_S', 1.0)  # Rewritten every 0.25 s; a waiter's limit is 1 s.
  url = f'gs://{BUCKET}/locks/held.lock'
  events, generations = [], set()

  def waiter():
    with storage.object_lock(url, poll_s=0.1):
      events.append(('waiter has it', time.monotonic()))

  with storage.object_lock(url):
    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + 3 * storage.LOCK_STALE_S  # Three times the waiter's limit.
    while time.monotonic() < deadline:
      generations.add(gcsfs().info(url)['generation'])
      time.sleep(0.1)
    events.append(('holder lets go', time.monotonic()))
  thread.join(timeout=30)
  assert [name for name, _ in events] == ['holder lets go', 'waiter has it'], events
  assert len(generations) >= 4, generations  # Rewritten while held.
  assert not objects(f'gs://{BUCKET}/locks')  # Deleted by the last holder.
