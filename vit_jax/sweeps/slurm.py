"""Sweeps on SLURM: `vit-jax sweep FILE --workdir DIR --executor slurm [--partition P] [--time T] ...`.

Every unfinished trial becomes one task of a job array (the trials of a sweep
ask for the same resources, so one `sbatch --array=I,J,...` submits them all),
and each task runs `python -m vit_jax.sweeps.slurm_job`: the trial's launcher
under `srun`, in the same workdir layout as a local sweep. SLURM warns a job
300 s before its time limit; the trial saves a checkpoint and the job requeues
itself (vit_jax/sweeps/slurm_job.py).

Plain `sbatch`, `squeue` and `scancel`, no library: what is submitted is a
script anyone can read (DIR/slurm/submit-N.sbatch), and no accounting
database (`sacct`) is needed. Each submission is a row of DIR/slurm_jobs.jsonl
(job id, trials); a trial's state comes from its workdir (sweep_done.json,
sweep_attempts.jsonl, whose rows name the job) and `squeue` for jobs still
queued, running or ending. Calling the same command again reports that
progress, resubmits the trials that failed, were cancelled, timed out or
vanished (never ran, or dropped from the queue), and leaves queued and
running ones alone. Without --detach the command waits for its jobs and then
writes the same report as a local sweep.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import NamedTuple, Optional, Sequence

from vit_jax.errors import UsageError
from vit_jax.sweeps import sweep as sweep_lib

JOBS_FILE = 'slurm_jobs.jsonl'  # In the sweep's workdir: one row per submission.
SCRIPTS_DIR = 'slurm'  # In the sweep's workdir: the submitted scripts and each array task's output.
# squeue's states of a job that will not run again; every other state (pending, running, completing,
# requeued, suspended, ...) is a job still under way.
ENDED_STATES = frozenset({'COMPLETED', 'CANCELLED', 'FAILED', 'TIMEOUT', 'NODE_FAIL', 'PREEMPTED',
                          'OUT_OF_MEMORY', 'BOOT_FAIL', 'DEADLINE'})
RESUBMIT = ('new', 'failed', 'interrupted', 'vanished')  # Trial states that get a job.
POLL_S = 10.0  # How often a waiting command asks squeue.
WARNING_S = 300  # The time-limit warning's lead (`--signal=B:USR1@300`); SLURM may send it up to 30 s earlier.


class Options(NamedTuple):
  """What each trial's job asks SLURM for (sbatch options)."""
  partition: Optional[str] = None
  time: Optional[str] = None  # sbatch --time, e.g. '4:00:00'.
  gpus_per_task: int = 0
  nodes: int = 1  # Per trial: one launcher process (task) per node.
  sbatch: Sequence[str] = ()  # Extra sbatch options, e.g. '--account=abc' or '#SBATCH --qos=high'.


def check_options(options: Options) -> None:
  """UsageError for options sbatch would refuse later."""
  if options.nodes < 1:
    raise UsageError(f'--nodes {options.nodes}: a trial runs on 1 or more nodes.')
  if options.gpus_per_task < 0:
    raise UsageError(f'--gpus_per_task {options.gpus_per_task}: use 0 (CPU) or more.')
  for line in options.sbatch:
    if not line.removeprefix('#SBATCH').strip().startswith('-'):
      raise UsageError(f'--sbatch {line!r}: give an sbatch option such as --account=NAME or --qos=high.')


def _tool(name: str) -> str:
  path = shutil.which(name)
  if not path:
    raise UsageError(f'--executor slurm: {name} is not on PATH; run the sweep on a SLURM login node, or '
                     'use --executor local.')
  return path


def queue() -> dict[str, str]:
  """{job id: state} of every job squeue lists (array tasks as `ARRAYID_INDEX`), ended ones included."""
  result = subprocess.run([_tool('squeue'), '-h', '-r', '--states=all', '-o', '%i %T'], capture_output=True,
                          text=True, timeout=120)
  if result.returncode:
    raise UsageError(f'squeue failed (exit code {result.returncode}): {result.stderr.strip()}')
  return dict(line.split()[:2] for line in result.stdout.splitlines() if len(line.split()) >= 2)


def _read_rows(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_jobs(workdir: str) -> dict[int, str]:
  """{trial index: the job id of its last submission}, from DIR/slurm_jobs.jsonl."""
  jobs = {}
  for row in _read_rows(os.path.join(workdir, JOBS_FILE)):
    jobs.update({index: f'{row["job"]}_{index}' for index in row['trials']})
  return jobs


def trial_states(sweep: sweep_lib.Sweep, workdir: str, trials: Sequence[sweep_lib.Trial],
                 jobs: dict[int, str], queued: dict[str, str]) -> dict[int, str]:
  """{trial index: state}: finished, a queue state in lower case (pending, running, ...) while its job is
  under way, else what its last job left: failed, interrupted (stopped after saving), vanished (no attempt),
  or new (never submitted)."""
  states = {}
  for trial in trials:
    job = jobs.get(trial.index)
    if sweep_lib.is_finished(sweep, trial, workdir):
      states[trial.index] = 'finished'
    elif job is None:
      states[trial.index] = 'new'
    elif job in queued and queued[job] not in ENDED_STATES:
      states[trial.index] = queued[job].lower()
    else:
      attempts = [row for row in _read_rows(os.path.join(workdir, trial.name, sweep_lib.ATTEMPTS_FILE))
                  if row.get('slurm_job') == job]
      states[trial.index] = attempts[-1]['status'] if attempts else 'vanished'
  return states


def job_script(sweep: sweep_lib.Sweep, workdir: str, options: Options, trials: Sequence[sweep_lib.Trial]) -> str:
  """The sbatch script of one job array: one task per trial, its index the trial's."""
  workdir = os.path.abspath(workdir)
  name = 'vit-jax-sweep-' + os.path.splitext(os.path.basename(sweep.path))[0]
  lines = ['#!/bin/bash', f'# {len(trials)} trial(s) of {sweep.path}; written by vit-jax sweep --executor slurm.',
           f'#SBATCH --job-name={name}', '#SBATCH --array=' + ','.join(str(t.index) for t in trials),
           f'#SBATCH --nodes={options.nodes}', '#SBATCH --ntasks-per-node=1']
  if options.gpus_per_task:
    lines.append(f'#SBATCH --gpus-per-task={options.gpus_per_task}')
  if options.partition:
    lines.append(f'#SBATCH --partition={options.partition}')
  if options.time:
    lines.append(f'#SBATCH --time={options.time}')
  lines += [f'#SBATCH --signal=B:USR1@{WARNING_S}', '#SBATCH --requeue', '#SBATCH --open-mode=append',
            f'#SBATCH --output={os.path.join(workdir, SCRIPTS_DIR, "%A_%a.out")}', f'#SBATCH --chdir={os.getcwd()}']
  lines += ['#SBATCH ' + line.removeprefix('#SBATCH').strip() for line in options.sbatch]  # Last: they win.
  lines.append(shlex.join(['exec', sys.executable, '-m', 'vit_jax.sweeps.slurm_job',
                           os.path.abspath(sweep.path), workdir]))
  return '\n'.join(lines) + '\n'


def submit(sweep: sweep_lib.Sweep, workdir: str, options: Options, trials: Sequence[sweep_lib.Trial]) -> str:
  """Submits `trials` as one job array; returns its job id."""
  folder = os.path.join(workdir, SCRIPTS_DIR)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f'submit-{len(_read_rows(os.path.join(workdir, JOBS_FILE)))}.sbatch')
  with open(path, 'w') as f:
    f.write(job_script(sweep, workdir, options, trials))
  result = subprocess.run([_tool('sbatch'), '--parsable', path], capture_output=True, text=True, timeout=120)
  if result.returncode:
    raise UsageError(f'sbatch {path} failed (exit code {result.returncode}): {" ".join(result.stderr.split())}')
  job = result.stdout.strip().split(';')[0]  # `ID` or `ID;CLUSTER`.
  with open(os.path.join(workdir, JOBS_FILE), 'a') as f:
    f.write(json.dumps({'job': job, 'trials': [t.index for t in trials], 'script': path,
                        'submitted': time.strftime('%Y-%m-%d %H:%M:%S')}) + '\n')
  return job


def _summary(states: dict[int, str]) -> str:
  counts: dict[str, int] = {}
  for state in states.values():
    counts[state] = counts.get(state, 0) + 1
  return ', '.join(f'{n} {state}' for state, n in counts.items())


def run_sweep(sweep: sweep_lib.Sweep, workdir: str, options: Options, only: Optional[Sequence[int]] = None,
              detach: bool = False) -> Optional[list[dict]]:
  """Reports progress, submits the trials that need a job and, unless `detach`, waits for them all.

  Returns the outcomes ({'trial', 'status'}, as the local runner's) once no job is under way, or None
  when jobs are still queued or running (after --detach, or Ctrl-C while waiting).
  """
  check_options(options)
  chosen = [sweep.trials[i] for i in only] if only else sweep.trials
  os.makedirs(workdir, exist_ok=True)
  jobs = last_jobs(workdir)
  states = trial_states(sweep, workdir, chosen, jobs, queue())
  print(f'{len(chosen)} trials in {workdir}: {_summary(states)}.', flush=True)
  todo = [t for t in chosen if states[t.index] in RESUBMIT]
  if todo:
    job = submit(sweep, workdir, options, todo)
    for t in todo:
      jobs[t.index] = f'{job}_{t.index}'
      if states[t.index] != 'new':
        print(f'  resubmitting trial {t.index} {t.name} ({states[t.index]})', flush=True)
    print(f'Submitted job array {job}: trial(s) {",".join(str(t.index) for t in todo)} '
          f'({os.path.join(workdir, SCRIPTS_DIR)}).', flush=True)
  under_way = lambda states: [i for i, s in states.items() if s not in RESUBMIT + ('finished',)]  # noqa: E731
  states = trial_states(sweep, workdir, chosen, jobs, queue())
  if detach and under_way(states):
    print(f'{len(under_way(states))} job(s) under way; run the same command again for their progress and, '
          'once they have all ended, the report.', flush=True)
    return None
  try:
    while under_way(states):
      time.sleep(POLL_S)
      previous, states = states, trial_states(sweep, workdir, chosen, jobs, queue())
      for t in chosen:
        if states[t.index] != previous[t.index] and states[t.index] not in ('running', 'completing'):
          print(f'[{t.index + 1}/{len(sweep.trials)}] {t.name}: {states[t.index]} (job {jobs[t.index]})',
                flush=True)
  except KeyboardInterrupt:  # Ctrl-C stops the waiting, not the jobs.
    print('Stopped waiting; the jobs go on: run the same command again for their progress.', flush=True)
    return None
  return [{'trial': t, 'status': states[t.index]} for t in chosen]
