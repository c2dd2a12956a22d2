"""Figure 7 of the ViT paper for any trained run: filters, position embeddings, attention distance.

  vit-jax analyze --workdir DIR --out OUT [--num_images 128] [--images FOLDER]
  vit-jax analyze --checkpoint FILE.npz [--config FILE] --out OUT

Writes into OUT:
  embedding_filters.png    the first principal components of the patch-embedding filters as RGB tiles
                           (Figure 7 left); not written for hybrids, whose patch embedding sees ResNet
                           features, not pixels
  position_similarity.png  cosine similarity of each patch's position embedding with every other's: one
                           small grid per patch, laid out as the patches are (Figure 7 centre)
  attention_distance.png   mean attention distance per head against depth (Figure 7 right)
  attention_distance.json  the same numbers, per layer and head, in pixels

Mean attention distance is the distance in pixels between the centres of the
query and key patches, weighted by attention and averaged over query patches
and images (the first --num_images of the run's eval split, or the images of
--images FOLDER, with the eval preprocessing as `predict` applies it). Class
and register tokens are dropped as queries and as keys, and each query's
weights are renormalised over the patch keys, so a head scores the distance it
looks at within the image. The token grid comes from the model (its patch
embedding's output), so non-square inputs and hybrids work.
"""

import functools
import json
import os
import sys
from typing import Any, Iterator, Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.checkpoint.run import Run, define_run_flags, run_from_flags
from vit_jax.config.sizes import image_hw
from vit_jax.errors import UsageError

# Top-level parameter names of a convolutional stem in front of the transformer
# (ours, and the original release's hybrids).
HYBRID_STEMS = ('ResNet', 'conv_root', 'gn_root')
FILES = {'filters': 'embedding_filters.png', 'similarity': 'position_similarity.png',
         'distance': 'attention_distance.png', 'json': 'attention_distance.json'}


def token_grid(model: Any, params: Any, shape: tuple[int, int]) -> tuple[int, int]:
  """(rows, columns) of patch tokens: the output grid of the model's `embedding` convolution.

  Found from shapes alone (`jax.eval_shape`), so it holds for plain ViTs (image
  / patch size) and for hybrids (the ResNet's output grid) at any input shape.
  """
  images = jnp.zeros((1, *shape, 3), jnp.float32)
  capture = lambda module, method: module.name == 'embedding' and method == '__call__'  # noqa: E731
  state = jax.eval_shape(lambda p: model.apply({'params': p}, images, capture_intermediates=capture,
                                               mutable=['intermediates'])[1], params)
  outputs = [x for x in jax.tree.leaves(state) if len(x.shape) == 4]  # (1, rows, columns, dim)
  if not outputs:
    raise UsageError(f'Model {type(model).__name__} has no `embedding` module producing a patch grid; '
                     'vit-jax analyze needs a ViT (or hybrid) with the published parameter names.')
  return int(outputs[0].shape[1]), int(outputs[0].shape[2])


def pixel_filters(params: dict) -> tuple[Optional[np.ndarray], str]:
  """(kernel (ph, pw, 3, dim), '') of a patch embedding on pixels, or (None, why not)."""
  if any(name in params for name in HYBRID_STEMS):
    return None, 'not applicable to hybrids: the patch embedding sees ResNet features, not pixels'
  kernel = params.get('embedding', {}).get('kernel')
  if kernel is None or np.ndim(kernel) != 4 or np.shape(kernel)[2] != 3:
    shape = None if kernel is None else tuple(np.shape(kernel))
    return None, f'not applicable: the patch embedding kernel {shape} does not take RGB pixels'
  return np.asarray(kernel, np.float64), ''


def filter_components(kernel: np.ndarray, num_components: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """Principal components of the `dim` filters of a (ph, pw, channels, dim) patch embedding.

  Each filter is a point in ph*pw*channels dimensions; the filters are centred
  and the eigenvectors of their covariance taken, largest first. Returns
  (components (n, ph, pw, channels), explained variance ratios (n,)), with
  n = min(num_components, ph*pw*channels, dim); each component's sign is
  chosen so that its largest-magnitude entry is positive.
  """
  ph, pw, c, dim = kernel.shape
  filters = np.asarray(kernel, np.float64).reshape(ph * pw * c, dim).T  # (dim, ph*pw*c)
  centred = filters - filters.mean(axis=0)
  variances, vectors = np.linalg.eigh(centred.T @ centred)  # Ascending.
  order = np.argsort(-variances, kind='stable')[:min(num_components, ph * pw * c, dim)]
  vectors = vectors[:, order].T  # (n, ph*pw*c)
  vectors *= np.sign(vectors[np.arange(len(vectors)), np.abs(vectors).argmax(axis=1)])[:, None]
  ratios = np.maximum(variances[order], 0) / max(variances.clip(0).sum(), 1e-30)
  return vectors.reshape(-1, ph, pw, c), ratios


def patch_position_embeddings(params: dict, model: Any, grid: tuple[int, int]) -> tuple[Optional[np.ndarray], str]:
  """((patches, dim) position embeddings of the patch tokens, a note), or (None, why there are none).

  Learned embeddings are stored as (1, prefix + rows*columns, dim), the class
  token's entry first (pool 'token'); registers have none. The prefix is
  dropped. Fixed 2-D sin-cos embeddings are recomputed on the grid.
  """
  from vit_jax.models.layers import sincos_2d_posemb

  patches = grid[0] * grid[1]
  posemb = params.get('Transformer', {}).get('posembed_input', {}).get('pos_embedding')
  if posemb is not None:
    posemb = np.asarray(posemb, np.float64)[0]
    if posemb.shape[0] < patches:
      raise UsageError(f'pos_embedding has {posemb.shape[0]} entries, fewer than the {grid[0]}x{grid[1]} '
                       'patch grid; the parameters do not belong to this model and image size.')
    return posemb[posemb.shape[0] - patches:], 'learned'
  if getattr(model, 'posemb', None) == 'sincos2d':
    return sincos_2d_posemb(*grid, model.hidden_size)[0].astype(np.float64), 'fixed 2-D sin-cos'
  return None, 'not applicable: the model has no position embeddings'


def position_similarity(embeddings: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Cosine similarities (rows, columns, rows, columns) of (rows*columns, dim) patch embeddings.

  [i, j] is the map of patch (i, j)'s similarity with every patch.
  """
  unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-30)
  return (unit @ unit.T).reshape(*grid, *grid)


def patch_distances(grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
  """(patches, patches) distances in pixels between patch centres, row-major patch order.

  A token covers height/rows x width/columns pixels of the input (for a
  hybrid, the ResNet's stride), so non-square grids and tokens are measured
  in the input's pixels.
  """
  rows, columns = grid
  y, x = np.mgrid[:rows, :columns]
  y = (y.reshape(-1) + 0.5) * shape[0] / rows
  x = (x.reshape(-1) + 0.5) * shape[1] / columns
  return np.hypot(y[:, None] - y[None, :], x[:, None] - x[None, :]).astype(np.float32)


def attention_distance_sums(attention: Any, distances: Any, weights: Any) -> Any:
  """Per head, the sum over images (times `weights`) and query patches of the attended distance.

  attention: (batch, heads, tokens, tokens), prefix tokens (class, registers)
  first; distances: (patches, patches); weights: (batch,), 0 for padding.
  Prefix tokens are dropped as queries and keys, each query's weights are
  renormalised over the patch keys. Works on numpy or traced arrays.
  """
  p = distances.shape[0]
  a = attention[:, :, -p:, -p:].astype(jnp.float32)  # Patch queries, patch keys.
  a = a / jnp.maximum(a.sum(axis=-1, keepdims=True), 1e-30)
  per_query = (a * distances).sum(axis=-1)  # (batch, heads, queries)
  return jnp.einsum('bhq,b->h', per_query, weights)


def mean_attention_distance(attention: list, grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
  """(layers, heads) mean attention distance in pixels of per-layer (batch, heads, tokens, tokens) weights."""
  distances = patch_distances(grid, shape)
  ones = np.ones(np.shape(attention[0])[0], np.float32)
  sums = np.stack([np.asarray(attention_distance_sums(np.asarray(a), distances, ones)) for a in attention])
  return sums / (len(ones) * distances.shape[0])


@functools.partial(jax.jit, static_argnames=('model',))
def _distance_sums(params, images, weights, distances, *, model):
  # Reduced on the device: only (layers, heads) numbers come back, not the attention weights.
  _, out = model.apply({'params': params}, images, train=False, return_attention=True)
  return jnp.stack([attention_distance_sums(a, distances, weights) for a in out['attention']])


def analysis_images(run: Run, images_dir: Optional[str], num_images: int, split: Optional[str],
                    batch_size: int) -> tuple[Iterator[np.ndarray], str]:
  """(batches of at most `batch_size` model inputs, a description): the first `num_images` images
  of `images_dir` (predict's preprocessing) or of the dataset split (the eval pipeline)."""
  if images_dir:
    from vit_jax.tools.predict import decode_images, find_images
    images = []
    for path in find_images([images_dir]):  # Files that do not decode are skipped, with a warning line.
      if len(images) == num_images:
        break
      images += decode_images(run.config, [path], skip=True)[1]
    if not images:
      raise UsageError(f'No image file in {images_dir!r} decodes; pass PNG, JPEG, GIF or BMP files.')
    batches = (np.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
    return batches, f'{len(images)} images of {images_dir}'
  from vit_jax.data import pipeline
  config = run.config.copy_and_resolve_references()
  config.eval_batch_size = batch_size
  config.dataset.eval_split = split or config.dataset.eval_split
  data = pipeline.open_split(config.dataset, config.dataset.eval_split)
  count = min(num_images, len(data))

  def batches():
    left = count
    for batch in pipeline.eval_iterator(config, data):
      images = batch['image'][batch['mask'] > 0][:left]
      left -= len(images)
      yield images
      if not left:
        return
  return batches(), f'{count} images of {config.dataset.name} {config.dataset.eval_split}'


def attention_distances(run: Run, batches: Iterator[np.ndarray], grid: tuple[int, int],
                        shape: tuple[int, int], batch_size: int) -> tuple[np.ndarray, int]:
  """((layers, heads) mean attention distance in pixels, number of images) over `batches`."""
  distances = jnp.asarray(patch_distances(grid, shape))
  total, count = None, 0
  for images in batches:
    n = len(images)
    padded = np.zeros((batch_size, *images.shape[1:]), np.float32)  # One compilation for every batch.
    padded[:n] = images
    weights = (np.arange(batch_size) < n).astype(np.float32)
    sums = np.asarray(jax.device_get(_distance_sums(run.params, padded, weights, distances, model=run.model)))
    total, count = (sums if total is None else total + sums), count + n
  if not count:
    raise UsageError('No images to measure attention distances on; check --images or the split.')
  return total / (count * grid[0] * grid[1]), count


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_filters(components: np.ndarray, ratios: np.ndarray, path: str, columns: int = 7) -> None:
  """The components as RGB tiles, each min-max scaled to [0, 1], `columns` per row."""
  plt = _pyplot()
  rows = -(-len(components) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(0.9 * columns, 0.95 * rows + 0.5), squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for k, (ax, c) in enumerate(zip(axes.flat, components)):
    low, high = c.min(), c.max()
    ax.imshow((c - low) / (high - low) if high > low else np.zeros_like(c), interpolation='nearest')
    ax.set_title(f'{k + 1}: {ratios[k]:.0%}', fontsize=6)
  ph, pw = components.shape[1:3]
  fig.suptitle(f'patch-embedding filters ({ph}x{pw} px): first {len(components)} principal components\n'
               '(share of the variance)', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_position_similarity(similarity: np.ndarray, path: str, title: str) -> None:
  """The paper's grid of grids: tile (i, j) is patch (i, j)'s cosine similarity with every patch."""
  plt = _pyplot()
  rows, columns = similarity.shape[:2]
  mosaic = np.full((rows * (rows + 1) - 1, columns * (columns + 1) - 1), np.nan)
  for i in range(rows):
    for j in range(columns):
      mosaic[i * (rows + 1):i * (rows + 1) + rows, j * (columns + 1):j * (columns + 1) + columns] = similarity[i, j]
  side = float(np.clip(0.35 * max(rows, columns) + 2.5, 4.0, 11.0))
  fig, ax = plt.subplots(figsize=(side * min(1.6, max(0.7, columns / rows)) + 1.0, side))
  cmap = plt.get_cmap('viridis').with_extremes(bad='white')  # White gaps between the tiles.
  shown = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation='nearest')
  step = max(1, max(rows, columns) // 14)  # Label at most ~14 tiles per axis.
  ax.set_xticks([j * (columns + 1) + (columns - 1) / 2 for j in range(0, columns, step)],
                [str(j + 1) for j in range(0, columns, step)], fontsize=7)
  ax.set_yticks([i * (rows + 1) + (rows - 1) / 2 for i in range(0, rows, step)],
                [str(i + 1) for i in range(0, rows, step)], fontsize=7)
  ax.set_xlabel('input patch column')
  ax.set_ylabel('input patch row')
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)
  fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label='cosine similarity')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_attention_distance(distance: np.ndarray, uniform: float, path: str, title: str) -> None:
  """One dot per head at (layer, mean attention distance), a dashed line at uniform attention."""
  plt = _pyplot()
  layers, heads = distance.shape
  fig, ax = plt.subplots(figsize=(5.0, 3.6))
  colors = plt.get_cmap('tab10' if heads <= 10 else 'tab20')
  for h in range(heads):
    ax.scatter(np.arange(1, layers + 1), distance[:, h], s=18, color=colors(h % colors.N),
               label=f'head {h + 1}' if heads <= 16 else None)
  ax.axhline(uniform, color='gray', linestyle='--', linewidth=1, label='uniform attention')
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_xticks(range(1, layers + 1) if layers <= 16 else range(1, layers + 1, max(1, layers // 12)))
  ax.set_ylim(0, 1.1 * max(float(distance.max()), uniform))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, loc='lower right', ncol=2 if heads > 6 else 1)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def check_options(images_dir: Optional[str], num_images: int, split: Optional[str], batch_size: int,
                  num_components: int) -> None:
  """Raises UsageError for option values `analyze` cannot use (before anything is loaded)."""
  for name, value in (('num_images', num_images), ('batch_size', batch_size), ('num_components', num_components)):
    if value < 1:
      raise UsageError(f'--{name}={value} must be a positive integer.')
  if images_dir and split:
    raise UsageError(f'--images={images_dir!r} and --split={split!r} both name the images; pass one.')
  if images_dir and not os.path.isdir(images_dir):
    raise UsageError(f'--images={images_dir!r} is not a folder; give a folder of image files.')


def analyze(run: Run, out_dir: str, *, images_dir: Optional[str] = None, num_images: int = 128,
            split: Optional[str] = None, batch_size: int = 32, num_components: int = 28) -> dict[str, Any]:
  """Writes Figure 7's three pictures and attention_distance.json for `run` into `out_dir`.

  Returns {'paths': written files by kind, 'filters': note, 'positions': note,
  'distance': (layers, heads) array, 'report': the JSON written}.
  """
  check_options(images_dir, num_images, split, batch_size, num_components)
  params = jax.device_get(run.params)
  shape = image_hw(run.config.input.image_size)
  grid = token_grid(run.model, params, shape)
  os.makedirs(out_dir, exist_ok=True)
  paths = {kind: os.path.join(out_dir, name) for kind, name in FILES.items()}
  result: dict[str, Any] = {'paths': {}}

  kernel, note = pixel_filters(params)
  if kernel is not None:
    components, ratios = filter_components(kernel, num_components)
    plot_filters(components, ratios, paths['filters'])
    result['paths']['filters'] = paths['filters']
    note = (f'{len(components)} principal components of {kernel.shape[3]} {kernel.shape[0]}x{kernel.shape[1]} '
            f'filters, {ratios.sum():.0%} of their variance')
  result['filters'] = note

  embeddings, kind = patch_position_embeddings(params, run.model, grid)
  if embeddings is not None:
    plot_position_similarity(position_similarity(embeddings, grid), paths['similarity'],
                             f'position embedding similarity ({kind}, {grid[0]}x{grid[1]} patches)')
    result['paths']['similarity'] = paths['similarity']
    kind = f'{kind}, {grid[0]}x{grid[1]} patch grid'
  result['positions'] = kind

  batches, source = analysis_images(run, images_dir, num_images, split, batch_size)
  distance, count = attention_distances(run, batches, grid, shape, batch_size)
  pairwise = patch_distances(grid, shape)
  uniform = float(pairwise.mean())
  report = {
      'step': run.step, 'images': source, 'num_images': count, 'image_size': list(shape),
      'token_grid': list(grid), 'pixels_per_token': [shape[0] / grid[0], shape[1] / grid[1]],
      'tokens': 'patch queries and patch keys only; class and register tokens dropped, each query\'s '
                'weights renormalised over the patch keys',
      'uniform_attention_distance': uniform, 'max_patch_distance': float(pairwise.max()),
      'mean_attention_distance': distance.tolist(),  # (layers, heads), pixels
      'layers': [{'layer': i + 1, 'mean': float(row.mean()), 'heads': row.tolist()}
                 for i, row in enumerate(distance)]}
  with open(paths['json'], 'w') as f:
    json.dump(report, f, indent=1)
  plot_attention_distance(distance, uniform, paths['distance'], f'mean attention distance, {source}')
  result['paths'].update(distance=paths['distance'], json=paths['json'])
  result.update(distance=distance, report=report)
  return result


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing this module adds none."""
  define_run_flags()
  flags.DEFINE_string('out', None, 'Folder to write the pictures and attention_distance.json into.')
  flags.DEFINE_string('images', None, 'Measure attention distances on the image files of this folder '
                      '(default: the eval split of the run).')
  flags.DEFINE_string('split', None, 'Dataset split to take the images from (default: config.dataset.eval_split).')
  flags.DEFINE_integer('num_images', 128, 'How many images the attention distances are averaged over.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.DEFINE_integer('num_components', 28, 'Principal components of the filters to show (the paper: 28).')
  flags.mark_flag_as_required('out')


def main(argv):
  if len(argv) > 1:
    raise UsageError(f'Unexpected arguments: {" ".join(argv[1:])}; name image folders with --images.')
  f = flags.FLAGS
  try:
    check_options(f.images, f.num_images, f.split, f.batch_size, f.num_components)
    result = analyze(run_from_flags(f.workdir, f.checkpoint, f.config, ema=f.ema, step=f.step), f.out, images_dir=f.images,
                     num_images=f.num_images, split=f.split, batch_size=f.batch_size,
                     num_components=f.num_components)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  paths = result['paths']
  print(f"embedding filters: {paths.get('filters', result['filters'])}"
        + (f" ({result['filters']})" if 'filters' in paths else ''))
  print(f"position embeddings: {paths.get('similarity', result['positions'])}"
        + (f" ({result['positions']})" if 'similarity' in paths else ''))
  print(f"mean attention distance ({result['report']['images']}): {paths['distance']}, {paths['json']}")
  for row in result['report']['layers']:
    heads = ' '.join(f'{d:.2f}' for d in row['heads'])
    print(f"  layer {row['layer']}: {row['mean']:.2f} px (heads {heads})", flush=True)
