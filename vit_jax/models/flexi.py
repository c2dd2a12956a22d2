"""FlexiViT (Beyer et al. 2023): one set of ViT parameters at any patch size.

A ViT's parameters are tied to its patch size p0 twice: the patch embedding
kernel is (p0, p0, channels, dim) and the learned position embeddings hold
one entry per cell of the (height / p0, width / p0) grid. `resize_params`
gives the parameters of the same model at patch size p:

- the kernel is PI-resized (pseudo-inverse resize): with B the matrix that
  resizes a p0 x p0 patch to p x p (bilinear, as `jax.image.resize` does),
  the new kernel w solves min ||B^T w - w0|| (least squares), i.e.
  w = pinv(B^T) w0. When p >= p0, B^T w = w0 exactly, so the resized kernel
  on a resized patch gives the same token: <B x, w> = <x, B^T w> = <x, w0>.
  B is separable (rows x columns), so pinv(B^T) is the Kronecker product of
  two small 1-D pseudo-inverses.
- the grid part of the position embeddings is resized linearly with
  aligned corners, the resize `vit_jax.checkpoint.npz.resize_posemb` applies
  when a checkpoint is loaded at another resolution; class-token entries are
  kept.

Both are linear maps with constant matrices: differentiable, in float32
inside a train step (`jnp` arrays, tracers) and in float64 for numpy arrays
(a checkpoint converted on the host). The training side draws one patch size
per step (vit_jax/training/flexi.py); vit_jax/checkpoint/resize.py converts
trained runs and checkpoints.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


def bilinear_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) matrix of `jax.image.resize(x, ..., 'bilinear')` along one axis of `old` samples.

  Half-pixel centres; when shrinking, the triangle kernel is widened by
  old / new (antialiasing, `jax.image.resize`'s default). Rows sum to one.
  """
  scale = new / old
  width = max(1.0 / scale, 1.0)
  centres = (np.arange(new) + 0.5) / scale - 0.5  # Where each new sample falls on the old axis.
  weights = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(old)[None, :]) / width)
  return weights / weights.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=None)
def pi_resize_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) float64: pinv(R^T) for R = `bilinear_matrix(old, new)`, the 1-D PI-resize."""
  if old == new:
    return np.eye(old)
  return np.linalg.pinv(bilinear_matrix(old, new).T)


@functools.lru_cache(maxsize=None)
def aligned_linear_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) float64: linear interpolation with the end points aligned (the posemb resize)."""
  if old == new:
    return np.eye(old)
  position = np.linspace(0.0, old - 1, new) if new > 1 else np.zeros(1)
  low = np.floor(position).astype(int)
  high = np.minimum(low + 1, old - 1)
  fraction = position - low
  matrix = np.zeros((new, old))
  np.add.at(matrix, (np.arange(new), low), 1 - fraction)
  np.add.at(matrix, (np.arange(new), high), fraction)
  return matrix


def _resize_2d(rows: np.ndarray, columns: np.ndarray, x):
  """`x` (h, w, ...) mapped to (rows.shape[0], columns.shape[0], ...): float64 for numpy arrays,
  x's dtype at full precision for JAX arrays and tracers."""
  if isinstance(x, jax.Array):
    return jnp.einsum('ia,jb,ab...->ij...', rows.astype(x.dtype), columns.astype(x.dtype), x,
                      precision=jax.lax.Precision.HIGHEST)
  x = np.asarray(x)
  return np.einsum('ia,jb,ab...->ij...', rows, columns, x.astype(np.float64)).astype(x.dtype)


def pi_resize_kernel(kernel, new_hw: Sequence[int]):
  """A patch-embedding kernel (h, w, channels, dim) PI-resized to (new_h, new_w, channels, dim)."""
  h, w = kernel.shape[:2]
  return _resize_2d(pi_resize_matrix(h, new_hw[0]), pi_resize_matrix(w, new_hw[1]), kernel)


def resize_posemb(posemb, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix: int):
  """Position embeddings (1, num_prefix + old_h * old_w, dim) on the (new_h, new_w) grid; the first
  `num_prefix` (class token) entries are kept as they are."""
  dim = posemb.shape[-1]
  grid = posemb[0, num_prefix:].reshape(old_grid[0], old_grid[1], dim)
  grid = _resize_2d(aligned_linear_matrix(old_grid[0], new_grid[0]),
                    aligned_linear_matrix(old_grid[1], new_grid[1]), grid)
  xp = jnp if isinstance(posemb, jax.Array) else np
  return xp.concatenate([posemb[:, :num_prefix], grid.reshape(1, new_grid[0] * new_grid[1], dim)], axis=1)


def patch_size_of(params: Params) -> int:
  """The patch size that `params` are at: the side of the embedding kernel."""
  return int(params['embedding']['kernel'].shape[0])


def resize_params(params: Params, patch_size: int, image_hw: Sequence[int]) -> Params:
  """`params` of a plain ViT (per-block or scan layout) at `patch_size` for (height, width) images.

  The embedding kernel is PI-resized and learned position embeddings
  resized from the grid of the current patch size to the new one; every
  other parameter is shared as it is. Returns `params` itself when the patch
  size is already `patch_size`. Raises ValueError when a patch size does not
  divide the image or the position embeddings do not fit the image's grid.
  """
  old = patch_size_of(params)
  if old == patch_size:
    return params
  height, width = image_hw
  for p in (old, patch_size):
    if height % p or width % p:
      raise ValueError(f'patch size {p} does not divide the {height}x{width} images; use a patch size '
                       f'that divides both sides.')
  new = dict(params)
  new['embedding'] = {**params['embedding'],
                      'kernel': pi_resize_kernel(params['embedding']['kernel'], (patch_size, patch_size))}
  posemb = params.get('Transformer', {}).get('posembed_input', {}).get('pos_embedding')
  if posemb is not None:
    old_grid = (height // old, width // old)
    num_prefix = posemb.shape[1] - old_grid[0] * old_grid[1]
    if num_prefix not in (0, 1):
      raise ValueError(f'position embeddings of {posemb.shape[1]} tokens do not fit the {old_grid[0]}x'
                       f'{old_grid[1]} grid of patch size {old} on {height}x{width} images.')
    resized = resize_posemb(posemb, old_grid, (height // patch_size, width // patch_size), num_prefix)
    new['Transformer'] = {**params['Transformer'],
                          'posembed_input': {**params['Transformer']['posembed_input'], 'pos_embedding': resized}}
  return new


def check_patch_sizes(patch_sizes: Sequence[int], image_hw: Sequence[int], hybrid: bool) -> None:
  """Raises ValueError (the fix in its text) unless every patch size is a positive integer that
  divides both image sides, and the model is not a hybrid (whose patches are ResNet features)."""
  if not patch_sizes:
    return
  if hybrid:
    raise ValueError('patch_sizes needs a plain ViT, not a hybrid (its patches are cells of the ResNet '
                     "feature map); use a variant such as 'Ti/16', or patch_sizes=().")
  height, width = image_hw
  bad = [p for p in patch_sizes if not isinstance(p, int) or p < 1 or height % p or width % p]
  if bad:
    raise ValueError(f'patch_sizes={tuple(patch_sizes)}: {", ".join(map(str, bad))} do not divide the '
                     f'{height}x{width} images; use patch sizes that divide both sides.')
