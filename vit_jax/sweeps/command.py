"""`vit-jax sweep SWEEP.py --workdir DIR [--parallel N] [--plan] [--trial I] [--report_only] [--executor slurm ...]`.

Runs the trials of a sweep file (vit_jax/sweeps/sweep.py), resuming where a
previous call stopped, then writes its report (vit_jax/sweeps/report.py).
With --executor slurm each trial is a SLURM job (vit_jax/sweeps/slurm.py).
"""

import signal
import sys
from typing import Optional

from vit_jax import storage
from vit_jax.errors import ArgumentParser, UsageError
from vit_jax.sweeps import report, slurm, sweep as sweep_lib


def main(argv: Optional[list[str]] = None) -> int:
  parser = ArgumentParser(prog='vit-jax sweep', description='Run an ablation sweep file (see vit_jax/sweeps/sweep.py).')
  parser.add_argument('sweep', help='the sweep file, e.g. experiments/posemb.py')
  parser.add_argument('--workdir', required=True,
                      help='folder (or gs://BUCKET/PATH) of the trial workdirs and the report')
  parser.add_argument('--parallel', type=int, default=1, help='trials run at once (default 1)')
  parser.add_argument('--plan', action='store_true', help='list the trials and exit, running nothing')
  parser.add_argument('--trial', type=int, action='append',
                      help='run only this trial index (repeatable); no report is built')
  parser.add_argument('--report_only', action='store_true', help='only build the report')
  parser.add_argument('--executor', choices=('local', 'slurm'), default='local',
                      help='local: subprocesses here (default); slurm: one SLURM job array task per trial')
  slurm_flags = parser.add_argument_group('--executor slurm')
  slurm_flags.add_argument('--partition', help="the jobs' partition (default: the cluster's)")
  slurm_flags.add_argument('--time', help="each job's time limit, as sbatch takes it, e.g. 4:00:00")
  slurm_flags.add_argument('--gpus_per_task', type=int, default=0, help='GPUs per launcher process (default 0)')
  slurm_flags.add_argument('--nodes', type=int, default=1, help='nodes per trial, one process each (default 1)')
  slurm_flags.add_argument('--sbatch', action='append', default=[],
                           help='an extra sbatch option for the jobs, e.g. --sbatch=--account=NAME (repeatable)')
  slurm_flags.add_argument('--detach', action='store_true',
                           help='return after submitting; run the same command again for progress and the report')
  args = parser.parse_args(argv)
  slurm_options = slurm.Options(args.partition, args.time, args.gpus_per_task, args.nodes, tuple(args.sbatch))
  try:
    if args.parallel < 1:
      raise UsageError(f'--parallel {args.parallel}: use 1 or more.')
    storage.check_supported(args.workdir, '--workdir')
    if storage.is_url(args.workdir) and args.executor == 'slurm':
      raise UsageError(f'--workdir {args.workdir}: with --executor slurm the sweep folder must be a path that '
                       "every node sees (SLURM writes each job's output file there), not a URL; give the "
                       'trials a shared file system path, or run the sweep with --executor local.')
    if args.executor == 'local':
      defaults = slurm.Options()._asdict()
      given = [f'--{name}' for name, value in slurm_options._asdict().items() if value != defaults[name]]
      if given or args.detach:
        raise UsageError(f'{(given + ["--detach"])[0]} is an option of --executor slurm; add --executor slurm.')
    else:
      slurm.check_options(slurm_options)
    sweep = sweep_lib.load_sweep(args.sweep)
    bad = [i for i in args.trial or [] if not 0 <= i < len(sweep.trials)]
    if bad:
      raise UsageError(f'--trial {bad[0]}: the sweep has trials 0..{len(sweep.trials) - 1} (see --plan).')
    if storage.is_url(args.workdir) and not args.plan:  # A missing bucket or no permission: now, in one line.
      storage.check_writable(args.workdir, '--workdir')
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.plan:
    sweep_lib.print_plan(sweep, args.workdir)
    return 0
  outcomes, stop_signal = [], None
  if args.executor == 'slurm' and not args.report_only:
    try:
      outcomes = slurm.run_sweep(sweep, args.workdir, slurm_options, args.trial, args.detach)
    except UsageError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    if outcomes is None:  # Detached, with jobs under way.
      return 0
  elif not args.report_only:
    outcomes, stop_signal = sweep_lib.run_sweep(sweep, args.workdir, args.parallel, args.trial)
    if stop_signal is not None:
      print(f'Interrupted by {signal.Signals(stop_signal).name}: run the same command to resume.', flush=True)
      return 128 + stop_signal
  failed = [o for o in outcomes if o['status'] != 'finished']
  if not args.trial:
    print(report.build_report(sweep, args.workdir), flush=True)
  if failed:
    print(f'{len(failed)} trial(s) did not finish: ' + ', '.join(o['trial'].name for o in failed),
          file=sys.stderr)
    return 1
  return 0
