"""Where a step's time goes on this CPU: vit_jax's launcher step next to timm's (docs/performance.md).

    python experiments/cpu_profile/profile.py VARIANT MODE BATCH [STEPS] --timm_python PYTHON
    python experiments/cpu_profile/profile.py Ti/16 train 32 2 --timm_python ../timm-venv/bin/python

The JAX side is the step `vit-jax benchmark` times (vit_jax.bench.workload, the launcher's), traced
with jax.profiler: XLA:CPU records one event per thunk, named after its HLO instruction, which the
compiled program's text maps to a kind. The torch side is the side-by-side's timm step
(vit_jax.bench.side_by_side.timm_worker's model and optimizer) under torch.profiler, in the timm
python. Both print milliseconds per step by kind of operation:

- matmul: matrix products and convolutions (XLA: a dot/convolution or a fusion holding one, with
  whatever XLA fused into it; torch: mm, addmm, bmm, the convolution, linear's kernels),
- copy: copies, transposes, concatenation, slicing and padding that move data only,
- other: everything else (element-wise work, reductions, softmax, GELU, LayerNorm, the optimizer).

Operations that run at the same time on the two cores both count, so a column can sum to more
than the step's wall time, which is printed next to it.
"""
import collections
import gzip
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

MATMUL_TORCH = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::convolution',
                'aten::_convolution', 'aten::mkldnn_convolution', 'aten::_mkldnn_convolution',
                'aten::linear', 'aten::matmul', 'aten::addmm_', 'aten::_scaled_dot_product_flash_attention_for_cpu',
                'aten::_scaled_dot_product_flash_attention_for_cpu_backward')
COPY_TORCH = ('aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::cat', 'aten::transpose',
              'aten::permute', 'aten::reshape', 'aten::view', 'aten::_unsafe_view', 'aten::t',
              'aten::expand', 'aten::slice', 'aten::select', 'aten::unbind', 'aten::empty',
              'aten::empty_like', 'aten::zeros', 'aten::zero_', 'aten::fill_', 'aten::as_strided',
              'aten::constant_pad_nd', 'aten::narrow', 'aten::flatten', 'aten::squeeze', 'aten::unsqueeze')
COPY_HLO = ('copy', 'transpose', 'concatenate', 'slice', 'dynamic-slice', 'dynamic-update-slice', 'pad',
            'broadcast', 'reshape', 'bitcast', 'tuple', 'get-tuple-element', 'parameter', 'constant')


def hlo_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> matmul/copy/other, from the compiled program's HLO text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$', line)
    if header:
      current = header.group(1)
      computations[current] = []
    elif current and '=' in line:
      computations[current].append(line)
  opcode_of, calls_of = {}, {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+(?:\s*\{[^}]*\})?\s+([\w\-]+)\(', line)
      if not m:
        m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\s([\w\-]+)\(', line)
      if m:
        opcode_of[m.group(1)] = m.group(2)
        called = re.search(r'calls=%?([\w.\-]+)', line)
        if called:
          calls_of[m.group(1)] = called.group(1)

  def has_product(computation, seen=()):
    for line in computations.get(computation, []):
      if re.search(r'\s(dot|convolution)\(', line):
        return True
      called = re.search(r'calls=%?([\w.\-]+)', line)
      if called and called.group(1) not in seen and has_product(called.group(1), seen + (computation,)):
        return True
    return False

  kinds = {}
  for name, opcode in opcode_of.items():
    if opcode in ('dot', 'convolution') or (name in calls_of and has_product(calls_of[name])):
      kinds[name] = 'matmul'
    elif opcode in COPY_HLO or (opcode == 'fusion' and all(
        re.search(r'\s(' + '|'.join(COPY_HLO) + r')\(', l) for l in computations.get(calls_of.get(name), [])
        if '=' in l)):
      kinds[name] = 'copy'
    else:
      kinds[name] = 'other'
  return kinds


def profile_jax(variant, mode, batch, steps):
  import jax
  from vit_jax.bench import workload
  w = workload.Workload(variant, 224, batch, 'float32', mode, loop='launcher')
  kinds = hlo_kinds(w.compiled.as_text())
  wall = w.run(steps) / steps
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  w.run(steps)
  jax.profiler.stop_trace()
  events = json.load(gzip.open(glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True)[0]))
  events = events['traceEvents'] if isinstance(events, dict) else events
  totals, unknown, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    name = e.get('name') or ''
    if e.get('ph') != 'X' or name.startswith('end: '):
      continue
    if name in kinds:
      totals[kinds[name]] += e['dur'] / 1e3 / steps
      by_op[name] += e['dur'] / 1e3 / steps
    elif not re.match(r'[A-Z$]|Thread|Pjit|Handle|Wait|Allocate|ParseArguments', name):
      unknown[name] += e['dur'] / 1e3 / steps
  return wall * 1e3, totals, unknown, by_op, kinds, w.compiled.as_text()


TORCH_SIDE = r'''
import collections, json, sys, time, torch
from torch.profiler import profile, ProfilerActivity
from vit_jax.bench.side_by_side import timm_model_options
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
variant_fields, mode, batch, steps, matmul, copy = json.loads(sys.argv[1])
torch.manual_seed(0)
model = VisionTransformer(**timm_model_options(variant_fields, 224))
images, labels = torch.rand(batch, 3, 224, 224) * 2 - 1, torch.randint(0, 1000, (batch,))
if mode == 'train':
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
  def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
else:
  model.eval()
  def step():
    with torch.inference_mode():
      model(images)
step(); step()
start = time.perf_counter()
for _ in range(steps): step()
wall = (time.perf_counter() - start) / steps
with profile(activities=[ProfilerActivity.CPU]) as prof:
  for _ in range(steps): step()
totals, by_op = collections.Counter(), collections.Counter()
for e in prof.key_averages():
  kind = 'matmul' if e.key in matmul else 'copy' if e.key in copy else 'other'
  totals[kind] += e.self_cpu_time_total / 1e3 / steps
  by_op[e.key] += e.self_cpu_time_total / 1e3 / steps
print(json.dumps([wall * 1e3, totals, by_op.most_common(10)]))
'''


def profile_torch(python, variant, mode, batch, steps):
  from vit_jax.models.variants import parse_variant
  fields = parse_variant(variant)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([python, '-c', TORCH_SIDE, json.dumps([fields, mode, batch, steps, MATMUL_TORCH,
                                                              COPY_TORCH])],
                       capture_output=True, text=True, check=True, env={**os.environ, 'PYTHONPATH': repo})
  wall, totals, top = json.loads(out.stdout.strip().splitlines()[-1])
  return wall, collections.Counter(totals), top


def main():
  args = [a for a in sys.argv[1:] if not a.startswith('--timm_python')]
  python = next(a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--timm_python='))
  variant, mode, batch = args[0], args[1], int(args[2])
  steps = int(args[3]) if len(args) > 3 else 2
  t_wall, t_totals, t_top = profile_torch(python, variant, mode, batch, steps)
  j_wall, j_totals, unknown, by_op, kinds, hlo = profile_jax(variant, mode, batch, steps)
  print(f'{variant} {mode} batch {batch}, ms per step (ops on both cores summed)')
  print(f'{"kind":8} {"vit_jax":>10} {"timm":>10}')
  for kind in ('matmul', 'copy', 'other'):
    print(f'{kind:8} {j_totals[kind]:10.0f} {t_totals[kind]:10.0f}')
  print(f'{"sum":8} {sum(j_totals.values()):10.0f} {sum(t_totals.values()):10.0f}')
  print(f'{"wall":8} {j_wall:10.0f} {t_wall:10.0f}')
  print('vit_jax, slowest XLA instructions (ms/step, kind, the instruction):')
  for name, ms in by_op.most_common(12):
    line = next((l.strip() for l in hlo.splitlines() if re.match(r'\s*(ROOT\s+)?%?' + re.escape(name) + r'\s*=', l)), '')
    print(f'  {ms:7.0f} {kinds[name]:6} {line[:150]}')
  print('timm, slowest torch operators (ms/step, self time):')
  for name, ms in t_top:
    print(f'  {ms:7.0f} {name}')
  if unknown:
    print('unmapped XLA events (ms/step):', dict(unknown.most_common(8)))


if __name__ == '__main__':
  main()
