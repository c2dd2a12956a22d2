"""Ablation sweeps: `vit-jax sweep experiments/NAME.py --workdir DIR`.

A sweep file is plain Python with these module-level names:

  BASE_CONFIG = 'configs/quickstart.py'  # Config file every trial starts from (relative to the repo root).
  OVERRIDES = {'total_steps': 500}       # Optional: applied to every trial.
  GRID = {'model.pool': ['token', 'gap'], 'optimizer.learning_rate': [3e-4, 1e-3]}  # Optional: a grid.
  TRIALS = [{'model.variant': 'Ti/8', 'model.hidden_size': 192}, ...]  # Optional: explicit points.
  SEEDS = 2                # Seeds per point: config.seed + 0, 1, ...; or an explicit list of seeds.
  METRIC = 'eval/accuracy' # A metrics.jsonl key; its value at the last step is the trial's result.
  MODE = 'max'             # Whether larger ('max') or smaller ('min') METRIC is better.

Keys are config keys, with or without a leading `config.`. The points are
every TRIALS entry (default: one empty entry) combined with every GRID
combination (default: one empty combination), and each point runs once per
seed. A trial is the real launcher in a subprocess,

  python -m vit_jax.main --config BASE_CONFIG --workdir DIR/NAME --config.KEY=VALUE ...

in its own workdir named after the point's overrides and seed (for example
`DIR/model.pool=gap,optimizer.learning_rate=0.0003,seed=1`). When the launcher
exits 0 and metrics.jsonl reaches config.total_steps, the sweep writes
`sweep_done.json` there; a re-run skips such trials and re-launches the others,
which resume from their last checkpoint. DIR may be a `gs://BUCKET/...` URL
(vit_jax/storage.py): the trials' workdirs, done files and report are then
objects there, and each launcher run's output is uploaded to its
launcher.out/err when the run ends. SIGTERM or Ctrl-C is passed on to the
running trials (they save a checkpoint and stop). A failed trial is reported
with the tail of its stderr and the others go on; the exit code is then 1.

Flags: --plan (list the trials and exit), --parallel N (trials at once),
--trial I (only trial I; repeatable; for a scheduler fanning out),
--report_only (only rebuild the report), --executor slurm (each trial a
SLURM job, vit_jax/sweeps/slurm.py). The report (results.csv,
results.md and PNGs, see vit_jax/sweep_report.py) is written into DIR.
"""

import concurrent.futures
import hashlib
import itertools
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import ml_collections

from vit_jax import storage
from vit_jax.config import files
from vit_jax.errors import UsageError
from vit_jax.training import preemption  # Its exit status only; it loads no JAX.

DONE_FILE = 'sweep_done.json'  # Written into a trial's workdir once it has finished.
ATTEMPTS_FILE = 'sweep_attempts.jsonl'  # One row per launcher run of the trial (wall time, exit code).
STDOUT_FILE, STDERR_FILE = 'launcher.out', 'launcher.err'  # The launcher's output, appended per run.
SWEEP_NAMES = {'BASE_CONFIG', 'OVERRIDES', 'GRID', 'TRIALS', 'SEEDS', 'METRIC', 'MODE'}
_ABSL_NOISE = re.compile(r'I\d{4} |WARNING: All log messages before absl::InitializeLog')
MAX_NAME_LENGTH = 200  # Folder names stay well under the usual 255-byte limit.


class Trial(NamedTuple):
  index: int
  name: str  # The sub-workdir: the point's overrides and the seed.
  point: dict[str, Any]  # The overrides that distinguish this point (no seed, no OVERRIDES).
  seed: int
  overrides: dict[str, Any]  # Everything passed to the launcher: OVERRIDES, point, seed.


class Sweep(NamedTuple):
  path: str
  base_config: str
  trials: list[Trial]
  metric: str
  mode: str
  points: list[dict[str, Any]]


def _strip(overrides: dict, where: str) -> dict[str, Any]:
  if not isinstance(overrides, dict):
    raise UsageError(f'{where} must be a dict of config key -> value, got {overrides!r}.')
  return {(k[len('config.'):] if k.startswith('config.') else k): v for k, v in overrides.items()}


def format_value(value: Any) -> str:
  """The text of `--config.KEY=TEXT` that the launcher parses back into `value`."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (list, tuple)):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return repr(value) if isinstance(value, float) else str(value)


def trial_name(point: dict[str, Any], seed: int) -> str:
  """A filesystem-safe folder name: `key=value,...,seed=S` (characters outside [\\w.=,+-] become '_')."""
  text = ','.join([f'{k}={format_value(v)}' for k, v in point.items()] + [f'seed={seed}'])
  text = re.sub(r'[^\w.=,+-]', '_', text)
  if len(text) > MAX_NAME_LENGTH:  # Keep it unique: a short hash of the full text.
    text = text[:MAX_NAME_LENGTH - 9] + '~' + hashlib.sha1(text.encode()).hexdigest()[:8]
  return text


def load_config(base_config: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (`path` or `path:argument`, as the launcher takes), locked."""
  path, _ = files.split_argument(base_config)
  if not os.path.isfile(path):
    raise UsageError(f'BASE_CONFIG {base_config!r}: no such file (paths are relative to the repo '
                     f'root, where the sweep runs; cwd is {os.getcwd()}).')
  try:
    return files.load_config(base_config)
  except UsageError as e:
    raise UsageError(f'BASE_CONFIG: {e}') from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets `key: value` on the locked `config`, as the launcher would; raises UsageError on bad ones."""
  for key, value in overrides.items():
    if value is None:
      raise UsageError(f'config.{key}=None: the launcher cannot take None on its command line; give '
                       'the value explicitly (e.g. the hidden size the variant would use).')
    unknown = files.unknown_key(config, key)
    if unknown:  # One short line, not the whole config that ml_collections' KeyError holds.
      raise UsageError(f'config.{key}={value!r} does not fit the config: {unknown}.')
    *parents, leaf = key.split('.')
    node = config
    try:
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise UsageError(f'config.{key}={value!r} does not fit the config ({e}); see vit_jax/config/defaults.py '
                       'for every key and its type.') from None


def load_sweep(path: str) -> Sweep:
  """Reads and checks a sweep file; every trial's overrides are tried on the base config."""
  if not os.path.isfile(path):
    raise UsageError(f'No sweep file {path!r}; pass one of experiments/*.py.')
  try:
    names = {k: v for k, v in runpy.run_path(path).items() if k.isupper()}
  except SyntaxError as e:
    raise UsageError(f'Sweep file {path!r} does not parse: {e.msg} (line {e.lineno}).') from None
  except Exception as e:  # Its imports or top-level code.
    raise UsageError(f'Sweep file {path!r} does not run: {type(e).__name__}: '
                     f'{" ".join(str(e).split())[:300]}.') from None
  unknown = set(names) - SWEEP_NAMES
  if unknown:
    raise UsageError(f'{path}: unknown names {sorted(unknown)}; a sweep file sets '
                     f'{", ".join(sorted(SWEEP_NAMES))}.')
  if 'BASE_CONFIG' not in names or not ('GRID' in names or 'TRIALS' in names):
    raise UsageError(f'{path} must set BASE_CONFIG and at least one of GRID or TRIALS.')
  mode = names.get('MODE', 'max')
  if mode not in ('max', 'min'):
    raise UsageError(f"{path}: MODE={mode!r}; use 'max' or 'min'.")
  shared = _strip(names.get('OVERRIDES', {}), 'OVERRIDES')
  grid = _strip(names.get('GRID', {}), 'GRID')
  for key, values in grid.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise UsageError(f'GRID[{key!r}] must be a non-empty list of values, got {values!r}.')
  combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  entries = [_strip(t, f'TRIALS[{i}]') for i, t in enumerate(names.get('TRIALS', [{}]))]
  points = []
  for entry in entries:
    for combo in combos:
      if set(entry) & set(combo):
        raise UsageError(f'{path}: TRIALS entry {entry} and GRID both set {sorted(set(entry) & set(combo))}.')
      points.append({**entry, **combo})

  base_seed = load_config(names['BASE_CONFIG']).seed
  seeds = names.get('SEEDS', 1)
  seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [base_seed + i for i in range(seeds)]
  if not seeds or any(not isinstance(s, int) for s in seeds):
    raise UsageError(f'{path}: SEEDS={names.get("SEEDS")!r}; use a positive count or a list of ints.')
  if any('seed' in p for p in points) or 'seed' in shared:
    raise UsageError(f'{path}: set seeds with SEEDS, not as an override of config.seed.')

  trials = []
  for point in points:
    for seed in seeds:
      overrides = {**shared, **point, 'seed': seed}
      apply_overrides(load_config(names['BASE_CONFIG']), overrides)  # Fails here, not mid-sweep.
      trials.append(Trial(len(trials), trial_name(point, seed), point, seed, overrides))
  duplicates = {t.name for t in trials if [u.name for u in trials].count(t.name) > 1}
  if duplicates:
    raise UsageError(f'{path}: several trials share the workdir name(s) {sorted(duplicates)}; '
                     'make the points differ.')
  return Sweep(path, names['BASE_CONFIG'], trials, names.get('METRIC', 'eval/accuracy'), mode, points)


def trial_config(sweep: Sweep, trial: Trial) -> ml_collections.ConfigDict:
  """The config the launcher runs for `trial`."""
  config = load_config(sweep.base_config)
  apply_overrides(config, trial.overrides)
  return config


def launch_command(sweep: Sweep, trial: Trial, workdir: str) -> list[str]:
  """The launcher's command line for `trial`."""
  return [sys.executable, '-m', 'vit_jax.main', '--config', sweep.base_config,
          '--workdir', storage.join(storage.absolute(workdir), trial.name),
          *[f'--config.{k}={format_value(v)}' for k, v in trial.overrides.items()]]


def is_finished(sweep: Sweep, trial: Trial, workdir: str) -> bool:
  """Whether `trial` finished with its current overrides (its done file says so)."""
  path = storage.join(workdir, trial.name, DONE_FILE)
  if not storage.isfile(path):
    return False
  done = json.loads(storage.read_text(path))
  # JSON turns tuples into lists: compare both sides in their JSON form.
  return (done.get('base_config'), done.get('overrides')) == (
      sweep.base_config, json.loads(json.dumps(trial.overrides)))


def last_step(trial_dir: str) -> int:
  """The largest step in `trial_dir/metrics.jsonl` (0 if none)."""
  from vit_jax.tools import plots  # Only its reader.
  try:
    return max((row['step'] for row in plots.read_metrics(trial_dir)), default=0)
  except UsageError:
    return 0


def trial_status(returncode: int, reached: int, total_steps: int, stopped: bool, saved_last: bool) -> str:
  """'finished', 'failed' or 'interrupted': how a launcher run of a trial ended. `reached` is the last
  step in its metrics, `stopped` whether the sweep passed a stop signal on, `saved_last` whether the
  checkpoint of `total_steps` exists."""
  # A signal that came after the last step had trained, evaluated and saved changed nothing.
  if reached >= total_steps and (not returncode or (stopped and saved_last)):
    return 'finished'
  if returncode and not stopped and returncode != preemption.STOPPED_EXIT_CODE:
    return 'failed'
  return 'interrupted'  # Stopped by a signal: saved (or had nothing new to save), or died of it.


def progress_line(chosen: int, skipped: int, todo: int, parallel: int, workdir: str) -> str:
  at_once = f', {min(parallel, todo)} at a time (--parallel {parallel})' if todo else ''
  return f'{chosen} trials: {skipped} already finished (skipped), {todo} to run{at_once}, in {workdir}.'


class Runner:
  """Runs trials in subprocesses, `parallel` at a time; forwards SIGTERM/SIGINT (or `signals`) to them.

  A SLURM job's runner (vit_jax/sweeps/slurm_job.py) changes what it does:
  `wrap` turns the launcher's command line into the one to run (under
  `srun`), `signals` are the ones it takes, `forward` the one it passes on
  (one the launcher stops on) and `record` goes into each attempt's row.
  """

  def __init__(self, sweep: Sweep, workdir: str, parallel: int,
               wrap: Callable[[list[str]], list[str]] = lambda command: command,
               signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), forward: int = signal.SIGTERM,
               record: Optional[dict[str, Any]] = None):
    self.sweep, self.workdir, self.parallel = sweep, workdir, parallel
    self.wrap, self.signals, self.forward, self.record = wrap, tuple(signals), forward, record or {}
    self.stop_signal: Optional[int] = None
    self._running: set[subprocess.Popen] = set()
    self._lock = threading.Lock()

  def _handle(self, signum, frame) -> None:
    del frame
    self.stop_signal = signum
    with self._lock:
      for process in self._running:
        process.send_signal(self.forward)  # The launcher saves a checkpoint and exits.

  def run_trial(self, trial: Trial) -> dict:
    """Launches `trial` once; returns its outcome: finished, failed, interrupted or not started."""
    trial_dir = storage.join(self.workdir, trial.name)
    total_steps = trial_config(self.sweep, trial).total_steps
    command = launch_command(self.sweep, trial, self.workdir)
    # The launcher appends its output to files: the trial's own, or local ones uploaded when it ends
    # (an object in a bucket cannot be appended to by another process).
    remote = storage.is_url(trial_dir)
    with self._lock:
      if self.stop_signal is not None:
        return {'trial': trial, 'status': 'not started'}
      storage.makedirs(trial_dir)
      log_dir = tempfile.mkdtemp(prefix='vit_jax_trial_') if remote else trial_dir
      err_path = os.path.join(log_dir, STDERR_FILE)
      err_offset = os.path.getsize(err_path) if os.path.exists(err_path) else 0
      start = time.time()
      with open(os.path.join(log_dir, STDOUT_FILE), 'a') as out, open(err_path, 'a') as err:
        process = subprocess.Popen(self.wrap(command), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
      self._running.add(process)
    returncode = process.wait()
    with self._lock:
      self._running.discard(process)
    wall_s = time.time() - start
    with open(err_path, errors='replace') as f:
      f.seek(err_offset)
      lines = f.read().strip().split('\n')
    if remote:
      for name in (STDOUT_FILE, STDERR_FILE):
        with open(os.path.join(log_dir, name), errors='replace') as f:
          storage.append_text(storage.join(trial_dir, name), f.read())
      shutil.rmtree(log_dir, ignore_errors=True)
    reached = last_step(trial_dir)
    saved_last = storage.isdir(storage.join(trial_dir, 'checkpoints', str(total_steps)))
    status = trial_status(returncode, reached, total_steps, self.stop_signal is not None, saved_last)
    storage.append_text(storage.join(trial_dir, ATTEMPTS_FILE), json.dumps({
        'start': start, 'wall_s': wall_s, 'returncode': returncode, 'last_step': reached, 'status': status,
        **self.record}) + '\n')
    if status == 'finished':
      storage.write_text(storage.join(trial_dir, DONE_FILE), json.dumps({
          'base_config': self.sweep.base_config, 'overrides': trial.overrides, 'command': command,
          'total_steps': total_steps, 'finished': time.strftime('%Y-%m-%d %H:%M:%S')}, indent=2))
    # TensorFlow's start-up INFO lines (absl format `I0000 ...`) would bury the error.
    tail = [line for line in lines if not _ABSL_NOISE.match(line)][-15:]
    return {'trial': trial, 'status': status, 'wall_s': wall_s, 'returncode': returncode,
            'last_step': reached, 'stderr_tail': '\n'.join(tail)}

  def run(self, trials: Sequence[Trial]) -> list[dict]:
    """Runs `trials`, printing a line as each ends; stops launching new ones after a signal."""
    previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
    outcomes = []
    try:
      with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
        pending = {pool.submit(self.run_trial, t) for t in trials}
        while pending:
          done, pending = concurrent.futures.wait(pending, timeout=1.0,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
          for future in done:
            outcome = future.result()
            outcomes.append(outcome)
            print_outcome(outcome, len(outcomes), len(trials))
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    return sorted(outcomes, key=lambda o: o['trial'].index)


def print_outcome(outcome: dict, done: int, count: int) -> None:
  """`[3/6 run] trial 4 NAME: finished ...`: how many of this call's trials have ended, and the trial's
  index as --plan and --trial name it."""
  trial, status = outcome['trial'], outcome['status']
  line = f'[{done}/{count} run] trial {trial.index} {trial.name}: {status}'
  if 'wall_s' in outcome:
    line += f' after {outcome["wall_s"]:.0f} s (step {outcome["last_step"]})'
  if status == 'failed':
    line += (f', launcher exit code {outcome["returncode"]}; end of its stderr:\n    '
             + outcome['stderr_tail'].replace('\n', '\n    '))
  print(line, flush=True)


def prepare_datasets(sweep: Sweep) -> None:
  """Prepares shipped datasets once, so that trials running side by side never race to do it."""
  from vit_jax.data import pipeline
  seen = set()
  for trial in sweep.trials:
    dataset = trial_config(sweep, trial).dataset
    if dataset.name in pipeline.SHIPPED_BUILDERS and (dataset.name, dataset.data_dir) not in seen:
      seen.add((dataset.name, dataset.data_dir))
      pipeline.get_builder(dataset)


def print_plan(sweep: Sweep, workdir: str) -> None:
  print(f'{len(sweep.trials)} trials of {sweep.base_config} ({sweep.path}), metric {sweep.metric} '
        f'({sweep.mode}), workdir {workdir}:')
  for trial in sweep.trials:
    state = 'finished' if is_finished(sweep, trial, workdir) else (
        'started' if storage.isdir(storage.join(workdir, trial.name)) else 'new')
    print(f'{trial.index:4d}  {trial.name}  [{state}]\n      '
          + ' '.join(f'--config.{k}={format_value(v)}' for k, v in trial.overrides.items()))


def run_sweep(sweep: Sweep, workdir: str, parallel: int = 1,
              only: Optional[Sequence[int]] = None) -> tuple[list[dict], Optional[int]]:
  """Runs the unfinished trials (all, or those indexed by `only`).

  Returns the outcomes (finished ones skipped count as 'finished') and the
  signal that interrupted the sweep, if any.
  """
  chosen = [sweep.trials[i] for i in only] if only else sweep.trials
  skipped = [t for t in chosen if is_finished(sweep, t, workdir)]
  todo = [t for t in chosen if t not in skipped]
  print(progress_line(len(chosen), len(skipped), len(todo), parallel, workdir), flush=True)
  storage.makedirs(workdir)
  if parallel > 1 and len(todo) > 1:
    prepare_datasets(sweep)
  runner = Runner(sweep, workdir, parallel)
  outcomes = [{'trial': t, 'status': 'finished', 'skipped': True} for t in skipped] + runner.run(todo)
  return sorted(outcomes, key=lambda o: o['trial'].index), runner.stop_signal
