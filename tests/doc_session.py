"""Runs the commands of the docs (tests/doc_commands.py) as a new user would copy them, in reading order.

A `Session` runs commands one after another in one directory, keeping what they
leave for the next ones: `vit-jax` commands in the test process (the
`run_command` fixture), Python blocks with `exec`. Training commands are shrunk
by appending overrides (the tiny model, step counts / 200, small images), so
they run in seconds with the same flags. What needs a GPU, a cluster, a
download or minutes of measuring is checked for its flags only, with the
command's own parser (`vit_jax.cli.check_flags`). A command the session does not
know how to run is a failure. How to write a doc command: docs/testing.md.
"""

import contextlib
import io
import math
import os
import re
import time
import traceback
from typing import Optional

from tests import doc_commands
from tests.doc_commands import Command, flag_value, program, quote

REPO = doc_commands.REPO
# Shrinking a training command: every step count divided by this (at least 1; total_steps at least 2).
STEP_DIVISOR = 200
STEP_KEYS = ('total_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
             'optimizer.warmup_steps', 'fewshot.every_steps')
ONCE_KEYS = ('eval_every_steps', 'checkpoint_every_steps', 'fewshot.every_steps')
TINY = {'model.hidden_size': 32, 'model.num_layers': 2, 'model.mlp_dim': 64, 'model.num_heads': 2,
        'batch_size': 16, 'eval_batch_size': 64}
LARGEST_IMAGE = 32  # Larger image sizes are shrunk to this (a multiple of every patch size of the docs).
# Commands that measure full-size models for minutes (or, for memory --devices, need a process of their
# own): checked for their flags; their own tests run them small.
MEASURING = {'selfcheck': 'tests/test_selfcheck.py', 'benchmark': 'tests/test_benchmark.py',
             'benchmark-timm': 'tests/test_benchmark.py', 'input-benchmark': 'tests/test_benchmark.py',
             'memory': 'tests/test_memory.py'}
# `vit-jax summary` of a variant this wide (L, H, g, G) traces hundreds of millions of parameters.
LARGE_WIDTH = 1024
# `vit-jax summary` of these variants at 224 px, which these tests run (and pin the parameter counts and
# GFLOPs of) through the command's library function.
SUMMARIES = {'B/16': 'tests/test_summary.py::test_published_counts_and_flops',
             'R50+B/16': 'tests/test_hybrid.py::test_summary_prints_the_published_count_with_the_resnet_first'}
CLUSTER = ('srun', 'sbatch', 'scancel', 'squeue', 'gcloud')
# Placeholder paths of the docs that stand for the user's own images: the test makes such a folder.
IMAGE_FOLDERS = ('/path/to/images', '/data/my_images')
# Console lines that are not ours: absl-formatted log lines and Python tracebacks (XLA's alarm of a
# compilation slowed by a loaded machine excepted: it says nothing of the command).
NOT_OURS = re.compile(r'^(?![EW]\d{4} [\d:.]+ +\d+ slow_operation_alarm)'
                      r'([IWEF]\d{4} |Traceback |Task exception was never retrieved)', re.M)


class DocFailure(Exception):
  pass


def downloaded(checkpoint: str) -> bool:
  """Whether `checkpoint` is a file the user downloads, not here: a published name, or a published file's
  name (`ViT-B_16.npz`, `R50+ViT-B_16.npz`: the docs' stand-in for a file downloaded by hand) that does not
  exist. Anything else that does not exist (a workdir, an export such as `quickstart.npz`) is not: the
  command runs and fails, as a wrong path in the docs must."""
  from vit_jax.checkpoint import published
  path, _ = published.split_key(checkpoint)
  if not checkpoint or os.path.exists(path):
    return False
  return (checkpoint in published.BIG_VISION or checkpoint.startswith('augreg:')
          or bool(re.match(r'^([\w]+\+)?ViT-[\w-]+\.npz$', os.path.basename(path)))
          or (path.split('/')[0] in published.FOLDERS and path.count('/') == 1))


def scale_steps(args: list[str]) -> list[str]:
  """`--step N` of a run shrunk as training commands are: N / STEP_DIVISOR, so the step exists."""
  scaled = list(args)
  for i, arg in enumerate(args):
    value = arg[len('--step='):] if arg.startswith('--step=') else args[i + 1] if (
        arg == '--step' and i + 1 < len(args)) else None
    if value and value.isdigit():
      small = str(math.ceil(int(value) / STEP_DIVISOR))
      if arg == '--step':
        scaled[i + 1] = small
      else:
        scaled[i] = f'--step={small}'
  return scaled


class Session:
  """Runs the doc commands one after another in `root`, keeping what they leave for the next ones."""

  def __init__(self, root, data_dir, run_command, seen: Optional[dict] = None):
    self.root, self.data_dir, self.run_command = str(root), data_dir, run_command
    self.ran, self.checked, self.seconds = [], [], []
    self.outputs = []  # What the `vit-jax` commands so far write (`record_outputs`).
    # The `vit-jax` commands run so far, as the docs write them: {arguments: where}. A session that goes on
    # from another's directory (test_docs.py's README) starts with that session's.
    self.seen = dict(seen or {})

  def run_all(self, commands: list[Command]) -> list[str]:
    """Runs `commands` in order; returns a message for each that fails (file, line, command, why)."""
    failures = []
    for command in commands:
      start = time.perf_counter()
      try:
        self.run(command)
      except DocFailure as e:
        text = command.text if command.kind == 'shell' else command.text.split('\n')[0] + ' ...'
        failures.append(f'{command.where()}: {text}\n  {str(e).strip()}')
      self.seconds.append((time.perf_counter() - start, command))
    return failures

  def report(self) -> str:
    """What ran and what was checked for flags only, and why: printed by the tests (`pytest -s`)."""
    lines = [f'{len(self.ran)} doc commands run, {len(self.checked)} checked for flags only:']
    lines += [f'  {command.where()}: {command.text.splitlines()[0][:80]}  [{why}]' for command, why in self.checked]
    lines += ['slowest:'] + [f'  {s:5.1f} s  {c.where()}: {c.text.splitlines()[0][:80]}'
                             for s, c in sorted(self.seconds, key=lambda x: -x[0])[:15]]
    return '\n'.join(lines)

  # Paths -------------------------------------------------------------------------------------------
  def relocate(self, arg: str) -> str:
    """An argument with /tmp/ and the docs' image-folder placeholders moved into the test directory."""
    arg = re.sub(r'(^|[=:])/tmp/', lambda m: m.group(1) + os.path.join(self.root, 'tmp') + '/', arg)
    for placeholder in IMAGE_FOLDERS:
      if placeholder in arg:
        arg = arg.replace(placeholder, self.image_folder())
    # Shell variables: $HOME is the test directory; others (a process index, a zone) a stand-in.
    return re.sub(r'\$\{?(\w+)\}?', lambda m: self.root if m.group(1) == 'HOME' else '0', arg)

  def image_folder(self) -> str:
    """A folder of class sub-folders (3 digits, 40 PNGs each: 25-shot few-shot fits), as the README
    teaches."""
    folder = os.path.join(self.root, 'my_images')
    if not os.path.isdir(folder):
      from vit_jax.data import pipeline
      from configs import quickstart
      dataset = quickstart.get_config().dataset
      dataset.data_dir = self.data_dir
      source = pipeline.open_split(dataset, 'train').source
      counts = {}
      for i in range(len(source)):
        label = int(source[i]['label'])
        if label < 3 and counts.get(label, 0) < 40:
          counts[label] = counts.get(label, 0) + 1
          os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
          with open(os.path.join(folder, str(label), f'{i}.png'), 'wb') as f:
            f.write(source[i]['image'])
    return folder

  # Commands ----------------------------------------------------------------------------------------
  def run(self, command: Command) -> None:
    if command.problem:
      raise DocFailure(command.problem)
    if command.kind == 'python':
      return self.python(command, command.text)
    name, written = program(command.argv)
    args = [self.relocate(a) for a in written]
    if name == 'vit-jax':
      return self.vit_jax(command, args, tuple(written))
    if name == 'python':
      return self.python_program(command, args)
    if name == 'pip':
      return self.pip(command, args)
    if name in CLUSTER:
      return self.cluster(command, name, args)
    if name == 'source' and args and args[0].endswith('bin/activate'):
      return self.checked.append((command, 'the virtual environment'))
    raise DocFailure(f'the doc test does not know how to run `{name}`: run it from vit-jax, Python or pip, '
                     'or teach tests/test_docs.py how to check it (docs/testing.md)')

  def vit_jax(self, command: Command, args: list[str], written: tuple) -> None:
    from vit_jax import cli
    earlier = self.seen.setdefault(quote(list(written)), command.where())
    if earlier != command.where():  # The README and a page show the same command: once is enough.
      return self.checked.append((command, f'the same command as {earlier}'))
    if not args or args[0] not in cli.COMMANDS:
      return self.execute(command, args)  # `vit-jax --help`, or an unknown command's error.
    name = args[0]
    parsed = self.parse(command, args)
    why = command.flags_only or self.cannot_run(name, args[1:], parsed)
    if command.flags_only:
      self.check_inputs(name, parsed)
      for test in re.findall(r'tests/[\w/]+\.py', command.flags_only):  # The test said to run it instead.
        if not os.path.isfile(os.path.join(REPO, test)):
          raise DocFailure(f'its flags-only mark names {test}, which does not exist')
    self.record_outputs(name, parsed)
    if why:
      return self.checked.append((command, why))
    if name == 'train':
      args = args + self.shrink(parsed['config'])
    else:
      args = scale_steps(args)
    if name == 'sweep' and '--plan' not in args:
      args = args + ['--plan']  # The sweep file and every override checked; the trials are the launcher's.
    self.execute(command, args)

  def check_inputs(self, name: str, parsed: dict) -> None:
    """For a command the doc marks flags-only: the workdirs and checkpoints it reads exist, or an earlier
    command of the session writes them (one checked for flags only too), so that a wrong workdir in the
    docs fails also where the command does not run."""
    if name == 'train':
      init = parsed['config'].init.path
      reads = [init] if init and not downloaded(init) and '://' not in init else []
    elif name == 'plots':
      reads = list(parsed['args'][1:])
    elif name == 'sweep':
      reads = []
    else:
      reads = [parsed.get('workdir')] + ([] if downloaded(parsed.get('checkpoint') or '') else
                                         [parsed.get('checkpoint')])
    for path in filter(None, reads):
      if '://' in path or os.path.exists(path):
        continue
      if not any(path == made or path.startswith(made.rstrip('/') + '/') for made in self.outputs):
        raise DocFailure(f'it reads {path}, which no earlier command of the docs makes (and it does not exist)')

  def record_outputs(self, name: str, parsed: dict) -> None:
    """What a command writes, for `check_inputs` of later commands: a run's or a sweep's workdir, an
    export or an evaluation's folder."""
    made = {'train': parsed.get('workdir'), 'sweep': parsed.get('workdir'), 'export': parsed.get('out'),
            'evaluate': parsed.get('out_dir')}.get(name)
    if made:
      self.outputs.append(made)

  def parse(self, command: Command, args: list[str]) -> dict:
    from vit_jax import cli
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      try:
        return cli.check_flags(args)
      except SystemExit:
        pass
    raise DocFailure(f'its flags do not parse: {err.getvalue().strip()}')

  def cannot_run(self, name: str, args: list[str], parsed: dict) -> str:
    """Why the command cannot run here ('' if it can): a GPU, a cluster, a download, minutes."""
    if any('://' in arg for arg in args):  # gs://, s3://, https://: tests/test_storage.py runs them locally.
      return 'reaches cloud storage or the internet (a URL)'
    if name in MEASURING:
      return f'measures full-size models; {MEASURING[name]} runs it small'
    if name == 'summary':
      from vit_jax.models import SIZES
      size = parsed['variant'].split('+')[-1].split('/')[0]
      if size in SIZES and SIZES[size][0] >= LARGE_WIDTH:
        return f'traces a {size} model for tens of seconds; tests/test_models.py pins its parameters'
      if parsed['variant'] in SUMMARIES and parsed['image_size'] == 224:
        return f'traces a {parsed["variant"]} model for seconds; {SUMMARIES[parsed["variant"]]} runs it'
    expect = parsed.get('expect')
    if expect and expect != 'cpu':
      return f'needs a {expect.upper()}'
    if parsed.get('multihost') or parsed.get('coordinator_address') or parsed.get('executor') == 'slurm':
      return 'needs a cluster'
    if name == 'train':
      from vit_jax.data import pipeline
      config = parsed['config']
      dataset = config.dataset.name
      if dataset not in pipeline.SHIPPED_BUILDERS and dataset != pipeline.IMAGE_FOLDER:
        return f'needs the {dataset} dataset prepared (a download)'
      if config.init.path and downloaded(config.init.path):
        return f'needs the checkpoint {config.init.path} (a download)'
    if name == 'prepare':
      from vit_jax.data import pipeline
      if parsed['name'] not in pipeline.SHIPPED_BUILDERS and not parsed.get('manual_dir'):
        return f'downloads {parsed["name"]}'
    checkpoint = parsed.get('checkpoint')
    if checkpoint and downloaded(checkpoint):
      return f'needs the checkpoint {checkpoint} (a download)'
    dataset = parsed.get('dataset')
    if name == 'fewshot' and dataset:
      from vit_jax.data import pipeline
      if dataset not in pipeline.SHIPPED_BUILDERS and not os.path.isdir(dataset):
        return f'needs the {dataset} dataset prepared (a download)'
    return ''

  def shrink(self, config) -> list[str]:
    """Overrides appended to a training command: the tiny model, step counts / STEP_DIVISOR, the
    prepared digits of this test session."""
    from vit_jax.config.sizes import image_hw
    overrides = dict(TINY)
    for key in STEP_KEYS:
      value = config
      for part in key.split('.'):
        value = value[part]
      if value:
        overrides[key] = max(math.ceil(value / STEP_DIVISOR), 2 if key == 'total_steps' else 1)
    # Evaluation, checkpoint and few-shot once, at the last step: each evaluation costs more than the
    # steps, and the docs' later commands read the last (and best) checkpoint only.
    for key in ONCE_KEYS:
      if key in overrides:
        overrides[key] = overrides['total_steps']
    if max(image_hw(config.input.image_size)) > LARGEST_IMAGE:
      overrides['input.image_size'] = LARGEST_IMAGE
    if config.dataset.name == 'sklearn_digits' and not config.dataset.data_dir:
      overrides['dataset.data_dir'] = self.data_dir
    return [f'--config.{key}={value}' for key, value in overrides.items()]

  def execute(self, command: Command, args: list[str]) -> None:
    result = self.run_command(*args)
    output = (result.stdout + result.stderr).strip()
    if command.expect_error:
      words = ' '.join(command.expect_error.split()[:4])
      said = ' '.join(result.stderr.replace(self.root + os.sep, '').split())  # Paths as the doc writes them.
      if result.returncode != 2 or f'error: {words}' not in said:
        raise DocFailure(f'expected exit code 2 and `error: {words} ...` as the doc shows; got exit code '
                         f'{result.returncode}:\n{output[-3000:]}')
    elif result.returncode != 0:
      raise DocFailure(f'exit code {result.returncode}:\n{output[-3000:]}')
    noise = NOT_OURS.search(result.stderr)
    if noise:
      raise DocFailure(f'the console shows lines that are not ours (`{noise.group(0)}`...):\n'
                       f'{result.stderr[-3000:]}')
    self.ran.append(command)

  def python(self, command: Command, source: str) -> None:
    code = compile(source, command.where(), 'exec')
    if command.flags_only:
      return self.checked.append((command, command.flags_only))
    try:
      exec(code, {'__name__': '__doc__'})  # noqa: S102 - the docs' own examples.
    except BaseException:  # noqa: BLE001
      raise DocFailure(traceback.format_exc(limit=-3)) from None
    self.ran.append(command)

  def python_program(self, command: Command, args: list[str]) -> None:
    if args[:1] == ['-c']:
      return self.python(command, args[1])
    if args[:2] == ['-m', 'venv']:
      return self.checked.append((command, 'the virtual environment'))
    if args[:2] == ['-m', 'pytest']:
      paths = [a.split('::')[0] for a in args[2:] if not a.startswith('-') and '/' in a or a == 'tests']
      missing = [p for p in paths if not os.path.exists(os.path.join(REPO, p))]
      if missing:
        raise DocFailure(f'no such test file or folder: {", ".join(missing)}')
      return self.checked.append((command, 'the tests themselves'))
    raise DocFailure(f'the doc test does not know how to run `python {quote(args)}`')

  def pip(self, command: Command, args: list[str]) -> None:
    import tomllib
    if args[:1] != ['install']:
      raise DocFailure(f'the doc test knows only `pip install`, not `pip {quote(args)}`')
    extras = set(tomllib.load(open(os.path.join(REPO, 'pyproject.toml'), 'rb'))
                 ['project']['optional-dependencies'])
    for arg in args[1:]:
      wanted = re.fullmatch(r'\.\[([\w,-]+)\]', arg)
      if wanted and set(wanted.group(1).split(',')) - extras:
        raise DocFailure(f'pyproject.toml has no extra {set(wanted.group(1).split(",")) - extras}')
    self.checked.append((command, 'installs (checked: the extras exist)'))

  def cluster(self, command: Command, name: str, args: list[str]) -> None:
    """The vit-jax command inside a cluster command, checked for its flags."""
    inner = []
    if name == 'srun':
      start = next((i for i, a in enumerate(args) if program(args[i:])[0] == 'vit-jax'), None)
      inner = [program(args[start:])[1]] if start is not None else []
    elif name == 'sbatch':
      script = next((a for a in args if not a.startswith('-')), None)
      if not script or not os.path.isfile(script):
        raise DocFailure(f'no such batch script: {script}')
      positional = args[args.index(script) + 1:]
      line = next(line for line in open(script) if re.search(r'\bvit-jax train\b', line))
      words = doc_commands.split_commands(line.split('vit-jax', 1)[1].split('&')[0])[0]
      expanded = []
      for word in words:
        if word == '${@:3}':
          expanded += positional[2:]
        else:
          expanded.append(re.sub(r'\$(\d)', lambda m: positional[int(m.group(1)) - 1], word))
      inner = [expanded]
    elif name == 'gcloud':
      remote = flag_value(args, 'command') or ''
      inner = [program(c)[1] for c in doc_commands.split_commands(remote) if program(c)[0] == 'vit-jax']
    for argv in inner:
      self.parse(command, argv)
    self.checked.append((command, f'needs a cluster ({name}); {len(inner)} vit-jax command(s) checked'))


