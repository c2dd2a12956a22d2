"""The bfloat16 B/16 train step lowers for cuda with cuDNN's flash attention, and no N^2 tensor.

Runs in the environment with JAX's CUDA plugin (.ci/cuda_env.sh), where JAX's
cuDNN path traces and lowers on this CPU machine: nothing is compiled or run.
The step of `vit_jax.training.setup` built for 'cuda' over 8 (virtual CPU)
devices with FSDP, at 224 px with the class token (197 tokens, which cuDNN
refuses in training unless padded) under `scan`, and at 384 px with MAP
pooling (576 tokens) without: the program holds cuDNN's custom calls, no
(..., tokens, tokens) array (no explicit softmax, no zero-filled residual of
one) and the parameter shardings of the state.

Under a mesh, JAX wraps cuDNN's attention in a `custom_partitioning` op: the
lowered program holds `CustomSPMDPartitioning` calls, whose per-device body
(`__cudnn$fmhaSoftmax` and its backward) the SPMD partitioner emits when
compiling. So the test reads cuDNN's primitives in the traced program, the
partitioned calls on the padded operands in the lowered one, and the custom
calls in the lowering of one device's attention.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax.config import defaults
from vit_jax.gpu import cudnn
from vit_jax.training import platform, setup, sharding

BATCH = 8


def unpadded(spec: P) -> tuple:
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


def square_shapes(text: str, lengths: set[int]) -> list[str]:
  """The tensor types of `text` whose two trailing dimensions are both one of `lengths`."""
  found = set()
  for dims in re.findall(r'tensor<((?:\d+x)+)\w+>', text):
    sizes = [int(d) for d in dims.rstrip('x').split('x')]
    if len(sizes) >= 2 and sizes[-1] in lengths and sizes[-2] in lengths:
      found.add(dims)
  return sorted(found)


@pytest.mark.parametrize('image_size,pool,scan', [(224, 'token', True), (384, 'map', False)])
def test_bf16_train_step_lowers_for_cuda_with_cudnn_attention_and_no_square_tensor(image_size, pool, scan):
  config = defaults.get_config()
  config.model.variant, config.model.dtype, config.model.pool, config.model.scan = 'B/16', 'bfloat16', pool, scan
  config.input.image_size, config.dataset.num_classes = image_size, 1000
  config.batch_size = config.eval_batch_size = BATCH
  config.mesh.data, config.mesh.fsdp = 1, 8
  mesh = sharding.make_mesh(config)
  run = setup.setup(config, mesh, 'cuda')
  tokens = (image_size // 16) ** 2 + (pool == 'token')
  length, _ = platform.cudnn_length(tokens, 12, 64, jnp.bfloat16)
  assert length is not None and length % 2 == 0
  line = platform.attention_implementation(config, 'gpu')
  assert line.startswith("attention on gpu: cuDNN flash attention (jax.nn.dot_product_attention, "
                         "implementation='cudnn')"), line
  assert (f'{tokens} tokens padded to {length} and masked' in line) == (length != tokens)

  state = sharding.placed(run.abstract_state, run.state_sharding)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=run.batch_sharding)  # noqa: E731
  batch = {'image': spec((BATCH, image_size, image_size, 3), jnp.float32), 'label': spec((BATCH,), jnp.int32)}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  traced = run.step_fn.trace(state, batch, rng)
  primitives = re.findall(r'= (\w+)\[', str(traced.jaxpr))
  layers = 1 if scan else 12  # Under scan the loop body is traced once.
  assert primitives.count('dot_product_attention_fwd_wrapper') == layers
  assert primitives.count('dot_product_attention_bwd_wrapper') == layers
  text = traced.lower(lowering_platforms=('cuda',)).as_text()
  operands = f'tensor<{BATCH}x{length}x12x64xbf16>'  # The global batch, padded, (batch, tokens, heads, head_dim).
  partitioned = [line for line in text.splitlines() if 'custom_call @CustomSPMDPartitioning' in line]
  assert len(partitioned) == 2 * layers and all(operands in line for line in partitioned)
  assert square_shapes(text, {tokens, length}) == []

  # One device's attention, forward and backward: cuDNN's custom calls.
  local = jax.ShapeDtypeStruct((1, tokens, 12, 64), jnp.bfloat16)
  loss = lambda q, k, v: cudnn.cudnn_attention(q, k, v, length=length).astype(jnp.float32).sum()  # noqa: E731
  device_text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(local, local, local).lower(
      lowering_platforms=('cuda',)).as_text()
  assert 'custom_call @__cudnn$fmhaSoftmax(' in device_text
  assert 'custom_call @__cudnn$fmhaSoftmaxBackward(' in device_text

  # The state keeps its shardings: each leaf's (Shardy) sharding in the lowered program is the
  # step's in_sharding, every large kernel split over fsdp.
  expected = [unpadded(s.spec) for s in jax.tree.leaves(run.state_sharding)]
  assert sum('fsdp' in s for s in expected) >= 6 * (1 if scan else 12)
  main = text[text.index('func.func public @main('):]
  arguments = main[:main.index('{\n')].split('%arg')[1:]
  assert [lowered_spec(a) for a in arguments[:len(expected)]] == expected


def lowered_spec(argument: str) -> tuple:
  """The PartitionSpec entries (trailing Nones dropped) of one `@main` argument's `sdy.sharding`."""
  dims = re.search(r'sdy\.sharding = #sdy\.sharding<@mesh, \[(.*?)\]>', argument).group(1)
  entries = []
  for axes in re.findall(r'\{([^}]*)\}', dims):
    names = tuple(re.findall(r'"(\w+)"', axes))
    entries.append(None if not names else names[0] if len(names) == 1 else names)
  return unpadded(P(*entries))
