"""What each platform runs: chosen once, when a step is traced for the devices it will run on.

The model (vit_jax/models/) is plain JAX. `platform_model` gives it what the
target platform should compute its projections and self-attention with,
before it is applied:
- cpu: the XLA:CPU rules of vit_jax/cpu/kernels.py named in `CPU_RULES`
  (kept only while a side-by-side measurement shows them earning their
  place: docs/performance.md);
- gpu (CUDA): cuDNN's flash attention where JAX's cuDNN path takes the
  operands (asked by a trial lowering: `cudnn_length`), the
  sequence padded to a length it takes; XLA's autodiff for everything else;
- tpu and anything else: the plain model, XLA's autodiff.
`config.model.attention` narrows the attention choice: 'xla' never takes
cuDNN, 'reference' runs the explicit softmax with plain autodiff everywhere.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vit_jax.config.sizes import image_hw
from vit_jax.cpu import kernels
from vit_jax.gpu import cudnn
from vit_jax.models.vit import VisionTransformer

# The CPU train step's rules (vit_jax/cpu/kernels.py): 'dense_backward' (the
# projections' weight gradients), 'attention_backward', 'bfloat16_dot' (bfloat16
# projections multiplied in bfloat16; used only on CPUs with AVX512_BF16 or AMX,
# where it pays: elsewhere it is slower). docs/performance.md has the measurements
# that keep each one.
CPU_RULES = ('dense_backward', 'attention_backward', 'bfloat16_dot')

# Names of `config.model.attention`: 'fused' is cuDNN's flash attention where
# JAX's cuDNN path takes the operands (CUDA), XLA elsewhere; 'xla' never cuDNN;
# 'reference' the explicit softmax with plain autodiff on every platform (no
# CPU rule either).
ATTENTION_IMPLEMENTATIONS = ('fused', 'xla', 'reference')

EXPLICIT = 'XLA: explicit softmax attention on head-major operands'


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices: 'cpu', 'gpu' or 'tpu'."""
  return mesh.devices.flat[0].platform


def self_attention_tokens(model: VisionTransformer, config: ml_collections.ConfigDict) -> int:
  """Tokens of the encoder's self-attention at `config.input.image_size` (or the NaFlex budget
  `config.input.max_tokens`): patches, class token, registers."""
  if config.input.max_tokens:
    return config.input.max_tokens + model.num_prefix_tokens
  rows, columns = model.token_grid(*image_hw(config.input.image_size))
  return rows * columns + model.num_prefix_tokens


def cudnn_refusal(tokens: int, heads: int, head_dim: int, dtype: Any, length: int) -> Optional[str]:
  """Why JAX refuses to lower `cudnn_attention`'s training (forward and backward) for cuda at
  these shapes padded to `length`, or None if it lowers. JAX's own checks (cuDNN installed, dtype,
  head size, sequence lengths), asked by a trial lowering; cached."""
  return _cudnn_refusal(tokens, heads, head_dim, jnp.dtype(dtype).name, length)


@functools.lru_cache(maxsize=None)
def _cudnn_refusal(tokens: int, heads: int, head_dim: int, dtype: str, length: int) -> Optional[str]:
  spec = jax.ShapeDtypeStruct((1, tokens, heads, head_dim), jnp.dtype(dtype))

  def loss(q, k, v):
    return cudnn.cudnn_attention(q, k, v, length=length).astype(jnp.float32).sum()
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec, spec, spec).lower(lowering_platforms=('cuda',))
  except Exception as e:  # noqa: BLE001  JAX raises NotImplementedError, RuntimeError, ValueError...
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if 'cuDNN is not detected' in reason:
      reason += " (JAX's CUDA plugin is not installed: pip install -e .[cuda12])"
    return reason
  return None


def cudnn_length(tokens: int, heads: int, head_dim: int, dtype: Any) -> tuple[Optional[int], str]:
  """(the sequence length at which JAX's cuDNN path trains this self-attention, or None; why).

  The token count itself, else the first padded length JAX accepts among the
  next multiples of 2, 8, 64 and 128; None with JAX's reason for the token
  count when none is accepted.
  """
  candidates = [tokens] + [-(-tokens // m) * m for m in (2, 8, 64, 128)]
  first = None
  for length in dict.fromkeys(candidates):
    reason = cudnn_refusal(tokens, heads, head_dim, dtype, length)
    if reason is None:
      return length, 'cuDNN flash attention'
    first = first or reason
    if 'sequence length' not in reason:  # Not about the length: no padding helps.
      break
  return None, first


def attention_choice(model: VisionTransformer, config: ml_collections.ConfigDict,
                     platform: str, cpu_rules: Optional[tuple[str, ...]] = None
                     ) -> tuple[Optional[Callable], str]:
  """(the encoder's `attention_fn` on `platform`, None for the plain one; a line saying what runs).

  `cpu_rules`: the CPU rules to use (default `CPU_RULES`).
  """
  cpu_rules = CPU_RULES if cpu_rules is None else cpu_rules
  implementation = config.model.attention
  if implementation == 'reference':
    return None, 'explicit softmax(q k^T / sqrt(d)) v, autodiff backward (attention=reference)'
  if platform == 'cpu':
    if config.input.max_tokens:  # The rule takes no padding mask.
      return None, f'{EXPLICIT}, padding masked (NaFlex), autodiff backward'
    if 'attention_backward' in cpu_rules:
      return kernels.attention, f'{EXPLICIT}, with the XLA:CPU backward of vit_jax/cpu/kernels.py'
    return None, f'{EXPLICIT}, autodiff backward'
  if platform in ('gpu', 'cuda'):
    if implementation != 'fused':
      return None, f"{EXPLICIT}, autodiff backward (not cuDNN: config.model.attention={implementation!r})"
    tokens = self_attention_tokens(model, config)
    head_dim = model.hidden_size // model.num_heads
    length, why = cudnn_length(tokens, model.num_heads, head_dim, model.dtype)
    if length is None:
      return None, f'{EXPLICIT}, autodiff backward (not cuDNN: {why})'
    padded = f', {tokens} tokens padded to {length} and masked' if length != tokens else ''
    padded += ', NaFlex padding masked by sequence lengths' if config.input.max_tokens else ''
    return _cudnn_at(length), f"cuDNN flash attention (jax.nn.dot_product_attention, implementation='cudnn'){padded}"
  return None, f'{EXPLICIT}, autodiff backward'


@functools.lru_cache(maxsize=None)
def _cudnn_at(length: int) -> Callable:
  """`cudnn_attention` at one padded length; cached, so equal choices give the same function."""
  return functools.partial(cudnn.cudnn_attention, length=length)


def platform_model(model: VisionTransformer, config: ml_collections.ConfigDict, platform: str,
                   cpu_rules: Optional[tuple[str, ...]] = None) -> tuple[VisionTransformer, str]:
  """(`model` with the projections and attention `platform` runs, a line saying what its attention is).

  `platform` is where the step will run: 'cpu', 'gpu' (or 'cuda') or 'tpu'
  (`mesh_platform` of the run's mesh). On CPU the model's `custom_vjp`
  rules make it reverse-mode only (jax.grad, not jax.jvp).
  """
  cpu_rules = CPU_RULES if cpu_rules is None else cpu_rules
  attention_fn, line = attention_choice(model, config, platform, cpu_rules)
  dot_general = None
  backward = 'dense_backward' in cpu_rules
  bfloat16 = ('bfloat16_dot' in cpu_rules and jnp.dtype(model.dtype) == jnp.bfloat16
              and kernels.bfloat16_matmul_unit())
  if platform == 'cpu' and (backward or bfloat16):
    dot_general = kernels.projection_dot_general(backward, bfloat16)
  return model.clone(dot_general=dot_general, attention_fn=attention_fn), line


def attention_implementation(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> str:
  """One line for the startup log: what computes the encoder's attention on `platform`.

  `platform` is 'cpu', 'gpu' or 'tpu' (default: `jax.default_backend()`, where
  the run executes): what `platform_model` chooses there for this config.
  """
  from vit_jax.models import model_from_config
  platform = platform or jax.default_backend()
  _, line = attention_choice(model_from_config(config), config, platform)
  return f'attention on {platform}: {line}'
