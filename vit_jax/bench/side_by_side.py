"""Side by side: vit_jax's train step (or forward pass) against timm's ViT on PyTorch.

  vit-jax benchmark-timm --variants Ti/16,S/16,B/16 --modes train,inference \
      [--loops launcher,library,library-plain] [--batch_size 8] [--image_size 224] \
      [--dtype float32] [--steps 3] [--repeats 5] [--timm_python PATH] [--json]

PyTorch and timm are never needed by vit_jax itself. The torch side runs in
the python that `--timm_python` or $TIMM_PYTHON names (a venv of its own),
or else in this one when it has torch and timm (`pip install -e .[bench]`);
that python runs this file as a worker script.
For each variant, mode and loop, two worker processes are built and warmed
up once: `vit-jax benchmark --serve` (the real jitted train step, as
`vit_jax.bench.benchmark` times it, or with `--loops library` a notebook's
own step on the public API, vit_jax/bench/notebook.py) and timm's
`VisionTransformer` of the same width, depth, heads, patch, resolution and 1000 classes, trained by AdamW with
gradient-norm clipping at 1.0 as vit_jax's default optimizer. Their timed runs
then alternate (A B, B A, A B, ...), so a change in the machine's load hits
both sides alike. Each row gives images/s of both (median over the runs) and
the ratio vit_jax / timm: above 1 means vit_jax is faster, and each side's
peak resident memory (the worker process's ru_maxrss).

This module imports only the standard library at the top: the timm worker
runs it with a python that has no JAX, and the tests import it without torch.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

TIMM_PYTHON_ENV = 'TIMM_PYTHON'


# What the vit_jax side runs: the launcher's train step, or a notebook's own step on
# the public API with and without the README's one call for CPU
# (vit_jax.cpu.hostmem.retain_freed_memory, which `vit-jax benchmark` makes unless
# VIT_JAX_RETAIN_HOST_MEMORY=0).
LOOPS = {'launcher': ('launcher', {}), 'library': ('library', {}),
         'library-plain': ('library', {'VIT_JAX_RETAIN_HOST_MEMORY': '0'})}


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (Linux reports ru_maxrss in KiB).

  Here, in the standard-library-only module, because the torch worker needs it
  too; `vit-jax benchmark` imports it from here."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- the rows

def make_row(variant: str, mode: str, batch_size: int, jax_seconds: list[float],
             timm_seconds: list[float], flops_per_image: Optional[float] = None) -> dict[str, Any]:
  """One comparison row from per-step seconds of each side: images/s (median) and their ratio.

  `flops_per_image` (XLA's count of vit_jax's program) turns both rates into
  FLOP/s of the same work, so the two sides can be read against one ceiling.
  """
  jax_step, timm_step = statistics.median(jax_seconds), statistics.median(timm_seconds)
  row = {'variant': variant, 'mode': mode, 'batch_size': batch_size,
         'vit_jax_images_per_second': batch_size / jax_step,
         'timm_images_per_second': batch_size / timm_step,
         'vit_jax_step_seconds': {'median': jax_step, 'min': min(jax_seconds), 'max': max(jax_seconds)},
         'timm_step_seconds': {'median': timm_step, 'min': min(timm_seconds), 'max': max(timm_seconds)},
         'ratio': timm_step / jax_step}  # = vit_jax images/s / timm images/s.
  if flops_per_image:
    row['vit_jax_flops_per_second'] = flops_per_image * row['vit_jax_images_per_second']
    row['timm_flops_per_second'] = flops_per_image * row['timm_images_per_second']
  return row


def format_table(rows: list[dict[str, Any]]) -> str:
  """A fixed-width text table of `make_row` rows, one line each."""
  header = (f'{"variant":<9} {"mode":<10} {"loop":<13} {"batch":>5} {"vit_jax img/s":>14} '
            f'{"timm img/s":>11} {"vit_jax/timm":>13} {"vit_jax GF/s":>13} {"timm GF/s":>10} '
            f'{"jax devices":>11} {"peak RSS GiB vit_jax/timm":>26}')
  lines = [header, '-' * len(header)]
  for r in rows:
    gflops = [f'{r[k] / 1e9:.1f}' if k in r else '-' for k in
              ('vit_jax_flops_per_second', 'timm_flops_per_second')]
    rss = '/'.join(f'{r[k] / 2**30:.2f}' if r.get(k) else '-' for k in
                   ('vit_jax_peak_rss_bytes', 'timm_peak_rss_bytes'))
    lines.append(f'{r["variant"]:<9} {r["mode"]:<10} {r.get("loop", "launcher"):<13} {r["batch_size"]:>5} '
                 f'{r["vit_jax_images_per_second"]:>14.2f} {r["timm_images_per_second"]:>11.2f} '
                 f'{r["ratio"]:>12.2f}x {gflops[0]:>13} {gflops[1]:>10} '
                 f'{str(r.get("vit_jax_devices", "-")).split(" x ")[0]:>11} {rss:>26}')
  return '\n'.join(lines)


def timm_model_options(variant_fields: dict[str, int], image_size: int) -> dict[str, Any]:
  """timm `VisionTransformer` keyword arguments of the vit_jax variant (class token, 1000 classes)."""
  return dict(img_size=image_size, patch_size=variant_fields['patch_size'],
              embed_dim=variant_fields['hidden_size'], depth=variant_fields['num_layers'],
              num_heads=variant_fields['num_heads'],
              mlp_ratio=variant_fields['mlp_dim'] / variant_fields['hidden_size'], num_classes=1000)


# ---------------------------------------------------------------- the timm worker (torch side)

def timm_worker(options: dict[str, Any]) -> None:
  """Worker loop of the torch side: build, warm up, print a JSON line, then time one run per `run` line."""
  import torch
  import torch.nn.functional as F
  from timm.models.vision_transformer import VisionTransformer

  torch.manual_seed(0)
  model = VisionTransformer(**options['model'])
  batch_size, size, steps = options['batch_size'], options['model']['img_size'], options['steps']
  images = torch.rand(batch_size, 3, size, size) * 2 - 1
  labels = torch.randint(0, 1000, (batch_size,))
  # CPU autocast is torch's way to bfloat16 compute with float32 parameters.
  autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=options['dtype'] == 'bfloat16')

  if options['mode'] == 'train':
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def step():
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = F.cross_entropy(model(images), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
  else:
    model.eval()

    def step():
      with torch.inference_mode(), autocast:
        model(images)

  step()  # Warm-up: allocations, optimizer state.
  print(json.dumps({'ready': True, 'torch': torch.__version__,
                    'timm': __import__('timm').__version__, 'threads': torch.get_num_threads(),
                    'num_params': sum(p.numel() for p in model.parameters())}), flush=True)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    start = time.perf_counter()
    for _ in range(steps):
      step()  # Eager CPU execution: each call has finished when it returns.
    print(json.dumps({'seconds': time.perf_counter() - start, 'peak_rss_bytes': peak_rss_bytes()}),
          flush=True)


# ---------------------------------------------------------------- the parent

class Worker:
  """A benchmark worker process that prints a ready line, then answers `run` with one timed run."""

  def __init__(self, command: list[str], name: str, env: Optional[dict[str, str]] = None):
    self.name = name
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=None if env is None else {**os.environ, **env})
    self.info = self._read()
    self.replies: list[dict[str, Any]] = []  # One per timed run.

  def _read(self) -> dict[str, Any]:
    # Libraries may print to stdout before the worker does: skip lines that are not JSON.
    for line in self.process.stdout:
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
    raise RuntimeError(f'The {self.name} worker exited (status {self.process.wait()}) before '
                       'answering; its error is above.')

  def run(self) -> float:
    self.process.stdin.write('run\n')
    self.process.stdin.flush()
    reply = self._read()
    self.replies.append(reply)
    return reply['seconds']

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.close()
      self.process.wait()


def compare(variant: str, mode: str, args: argparse.Namespace, loop: str = 'launcher') -> dict[str, Any]:
  """Builds both workers for one (variant, mode, loop), alternates their timed runs; returns the row."""
  from vit_jax.models.variants import HYBRIDS, parse_variant
  if variant in HYBRIDS:  # timm's VisionTransformer has no ResNet stem: it would time another model.
    raise ValueError(f'--variants has the hybrid {variant!r}; the side-by-side compares plain ViTs only '
                     '(time hybrids alone with vit-jax benchmark).')
  fields = parse_variant(variant)
  common = ['--variant', variant, '--mode', mode, '--batch_size', str(args.batch_size),
            '--image_size', str(args.image_size), '--dtype', args.dtype, '--steps', str(args.steps)]
  jax_loop, jax_env = LOOPS[loop]
  jax_options = ['--gelu', args.gelu, '--loop', jax_loop, '--cpu_scheduler', args.cpu_scheduler]
  if args.cpu_devices is not None:
    jax_options += ['--cpu_devices', str(args.cpu_devices)]
  options = {'model': timm_model_options(fields, args.image_size), 'batch_size': args.batch_size,
             'mode': mode, 'dtype': args.dtype, 'steps': args.steps}
  # One side at a time while building, so that neither compiles during the other's warm-up.
  jax_worker = Worker([sys.executable, '-m', 'vit_jax', 'benchmark', '--serve', *common, *jax_options],
                      'vit_jax', jax_env or None)
  timm = None
  try:
    timm = Worker([args.timm_python, os.path.abspath(__file__), json.dumps(options)], 'timm')
    jax_seconds, timm_seconds = [], []
    for repeat in range(args.repeats):
      pair = (jax_worker, timm) if repeat % 2 == 0 else (timm, jax_worker)
      for worker in pair:
        (jax_seconds if worker is jax_worker else timm_seconds).append(worker.run() / args.steps)
  finally:
    jax_worker.close()
    if timm is not None:
      timm.close()
  row = make_row(variant, mode, args.batch_size, jax_seconds, timm_seconds,
                 jax_worker.info.get('flops_per_image'))
  row.update({'loop': loop, 'dtype': args.dtype, 'image_size': args.image_size, 'steps': args.steps,
              'repeats': args.repeats, 'vit_jax_num_params': jax_worker.info.get('num_params'),
              'timm_num_params': timm.info.get('num_params'), 'torch': timm.info.get('torch'),
              'timm': timm.info.get('timm'), 'torch_threads': timm.info.get('threads'),
              'vit_jax_compile_seconds': jax_worker.info.get('compile_seconds'),
              'vit_jax_devices': jax_worker.info.get('devices'),
              'vit_jax_host_memory_retained': jax_worker.info.get('host_memory_retained'),
              'vit_jax_cpu_scheduler': jax_worker.info.get('cpu_scheduler'),
              'vit_jax_page_faults_per_step': [r.get('page_faults') for r in jax_worker.replies],
              'vit_jax_peak_rss_bytes': max((r.get('peak_rss_bytes') or 0) for r in jax_worker.replies),
              'timm_peak_rss_bytes': max((r.get('peak_rss_bytes') or 0) for r in timm.replies)})
  return row


def find_timm_python(flag: Optional[str]) -> tuple[Optional[str], str]:
  """(python with torch and timm, or None; where it was looked for): the flag, $TIMM_PYTHON, this python."""
  import importlib.util
  if flag:
    return (flag if os.path.exists(flag) else None), f'--timm_python={flag}'
  if os.environ.get(TIMM_PYTHON_ENV):
    path = os.environ[TIMM_PYTHON_ENV]
    return (path if os.path.exists(path) else None), f'${TIMM_PYTHON_ENV}={path}'
  if importlib.util.find_spec('torch') and importlib.util.find_spec('timm'):
    return sys.executable, 'this python'
  return None, f'--timm_python, ${TIMM_PYTHON_ENV} and this python ({sys.executable}, which has no torch/timm)'


# CPU features that decide which kernels XLA and PyTorch can use: shown next to the model name.
CPU_FEATURES = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')


def cpu_model(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU's model name as lscpu shows it, with its family/model numbers and matmul features.

  Cloud VMs often report a bare name ("AMD EPYC") for different generations;
  the family and model numbers tell them apart. Falls back to what Python's
  platform module knows where there is no /proc/cpuinfo.
  """
  import platform
  fields = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(':')
        if not line.strip():
          break  # The first processor's block is enough.
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or platform.machine()
  name = fields.get('model name') or platform.processor() or platform.machine()
  details = [f'family {fields["cpu family"]} model {fields["model"]}'] if 'cpu family' in fields else []
  flags = fields.get('flags', '').split()
  details += [' '.join(f for f in CPU_FEATURES if f in flags) or 'no AVX2']
  return f'{name} ({"; ".join(details)})'


def parser() -> argparse.ArgumentParser:
  from vit_jax.errors import ArgumentParser
  p = ArgumentParser(prog='vit-jax benchmark-timm',
                     description='vit_jax against timm, same variant, batch and machine.')
  p.add_argument('--variants', default='Ti/16,S/16,B/16', help='comma-separated SIZE/PATCH list')
  p.add_argument('--modes', default='train,inference', help='comma-separated: train, inference')
  p.add_argument('--loops', default='launcher',
                 help='comma-separated vit_jax sides: launcher (the train step of vit_jax.training), '
                      "library (a notebook's own step on the public API, after the README's "
                      'retain_freed_memory call), library-plain (the same without it); default launcher')
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--gelu', default='tanh', choices=('tanh', 'exact'),
                 help="vit_jax's config.model.gelu (timm's GELU is the exact one)")
  p.add_argument('--cpu_scheduler', default='auto', choices=('auto', 'concurrency', 'memory'),
                 help="the vit_jax launcher's config.cpu_scheduler (default auto; 'memory' leaves timm's "
                      'worker room where the two sides together would not fit)')
  p.add_argument('--steps', type=int, default=3, help='steps per timed run (default 3)')
  p.add_argument('--repeats', type=int, default=5, help='timed runs of each side (default 5)')
  p.add_argument('--timm_python', default=None,
                 help='python of a venv with torch and timm (default $TIMM_PYTHON, else this python '
                      'if it has them: pip install -e .[bench])')
  p.add_argument('--cpu_devices', type=int, default=None,
                 help='CPU devices of the vit_jax side, as its --cpu_devices (default $VIT_JAX_CPU_DEVICES or 1)')
  p.add_argument('--json', action='store_true', help='print the rows as JSON lines')
  return p


def main(argv: Optional[list[str]] = None) -> int:
  args = parser().parse_args(argv)
  args.timm_python, looked = find_timm_python(args.timm_python)
  if args.timm_python is None:
    print(f'error: no python with torch and timm found (looked at {looked}); run `pip install -e .[bench]` '
          'or point --timm_python / $TIMM_PYTHON at one (docs/performance.md).', file=sys.stderr)
    return 2
  modes, loops = args.modes.split(','), args.loops.split(',')
  bad = [m for m in modes if m not in ('train', 'inference')]
  if bad:
    print(f'error: --modes has {",".join(bad)}; use train and/or inference.', file=sys.stderr)
    return 2
  bad = [loop for loop in loops if loop not in LOOPS]
  if bad:
    print(f'error: --loops has {",".join(bad)}; use {", ".join(LOOPS)}.', file=sys.stderr)
    return 2
  rows = []
  cpu = f'{cpu_model()}, {os.cpu_count()} cores'
  if not args.json:
    print(f'CPU: {cpu}', flush=True)
  try:
    for variant in args.variants.split(','):
      for mode in modes:
        for loop in loops:
          rows.append({**compare(variant, mode, args, loop), 'cpu': cpu})
          if args.json:
            print(json.dumps(rows[-1]), flush=True)
          else:  # The header with the first row, then a line per row as it is measured.
            lines = format_table(rows).split('\n')
            print('\n'.join(lines if len(rows) == 1 else lines[-1:]), flush=True)
  except ValueError as e:  # A bad --variants entry.
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':  # The torch side, run by the timm python as a plain script.
  timm_worker(json.loads(sys.argv[1]))
