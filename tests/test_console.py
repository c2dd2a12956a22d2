"""The console shows our lines: what orbax, tfds and asyncio log goes to the log file (vit_jax/console.py).

Each case is one the issue saw on the console: a save at a step without eval
metrics (orbax's `Requested tracked_metric; did not provide metrics.`), a
damaged checkpoint set aside (thousands of lines of asyncio tracebacks), a
run started from another workdir (orbax's composite-handler warnings).
"""

import glob
import os
import re

from tests.conftest import REPO

# Lines that are not ours: absl-formatted log lines, Python tracebacks and asyncio's task errors.
NOT_OURS = re.compile(r'^(?![EW]\d{4} [\d:.]+ +\d+ slow_operation_alarm)'
                      r'([IWEF]\d{4} |Traceback |Task exception was never retrieved|.*tracked_metric)', re.M)


def train_args(workdir, data_dir, *overrides):
  return ['train', '--config', os.path.join(REPO, 'configs', 'quickstart.py'), '--workdir', str(workdir),
          f'--config.dataset.data_dir={data_dir}', '--config.model.hidden_size=32', '--config.model.num_layers=2',
          '--config.model.mlp_dim=64', '--config.model.num_heads=2', '--config.batch_size=16',
          '--config.eval_batch_size=64', '--config.log_every_steps=2', '--config.optimizer.warmup_steps=1',
          *overrides]


def log_text() -> str:
  path = os.path.join(os.environ['VIT_JAX_LOG_DIR'], 'vit-jax-train.log')
  return open(path).read() if os.path.exists(path) else ''


def test_library_warnings_and_tracebacks_stay_off_the_console(tmp_path, data_dir, run_command):
  old = tmp_path / 'old'
  # Checkpoints at steps 2 and 4, evaluated only at 4: orbax warns when the step-2 save has no metrics.
  first = run_command(*train_args(old, data_dir, '--config.total_steps=4', '--config.eval_every_steps=4',
                                  '--config.checkpoint_every_steps=2'))
  assert first.returncode == 0, first.stderr[-3000:]
  assert not NOT_OURS.search(first.stdout + first.stderr), first.stderr[-3000:]
  assert 'tracked_metric' in log_text()

  # The newest checkpoint's array files cut short: set aside in our one line, resumed from step 2.
  for path in glob.glob(str(old / 'checkpoints' / '4' / '**' / 'd' / '*'), recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(max(os.path.getsize(path) // 3, 1))
  # The first run's config again (its compiled programs): steps 3 and 4 again.
  damaged = run_command(*train_args(old, data_dir, '--config.total_steps=4', '--config.eval_every_steps=4',
                                    '--config.checkpoint_every_steps=2'))
  assert damaged.returncode == 0, damaged.stderr[-3000:]
  assert re.search(r'Checkpoint at step 4 is damaged \(.*\); set aside', damaged.stdout + damaged.stderr)
  assert 'Resuming from the checkpoint at step 2' in damaged.stdout
  assert not NOT_OURS.search(damaged.stdout + damaged.stderr), damaged.stderr[-3000:]

  # A new run from the old one's parameters, as the changed-config error suggests: our line says that
  # the head is reset; orbax's warnings about the handlers it picked stay off the console.
  new = run_command(*train_args(tmp_path / 'new', data_dir, '--config.total_steps=4',
                                f'--config.init.path={old}', '--config.eval_every_steps=4',
                                '--config.checkpoint_every_steps=2'))
  assert new.returncode == 0, new.stderr[-3000:]
  assert f'Initialised from {old} (head reset' in new.stdout
  assert not NOT_OURS.search(new.stdout + new.stderr), new.stderr[-3000:]



def test_verbose_shows_the_libraries_lines_and_the_log_file_has_each_once(caplog, monkeypatch, tmp_path):
  """What a library logs reaches no handler of the process (the console's, or here pytest's) but the log
  file, once; with --verbose it reaches them as before."""
  from absl import logging as absl_logging
  from vit_jax import console
  monkeypatch.setenv('VIT_JAX_LOG_DIR', str(tmp_path))
  try:
    console.keep_to_our_lines('vit-jax probe')
    absl_logging.warning('a library warning')  # Logged from this file: not vit_jax's.
    assert 'a library warning' not in caplog.text
    assert open(tmp_path / 'vit-jax-probe.log').read().count('a library warning') == 1
    console.keep_to_our_lines('vit-jax probe', verbose=True)  # --verbose
    absl_logging.warning('another library warning')
    assert 'another library warning' in caplog.text
    assert 'another' not in open(tmp_path / 'vit-jax-probe.log').read()
  finally:
    console.keep_to_our_lines('vit-jax probe')
