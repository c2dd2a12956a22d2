"""A/B of the CPU train step's rules (docs/performance.md): the launcher's train step (or forward
pass) built once per arm in one process, the arms' timed runs alternating.

    python experiments/cpu_rules/ab.py VARIANT DTYPE MODE BATCH ROUNDS STEPS ARM [ARM ...]
    python experiments/cpu_rules/ab.py B/16 float32 train 8 8 1 none dense_backward \
        attention_backward dense_backward+attention_backward
    SIZE=384 python experiments/cpu_rules/ab.py Ti/16 float32 train 8 8 2 none attention_backward

An arm is `none` or rule names of `vit_jax.training.platform.CPU_RULES` joined by '+'. Per round
and arm it prints wall img/s and the process's CPU seconds per image (user + system), which
other processes' load changes far less than the wall clock; then medians and ratios.
"""
import os
import resource
import statistics
import sys
import time

from vit_jax.training import platform
from vit_jax.bench import workload
workload.MAX_WARMUP_STEPS = 2

variant, dtype, mode, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rounds, steps = int(sys.argv[5]), int(sys.argv[6])
arms = [tuple(a.split('+')) if a != 'none' else () for a in sys.argv[7:]]
built = []
for rules in arms:
  platform.CPU_RULES = rules
  start = time.perf_counter()
  w = workload.Workload(variant, int(os.environ.get('SIZE', 224)), batch, dtype, mode, loop='launcher')
  print(f'built {rules or "plain"} in {time.perf_counter() - start:.0f} s (compile {w.compile_seconds:.0f} s)', flush=True)
  built.append(('+'.join(rules) or 'plain', w))
wall = {name: [] for name, _ in built}
cpu = {name: [] for name, _ in built}
for i in range(rounds):
  for name, w in (built if i % 2 == 0 else built[::-1]):
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = w.run(steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    wall[name].append(steps * batch / seconds)
    cpu[name].append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / (steps * batch))
  print(i, {k: (round(wall[k][-1], 3), round(cpu[k][-1], 3)) for k in wall}, flush=True)
base = built[0][0]
for name in wall:
  print(f'{variant} {dtype} {mode} b{batch} {name}: wall img/s median {statistics.median(wall[name]):.3f} '
        f'best {max(wall[name]):.3f}; CPU s/img median {statistics.median(cpu[name]):.3f} '
        f'(speed vs {base}: wall best {max(wall[name]) / max(wall[base]):.3f}x, '
        f'CPU {statistics.median(cpu[base]) / statistics.median(cpu[name]):.3f}x)')
