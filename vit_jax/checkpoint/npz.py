"""The published `.npz` format: load, export, position-embedding resize, fine-tune init.

Two published layouts are read, both flat `np.savez` files with '/'-joined keys:

* original ViT / AugReg release (google-research/vision_transformer), which is
  also our own layout: `embedding/kernel`, `cls`,
  `Transformer/posembed_input/pos_embedding` (class entry included),
  `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}/...`, `Transformer/encoder_norm/...`,
  `pre_logits/...` when present, `head/...`.
* big_vision: optionally under `params/`, blocks named `LayerNorm_0`,
  `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0` (or stacked
  under `Transformer/encoderblock` by `nn.scan`), a top-level `pos_embedding`
  without the class entry (big_vision adds it before prepending the class
  token), and the attention-pooling head `MAPHead_0/...`.

`save_npz` always writes the first. Arrays are copied unchanged, so export
then load is bit-exact.

Hybrids (R50+B/16, ...) add the ResNet at the top level, as the original
release has it: `conv_root`, `gn_root`, `block{i}/unit{j}/{conv1..3, gn1..3,
conv_proj, gn_proj}`. The release's files keep GroupNorm `scale`/`bias` in the
pre-Linen shape (1, 1, 1, channels); they are read as Linen's (channels,) and
written back in the release's shape (`_GROUPNORM_KEY`).
"""

import io
import math
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import storage
from vit_jax.config.sizes import image_hw
from vit_jax.errors import UsageError
from vit_jax.models import flexi
from vit_jax.models.vit import stack_blocks, unstack_blocks

Params = dict[str, Any]

# big_vision's auto-named block children -> the original release's names.
_BIG_VISION_BLOCK = {'LayerNorm_0': 'LayerNorm_0',
                     'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
                     'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}
_BLOCK_KEY = re.compile(r'^Transformer/encoderblock_(\d+)/([^/]+)/(.*)$')
# GroupNorm parameters of the hybrids' ResNet (see google/flax#1721 for the shape change).
_GROUPNORM_KEY = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')


def _groupnorm_to_linen(flat: dict[str, Any]) -> dict[str, Any]:
  """The release's (1, 1, 1, C) GroupNorm scales and biases -> (C,)."""
  return {k: np.reshape(v, v.shape[-1:]) if _GROUPNORM_KEY.search(k) and np.ndim(v) == 4
          and v.shape[:3] == (1, 1, 1) else v for k, v in flat.items()}


def _groupnorm_to_release(flat: dict[str, Any]) -> dict[str, Any]:
  """(C,) GroupNorm scales and biases -> the release's (1, 1, 1, C)."""
  return {k: np.reshape(v, (1, 1, 1, -1)) if _GROUPNORM_KEY.search(k) and np.ndim(v) == 1 else v
          for k, v in flat.items()}


def flatten_params(params: Params) -> dict[str, np.ndarray]:
  """Nested params -> {'a/b/c': array}, the key format of the published files."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat['/'.join(str(getattr(k, 'key', k)) for k in path)] = leaf
  return flat


def unflatten_params(flat: dict[str, Any]) -> Params:
  """{'a/b/c': array} -> nested dicts."""
  params: Params = {}
  for key, value in flat.items():
    *parents, name = key.split('/')
    node = params
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  return params


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def _from_big_vision(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision keys (per-block) -> original-layout keys, arrays untouched except posemb."""
  out = {}
  for key, value in flat.items():
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) in _BIG_VISION_BLOCK:
      key = f'Transformer/encoderblock_{match.group(1)}/{_BIG_VISION_BLOCK[match.group(2)]}/{match.group(3)}'
    elif key.split('/')[0] in ('probe', 'MlpBlock_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_0'):
      key = 'MAPHead_0/' + key  # MAP head inlined at the top level (early ViT-G checkpoints).
    out[key] = value
  if 'pos_embedding' in out:
    posemb = out.pop('pos_embedding')
    if 'cls' in out and _is_square(posemb.shape[1]):
      # The class token got no position embedding: a zero entry is the same function.
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    out['Transformer/posembed_input/pos_embedding'] = posemb
  return out


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of the .npz file `path` (a local file, or a gs:// URL: a checkpoint cache in a bucket)."""
  if not storage.isfile(path):
    raise UsageError(f'Checkpoint file {path!r} does not exist; give the path of a .npz file '
                     '(original ViT/AugReg or big_vision layout), e.g. --config.init.path=PATH.')
  try:
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
    with np.load(source, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (ValueError, OSError) as e:
    raise UsageError(f'Cannot read {path!r} as a .npz checkpoint ({e}); give a file written by '
                     'np.savez, such as the published ViT checkpoints.') from None


def _select(flat: dict[str, np.ndarray], key: str, spec: str) -> dict[str, np.ndarray]:
  """The sub-tree `key` ('img', 'a/b') of flat arrays, with its prefix removed."""
  prefix = key + '/'
  selected = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if not selected:
    tops = sorted({k.split('/')[0] for k in flat})
    raise UsageError(f'Checkpoint {spec!r} has no sub-tree {key!r}; its top-level keys are '
                     f'{", ".join(tops[:12])}{", ..." if len(tops) > 12 else ""}.')
  return selected


def load_npz(path: str) -> Params:
  """Parameters for `VisionTransformer` from a published `.npz` file, either layout.

  `path` is a local file, a gs:// / https:// URL or a published name
  (`vit_jax.checkpoint.published`: downloaded once into the cache), and may
  end in `.npz:KEY` to take the sub-tree KEY (e.g. `:img` of a two-tower file).
  Returns nested dicts of numpy arrays in the per-block layout (use
  `vit_jax.models.vit.stack_blocks` for a `scan=True` model, or
  `load_for_model`, which also checks every key and shape).
  """
  from vit_jax.checkpoint import published
  local, key = published.fetch(path)
  flat = _read_npz(local)
  if flat and all(k.startswith('params/') for k in flat):
    flat = {k[len('params/'):]: v for k, v in flat.items()}
  if key:
    flat = _select(flat, key, path)
  # A scanned checkpoint (stacked blocks) is split into per-block arrays first.
  flat = flatten_params(unstack_blocks(unflatten_params(flat)))
  big_vision_children = ('MultiHeadDotProductAttention_0', 'MlpBlock_0', 'LayerNorm_1')
  big_vision = 'pos_embedding' in flat or any(
      (m := _BLOCK_KEY.match(k)) and m.group(2) in big_vision_children for k in flat)
  if big_vision:
    flat = _from_big_vision(flat)
  return unflatten_params(_groupnorm_to_linen(flat))


def save_npz(params: Params, path: str) -> None:
  """Writes `params` (per-block or scanned) to `path` in the original ViT layout."""
  flat = flatten_params(unstack_blocks(jax.device_get(params)))
  flat = _groupnorm_to_release({k: np.asarray(v) for k, v in flat.items()})
  buffer = io.BytesIO()  # A file object keeps np.savez from appending '.npz'.
  np.savez(buffer, **{k: np.asarray(v) for k, v in flat.items()})
  storage.write_bytes(path, buffer.getvalue())  # A local path or a gs:// URL; written whole.


def _resize_linear(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Linear interpolation along `axis` to `size` samples, end points aligned."""
  n = x.shape[axis]
  if n == size:
    return x
  pos = np.linspace(0.0, n - 1, size) if size > 1 else np.zeros(1)
  low = np.floor(pos).astype(int)
  high = np.minimum(low + 1, n - 1)
  shape = [1] * x.ndim
  shape[axis] = size
  frac = (pos - low).reshape(shape)
  return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def resize_posemb(posemb: np.ndarray, new_grid: tuple[int, int], num_prefix: int,
                  new_num_prefix: Optional[int] = None,
                  old_grid: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Position embeddings (1, num_prefix + h*w, dim) for a new (rows, columns) patch grid.

  The grid part is resized bilinearly on its 2-D grid, `old_grid` (default:
  the square its token count makes), to `new_grid`, square or not; the
  class-token entries (the first `num_prefix`) are kept apart and copied, or
  dropped (`new_num_prefix=0`), or added as zeros (`new_num_prefix=1` from 0).
  """
  new_num_prefix = num_prefix if new_num_prefix is None else new_num_prefix
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  if old_grid is None:
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
      raise UsageError(f'Cannot resize position embeddings of {grid.shape[1]} grid tokens: not a '
                       'square grid; fine-tune at the pretraining resolution or give a square checkpoint.')
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != grid.shape[1]:
    raise ValueError(f'old_grid {old_grid} does not hold the {grid.shape[1]} grid tokens of posemb.')
  grid = grid.reshape(old_grid[0], old_grid[1], -1).astype(np.float64)
  grid = _resize_linear(_resize_linear(grid, new_grid[0], 0), new_grid[1], 1)
  grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(posemb.dtype)
  if new_num_prefix > num_prefix:
    zeros = np.zeros((1, new_num_prefix - num_prefix, posemb.shape[2]), posemb.dtype)
    prefix = np.concatenate([prefix, zeros], axis=1)
  return np.concatenate([prefix[:, :new_num_prefix], grid], axis=1)


def check_params(params: Params, expected: Params, source: str) -> None:
  """Raises one UsageError listing every missing, unexpected and shape-mismatched key."""
  have, want = flatten_params(params), flatten_params(expected)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  mismatched = sorted(k for k in set(have) & set(want) if tuple(np.shape(have[k])) != tuple(want[k].shape))
  if not (missing or unexpected or mismatched):
    return

  def listed(keys, describe=str):
    shown = ', '.join(describe(k) for k in keys[:6])
    return shown + (f', ... ({len(keys) - 6} more)' if len(keys) > 6 else '')
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing: {listed(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected: {listed(unexpected)}')
  if mismatched:
    problems.append(f'{len(mismatched)} with other shapes: ' + listed(
        mismatched, lambda k: f'{k} {tuple(np.shape(have[k]))} vs model {tuple(want[k].shape)}'))
  raise UsageError(f'{source} does not fit the model: {"; ".join(problems)}. Match config.model '
                   '(variant, pool, representation_size, num_registers, qk_norm, layerscale) '
                   'to the checkpoint.')


def adapt_params(loaded: Params, template: Params, *, reset_head: bool, source: str,
                 grid: Optional[tuple[int, int]] = None) -> Params:
  """`loaded` (per-block layout) made to fit `template` (shapes of the target model).

  A patch embedding of another patch size is PI-resized to the template's
  (`vit_jax.models.flexi`). Position embeddings are resized to the template's patch grid, `grid` (rows,
  columns; default: the square its token count makes), the head
  is replaced by zeros when `reset_head`, a `pre_logits` layer the template
  lacks is dropped (as the paper does when fine-tuning) and one it has but
  the checkpoint lacks keeps the template's value. Blocks are stacked for a
  scanned template. Everything else must match exactly (`check_params`).
  """
  loaded = unstack_blocks(loaded)
  template_flat = flatten_params(unstack_blocks(template))
  flat = flatten_params(loaded)
  kernel = 'embedding/kernel'
  if (kernel in flat and kernel in template_flat and np.ndim(flat[kernel]) == 4
      and np.shape(flat[kernel])[2:] == template_flat[kernel].shape[2:]
      and np.shape(flat[kernel])[:2] != template_flat[kernel].shape[:2]):
    # Another patch size: the FlexiViT PI-resize (vit_jax/models/flexi.py).
    flat[kernel] = flexi.pi_resize_kernel(np.asarray(flat[kernel]), template_flat[kernel].shape[:2])
  key = 'Transformer/posembed_input/pos_embedding'
  if key in flat and key in template_flat and np.shape(flat[key]) != template_flat[key].shape:
    src_prefix, dst_prefix = int('cls' in flat), int('cls' in template_flat)
    if grid is None:
      side = math.isqrt(template_flat[key].shape[1] - dst_prefix)
      grid = (side, side)
    flat[key] = resize_posemb(np.asarray(flat[key]), tuple(grid), src_prefix, dst_prefix)
  if reset_head:
    for name in [k for k in flat if k.startswith('head/')]:
      del flat[name]
    for name in [k for k in template_flat if k.startswith('head/')]:
      flat[name] = np.zeros(template_flat[name].shape, template_flat[name].dtype)
    has_pre_logits = any(k.startswith('pre_logits/') for k in template_flat)
    for name in [k for k in flat if k.startswith('pre_logits/') and not has_pre_logits]:
      del flat[name]
    for name in [k for k in template_flat if k.startswith('pre_logits/') and k not in flat]:
      flat[name] = template_flat[name]
  check_params(flat, template_flat, source)
  # Same dtype as the model (a bfloat16 checkpoint becomes float32 parameters).
  flat = {k: v if isinstance(v, (jax.Array, jax.ShapeDtypeStruct)) else np.asarray(v, template_flat[k].dtype)
          for k, v in flat.items()}
  params = unflatten_params(flat)
  is_scanned = 'encoderblock' in template.get('Transformer', {})
  return stack_blocks(params) if is_scanned else params


def load_for_model(path: str, model: nn.Module, image_size, reset_head: bool = False) -> Params:
  """Loads `path` (.npz, or an orbax workdir/checkpoint) as parameters of `model` at `image_size`
  (one side or (height, width)).

  Resizes position embeddings to the model's patch grid; fails with one
  UsageError naming every key that does not fit.
  """
  height, width = image_hw(image_size)
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, height, width, 3)))  # noqa: E731
  # A fresh head needs real initial values (a new pre_logits layer); loading needs only shapes.
  template = jax.device_get(jax.jit(init)()) if reset_head else jax.eval_shape(init)
  return adapt_params(load_pretrained(path), template['params'], reset_head=reset_head, source=path,
                      grid=_token_grid(model, height, width))


def _token_grid(model: nn.Module, height: int, width: int) -> Optional[tuple[int, int]]:
  """The model's patch grid at (height, width), for the posemb resize; None if it cannot say."""
  token_grid = getattr(model, 'token_grid', None)
  return token_grid(height, width) if token_grid else None


def load_pretrained(path: str) -> Params:
  """Per-block parameters from a `.npz` (file, URL or published name), an orbax workdir or step directory
  (local or gs://)."""
  if path.endswith('.npz') or ':' in path and not storage.is_url(path) or not storage.isdir(path):
    return load_npz(path)
  import orbax.checkpoint as ocp  # Local: only this branch needs orbax.
  directory, step = storage.join(path, 'checkpoints'), None
  name = storage.basename(path)
  if not storage.isdir(directory) and name.isdigit():
    directory, step = storage.dirname(path.rstrip('/')), int(name)
  if not storage.isdir(directory):
    raise UsageError(f'config.init.path={path!r} is a directory but neither a vit_jax workdir '
                     '(with checkpoints/) nor a checkpoint step directory; give a .npz file or a workdir.')
  manager = ocp.CheckpointManager(storage.absolute(directory))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise UsageError(f'No checkpoint in {directory!r}; train there first or give a .npz file.')
  try:
    restored = manager.restore(step)
  finally:
    manager.close()
  return unstack_blocks(jax.tree.map(np.asarray, restored['params']))


def init_from_pretrained(state: Any, config: ml_collections.ConfigDict) -> Any:
  """`state` with its params replaced by those of `config.init.path`, fitted to the model.

  For the fine-tuning hook in `loop.train_and_evaluate`: the state was just
  created (random init, already placed); its params give the target shapes
  and shardings. The optimizer state is kept: for SGD and AdamW it does not
  depend on the parameter values at step 0. A no-op when the path is ''.
  """
  path = config.init.path
  if not path:
    return state
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  from vit_jax.models import model_from_config  # Local: the model's grid, for the posemb resize.
  grid = _token_grid(model_from_config(config), *image_hw(config.input.image_size))
  params = adapt_params(load_pretrained(path), template, reset_head=config.init.reset_head,
                        source=f'config.init.path={path!r}', grid=grid)
  params = flatten_params(params)
  # pre_logits kept from the fresh init are the state's own placed arrays.
  current = flatten_params(state.params)
  for key, value in params.items():
    if isinstance(value, jax.ShapeDtypeStruct):
      params[key] = current[key]

  def place(value, target):
    if isinstance(value, jax.Array):
      return value
    # Every process holds the whole array; each device takes its own shard.
    return jax.make_array_from_callback(value.shape, target.sharding, lambda index: value[index])
  placed = {k: place(v, current[k]) for k, v in params.items()}
  if jax.process_index() == 0:
    print(f'Initialised from {path} (head {"reset" if config.init.reset_head else "loaded"}, '
          f'position embeddings for {config.input.image_size} px).', flush=True)
  return state.replace(params=jax.tree.unflatten(jax.tree.structure(state.params),
                                                 [placed[k] for k in flatten_params(state.params)]))
