"""What the benchmark times: the compiled train step (or forward pass) on synthetic data, and the
matmul ceiling it is read against. `vit_jax.bench.benchmark` is the command around them."""

import math
import resource
import time
from typing import Any, Callable, Optional

MODES = ('train', 'inference')
# launcher: the step of `vit_jax.training.setup`; library: a notebook's own step on the
# public API (vit_jax/bench/notebook.py).
LOOPS = ('launcher', 'library')
DTYPES = ('float32', 'bfloat16')
# Warm-up runs single steps until one faults in fewer than SETTLED_PAGE_FAULTS
# pages (16 MiB of 4 KiB pages), at most MAX_WARMUP_STEPS of them.
SETTLED_PAGE_FAULTS = 4096
MAX_WARMUP_STEPS = 6


def benchmark_config(variant: str, image_size: int, batch_size: int, dtype: str,
                     model_options: Optional[dict[str, Any]] = None):
  """The base config with the benchmark's model, resolution and batch (1000 classes, as ImageNet).

  `model_options` are further `config.model` fields (attention, gelu, remat, scan).
  """
  from vit_jax.config import defaults
  config = defaults.get_config()
  config.model.variant = variant
  config.model.dtype = dtype
  for key, value in (model_options or {}).items():
    config.model[key] = value
  config.input.image_size = image_size
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.dataset.num_classes = 1000
  config.total_steps = 10_000  # Keeps the learning rate in its warm-up/cosine range; no effect on speed.
  return config


def matmul_flops_per_image(model, image_size, mode: str) -> float:
  """Analytic FLOPs of the model's matrix products for one image (a multiply-add counts 2).

  A hybrid's ResNet convolutions, the patch embedding, per block the
  q/k/v/out projections, q k^T, the weighted sum of values and the two MLP
  layers, then the head. Training is the forward pass plus twice its work for
  the two gradients of each product, except the first layer's gradient with
  respect to the images, which is never computed. Element-wise work
  (softmax, GELU, LayerNorm, GroupNorm, the optimizer) is left out; XLA's
  count includes it.
  """
  from vit_jax.config.sizes import image_hw
  from vit_jax.models.resnet import resnet_conv_flops
  d, m, p = model.hidden_size, model.mlp_dim, model.patch_size
  height, width = image_hw(image_size)
  gh, gw = model.token_grid(height, width)
  n = gh * gw + model.num_prefix_tokens
  channels, resnet, first = 3, 0.0, None
  if model.resnet_stages is not None:
    stages = tuple(model.resnet_stages)
    resnet, first = resnet_conv_flops(height, width, stages, model.resnet_width)
    channels = model.resnet_width * (4 * 2 ** (len(stages) - 1) if stages else 1)
  embed = 2 * gh * gw * p * p * channels * d
  block = 2 * n * d * 4 * d + 2 * 2 * n * n * d + 2 * 2 * n * d * m
  forward = resnet + embed + model.num_layers * block + 2 * d * model.num_classes
  return float(forward if mode == 'inference' else 3 * forward - (embed if first is None else first))


def program(run, mode: str, state, batch, rng) -> tuple[Callable, tuple]:
  """(jitted function, its arguments) that `mode` times: the train step, or the forward pass."""
  import jax
  if mode == 'train':
    return run.step_fn, (state, batch, rng)
  forward = jax.jit(lambda params, images: run.model.apply({'params': params}, images)[0],
                    in_shardings=(run.state_sharding.params, run.batch_sharding))
  return forward, (state.params, batch['image'])


def cost_flops(stage) -> float:
  """XLA's FLOP count of a lowered or compiled program (a multiply-add counts 2)."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


class Workload:
  """The compiled train step (or forward pass) with its state and batch, ready to time."""

  def __init__(self, variant: str, image_size: int, batch_size: int, dtype: str = 'float32',
               mode: str = 'train', model_options: Optional[dict[str, Any]] = None,
               loop: str = 'launcher', cpu_scheduler: str = 'auto'):
    import jax
    import numpy as np

    if mode not in MODES:
      raise ValueError(f'Unknown mode {mode!r}; use one of {", ".join(MODES)}.')
    if loop not in LOOPS:
      raise ValueError(f'Unknown loop {loop!r}; use one of {", ".join(LOOPS)}.')
    self.mode, self.batch_size, self.loop = mode, batch_size, loop
    rng = np.random.default_rng(0)
    from vit_jax.config.sizes import image_hw
    images = rng.uniform(-1, 1, (batch_size, *image_hw(image_size), 3)).astype(np.float32)
    labels = rng.integers(0, 1000, batch_size).astype(np.int32)
    options = model_options or {}
    if loop == 'library':
      from vit_jax.bench import notebook
      self.batch = {'image': jax.numpy.asarray(images), 'label': jax.numpy.asarray(labels)}
      program = notebook.build(variant, self.batch, dtype, mode, options)
      self.model, self.state, self.rng = program.model, program.state, program.rng
      function = program.function
      args = (self.state, self.batch, self.rng) if mode == 'train' else (self.state.params, self.batch['image'])
      abstract_params = jax.eval_shape(lambda: self.state.params)
    else:
      self._build_launcher(variant, image_size, batch_size, dtype, mode, options, images, labels)
      function, args = self._function, self._args
      abstract_params = self._abstract_params
    start = time.perf_counter()
    if loop == 'launcher':  # With the launcher's choice of XLA:CPU scheduler (vit_jax/cpu/scheduler.py).
      from vit_jax.cpu import scheduler
      compiled = scheduler.compile_within_memory(function.lower(*args), platform=jax.devices()[0].platform,
                                                 local_devices=jax.local_device_count(), choice=cpu_scheduler)
      self.compiled, self.scheduler = compiled.program, compiled.reason
    else:
      self.compiled, self.scheduler = function.lower(*args).compile(), 'the default (plain jax.jit)'
    self.compile_seconds = time.perf_counter() - start
    # The launcher's program is one device's share of the batch; a notebook's plain jit runs on one device.
    num_devices = jax.device_count() if loop == 'launcher' else 1
    self.flops_per_image = cost_flops(self.compiled) * num_devices / batch_size
    if loop == 'launcher' and (options.get('scan') or options.get('remat') not in (None, False, 'none')):
      self.flops_per_image = self._plain_flops_per_image(variant, image_size, batch_size, dtype, mode,
                                                         options)
    self.matmul_flops_per_image = matmul_flops_per_image(self.model, image_size, mode)
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    self.devices = f'{num_devices} x {jax.devices()[0].device_kind}'
    # Warm-up: first-call allocations, thread-pool start-up, and the host heap
    # growing to the program's peak (steps fault pages in until it has).
    self.warmup_steps = 0
    while self.warmup_steps < MAX_WARMUP_STEPS:
      self.run(1)
      self.warmup_steps += 1
      if self.page_faults < SETTLED_PAGE_FAULTS:
        break

  def _build_launcher(self, variant, image_size, batch_size, dtype, mode, options, images, labels):
    """The launcher's train step (`vit_jax.training.setup`) over the config's mesh, state placed."""
    import jax

    from vit_jax.training import sharding
    from vit_jax.training import setup as setup_lib
    config = benchmark_config(variant, image_size, batch_size, dtype, options)
    self._mesh = sharding.make_mesh(config)
    run = setup_lib.setup(config, self._mesh)  # The real model, optimizer and jitted (donating) train step.
    self.model = run.model
    self.batch = sharding.global_batch({'image': images, 'label': labels}, run.batch_sharding)
    self.state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(0))
    self.rng = jax.random.key(1)
    self._function, self._args = program(run, mode, self.state, self.batch, self.rng)
    self._abstract_params = run.abstract_state.params

  def _plain_flops_per_image(self, variant, image_size, batch_size, dtype, mode, options) -> float:
    """XLA counts a loop body once, not once per layer, and recomputation is not the model's
    work: count the plain program (lowered, not compiled). Before partitioning, the lowered
    program is the whole batch's."""
    import jax

    from vit_jax.training import sharding
    from vit_jax.training import setup as setup_lib
    plain = setup_lib.setup(benchmark_config(variant, image_size, batch_size, dtype,
                                             {**options, 'scan': False, 'remat': False}), self._mesh)
    state = sharding.placed(plain.abstract_state, plain.state_sharding)
    batch = sharding.placed(jax.eval_shape(lambda: self.batch),
                            {'image': plain.batch_sharding, 'label': plain.batch_sharding})
    function, args = program(plain, mode, state, batch, jax.eval_shape(lambda: self.rng))
    return cost_flops(function.lower(*args)) / batch_size

  def run(self, steps: int) -> float:
    """Runs `steps` steps and returns the seconds they took, waiting for the device at the end.

    Also sets `page_faults`: the process's minor page faults per step during
    the run (memory the host allocator had to fault in; see vit_jax/cpu/hostmem.py).
    """
    import jax
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    if self.mode == 'train':
      for _ in range(steps):
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
      jax.block_until_ready((self.state, metrics))
    else:
      for _ in range(steps):
        logits = self.compiled(self.state.params, self.batch['image'])
      jax.block_until_ready(logits)
    seconds = time.perf_counter() - start
    self.page_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    return seconds

  def peak_memory(self) -> tuple[Optional[int], str]:
    """(bytes, source): the device's own peak where it reports one, else the compiled program's plan."""
    import jax
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      return int(stats['peak_bytes_in_use']), 'device.memory_stats peak_bytes_in_use'
    analysis = self.compiled.memory_analysis()
    if analysis is None:
      return None, 'unavailable'
    planned = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return int(planned), 'compiled.memory_analysis (arguments + outputs + temporaries - donated), per device'


class MatmulCeiling:
  """Times square products of `dtype`, one per size: the fastest is what matmuls reach here.

  Several sizes because no single one is best everywhere: on a 2-core AVX2 CPU
  1024..2048 reach the cores' FMA peak while 4096 falls ~10% short (its
  operands spill out of cache); on a GPU the larger sizes win.
  """

  def __init__(self, dtype: str = 'float32', sizes: tuple[int, ...] = (1024, 2048, 4096)):
    import jax
    import jax.numpy as jnp
    self.products = []  # (flops, compiled, args) per size.
    for size in sizes:
      a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
      args = (a, a.T + 1)
      compiled = jax.jit(jnp.matmul).lower(*args).compile()
      jax.block_until_ready(compiled(*args))
      self.products.append((2.0 * size**3, compiled, args))

  def flops_per_second(self, calls: int = 2) -> float:
    """The best FLOP/s of any size, each timed `calls` times."""
    import jax
    best = 0.0
    for flops, compiled, args in self.products:
      for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = max(best, flops / (time.perf_counter() - start))
    return best
