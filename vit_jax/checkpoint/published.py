"""Published checkpoints by name: each name is a file under a bucket root, downloaded once and cached.

Names (docs/transfer.md has the table):

  imagenet21k/ViT-B_16                   the original release: FOLDER/FILE without .npz, for the
  imagenet21k+imagenet2012/ViT-B_16      folders of gs://vit_models (imagenet21k,
  imagenet21k/R50+ViT-B_16               imagenet21k+imagenet2012, augreg, sam, gsam)
  augreg/Ti_16-i21k-300ep-lr_0.001-...   one AugReg file, as in the filename / adapt_filename columns
  augreg:B/16[@DS][->ADAPT_DS[@RES]]     AugReg by model, chosen from augreg/index.csv (below)
  i1k-s16-300ep, SigLIP B/16 224, ...    big_vision's short names of plain ViTs (`BIG_VISION`)

`augreg:NAME` picks, as the AugReg colab does, the pre-training run of model
NAME (the `name` column: Ti/16, S/32, B/16, R26+S/32, ...) on `ds` == DS
(default i21k; also i1k, i21k_30) with the highest `final_val`; `->ADAPT_DS`
then picks that run's fine-tune on ADAPT_DS (the `adapt_ds` column, a tfds
name such as imagenet2012 or oxford_iiit_pet), at `adapt_resolution` RES if
given, with the highest `adapt_final_val`.

A path or URL ending in `.npz:KEY` selects the sub-tree KEY of the file, e.g.
the image tower `:img` of big_vision's two-tower files (the SigLIP names
carry it already). The roots `gs://vit_models` and `gs://big_vision` are
overridden by $VIT_JAX_CHECKPOINT_ROOT and $VIT_JAX_BIG_VISION_ROOT (a local
directory or a URL laid out as the bucket). Downloads go to
$VIT_JAX_CACHE (default ~/.cache/vit_jax/checkpoints), one per file even when
several processes start at once: under a lock file, into a temporary name,
checked against the remote size, then renamed into place.

$VIT_JAX_CACHE may be a gs:// URL (a cache that the hosts of a pod share):
there the lock is an object created only where absent (storage.object_lock),
the file is downloaded to a local temporary file, checked against the remote
size, and uploaded as one object, which appears whole or not at all.

gs:// URLs are read through vit_jax/storage.py (gcsfs, pointed at a local
server by STORAGE_EMULATOR_HOST in the tests); no TensorFlow is needed.
"""

import csv
import dataclasses
import fcntl
import io
import os
import re
import sys
import tempfile
import threading
from typing import Optional

from vit_jax import storage
from vit_jax.errors import UsageError

ROOT_ENV, BIG_VISION_ROOT_ENV, CACHE_ENV = 'VIT_JAX_CHECKPOINT_ROOT', 'VIT_JAX_BIG_VISION_ROOT', 'VIT_JAX_CACHE'
BUCKETS = {'vit_models': ROOT_ENV, 'big_vision': BIG_VISION_ROOT_ENV}  # bucket -> env var overriding its root
# Folders of gs://vit_models whose files are named FOLDER/FILE.
FOLDERS = ('imagenet21k', 'imagenet21k+imagenet2012', 'augreg', 'sam', 'gsam')
AUGREG_INDEX = 'augreg/index.csv'

_AUGREG_FILES = {  # The best i21k pre-training per model (README of google-research/vision_transformer).
    'Ti/16': 'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0',
    'S/32': 'S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0',
    'S/16': 'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0',
    'B/32': 'B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0',
    'B/16': 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0',
    'B/8': 'B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0',
    'L/16': 'L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0',
}
# big_vision's short names (big_vision/models/vit.py VANITY_NAMES) of plain ViTs -> (bucket, file, sub-tree).
BIG_VISION: dict[str, tuple[str, str, str]] = {
    **{f'howto-i21k-{model}': ('vit_models', f'augreg/{file}.npz', '') for model, file in _AUGREG_FILES.items()},
    # "Better plain ViT baselines for ImageNet-1k": S/16, pool 'gap', posemb 'sincos2d', pre-logits.
    'i1k-s16-90ep': ('big_vision', 'vit_s16_i1k_90ep.npz', ''),
    'i1k-s16-150ep': ('big_vision', 'vit_s16_i1k_150ep.npz', ''),
    'i1k-s16-300ep': ('big_vision', 'vit_s16_i1k_300ep.npz', ''),
    # SigLIP image towers: pool 'map', no class token, head = the embedding projection.
    'SigLIP B/16 224': ('big_vision', 'siglip/webli_en_b16_224_63724782.npz', 'img'),
    'SigLIP B/16 256': ('big_vision', 'siglip/webli_en_b16_256_60500360.npz', 'img'),
    'SigLIP B/16 384': ('big_vision', 'siglip/webli_en_b16_384_68578854.npz', 'img'),
    'SigLIP B/16 512': ('big_vision', 'siglip/webli_en_b16_512_68580893.npz', 'img'),
    'SigLIP L/16 256': ('big_vision', 'siglip/webli_en_l16_256_60552751.npz', 'img'),
    'SigLIP L/16 384': ('big_vision', 'siglip/webli_en_l16_384_63634585.npz', 'img'),
}
_AUGREG_SPEC = re.compile(r'^augreg:(?P<name>[^@>]+?)(@(?P<ds>[^@>-]+))?(->(?P<adapt>[^@]+?)(@(?P<res>\d+))?)?$')
_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')
_CHUNK = 16 << 20


@dataclasses.dataclass(frozen=True)
class Resolved:
  """Where a checkpoint spec points: a local file, or a remote `url` cached at `cache_path`."""
  spec: str  # As the user wrote it.
  path: str  # The local file (local checkpoints), else the remote URL.
  cache_path: Optional[str]  # None for a local file.
  key: str = ''  # The sub-tree to select ('' = the whole file).
  hint: str = ''  # For a name: the file to put into a mirror directory (relative to the root).


def split_key(spec: str) -> tuple[str, str]:
  """'x.npz:img' -> ('x.npz', 'img'); anything without `.npz:` -> (spec, '')."""
  match = re.match(r'^(.*\.npz):([^:]+)$', spec)
  return (match.group(1), match.group(2).strip('/')) if match else (spec, '')


def cache_dir() -> str:
  """$VIT_JAX_CACHE (a local folder or a gs:// URL), or ~/.cache/vit_jax/checkpoints."""
  root = os.environ.get(CACHE_ENV) or os.path.join('~', '.cache', 'vit_jax', 'checkpoints')
  storage.check_supported(root, f'${CACHE_ENV}')
  return storage.absolute(root) if storage.is_url(root) else os.path.abspath(os.path.expanduser(root))


def _check_source(url: str, what: str) -> None:
  """UsageError for a URL that downloads cannot read: neither gs:// nor http(s)://."""
  if not url.startswith(('http://', 'https://')):
    storage.check_supported(url, what)


def bucket_root(bucket: str) -> str:
  """The root standing for gs://BUCKET: its override from the environment, or the bucket itself."""
  root = (os.environ.get(BUCKETS[bucket]) or f'gs://{bucket}').rstrip('/')
  _check_source(root, f'${BUCKETS[bucket]}')
  return root


def _join(root: str, relative: str) -> str:
  return f'{root}/{relative}' if _URL.match(root) else os.path.join(os.path.expanduser(root), relative)


def _in_bucket(spec: str, bucket: str, relative: str, key: str = '') -> Resolved:
  return Resolved(spec, _join(bucket_root(bucket), relative), storage.join(cache_dir(), bucket, relative),
                  key, hint=f'{BUCKETS[bucket]} to a directory holding {relative}')


def resolve(spec: str) -> Resolved:
  """Where the checkpoint `spec` (name, local path or URL, optionally `.npz:KEY`) lives.

  Reads augreg/index.csv (downloading it once) for `augreg:` names; raises
  UsageError for a spec that is none of these.
  """
  path, key = split_key(spec)
  if spec in BIG_VISION:
    bucket, relative, key = BIG_VISION[spec]
    return _in_bucket(spec, bucket, relative, key)
  if _URL.match(path):
    _check_source(path, 'checkpoint')
    scheme, rest = path.split('://', 1)
    return Resolved(spec, path, storage.join(cache_dir(), 'urls', scheme, rest.lstrip('/')), key)
  if os.path.exists(os.path.expanduser(path)):
    return Resolved(spec, os.path.expanduser(path), None, key)
  if spec.startswith('augreg:'):
    filename = pick_augreg(spec)
    print(f'{spec} is augreg/{filename}', file=sys.stderr, flush=True)
    return _in_bucket(spec, 'vit_models', f'augreg/{filename}.npz')
  if path.split('/')[0] in FOLDERS and path.count('/') == 1:
    relative = path if path.endswith('.npz') else path + '.npz'
    return _in_bucket(spec, 'vit_models', relative, key)
  raise UsageError(
      f'Checkpoint {spec!r} does not exist: it is no local file, no gs:// or https:// URL and no published '
      'name; give a .npz path, a URL, or a name such as imagenet21k/ViT-B_16, augreg:B/16, '
      "augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0 or 'i1k-s16-300ep' "
      '(docs/transfer.md lists them).')


def check_source(spec: str, what: str) -> None:
  """UsageError, before any work, for a checkpoint `spec` that could never be read: a URL of a scheme
  that downloads cannot read (s3://...), or a name or URL to download into a cache root of one."""
  path, _ = split_key(spec)
  if _URL.match(path):
    _check_source(path, what)
  if not os.path.exists(os.path.expanduser(path)):
    cache_dir()


def fetch(spec: str) -> tuple[str, str]:
  """(local file, sub-tree key) of checkpoint `spec`: a local path as is, anything remote from the cache.

  Downloads on the first use; a file already in the cache is used without
  touching the network.
  """
  resolved = resolve(spec)
  if resolved.cache_path is None:
    return resolved.path, resolved.key
  return download(resolved), resolved.key


def download(resolved: Resolved) -> str:
  """`resolved.path` copied to `resolved.cache_path` (once, atomically, size-checked); returns the latter."""
  dest = resolved.cache_path
  if storage.is_url(dest):
    return _download_into_bucket(resolved)
  if os.path.isfile(dest):
    return dest
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  # One download per file: others wait on the lock, then find the finished file.
  with open(dest + '.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.isfile(dest):
      return dest
    temporary = f'{dest}.tmp-{os.getpid()}-{threading.get_ident()}'
    try:
      _copy_checked(resolved, temporary)
      os.replace(temporary, dest)
    finally:
      if os.path.exists(temporary):
        os.remove(temporary)
  return dest


def _download_into_bucket(resolved: Resolved) -> str:
  """download() into a cache in a bucket: an object for a lock, a local temporary file, one upload."""
  dest = resolved.cache_path
  try:
    if storage.isfile(dest):
      return dest
    with storage.object_lock(dest + '.lock'):
      if storage.isfile(dest):
        return dest
      with tempfile.TemporaryDirectory(prefix='vit_jax_download_') as folder:
        temporary = os.path.join(folder, storage.basename(dest))
        _copy_checked(resolved, temporary)
        storage.upload(temporary, dest)
  except UsageError:
    raise
  except Exception as e:  # The cache's bucket: missing, no permission, no credentials.
    raise UsageError(storage.bucket_error(dest, f'${CACHE_ENV}', e)) from None
  return dest


def _copy_checked(resolved: Resolved, temporary: str) -> None:
  """Copies `resolved.path` to the local file `temporary`, checked against the source's size; a
  failure is a one-line UsageError."""
  try:
    written, expected = _copy(resolved.path, temporary)
  except Exception as e:  # Network, permission and not-found errors of gcsfs and urllib alike.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    where = f' (or set {resolved.hint})' if resolved.hint else ''
    raise UsageError(f'Cannot fetch checkpoint {resolved.spec!r}: tried {resolved.path} ({reason}); '
                     f'without network, put the file at {resolved.cache_path}{where}.') from None
  if expected is not None and written != expected:
    raise UsageError(f'Download of {resolved.path} stopped after {written} of {expected} bytes; '
                     'run again to retry.')


def _copy(url: str, dest: str) -> tuple[int, Optional[int]]:
  """Copies `url` (https://, gs:// or a local mirror's file) to the local `dest`: (bytes written, size)."""

  def announce(size: Optional[int]) -> None:  # Once the source answered: a failure stays one line.
    shown = f' ({size / 1e6:.1f} MB)' if size is not None else ''
    print(f'downloading {url}{shown}', file=sys.stderr, flush=True)
  if not url.startswith(('http://', 'https://')):  # gs:// through gcsfs, a mirror directory through the OS.
    return storage.copy_to_local(url, dest, _CHUNK, announce)
  import urllib.request
  written = 0
  with open(dest, 'wb') as out, urllib.request.urlopen(url, timeout=60) as response:
    length = response.headers.get('Content-Length')
    expected = int(length) if length else None
    announce(expected)
    while chunk := response.read(_CHUNK):
      written += out.write(chunk)
  return written, expected


def augreg_index() -> list[dict[str, str]]:
  """The rows of augreg/index.csv (fetched once into the cache)."""
  cached = download(_in_bucket(AUGREG_INDEX, 'vit_models', AUGREG_INDEX))  # A local file or a gs:// URL.
  return list(csv.DictReader(io.StringIO(storage.read_text(cached), newline='')))


def _best(rows: list[dict[str, str]], column: str) -> dict[str, str]:
  return max(rows, key=lambda row: float(row[column]) if row[column] not in ('', 'nan') else float('-inf'))


def pick_augreg(spec: str) -> str:
  """The AugReg file (without .npz) that `augreg:NAME[@DS][->ADAPT_DS[@RES]]` names; see the module doc."""
  match = _AUGREG_SPEC.match(spec)
  if not match:
    raise UsageError(f'Cannot parse AugReg name {spec!r}; write augreg:NAME[@DS][->ADAPT_DS[@RES]], e.g. '
                     'augreg:B/16, augreg:B/16@i1k or augreg:B/16@i21k->imagenet2012@384.')
  name, ds = match.group('name'), match.group('ds') or 'i21k'
  rows = augreg_index()
  models = [row for row in rows if row['name'] == name]
  if not models:
    raise UsageError(f'No AugReg model {name!r} in {AUGREG_INDEX} ({spec!r}); models: '
                     f'{", ".join(sorted({row["name"] for row in rows}))}.')
  upstream = [row for row in models if row['ds'] == ds]
  if not upstream:
    raise UsageError(f'AugReg {name} has no pre-training on {ds!r} ({spec!r}); datasets: '
                     f'{", ".join(sorted({row["ds"] for row in models}))}.')
  filename = _best(upstream, 'final_val')['filename']
  adapt = match.group('adapt')
  if not adapt:
    return filename
  tunes = [row for row in rows if row['filename'] == filename and row['adapt_ds'] == adapt]
  if not tunes:
    raise UsageError(f'AugReg {filename} has no fine-tune on {adapt!r} ({spec!r}); fine-tuned on: '
                     f'{", ".join(sorted({r["adapt_ds"] for r in rows if r["filename"] == filename}))}.')
  resolution = match.group('res')
  if resolution:
    at = [row for row in tunes if str(int(float(row['adapt_resolution']))) == resolution]
    if not at:
      raise UsageError(f'AugReg {filename} on {adapt} has no fine-tune at {resolution} px ({spec!r}); '
                       f'resolutions: {", ".join(sorted({r["adapt_resolution"] for r in tunes}))}.')
    tunes = at
  return _best(tunes, 'adapt_final_val')['adapt_filename']
