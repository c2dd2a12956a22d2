"""The launcher: `vit-jax train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`.

`python -m vit_jax.main ...` is the same command. Several processes (hosts)
join one run with --coordinator_address, --num_processes and --process_id,
or with --multihost where JAX detects the cluster itself (SLURM, TPU pods).
"""

import sys

from absl import flags

from vit_jax.config import files


def define_flags() -> None:
  """The launcher's flags; defined when it runs, so importing this module adds none."""
  files.define_config_flag('Config: a configs/*.py file (e.g. configs/quickstart.py, or '
                           'configs/image_folder.py:PATH), or a workdir config.json.')
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process run.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
  flags.DEFINE_integer('process_id', None, 'Index of this process, 0..num_processes-1.')
  flags.DEFINE_integer('distributed_timeout', 300, 'Seconds a process waits for the others of a '
                       'multi-process run to join before it gives up, naming what it waited for.')
  flags.DEFINE_bool('discard_damaged', False, 'If every checkpoint in --workdir is damaged, move them to '
                    'corrupt_checkpoints/ and start over from step 0 (without it, the run stops and says so).')
  flags.DEFINE_bool('multihost', False, 'Join a multi-process run detected from the environment (SLURM, TPU).')
  flags.DEFINE_string('stop_signals', 'TERM,INT,USR1', 'Signals that make the run save a checkpoint and exit '
                      '(a scheduler\'s preemption, cancel or time-limit warning, e.g. SLURM\'s --signal=USR1@300).')
  flags.DEFINE_integer(
      'cpu_devices', None, 'Split the CPU into this many JAX devices, each running the data-parallel '
      'step on its share of the batch (default $VIT_JAX_CPU_DEVICES or 1; see vit_jax/cpu/devices.py).')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> int:
  """Trains (or resumes) the run that the parsed flags describe; returns the exit status.

  0 when the run is finished, preemption.STOPPED_EXIT_CODE when a stop signal ended it before
  config.total_steps (run the same command to resume).
  """
  from vit_jax.cpu import devices as cpu_devices
  from vit_jax.errors import UsageError
  from vit_jax.training import loop, preemption, sharding, steps  # Here, so that --help does not load JAX.

  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}; every option is a --flag.')
  f = flags.FLAGS
  try:
    # Installed before any other work, taking over a signal caught since the process started (cli.run).
    with preemption.StopRequest(preemption.parse_signals(f.stop_signals)) as stop:
      cpu_devices.split_cpu(f.cpu_devices)  # Before JAX creates its CPU backend.
      sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                                      auto=f.multihost, timeout_s=f.distributed_timeout)
      with stop:  # Installed again: JAX's distributed client has taken SIGTERM for itself.
        loop.train_and_evaluate(f.config, f.workdir, stop=stop, discard_damaged=f.discard_damaged)
  except steps.DivergenceError as e:
    raise UsageError(str(e)) from None
  return 0 if stop.stopped_at is None else preemption.STOPPED_EXIT_CODE


if __name__ == '__main__':
  from vit_jax import cli
  sys.exit(cli.main(['train'] + sys.argv[1:]))
