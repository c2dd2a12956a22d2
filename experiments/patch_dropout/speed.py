"""Training speed of the token-dropping study's trials, side by side in one process.

    python experiments/patch_dropout/speed.py [ROUNDS] [STEPS]      (defaults 12 rounds of 20 steps)

Builds the train step of each trial of experiments/patch_dropout.py (its exact
config, through the launcher's `vit_jax.training.setup` and XLA:CPU scheduler
choice) on one batch of the digits from the launcher's input pipeline, warms
each up, then times ROUNDS rounds in which every rate runs STEPS steps, the
order reversed every other round, so the machine's drift and other processes'
load hit all rates alike. Per rate it prints the median wall img/s (min and max
over rounds), its speed relative to rate 0 (the median over rounds of the two
rates' ratio within a round), and the process's CPU seconds per image (user +
system; median over rounds), which other processes' load changes far less than
the wall clock; and the load average (/proc/loadavg, 1 min) over the run. The
input pipeline is not timed: the step alone, as `vit-jax benchmark` times it.
"""
import os
import resource
import statistics
import sys
import time

from vit_jax.cpu import hostmem

hostmem.retain_freed_memory()  # As the launcher does, before JAX starts.

import jax  # noqa: E402

from vit_jax.cpu import scheduler  # noqa: E402
from vit_jax.data import pipeline  # noqa: E402
from vit_jax.sweeps import sweep as sweep_lib  # noqa: E402
from vit_jax.training import setup as setup_lib, sharding  # noqa: E402

STUDY = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'patch_dropout.py')


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def load_average() -> float:
  with open('/proc/loadavg') as f:
    return float(f.read().split()[0])


class Arm:
  """One trial's compiled train step, its state and a fixed batch."""

  def __init__(self, sweep, trial):
    config = sweep_lib.trial_config(sweep, trial)
    self.rate, self.batch_size = config.model.patch_dropout, config.batch_size
    mesh = sharding.make_mesh(config)
    run = setup_lib.setup(config, mesh)
    split = pipeline.open_split(config.dataset, config.dataset.train_split)
    self.batch = sharding.global_batch(next(pipeline.train_iterator(config, split, 0)), run.batch_sharding)
    init_rng, self.rng = setup_lib.seed_rngs(config)
    self.state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(init_rng)
    start = time.perf_counter()
    self.step = scheduler.compile_within_memory(
        run.step_fn.lower(self.state, self.batch, self.rng), platform=jax.devices()[0].platform,
        local_devices=len(mesh.local_devices), choice=config.cpu_scheduler).program
    self.compile_seconds = time.perf_counter() - start
    self.run(5)  # Warm-up: first-call allocations and thread start-up.
    self.wall, self.cpu = [], []

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))

  def timed(self, steps: int) -> None:
    cpu, start = cpu_seconds(), time.perf_counter()
    self.run(steps)
    seconds = time.perf_counter() - start
    self.wall.append(steps * self.batch_size / seconds)
    self.cpu.append((cpu_seconds() - cpu) / (steps * self.batch_size))


def main() -> None:
  rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
  steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
  sweep = sweep_lib.load_sweep(STUDY)
  arms = []
  for trial in sweep.trials:
    arms.append(Arm(sweep, trial))
    print(f'built patch_dropout={arms[-1].rate}: compile {arms[-1].compile_seconds:.1f} s', flush=True)
  loads = [load_average()]
  for i in range(rounds):
    for arm in arms if i % 2 == 0 else arms[::-1]:
      arm.timed(steps)
    loads.append(load_average())
    print(f'round {i}: ' + ', '.join(f'{a.rate}: {a.wall[-1]:.0f} img/s {a.cpu[-1] * 1e3:.2f} CPU ms/img'
                                    for a in arms)
          + f'; load {loads[-1]:.1f}', flush=True)
  base = arms[0]
  print(f'\n{rounds} rounds x {steps} steps of batch {base.batch_size} per rate; load average (1 min) '
        f'{min(loads):.1f}..{max(loads):.1f}, median {statistics.median(loads):.1f}')
  print('| model.patch_dropout | img/s, median (min-max) | speed vs 0, paired (min-max) | CPU ms / image '
        '| CPU speed vs 0, paired |')
  print('| --- | --- | --- | --- | --- |')
  for arm in arms:
    speed = [a / b for a, b in zip(arm.wall, base.wall)]  # Within each round: the same load.
    cpu_speed = [b / a for a, b in zip(arm.cpu, base.cpu)]
    print(f'| `{arm.rate}` | {statistics.median(arm.wall):.0f} ({min(arm.wall):.0f}-{max(arm.wall):.0f}) '
          f'| {statistics.median(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f}) '
          f'| {statistics.median(arm.cpu) * 1e3:.2f} | {statistics.median(cpu_speed):.2f}x |')


if __name__ == '__main__':
  main()
