"""The body of a sweep's SLURM job: `python -m vit_jax.sweeps.slurm_job SWEEP_FILE WORKDIR`.

One task of the job array that vit_jax/sweeps/slurm.py submits is one trial
(the array index is the trial index). It runs the trial as a local sweep does
(vit_jax/sweeps/sweep.py's Runner: the same launcher command, workdir,
launcher.out/err, sweep_attempts.jsonl and sweep_done.json), with the launcher
under `srun` on every task of the job (with --multihost when there are
several).

Signals: SLURM's time-limit warning (`--signal=B:USR1@SECONDS`, sent to this
batch script) and SIGTERM (scancel, preemption, the time limit itself) are
passed to the launcher as SIGUSR1, which srun forwards to every process and
on which the launcher saves a checkpoint and exits. After the warning the job
puts itself back in the queue (`scontrol requeue`) and resumes from that
checkpoint when it starts again; after SIGTERM it does not (a cancelled or
timed-out trial is resubmitted by the next `vit-jax sweep` call; SLURM
requeues a preempted one itself).
"""

import os
import signal
import subprocess
import sys
from typing import Optional

from vit_jax.sweeps import sweep as sweep_lib


def main(argv: Optional[list[str]] = None) -> int:
  sweep_file, workdir = sys.argv[1:] if argv is None else argv
  sweep = sweep_lib.load_sweep(sweep_file)
  index = int(os.environ['SLURM_ARRAY_TASK_ID'])
  trial = sweep.trials[index]
  tasks = int(os.environ.get('SLURM_NTASKS', '1'))
  job = f'{os.environ["SLURM_ARRAY_JOB_ID"]}_{index}'
  restart = int(os.environ.get('SLURM_RESTART_COUNT', '0'))

  def under_srun(command: list[str]) -> list[str]:
    return ['srun', '--kill-on-bad-exit=1', f'--ntasks={tasks}', *command] + (['--multihost'] if tasks > 1 else [])

  print(f'job {job} (start {restart}): trial {index} {trial.name} in {workdir}, {tasks} task(s)', flush=True)
  runner = sweep_lib.Runner(sweep, workdir, 1, wrap=under_srun,
                            signals=(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1), forward=signal.SIGUSR1,
                            record={'slurm_job': job, 'slurm_restart': restart})
  outcome = runner.run([trial])[0]
  requeue = outcome['status'] == 'interrupted' and runner.stop_signal == signal.SIGUSR1
  print(f'job {job}: trial {outcome["status"]} at step {outcome.get("last_step", 0)}'
        + (' after the time-limit warning: requeueing' if requeue else ''), flush=True)
  if outcome['status'] == 'failed':
    print(outcome['stderr_tail'], file=sys.stderr, flush=True)
  if requeue:
    subprocess.run(['scontrol', 'requeue', os.environ['SLURM_JOB_ID']], check=False)
  return 0 if outcome['status'] == 'finished' else 1


if __name__ == '__main__':
  sys.exit(main())
