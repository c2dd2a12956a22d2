"""Every bad start is one line: each class of user mistake, in every command, ends in one `error:` line
on stderr and exit code 2, before anything is written.

The commands run in this process through `cli.main` (it forgets each command's flags afterwards, so
it can run again); subprocesses only where the process itself is the point (no JAX for `--help`, a
multi-process peer that never starts).
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.trained_run import trained_workdir
from vit_jax import cli
from vit_jax.errors import UsageError

BAD_CONFIGS = {  # file name -> (contents, what the error says)
    'syntax.py': ('def get_config(:\n', 'does not parse'),
    'imports.py': ('import no_such_module_here\n\ndef get_config():\n  pass\n', "does not import: "
                   "ModuleNotFoundError: No module named 'no_such_module_here'"),
    'no_get_config.py': ('CONFIG = 1\n', 'has no get_config() function'),
    'raises.py': ('def get_config():\n  raise ValueError("no such preset")\n',
                  'get_config() raised ValueError: no such preset'),
    'broken.json': ('{"total_steps": ', 'nor valid JSON'),
}


@pytest.fixture(autouse=True)
def no_process_settings(monkeypatch):
  """cli.run would change malloc and JAX's dispatch of this test process, and use the compilation cache."""
  monkeypatch.setenv('VIT_JAX_RETAIN_HOST_MEMORY', '0')
  monkeypatch.setenv('VIT_JAX_COMPILATION_CACHE', '0')


def run_cli(capsys, *args) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `vit-jax ARGS`, run in this process."""
  capsys.readouterr()  # Only this command's output.
  try:
    code = cli.main([str(a) for a in args])
  except SystemExit as e:
    code = e.code or 0
  out, err = capsys.readouterr()
  return code, out, err


def one_error_line(code: int, err: str, *fragments: str) -> str:
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), (code, err)
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


@pytest.fixture
def bad_configs(tmp_path):
  for name, (text, _) in BAD_CONFIGS.items():
    (tmp_path / name).write_text(text)
  return tmp_path


def write_png(path, seed: int = 0) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)).save(path)


@pytest.mark.parametrize('command', ['train', 'memory'])
def test_a_bad_config_file_is_one_line_naming_it_and_writes_nothing(command, bad_configs, tmp_path, capsys):
  workdir = tmp_path / 'workdir'
  cases = {str(bad_configs / name): expected for name, (_, expected) in BAD_CONFIGS.items()}
  cases.update({
      str(tmp_path / 'missing.py'): 'does not exist',
      'configs/quickstrt.py': "does not exist (did you mean 'configs/quickstart.py'?)",  # A path typo.
      'configs/quickstart.py:extra': 'takes no ":ARG" (got \'extra\')',
      str(bad_configs / 'broken.json') + ':x': 'only a .py config file takes ":ARG"',
      'configs': 'is a folder',
  })
  for path, expected in cases.items():
    args = ['--workdir', workdir] if command == 'train' else []
    code, _, err = run_cli(capsys, command, '--config', path, *args)
    one_error_line(code, err, expected, path.split(':')[0])
  assert not workdir.exists()


def test_predict_and_sweep_report_a_bad_config_file_the_same_way(bad_configs, tmp_path, capsys):
  image = tmp_path / 'a.png'
  write_png(image)
  code, _, err = run_cli(capsys, 'predict', '--checkpoint', tmp_path / 'x.npz', '--config',
                         bad_configs / 'raises.py', image)
  one_error_line(code, err, 'raises.py', 'raised ValueError: no such preset')
  sweep = tmp_path / 'sweep.py'
  sweep.write_text(f"BASE_CONFIG = {str(bad_configs / 'syntax.py')!r}\nGRID = {{'seed': [1]}}\n")
  code, _, err = run_cli(capsys, 'sweep', sweep, '--workdir', tmp_path / 'sweep_out', '--plan')
  one_error_line(code, err, 'BASE_CONFIG', 'syntax.py', 'does not parse')
  sweep.write_text('BASE_CONFIG = (\n')  # The sweep file itself.
  code, _, err = run_cli(capsys, 'sweep', sweep, '--workdir', tmp_path / 'sweep_out', '--plan')
  one_error_line(code, err, 'sweep.py', 'does not parse')
  assert not (tmp_path / 'sweep_out').exists()


def test_a_misspelt_config_key_is_one_short_line_with_the_right_key(tmp_path, capsys):
  for command in ('train', 'memory'):
    code, _, err = run_cli(capsys, command, '--config', 'configs/quickstart.py', '--workdir', tmp_path / 'w',
                           '--config.modle.variant=Ti/16')
    one_error_line(code, err, "unknown config key 'modle.variant' (did you mean \"model.variant\"?)")
  sweep = tmp_path / 'sweep.py'
  sweep.write_text("BASE_CONFIG = 'configs/quickstart.py'\nGRID = {'total_step': [5, 10]}\n")
  code, _, err = run_cli(capsys, 'sweep', sweep, '--workdir', tmp_path / 'sweep_out', '--plan')
  line = one_error_line(code, err, "unknown config key 'total_step' (did you mean \"total_steps\"?)")
  assert len(line) < 200  # Not the whole config.
  assert not (tmp_path / 'w').exists()


def test_a_workdir_config_json_is_a_train_and_memory_config_with_overrides(tiny_config, tmp_path, capsys):
  saved = os.path.join(trained_workdir(tiny_config), 'config.json')
  code, out, err = run_cli(capsys, 'memory', '--config', saved, '--config.batch_size=24')
  assert code == 0, err
  assert out.startswith('tiny/4, batch 24 on 8 devices'), out
  assert "activations with config.cpu_scheduler='memory'" in out  # The plan 'auto' falls back to.
  # train takes it too (the unknown dataset then stops the run before anything is compiled or written).
  workdir = tmp_path / 'from_json'
  code, _, err = run_cli(capsys, 'train', '--config', saved, '--workdir', workdir, '--config.total_steps=4',
                         '--config.dataset.name=no_such_dataset')
  one_error_line(code, err, "Unknown dataset 'no_such_dataset'")
  assert not workdir.exists()


def test_every_command_rejects_an_unknown_flag_in_one_line(capsys):
  for name in cli.COMMANDS:
    code, _, err = run_cli(capsys, name, '--no_such_flag')
    line = one_error_line(code, err)
    # argparse names the missing positional arguments first (summary, sweep).
    assert 'no_such_flag' in line or 'required' in line, (name, line)
    assert '--help' in line, (name, line)  # And where to find the flags.


def test_every_command_has_help_with_exit_code_0(capsys):
  for name in cli.COMMANDS:
    code, out, err = run_cli(capsys, name, '--help')
    assert code == 0 and not err, (name, code, err)
    assert '--' in out and len(out.splitlines()) > 3, (name, out)
  code, out, _ = run_cli(capsys, 'train', '--help')
  assert '--workdir' in out and '--config.KEY=VALUE' in out and '--distributed_timeout' in out


def test_train_help_loads_neither_jax_nor_tensorflow():
  script = ("import sys\nfrom vit_jax import cli\ncli.main(['train', '--help'])\n"
            "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))")
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().endswith('[]'), result.stdout


def test_commands_import_tensorflow_without_keras_which_still_imports_after():
  """TensorFlow imports Keras (with scikit-learn and matplotlib.pyplot) at start-up unless it cannot;
  no command uses it, and skipping it saves seconds of every command's start."""
  script = ("import sys\nfrom vit_jax import cli\ncli.import_tensorflow_quietly()\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'sklearn', 'matplotlib.pyplot') if m in sys.modules))\n"
            "import keras\nprint(keras.__name__)")
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split('\n')[:2] == ["['tensorflow']", 'keras'], result.stdout


def test_missing_flags_bad_numbers_and_missing_workdirs_are_one_line(tmp_path, capsys):
  image = tmp_path / 'a.png'
  write_png(image)
  cases = [
      (['train', '--config', 'configs/quickstart.py'], '--workdir is required'),
      (['train', '--workdir', tmp_path / 'w'], '--config is required'),
      (['train', '--config', 'configs/quickstart.py', '--workdir', tmp_path / 'w', '--config.total_steps=many'],
       'config.total_steps=many'),
      (['train', '--config', 'configs/quickstart.py', '--workdir', tmp_path / 'w', 'stray'], 'unexpected'),
      (['train', '--config', 'configs/quickstart.py', '--workdir', tmp_path / 'w', '--num_processes=x'],
       '--num_processes=x'),
      (['predict', '--workdir', tmp_path / 'nope', image], "Workdir '%s' does not exist" % (tmp_path / 'nope')),
      (['predict', '--workdir', tmp_path / 'nope', '--top_k', 'five', image], '--top_k=five'),
      (['evaluate', '--workdir', tmp_path / 'nope'], 'does not exist'),
      (['export', '--workdir', tmp_path / 'nope', '--out', tmp_path / 'x.npz'], 'does not exist'),
      (['export', '--workdir', tmp_path / 'nope', '--out', tmp_path / 'x.npz', 'stray'], 'stray'),
      (['export', '--workdir', tmp_path / 'nope'], '--out is required'),
      (['plots', tmp_path / 'nope', '--out', tmp_path / 'x.png'], 'No metrics.jsonl'),
      (['memory', '--config', 'configs/quickstart.py', '--devices', '0'], '--devices=0'),
      (['memory', '--config', 'configs/quickstart.py', 'stray'], 'unexpected arguments: stray'),
      (['summary', 'B/15x'], 'B/15x'),
      (['sweep', tmp_path / 'nope.py', '--workdir', tmp_path / 's'], 'nope.py'),
      (['input-benchmark', '--steps', '0'], '--steps=0'),
      (['no-such-command'], "unknown command 'no-such-command'"),
  ]
  for args, expected in cases:
    code, _, err = run_cli(capsys, *args)
    one_error_line(code, err, expected)
  assert os.listdir(tmp_path) == ['a.png']


def test_input_benchmark_mistakes_are_one_line(tmp_path, capsys):
  write_png(str(tmp_path / 'one_class' / 'cat' / 'a.png'))
  for args, expected in [
      (['--folder', tmp_path / 'nope'], ["--folder='%s' is not a folder" % (tmp_path / 'nope')]),
      (['--folder', tmp_path / 'one_class'], ['1 class sub-folder(s) (cat)']),
      (['--model', 'B/15', '--image_size', '32'], ['--model=B/15 --image_size=32', 'not divisible']),
      (['--model', 'B/17x'], ["Unknown model variant 'B/17x'"]),
  ]:
    code, _, err = run_cli(capsys, 'input-benchmark', *args)
    one_error_line(code, err, *expected)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_peer_that_never_starts_is_given_up_on_after_the_timeout(tmp_path):
  """Process 1 of 2, with nothing at the coordinator's address: one line naming it, exit 2, no workdir."""
  address = f'127.0.0.1:{free_port()}'  # Bound and released: nothing listens there.
  workdir = tmp_path / 'workdir'
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax', 'train', '--config', 'configs/quickstart.py', '--workdir', str(workdir),
       '--coordinator_address', address, '--num_processes', '2', '--process_id', '1',
       '--distributed_timeout', '2'],
      cwd=REPO, capture_output=True, text=True, timeout=240,
      env=dict(os.environ, XLA_FLAGS='', VIT_JAX_COMPILATION_CACHE='0'))
  one_error_line(result.returncode, result.stderr, 'gave up after 2 s (--distributed_timeout)',
                 f'process 0 (the coordinator) at {address}, where nothing answers')
  assert not workdir.exists()


def test_distributed_flags_that_cannot_work_are_one_line(tmp_path, capsys):
  base = ['train', '--config', 'configs/quickstart.py', '--workdir', tmp_path / 'w',
          '--coordinator_address', '127.0.0.1:1']
  for extra, expected in [(['--num_processes', '2'], 'needs --num_processes and --process_id'),
                          (['--num_processes', '2', '--process_id', '2'], 'numbered 0..num_processes-1'),
                          (['--num_processes', '2', '--process_id', '1', '--distributed_timeout', '0'],
                           '--distributed_timeout=0')]:
    code, _, err = run_cli(capsys, *base, *extra)
    one_error_line(code, err, expected)
  assert not (tmp_path / 'w').exists()


def test_a_warmup_as_long_as_the_run_is_one_warning_line_at_start(tmp_path, capsys):
  # The unknown dataset stops the run right after its start, where the warning is printed.
  code, _, err = run_cli(capsys, 'train', '--config', 'configs/quickstart.py', '--workdir', tmp_path / 'w',
                         '--config.total_steps=50', '--config.dataset.name=no_such_dataset')
  warning, error = err.strip().splitlines()
  assert warning.startswith('warning: config.optimizer.warmup_steps=100 is not shorter than '
                            'config.total_steps=50'), warning
  assert code == 2 and error.startswith("error: Unknown dataset 'no_such_dataset'"), err
  from vit_jax.config import defaults
  from vit_jax.training import optim
  config = defaults.get_config()
  assert optim.warmup_warning(config) is None  # 10 of 100 steps.


def test_predict_skips_an_undecodable_image_with_a_warning(tiny_config, tmp_path, capsys):
  workdir = trained_workdir(tiny_config)
  folder = tmp_path / 'images'
  write_png(str(folder / 'a.png'))
  (folder / 'b.png').write_bytes(b'not a png')
  write_png(str(folder / 'c.png'), seed=1)
  code, out, err = run_cli(capsys, 'predict', '--workdir', workdir, '--batch_size', '2', '--top_k', '1', folder)
  assert code == 0, err
  assert [line for line in out.splitlines() if not line.startswith(' ')] == [
      str(folder / 'a.png'), str(folder / 'c.png')]
  assert err.strip() == (f'warning: skipped {folder / "b.png"}: it does not decode as an image '
                         '(PNG, JPEG, GIF or BMP).')
  code, _, err = run_cli(capsys, 'predict', '--workdir', workdir, folder / 'b.png')  # The only one: an error.
  one_error_line(code, err, f"Cannot decode '{folder / 'b.png'}' as an image")


def test_class_names_of_an_image_folder_run_read_no_image(tmp_path, monkeypatch):
  from vit_jax.checkpoint import run
  from vit_jax.config import defaults
  from vit_jax.data.builders import image_folder
  for name in ('dog', 'cat', 'owl'):
    write_png(str(tmp_path / 'images' / name / 'a.png'))
  config = defaults.get_config()
  config.dataset.name, config.dataset.num_classes = 'image_folder', 3
  config.dataset.folder = str(tmp_path / 'images')

  def no_decoding(paths):
    raise AssertionError(f'decoded {len(paths)} images only to name the classes')

  monkeypatch.setattr(image_folder, '_decodable', no_decoding)
  image_folder._scan.cache_clear()
  assert run.class_names_of(config) == ['cat', 'dog', 'owl']


def test_the_empty_folder_error_suggests_overrides_that_work(tmp_path):
  from vit_jax.config import defaults
  from vit_jax.data import pipeline
  config = defaults.get_config()
  config.dataset.name = 'image_folder'
  with pytest.raises(UsageError) as error:
    pipeline.open_split(config.dataset, 'train')
  assert 'configs/image_folder.py:PATH' in str(error.value)
  assert '--config.dataset.folder=PATH and --config.dataset.num_classes=N' in str(error.value)
  for name in ('cat', 'dog'):
    for i in range(2):
      write_png(str(tmp_path / 'images' / name / f'{i}.png'), seed=i)
  config.dataset.folder, config.dataset.num_classes = str(tmp_path / 'images'), 2  # What it suggests.
  assert len(pipeline.open_split(config.dataset, 'train')) == 4


def test_a_run_saved_before_the_gelu_key_reads_back_as_exact_gelu(tmp_path):
  """Workdirs written before config.model.gelu existed were trained with exact GELU: they load as such."""
  import json
  from vit_jax.config import defaults, files
  saved = json.loads(defaults.get_config().to_json())
  del saved['model']['gelu']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert files.load_config(str(tmp_path / 'config.json')).model.gelu == 'exact'
  saved['model']['gelu'] = 'tanh'
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert files.load_config(str(tmp_path / 'config.json')).model.gelu == 'tanh'
  assert defaults.get_config().model.gelu == 'tanh'


def test_a_config_imports_its_siblings_from_anywhere(tmp_path, monkeypatch):
  """`configs/vit_l16.py` does `from configs import vit_b16`: that works under the `vit-jax` script,
  whose sys.path lacks the working directory, and from any directory."""
  from vit_jax.config import files
  package = tmp_path / 'my_configs'
  package.mkdir()
  (package / '__init__.py').write_text('')
  (package / 'base_run.py').write_text(
      'from vit_jax.config import defaults\n\ndef get_config():\n  c = defaults.get_config()\n'
      '  c.total_steps = 7\n  return c\n')
  (package / 'longer.py').write_text(
      'from my_configs import base_run\n\ndef get_config():\n  c = base_run.get_config()\n'
      '  c.total_steps *= 2\n  return c\n')
  monkeypatch.setattr(sys, 'path', [p for p in sys.path if p not in ('', os.getcwd(), str(tmp_path))])
  monkeypatch.chdir('/')
  assert files.load_config(str(package / 'longer.py')).total_steps == 14


def test_float16_training_is_one_line_naming_bfloat16(tmp_path, capsys):
  """float16 without loss scaling underflows its gradients: train and memory refuse it before any work."""
  workdir = tmp_path / 'w'
  for command, where in (('train', ('--workdir', workdir)), ('memory', ())):
    code, _, err = run_cli(capsys, command, '--config', 'configs/quickstart.py', *where,
                           '--config.model.dtype=float16')
    one_error_line(code, err, "config.model.dtype='float16'", "use 'bfloat16'")
  assert not workdir.exists()
