"""Throughput of vit_jax's real train step (or forward pass), against this device's matmul ceiling.

  vit-jax benchmark --variant B/16 --batch_size 8 [--mode train|inference]
      [--dtype float32|bfloat16] [--image_size 224] [--steps 3] [--repeats 5]
      [--remat none|full|dots_saveable|...] [--scan] [--cpu_devices N]
      [--xla_flags='--flag=value ...'] [--loop launcher|library] [--json]

Builds the train step exactly as training does (`vit_jax.training.setup`: the model of
`config.model`, AdamW with clipping from `vit_jax.training.optim`, donated state, one
jit over the device mesh) on synthetic data (`--loop library`: a notebook's own
step on the public API instead, vit_jax/bench/notebook.py), compiles it once, warms it up
(single steps until one no longer faults host memory in: at most 6), then
times `--repeats` runs of `--steps` steps each. After each run it
times square matmuls of the same dtype (`--ceiling_sizes`; the fastest of
them is the ceiling), so the model and the ceiling see the same load on a
shared machine. Prints images/s, step time (median, min, max over the runs),
compile time, warm-up steps, page faults per step, FLOPs per image from
XLA's cost analysis of the compiled program (a multiply-add counts 2; with
--scan or --remat, of the plain program: XLA counts a loop body once, and
recomputation is not model work)
next to the analytic matmul count, achieved FLOP/s, MFU (achieved / median
ceiling) and peak memory: `device.memory_stats()` where the device has it
(GPU, TPU), else the compiled program's memory analysis (arguments + outputs
+ temporaries - donated) and the process's peak RSS, and says which.

`--serve` turns the process into a worker for side-by-side runs
(`vit_jax.bench.side_by_side`): it builds and warms up once, prints one JSON
line, then answers each `run` line on stdin with one timed run.

Run as a command, it first calls `vit_jax.cpu.hostmem.retain_freed_memory`, as
the launcher does, so the step runs with the launcher's host-memory settings.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from vit_jax.bench.side_by_side import peak_rss_bytes
from vit_jax.bench.workload import DTYPES, LOOPS, MODES, MatmulCeiling, Workload
from vit_jax.cpu import hostmem, scheduler
from vit_jax.errors import ArgumentParser

# train imports TensorFlow (input pipeline), which the benchmark never runs: keep it quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # Only silences TF's start-up notice.


def spread(values: list[float]) -> dict[str, float]:
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def run_benchmark(args: argparse.Namespace, on_repeat: Optional[Callable[[int], None]] = None
                  ) -> dict[str, Any]:
  """Builds, warms up and times the workload of `args`; returns the result record."""
  import jax
  workload = Workload(args.variant, args.image_size, args.batch_size, args.dtype, args.mode,
                      model_options(args), args.loop, args.cpu_scheduler)
  sizes = tuple(int(size) for size in args.ceiling_sizes.split(',') if size.strip() and int(size))
  ceiling = MatmulCeiling(args.dtype, sizes) if sizes else None
  step_seconds, ceilings, page_faults = [], [], []
  for repeat in range(args.repeats):
    step_seconds.append(workload.run(args.steps) / args.steps)
    page_faults.append(workload.page_faults)
    if ceiling is not None:
      ceilings.append(ceiling.flops_per_second())
    if on_repeat:
      on_repeat(repeat)
  step = spread(step_seconds)
  images_per_second = args.batch_size / step['median']
  achieved = workload.flops_per_image * images_per_second
  memory, memory_source = workload.peak_memory()
  result = {
      'variant': args.variant, 'mode': args.mode, 'dtype': args.dtype, 'image_size': args.image_size,
      'batch_size': args.batch_size, 'loop': args.loop, 'attention': args.attention, 'gelu': args.gelu,
      'remat': args.remat, 'scan': args.scan, 'steps': args.steps,
      'repeats': args.repeats, 'devices': workload.devices, 'num_params': workload.num_params,
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'date': time.strftime('%Y-%m-%d %H:%M'),
      'images_per_second': images_per_second,
      'images_per_second_spread': {k: args.batch_size / v for k, v in
                                   (('min', step['max']), ('max', step['min']))},
      'step_seconds': step, 'step_seconds_all': step_seconds,
      'compile_seconds': workload.compile_seconds, 'warmup_steps': workload.warmup_steps,
      'page_faults_per_step': page_faults, 'host_memory_retained': hostmem.retaining(),
      'cpu_scheduler': workload.scheduler,
      'flops_per_image': workload.flops_per_image,
      'matmul_flops_per_image': workload.matmul_flops_per_image,
      'achieved_flops_per_second': achieved,
      'peak_memory_bytes': memory, 'peak_memory_source': memory_source,
      'process_peak_rss_bytes': peak_rss_bytes(),
      'jax_version': jax.__version__,
  }
  if ceilings:
    median_ceiling = statistics.median(ceilings)
    result.update({'ceiling_flops_per_second': spread(ceilings), 'ceiling_matmul_sizes': list(sizes),
                   'mfu': achieved / median_ceiling})
  return result


def format_result(r: dict[str, Any]) -> str:
  """Human-readable lines of a result record."""
  step = r['step_seconds']
  lines = [
      f'ViT-{r["variant"]} {r["mode"]} ({r.get("loop", "launcher")} loop), {r["dtype"]}, '
      f'batch {r["batch_size"]}, {r["image_size"]} px, '
      f'attention {r["attention"]!r}, gelu {r["gelu"]!r}, remat {r["remat"]!r}, scan {r["scan"]}, '
      f'{r["num_params"]:,} params on {r["devices"]}',
      f'images/s: {r["images_per_second"]:.2f} (min {r["images_per_second_spread"]["min"]:.2f}, '
      f'max {r["images_per_second_spread"]["max"]:.2f})',
      f'step: {step["median"] * 1e3:.1f} ms median, {step["min"] * 1e3:.1f}..{step["max"] * 1e3:.1f} ms '
      f'over {r["repeats"]} runs of {r["steps"]} steps',
      f'compile: {r["compile_seconds"]:.1f} s; warm-up: {r["warmup_steps"]} steps; page faults per step: '
      f'{statistics.median(r["page_faults_per_step"]):,.0f} (host memory '
      f'{"retained" if r["host_memory_retained"] else "returned to the OS"}: vit_jax/cpu/hostmem.py)',
      f'XLA:CPU scheduler: {r.get("cpu_scheduler", "not recorded")}',
      f'GFLOPs per image: {r["flops_per_image"] / 1e9:.3f} (XLA cost analysis), '
      f'{r["matmul_flops_per_image"] / 1e9:.3f} (analytic, matmuls only)',
      f'achieved: {r["achieved_flops_per_second"] / 1e9:.1f} GFLOP/s',
  ]
  if 'mfu' in r:
    c = r['ceiling_flops_per_second']
    sizes = '/'.join(map(str, r['ceiling_matmul_sizes']))
    lines.append(f'matmul ceiling (best of {sizes} square, {r["dtype"]}): {c["median"] / 1e9:.1f} '
                 f'GFLOP/s ({c["min"] / 1e9:.1f}..{c["max"] / 1e9:.1f}); MFU {r["mfu"]:.1%}')
  memory = r['peak_memory_bytes']
  lines.append(f'peak memory: {"n/a" if memory is None else f"{memory / 2**30:.3f} GiB"} '
               f'({r["peak_memory_source"]}); process peak RSS {r["process_peak_rss_bytes"] / 2**30:.3f} GiB')
  return '\n'.join(lines)


def serve(args: argparse.Namespace) -> None:
  """Worker loop: build once, print a JSON line, then one timed run per `run` line on stdin."""
  workload = Workload(args.variant, args.image_size, args.batch_size, args.dtype, args.mode,
                      model_options(args), args.loop, args.cpu_scheduler)
  print(json.dumps({'ready': True, 'compile_seconds': workload.compile_seconds,
                    'flops_per_image': workload.flops_per_image,
                    'matmul_flops_per_image': workload.matmul_flops_per_image,
                    'num_params': workload.num_params, 'devices': workload.devices,
                    'host_memory_retained': hostmem.retaining(),
                    'cpu_scheduler': workload.scheduler}), flush=True)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    seconds = workload.run(args.steps)
    print(json.dumps({'seconds': seconds, 'page_faults': workload.page_faults,
                      'peak_rss_bytes': peak_rss_bytes()}), flush=True)


def parse_remat(value: str):
  """--remat as config.model.remat takes it: 'True'/'False' become booleans, names stay names."""
  return {'true': True, 'false': False}.get(value.lower(), value)


def model_options(args: argparse.Namespace) -> dict[str, Any]:
  """The `config.model` fields that the command line sets."""
  return {'attention': args.attention, 'gelu': args.gelu, 'remat': args.remat, 'scan': args.scan}


def parser() -> argparse.ArgumentParser:
  from vit_jax.models import SIZES
  p = ArgumentParser(prog='vit-jax benchmark', description=__doc__.split('\n\n')[1])
  p.add_argument('--variant', default='B/16', help=f'SIZE/PATCH, SIZE one of {", ".join(SIZES)}, or a hybrid '
                 'such as R50+B/16 (default B/16)')
  p.add_argument('--image_size', type=int, default=224, help='square input side in pixels (default 224)')
  p.add_argument('--batch_size', type=int, default=8, help='global batch (default 8)')
  p.add_argument('--dtype', default='float32', choices=DTYPES, help='compute dtype; params stay float32')
  p.add_argument('--mode', default='train', choices=MODES,
                 help='train: the optimizer step; inference: the forward pass (default train)')
  p.add_argument('--loop', default='launcher', choices=LOOPS,
                 help="launcher: the train step of vit_jax.training (default); library: a notebook's own "
                      'step on the public API (create_model, optax, jax.jit; vit_jax/bench/notebook.py)')
  p.add_argument('--attention', default='fused', choices=('fused', 'reference'), help='config.model.attention')
  p.add_argument('--gelu', default='tanh', choices=('tanh', 'exact'),
                 help="config.model.gelu: 'tanh' as the published JAX models (default), 'exact' as timm")
  p.add_argument('--remat', default='none', type=parse_remat,
                 help="config.model.remat: none, full, or a policy name, e.g. dots_saveable (default none)")
  p.add_argument('--scan', action='store_true', help='config.model.scan: one nn.scan over the blocks')
  p.add_argument('--cpu_scheduler', default='auto', choices=scheduler.CHOICES,
                 help="the launcher loop's config.cpu_scheduler: XLA:CPU's instruction order (default auto: "
                      'the fast one unless its plan would not fit in free memory)')
  p.add_argument('--steps', type=int, default=3, help='steps per timed run (default 3)')
  p.add_argument('--repeats', type=int, default=5, help='timed runs after the warm-up (default 5)')
  p.add_argument('--ceiling_sizes', default='1024,2048,4096',
                 help='sides of the square matmuls that measure the ceiling; 0 skips it '
                      '(default 1024,2048,4096)')
  p.add_argument('--xla_flags', default='', help='appended to $XLA_FLAGS before JAX starts')
  p.add_argument('--cpu_devices', type=int, default=None,
                 help='split the CPU into this many data-parallel devices, as the launcher\'s '
                      '--cpu_devices (default $VIT_JAX_CPU_DEVICES or 1)')
  p.add_argument('--json', action='store_true', help='print one JSON object instead of text')
  p.add_argument('--serve', action='store_true', help='worker mode for vit_jax.bench.side_by_side')
  return p


def xla_flags_error(xla_flags: str) -> Optional[str]:
  """Why XLA refuses `xla_flags` (None if it takes them). XLA reads them when JAX starts a backend and
  aborts the process on a flag it does not know, so they are tried in a child process first (~2 s)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  try:
    probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env, capture_output=True,
                           text=True, timeout=600)
  except subprocess.TimeoutExpired:
    return f'--xla_flags={xla_flags!r}: JAX did not start with them within 600 s; check them.'
  if probe.returncode == 0:
    return None
  unknown = re.search(r'Unknown flags? in XLA_FLAGS: (.*)', probe.stderr)
  said = unknown.group(1).strip() if unknown else (probe.stderr.strip().splitlines() or ['no output'])[-1]
  return (f'--xla_flags={xla_flags!r}: XLA does not take them ({"unknown: " if unknown else ""}{said}); '
          'give flags of the installed XLA, e.g. --xla_flags=--xla_cpu_use_fusion_emitters=false.')


def main(argv: Optional[list[str]] = None) -> int:
  args = parser().parse_args(argv)
  if args.xla_flags:  # Read by XLA when JAX creates its first backend, i.e. after this.
    combined = f'{os.environ.get("XLA_FLAGS", "")} {args.xla_flags}'.strip()
    error = xla_flags_error(combined)
    if error:
      print(f'error: {error}', file=sys.stderr)
      return 2
    os.environ['XLA_FLAGS'] = combined
  for name in ('image_size', 'batch_size', 'steps', 'repeats'):
    if getattr(args, name) < 1:
      print(f'error: --{name}={getattr(args, name)} must be positive.', file=sys.stderr)
      return 2
  from vit_jax.cpu import devices as cpu_devices
  from vit_jax.errors import UsageError
  try:
    cpu_devices.split_cpu(args.cpu_devices)  # Before JAX creates its CPU backend.
    if args.serve:
      serve(args)
      return 0
    result = run_benchmark(args)
  except (ValueError, UsageError) as e:  # A bad variant, size or mode: one line, as the launcher.
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1) if args.json else format_result(result), flush=True)
  return 0
