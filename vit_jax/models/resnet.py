"""The ResNet-v2 part of the paper's hybrid models (Dosovitskiy et al. 2020, Section 3.1).

A weight-standardised 7x7/2 root convolution `conv_root`, GroupNorm `gn_root`,
ReLU and a 3x3/2 max-pool (stride 4 in all), then stages `block{i}` of
bottleneck units `unit{j}` (BiT's ResNet, Kolesnikov et al. 2020). Stage i has
`width * 2**(i-1)` bottleneck channels and `4x` that many outputs; the first
stage keeps the resolution and each later one halves it in its first unit, so
`s` stages give a stride of `4 * 2**(s-1)`.

Names follow the original release (google-research/vision_transformer), whose
hybrids put the ResNet modules at the top level of the ViT's parameters (no
`ResNet/` prefix): `conv_root`, `gn_root`, `block1/unit1/{conv1, gn1, conv2,
gn2, conv3, gn3, conv_proj, gn_proj}`. `resnet_features` is therefore a
function called inside the ViT's compact `__call__`, not a module of its own.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any

WS_EPSILON = 1e-5  # Weight standardisation, as the release (BiT) has it.


def standardize_weight(kernel: Array, epsilon: float = WS_EPSILON) -> Array:
  """Kernel (kh, kw, in, out) with zero mean and unit (population) std per output channel."""
  kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2))
  return kernel / (jnp.std(kernel, axis=(0, 1, 2)) + epsilon)


class StdConv(nn.Conv):
  """A convolution whose kernel is weight-standardised (in float32) before every use.

  The stored parameter is the raw kernel, as in the published checkpoints.
  """

  def param(self, name: str, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    return standardize_weight(value) if name == 'kernel' else value


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 convolutions, each followed by GroupNorm.

  Output channels are `4 * features`; the shortcut is a strided 1x1 `conv_proj`
  and `gn_proj` when the shape changes. `gn3` starts at zero scale, so that a
  fresh unit is the identity on its shortcut (as in the release).
  """

  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda features, size, strides, name: StdConv(  # noqa: E731
        features, size, strides, use_bias=False, dtype=self.dtype, name=name)
    norm = lambda name, **kw: nn.GroupNorm(dtype=self.dtype, name=name, **kw)  # noqa: E731
    residual = x
    if x.shape[-1] != 4 * self.features or tuple(self.strides) != (1, 1):
      residual = conv(4 * self.features, (1, 1), self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = norm('gn3', scale_init=nn.initializers.zeros)(conv(4 * self.features, (1, 1), (1, 1), 'conv3')(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`num_units` bottleneck units `unit1..`; the first one strides."""

  num_units: int
  features: int
  first_strides: tuple[int, int] = (1, 1)
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_units):
      strides = self.first_strides if j == 0 else (1, 1)
      x = ResidualUnit(self.features, strides, dtype=self.dtype, name=f'unit{j + 1}')(x)
    return x


def resnet_stride(num_stages: int) -> int:
  """How much the root (4) and `num_stages` stages (2 each after the first) downsample."""
  return 4 * 2 ** max(num_stages - 1, 0)


def resnet_features(x: Array, stages: Sequence[int], width: int, dtype: DType = jnp.float32) -> Array:
  """The root and `stages` (units per stage) on images x (batch, h, w, 3); returns the feature map.

  Must be called inside a Flax module's compact method: the modules it makes
  are that module's children, named as in the release. Output:
  (batch, h / stride, w / stride, channels) with `resnet_stride(len(stages))`
  and channels `width` (root only) or `4 * width * 2**(len(stages)-1)`.
  """
  x = StdConv(width, (7, 7), (2, 2), use_bias=False, dtype=dtype, name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(dtype=dtype, name='gn_root')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, units in enumerate(stages):
    strides = (2, 2) if i > 0 else (1, 1)
    x = ResNetStage(units, width * 2 ** i, strides, dtype=dtype, name=f'block{i + 1}')(x)
  return x


def resnet_conv_flops(height: int, width: int, stages: Sequence[int], root_width: int) -> tuple[float, float]:
  """(all, root) FLOPs of the convolutions of `resnet_features` on one (height, width) image.

  A multiply-add counts 2; GroupNorm, ReLU and the max-pool are left out. The
  root's share is returned apart because training never needs its gradient
  with respect to the images.
  """
  def out(size, stride):  # 'SAME' padding.
    return -(-size // stride)
  h, w = out(height, 2), out(width, 2)
  root = 2.0 * h * w * 7 * 7 * 3 * root_width
  h, w, channels = out(h, 2), out(w, 2), root_width
  total = root
  for i, units in enumerate(stages):
    features = root_width * 2 ** i
    for j in range(units):
      stride = 2 if i > 0 and j == 0 else 1
      h2, w2 = out(h, stride), out(w, stride)
      total += 2.0 * h * w * channels * features  # conv1, 1x1.
      total += 2.0 * h2 * w2 * 9 * features * features  # conv2, 3x3 (strided).
      total += 2.0 * h2 * w2 * features * 4 * features  # conv3, 1x1.
      if channels != 4 * features or stride != 1:
        total += 2.0 * h2 * w2 * channels * 4 * features  # conv_proj, 1x1 (strided).
      h, w, channels = h2, w2, 4 * features
  return total, root
