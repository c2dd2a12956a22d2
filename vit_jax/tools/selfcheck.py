"""`vit-jax selfcheck`: what to run after installing on a GPU or TPU machine.

  vit-jax selfcheck [--variant S/16] [--image_size 224] [--batch_size N] [--steps 5]
      [--dtype bfloat16] [--attention fused,xla,reference] [--ceiling_sizes 1024,2048,4096]
      [--cpu_devices N]

On every device JAX sees, trains a small ViT a few steps in each layout
(data-parallel; FSDP, parameters and optimizer state split over all devices)
with each attention implementation of the model, and checks that they agree.
Each run builds the launcher's train step (`vit_jax.training.setup`: the same
model, optimizer, shardings and jit), starts from the same parameters and
takes --steps steps on one fixed synthetic batch whose labels the images give
away. Checks: every run trains (a step that fails to trace, compile or fit is
a FAIL line, and the other runs go on); every loss is finite; the loss falls
in every run; every run's losses equal the first run's step by step within
the dtype's tolerance (`TOLERANCE`); each layout's final train state, saved
as the launcher saves it (orbax, `vit_jax.checkpoint`) to a temporary
directory and restored as a resumed run restores it, into its shardings,
comes back bit for bit; FSDP splits the parameters.
Prints each run's images/s and MFU (XLA's FLOP count of the step against the
matmul ceiling measured here, as `vit-jax benchmark` does) and the peak
device memory (`device.memory_stats()`; CPU devices report none, so there the
process's peak RSS, labelled as such).

Ends with `selfcheck passed` and exit code 0, or one `FAIL` line per failed
check and an `error:` line, exit code 1. Needs vit_jax's dependencies
but not TensorFlow (nor the data pipeline).
"""

import math
import os
import sys
import tempfile
import time
from typing import Any, NamedTuple, Optional

from vit_jax.bench.side_by_side import peak_rss_bytes
from vit_jax.bench.workload import DTYPES, MatmulCeiling, benchmark_config, cost_flops
from vit_jax.errors import ArgumentParser, UsageError

# Layouts: name -> (config.mesh.data, config.mesh.fsdp).
LAYOUTS = {'data-parallel': (-1, 1), 'fsdp': (1, -1)}
# Largest |loss - first run's loss| allowed at each step: atol + rtol * |first run's loss|. bfloat16 keeps
# 8 bits of mantissa: implementations and layouts that round and sum in another order drift apart (on
# CPU, Ti/16 at 64 px: 0.0002 after 5 steps); an attention that attends to the wrong tokens, or a
# gradient lost in a layout, moves the loss by far more. float32 is held 100x tighter.
TOLERANCE = {'bfloat16': (0.01, 0.005), 'float32': (1e-4, 5e-5)}
NUM_CLASSES = 10
LEARNING_RATE = 1e-3
IMAGES_PER_DEVICE = 32  # The default batch: 32 images per device.


class Run(NamedTuple):
  """One layout x attention implementation, trained."""
  layout: str
  attention: str
  losses: list[float]
  images_per_second: float
  flops_per_image: float
  compile_seconds: Optional[float]  # None: the same program as an earlier run's (`same_as`), not compiled again.
  same_as: Optional[str]
  state: Any
  state_sharding: Any
  abstract_state: Any


class Program(NamedTuple):
  """A compiled train step and what it was compiled for."""
  compiled: Any
  name: str  # The first run that compiled it: 'layout/attention'.
  flops_per_image: float
  compile_seconds: float


def synthetic_batch(batch_size: int, height: int, width: int, seed: int = 0) -> dict[str, Any]:
  """Images that give their label away (a fixed pattern per class, plus noise), and the labels."""
  import numpy as np
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(-1, 1, (NUM_CLASSES, height, width, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
  noise = rng.normal(0, 0.5, (batch_size, height, width, 3)).astype(np.float32)
  return {'image': patterns[labels] + noise, 'label': labels}


def run_config(args, layout: str, attention: str):
  """The benchmark's config of `args` with this layout and attention, a constant learning rate, 10 classes."""
  config = benchmark_config(args.variant, args.image_size, args.batch_size, args.dtype, {'attention': attention})
  config.dataset.num_classes = NUM_CLASSES
  config.optimizer.schedule = 'constant'
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = LEARNING_RATE
  config.mesh.data, config.mesh.fsdp = LAYOUTS[layout]
  config.mesh.fsdp_min_size = 0  # Split every array that divides, so that small models are split too.
  return config


def initial_state(args, batch: dict[str, Any]) -> Any:
  """The train state every run starts from, on the host: initialised once, so that runs differ only in
  their layout and attention."""
  import jax

  from vit_jax.training import setup as setup_lib
  from vit_jax.training import sharding
  config = run_config(args, 'data-parallel', args.attention[0])
  run = setup_lib.setup(config, sharding.make_mesh(config))
  return jax.device_get(jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(0)))


def train(args, layout: str, attention: str, batch: dict[str, Any], host_state: Any,
          programs: dict[str, Program]) -> Run:
  """Builds the launcher's train step for this layout and attention and takes `args.steps` steps from
  `host_state`. A step that lowers to the same program as an earlier run's (on CPU, 'fused' and 'xla')
  reuses its compilation from `programs`, keyed by the program's text."""
  import jax

  from vit_jax.cpu import scheduler
  from vit_jax.training import setup as setup_lib
  from vit_jax.training import sharding

  config = run_config(args, layout, attention)
  mesh = sharding.make_mesh(config)
  run = setup_lib.setup(config, mesh)
  state = jax.device_put(host_state, run.state_sharding)
  placed_batch = sharding.global_batch(batch, run.batch_sharding)
  rng = jax.random.key(1)
  lowered = run.step_fn.lower(state, placed_batch, rng)
  text = lowered.as_text()
  program = programs.get(text)
  if program is None:
    start = time.perf_counter()
    compiled = scheduler.compile_within_memory(lowered, platform=mesh.devices.flat[0].platform,
                                               local_devices=jax.local_device_count(),
                                               choice=config.cpu_scheduler).program
    programs[text] = program = Program(compiled, f'{layout}/{attention}',
                                       cost_flops(compiled) * mesh.size / args.batch_size,
                                       time.perf_counter() - start)
    same_as = None
  else:
    same_as = program.name
  state, metrics = program.compiled(state, placed_batch, rng)  # The first step: allocations, warm-up.
  losses = [metrics['train/loss']]
  start = time.perf_counter()
  for _ in range(args.steps - 1):
    state, metrics = program.compiled(state, placed_batch, rng)
    losses.append(metrics['train/loss'])
  jax.block_until_ready((state, losses))
  seconds = time.perf_counter() - start
  return Run(layout, attention, [float(loss) for loss in losses],
             args.batch_size * (args.steps - 1) / seconds, program.flops_per_image,
             None if same_as else program.compile_seconds, same_as, state, run.state_sharding,
             run.abstract_state)


def loss_failures(runs: list[Run], dtype: str) -> tuple[list[str], float]:
  """(what fails, the largest difference to the first run): finite, falling and agreeing losses."""
  atol, rtol = TOLERANCE[dtype]
  reference, failures, largest = runs[0], [], 0.0
  for run in runs:
    name = f'{run.layout}/{run.attention}'
    if not all(math.isfinite(loss) for loss in run.losses):
      failures.append(f'{name}: non-finite loss {run.losses}')
      continue
    if not run.losses[-1] < run.losses[0]:
      failures.append(f'{name}: the loss did not fall on a batch it trains on ({run.losses[0]:.4f} -> '
                      f'{run.losses[-1]:.4f})')
    for step, (loss, expected) in enumerate(zip(run.losses, reference.losses)):
      difference = abs(loss - expected)
      largest = max(largest, difference) if math.isfinite(difference) else largest
      if not difference <= atol + rtol * abs(expected):
        failures.append(f'{name}: loss {loss:.5f} at step {step + 1}, but {expected:.5f} in '
                        f'{reference.layout}/{reference.attention} (tolerance {atol} + {rtol} x loss)')
        break
  return failures, largest


def differing_arrays(saved: Any, restored: Any) -> list[str]:
  """Paths of the arrays of `restored` that differ from `saved` in shape, dtype, sharding or any bit."""
  import jax
  import numpy as np
  different = []
  restored_leaves = dict(jax.tree_util.tree_leaves_with_path(restored))
  for path, a in jax.tree_util.tree_leaves_with_path(saved):
    b = restored_leaves.get(path)
    name = jax.tree_util.keystr(path)
    if b is None or a.shape != b.shape or a.dtype != b.dtype:
      different.append(f'{name} (missing, or another shape or dtype)')
    elif not a.sharding.is_equivalent_to(b.sharding, a.ndim):
      different.append(f'{name} (sharding {b.sharding} instead of {a.sharding})')
    elif any(np.asarray(x.data).tobytes() != np.asarray(y.data).tobytes()
             for x, y in zip(sorted(a.addressable_shards, key=lambda s: s.device.id),
                             sorted(b.addressable_shards, key=lambda s: s.device.id))):
      different.append(f'{name} (values)')
  return different


def round_trip(run: Run, workdir: str) -> list[str]:
  """Saves `run.state` as the launcher does (orbax, `vit_jax.checkpoint`) in `workdir`, restores it as a
  resumed run does, into the same shardings; the arrays that differ."""
  from vit_jax import checkpoint
  from vit_jax.config import defaults
  from vit_jax.training import sharding
  config = defaults.get_config()  # Its checkpoint keys: keep the latest few, no best checkpoint.
  config.best_metric = ''
  manager = checkpoint.create_manager(workdir, config)
  checkpoint.save(manager, 1, run.state)
  checkpoint.finish(manager)
  manager = checkpoint.create_manager(workdir, config)
  restored = checkpoint.restore_latest(manager, sharding.placed(run.abstract_state, run.state_sharding))
  manager.close()
  return ['nothing restored'] if restored is None else differing_arrays(run.state, restored)


def split_arrays(run: Run) -> tuple[int, int]:
  """(parameter arrays split over devices, all parameter arrays) of a run's state."""
  import jax
  params = jax.tree.leaves(run.state.params)
  return sum(not p.sharding.is_fully_replicated for p in params), len(params)


def peak_memory_line(devices: list) -> str:
  """The devices' peak memory in use (`memory_stats()`), or n/a and the process's peak RSS on CPU."""
  stats = [d.memory_stats() or {} for d in devices]
  peaks = [s['peak_bytes_in_use'] for s in stats if 'peak_bytes_in_use' in s]
  rss = f'process peak RSS {peak_rss_bytes() / 2**30:.2f} GiB'
  if not peaks:
    return f'peak device memory: n/a ({devices[0].platform} devices report none); {rss}'
  return (f'peak device memory: {max(peaks) / 2**30:.2f} GiB (the largest device.memory_stats() '
          f'peak_bytes_in_use of {len(peaks)} devices, over all runs); {rss}')


def parser() -> ArgumentParser:
  from vit_jax.training.platform import ATTENTION_IMPLEMENTATIONS
  implementations = ','.join(ATTENTION_IMPLEMENTATIONS)
  p = ArgumentParser(prog='vit-jax selfcheck', description=__doc__.split('\n\n')[0])
  p.add_argument('--variant', default='S/16', help='model variant (default S/16)')
  p.add_argument('--image_size', type=int, default=224, help='square input side in pixels (default 224)')
  p.add_argument('--batch_size', type=int, default=None,
                 help=f'global batch (default {IMAGES_PER_DEVICE} per device)')
  p.add_argument('--steps', type=int, default=5, help='train steps per run, 2 or more (default 5)')
  p.add_argument('--dtype', default='bfloat16', choices=DTYPES, help='compute dtype (default bfloat16)')
  p.add_argument('--attention', default=implementations,
                 help=f'comma-separated config.model.attention values to run (default {implementations})')
  p.add_argument('--ceiling_sizes', default='1024,2048,4096',
                 help='sides of the square matmuls that measure the ceiling for MFU; 0 skips it '
                      '(default 1024,2048,4096)')
  p.add_argument('--cpu_devices', type=int, default=None,
                 help="split the CPU into this many devices, as the launcher's --cpu_devices "
                      '(default $VIT_JAX_CPU_DEVICES or 1)')
  return p


def check_args(args, num_devices: int) -> None:
  """Raises UsageError for a flag value that cannot run."""
  from vit_jax.training.platform import ATTENTION_IMPLEMENTATIONS
  if args.steps < 2:
    raise UsageError(f'--steps={args.steps}: give 2 or more (the first step is the warm-up; the loss must fall).')
  if args.image_size < 1:
    raise UsageError(f'--image_size={args.image_size} must be positive.')
  if args.batch_size is None:
    args.batch_size = IMAGES_PER_DEVICE * num_devices
  if args.batch_size < 1 or args.batch_size % num_devices:
    raise UsageError(f'--batch_size={args.batch_size} must be a positive multiple of the {num_devices} devices.')
  args.attention = [name.strip() for name in args.attention.split(',') if name.strip()]
  unknown = [name for name in args.attention if name not in ATTENTION_IMPLEMENTATIONS]
  if unknown or not args.attention:
    raise UsageError(f'--attention={",".join(args.attention)}: use one or more of '
                     f'{", ".join(ATTENTION_IMPLEMENTATIONS)}, separated by commas.')
  from vit_jax.models import model_from_config
  model_from_config(run_config(args, 'data-parallel', args.attention[0]))  # A bad variant or image size.
  try:
    args.ceiling_sizes = tuple(int(size) for size in args.ceiling_sizes.split(',') if size.strip() and int(size))
  except ValueError:
    raise UsageError(f'--ceiling_sizes={args.ceiling_sizes}: give matrix sides separated by commas, '
                     'or 0.') from None


def selfcheck(args) -> int:
  """Runs every layout x attention implementation, prints what it measured and the checks; the exit code."""
  import jax

  devices = jax.devices()
  check_args(args, len(devices))
  platform = devices[0].platform
  from vit_jax.training.platform import attention_implementation
  layouts = list(LAYOUTS) if len(devices) > 1 else ['data-parallel']
  print(f'jax {jax.__version__}, {len(devices)} x {devices[0].device_kind} ({platform}); ViT-{args.variant}, '
        f'{args.dtype}, batch {args.batch_size}, {args.image_size} px, {args.steps} steps per run', flush=True)
  if len(devices) == 1:
    print('fsdp: skipped, one device (it would be the data-parallel run)')
  batch = synthetic_batch(args.batch_size, args.image_size, args.image_size)
  for attention in args.attention:
    print(f'attention={attention}: '
          f'{attention_implementation(run_config(args, "data-parallel", attention), platform)}', flush=True)
  host_state = initial_state(args, batch)
  runs, programs, crashed = [], {}, []
  for layout in layouts:
    for attention in args.attention:
      try:
        run = train(args, layout, attention, batch, host_state, programs)
      except Exception as e:  # A step that does not trace, compile or fit (e.g. out of memory): a FAIL line.
        crashed.append(f'{layout}/{attention}: {one_line(e)}')
        print(f'  {layout:<13} {attention:<9} failed: {one_line(e)}', flush=True)
        continue
      runs.append(run)
      compiled = (f'compile {run.compile_seconds:.1f} s' if run.same_as is None else
                  f'the same program as {run.same_as}')
      print(f'  {layout:<13} {attention:<9} loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}  '
            f'{run.images_per_second:8.1f} img/s  {compiled}', flush=True)

  checks = [(f'every run trained ({len(runs)} of {len(runs) + len(crashed)})', crashed)]
  if runs:
    failures, largest = loss_failures(runs, args.dtype)
    checks.append((f'losses finite, falling and equal to {runs[0].layout}/{runs[0].attention}\'s within '
                   f'{TOLERANCE[args.dtype][0]} + {TOLERANCE[args.dtype][1]} x loss (largest difference '
                   f'{largest:.5f})', failures))
  with tempfile.TemporaryDirectory(prefix='vit_jax_selfcheck_') as directory:
    for layout in layouts:
      run = next((r for r in runs if r.layout == layout), None)
      if run is None:
        continue
      split, total = split_arrays(run)
      try:
        different = [f'{layout}: {name}' for name in round_trip(run, os.path.join(directory, layout))]
      except Exception as e:  # Orbax could not write or read it back.
        different = [f'{layout}: {one_line(e)}']
      checks.append((f'orbax save and restore of the {layout} train state as the launcher does, bit for '
                     f'bit, shardings kept ({split} of {total} parameter arrays split over devices)', different))
      if layout == 'fsdp':
        checks.append(('fsdp splits parameters over the devices',
                       [] if split else ['fsdp: every parameter array is replicated']))

  if args.ceiling_sizes:
    ceiling = MatmulCeiling(args.dtype, args.ceiling_sizes).flops_per_second()
    # Virtual CPU devices share the host's cores, which one device's matmul already fills.
    total = ceiling * (1 if platform == 'cpu' else len(devices))
    per = 'the host' if platform == 'cpu' or len(devices) == 1 else f'{len(devices)} devices'
    print(f'matmul ceiling ({args.dtype}, best of {"/".join(map(str, args.ceiling_sizes))} square): '
          f'{ceiling / 1e9:.1f} GFLOP/s per device; MFU against {per}:')
    for run in runs:
      achieved = run.flops_per_image * run.images_per_second
      print(f'  {run.layout:<13} {run.attention:<9} {achieved / 1e9:8.1f} GFLOP/s  MFU {achieved / total:.1%}')
  print(peak_memory_line(devices))

  return report(checks, len(runs))


def one_line(error: Exception) -> str:
  """An exception as one short line: its type and the first line of its message."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:300] if text else ""}'


def report(checks: list[tuple[str, list[str]]], runs: Optional[int] = None) -> int:
  """Prints PASS or FAIL (with each problem) per check, then the verdict; returns the exit code."""
  failed = 0
  for what, problems in checks:
    print(f'{"PASS" if not problems else "FAIL"} {what}')
    for problem in problems:
      print(f'  FAIL {problem}')
    failed += bool(problems)
  sys.stdout.flush()
  if failed:
    print(f'error: selfcheck failed {failed} of {len(checks)} checks (the FAIL lines above).', file=sys.stderr)
    return 1
  print('selfcheck passed: ' + ('' if runs is None else f'{runs} runs, ') + f'{len(checks)} checks', flush=True)
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  args = parser().parse_args(argv)
  from vit_jax.cpu import devices as cpu_devices
  try:
    cpu_devices.split_cpu(args.cpu_devices)  # Before JAX creates its CPU backend.
    return selfcheck(args)
  except UsageError as e:  # A bad variant, size or device count: one line, as the launcher.
    print(f'error: {e}', file=sys.stderr)
    return 2
