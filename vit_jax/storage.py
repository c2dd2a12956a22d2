"""Every path a run reads or writes, on local disk or in a bucket (`gs://BUCKET/...`), through one API.

Workdirs, `--checkpoint`, `config.init.path`, export `--out` and the
published checkpoints' roots may be `gs://` URLs. Files go through
`etils.epath` (the path type orbax uses for its own files) and arrays through
tensorstore (orbax), so one URL reaches the same objects from both.

For `gs://`, epath is told to use its fsspec backend (gcsfs) even where
TensorFlow is installed: TensorFlow's GCS client has Google's endpoint
compiled in, so it cannot be pointed at a local storage server and would be
a code path no test runs. gcsfs and tensorstore both read the documented
endpoint settings (`STORAGE_EMULATOR_HOST`, `TENSORSTORE_GCS_HTTP_URL`) and
Application Default Credentials. gcsfs' listing cache is turned off, as
other processes (and tensorstore) write into the same folders.

Object stores have no folders, no atomic rename and no append: `write_text`
replaces an object in one upload (atomic by itself), `append_text` rewrites
the object, and `move_tree` copies then deletes. Everything here raises
OSError subclasses (or gcsfs' HttpError) as the backends do; callers turn
them into one-line errors (`describe_error`).
"""

import contextlib
import os
import re
import tempfile
from typing import Any, Iterator, Optional

from vit_jax.errors import UsageError

URL_SCHEMES = ('gs://',)
_ANY_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def is_url(path: Any) -> bool:
  """Whether `path` names an object in a bucket (gs://) rather than a local file."""
  return path is not None and str(path).startswith(URL_SCHEMES)


def check_supported(path: Any, what: str = 'path') -> None:
  """UsageError for a URL of a scheme that runs cannot use (s3://, https://, ...): only gs:// is wired.

  s3:// is refused because orbax-checkpoint (0.12) builds tensorstore specs for gs:// only (any other
  URL becomes a relative local path) and makes a save atomic without a rename (commit_success.txt) only
  on GCS; tensorstore's own s3 driver warns that S3 lacks the atomic writes it relies on."""
  text = str(path)
  if _ANY_URL.match(text) and not is_url(text):
    scheme = text.split('://', 1)[0]
    raise UsageError(f'{what}={text}: {scheme}:// is not supported, only local paths and gs://BUCKET/... '
                     'URLs: orbax-checkpoint writes arrays (through tensorstore) and commits a save without '
                     'a rename only on gs://; use a gs:// bucket or a local (or shared file system) path.')


_configured = False


def _use_gcsfs() -> None:
  """Points epath's gs:// paths at gcsfs (not tf.io.gfile), without gcsfs' listing cache; once."""
  global _configured
  if _configured:
    return
  try:
    import gcsfs  # noqa: F401
  except ImportError:
    raise UsageError('gs:// paths need gcsfs, which is not installed: pip install -e ".[gcs]" (or '
                     '"gcsfs>=2026.10.1").') from None
  os.environ.setdefault('EPATH_USE_TF', 'false')
  from etils.epath import gpath
  if hasattr(gpath, '_is_tf_installed'):  # Cached on its first call, which may have come before.
    gpath._is_tf_installed.cache_clear()
  import fsspec.config
  fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)
  _configured = True


def path(p: Any):
  """`p` as an `epath.Path` (gs:// through gcsfs); UsageError for another scheme (check_supported)."""
  from etils import epath
  if is_url(p):
    _use_gcsfs()
  else:
    check_supported(p)
  return epath.Path(p)


def join(base: str, *parts: str) -> str:
  """`base/part/...`: '/'-joined for a URL, os.path.join for a local path."""
  if is_url(base):
    return '/'.join([str(base).rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(base, *parts)


def absolute(p: str) -> str:
  """A local path made absolute (orbax needs that), a URL unchanged (without a trailing slash)."""
  return str(p).rstrip('/') if is_url(p) else os.path.abspath(p)


def dirname(p: str) -> str:
  return str(p).rstrip('/').rsplit('/', 1)[0] if is_url(p) else os.path.dirname(p)


def basename(p: str) -> str:
  return str(p).rstrip('/').rsplit('/', 1)[-1] if is_url(p) else os.path.basename(os.path.normpath(p))


def exists(p: str) -> bool:
  return path(p).exists()


def isdir(p: str) -> bool:
  return path(p).is_dir()


def isfile(p: str) -> bool:
  """Whether `p` is a file (an object, for a URL)."""
  return path(p).is_file() if is_url(p) else os.path.isfile(p)


def listdir(p: str) -> list[str]:
  """Names in folder `p` (FileNotFoundError when it does not exist; for a URL: holds no object)."""
  if not is_url(p):
    check_supported(p)
    return os.listdir(p)
  folder = path(p)
  if not folder.is_dir():
    raise FileNotFoundError(f'No such folder: {p}')
  return [child.name for child in folder.iterdir()]


def list_files(url: str) -> list[str]:
  """Every object under the URL `url` (at any depth), as gs:// URLs, in name order."""
  fs = _filesystem(url)
  return sorted('gs://' + name for name in fs.find(url))


def makedirs(p: str) -> None:
  """Creates folder `p` and its parents; nothing to do in a bucket, where folders are name prefixes."""
  if not is_url(p):
    check_supported(p)
    os.makedirs(p, exist_ok=True)


def read_text(p: str) -> str:
  return path(p).read_text()


def read_bytes(p: str) -> bytes:
  return path(p).read_bytes()


def size(p: str) -> int:
  return path(p).stat().length if is_url(p) else os.path.getsize(p)


def write_text(p: str, text: str) -> None:
  """Replaces file `p` by `text` atomically: a kill or failure leaves the previous content.

  Locally the text is written aside and renamed; an object upload is atomic by itself.
  """
  if is_url(p):
    path(p).write_text(text)
    return
  check_supported(p)
  with open(p + '.tmp', 'w') as f:
    f.write(text)
  os.replace(p + '.tmp', p)


def write_bytes(p: str, data: bytes) -> None:
  """Writes `data` to `p` (creating its folder), atomically as `write_text`."""
  if is_url(p):
    path(p).write_bytes(data)
    return
  check_supported(p)
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  with open(p + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(p + '.tmp', p)


def append_text(p: str, text: str) -> None:
  """Adds `text` at the end of `p`: an append locally, a rewrite of the whole object in a bucket."""
  if not is_url(p):
    check_supported(p)
    with open(p, 'a') as f:
      f.write(text)
    return
  try:
    before = read_text(p)
  except FileNotFoundError:
    before = ''
  write_text(p, before + text)


def remove(p: str) -> None:
  path(p).unlink(missing_ok=True)


def rmtree(p: str) -> None:
  if exists(p):
    path(p).rmtree()


def move_tree(source: str, target: str, last_first: Optional[str] = None) -> None:
  """Moves folder `source` to `target` (which must not exist).

  Locally a rename. In a bucket every object is copied, then `last_first`
  (e.g. orbax's commit marker) is deleted from `source` before the rest, so
  that a move cut short never leaves `source` looking finished.
  """
  if not is_url(source):
    import shutil
    shutil.move(source, target)
    return
  fs = _filesystem(source)
  fs.copy(source.rstrip('/') + '/', target.rstrip('/') + '/', recursive=True)
  if last_first:
    fs.rm(join(source, last_first))
  fs.rm(source, recursive=True)


def _filesystem(url: str):
  """The gcsfs file system behind `url` (the instance epath uses: same settings, same credentials)."""
  _use_gcsfs()
  import fsspec
  return fsspec.filesystem('gcs', finalize_on_close=True)


LOCK_STALE_S = 120.0  # A lock object that no one rewrote for this long was left by a process that died.


@contextlib.contextmanager
def object_lock(url: str, poll_s: float = 0.5) -> Iterator[None]:
  """Holds the object `url` as a lock between processes and hosts while the block runs.

  The object is created only where absent (a generation precondition: one creator wins), rewritten
  every LOCK_STALE_S / 4 seconds while held and deleted on exit. A waiter takes over a lock that no
  one rewrote for LOCK_STALE_S seconds of its own clock: the kernel releases a dead process's file
  lock, but nothing releases an object.
  """
  import json
  import socket
  import threading
  import time
  fs = _filesystem(url)
  bucket, key = split_url(url)

  def stamp() -> bytes:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()}).encode()
  seen, since = None, time.monotonic()
  while True:
    try:
      fs.pipe_file(url, stamp(), mode='create')
      break
    except FileExistsError:  # 412: another process holds it.
      pass
    try:
      generation = fs.info(url)['generation']
    except FileNotFoundError:
      continue  # Released meanwhile: try again at once.
    if generation != seen:
      seen, since = generation, time.monotonic()
    elif time.monotonic() - since > LOCK_STALE_S:
      try:  # Only that stale generation: a waiter that took over first keeps its new lock.
        fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=str(generation))
      except (FileNotFoundError, FileExistsError):
        pass
      continue
    time.sleep(poll_s)
  stop = threading.Event()

  def refresh() -> None:
    while not stop.wait(LOCK_STALE_S / 4):
      fs.pipe_file(url, stamp())
  refresher = threading.Thread(target=refresh, daemon=True)
  refresher.start()
  try:
    yield
  finally:
    stop.set()
    refresher.join()
    fs.rm_file(url)


def upload(local: str, url: str) -> None:
  """Copies the local file `local` to `url` (one object, which appears whole or not at all)."""
  _filesystem(url).put_file(local, url)


def copy_to_local(url: str, dest: str, chunk: int = 16 << 20, announce=None) -> tuple[int, Optional[int]]:
  """Copies file `url` (a URL or local path) to the local file `dest`: (bytes written, size of the source)."""
  expected = size(url)
  if announce:
    announce(expected)
  written = 0
  with path(url).open('rb') as source, open(dest, 'wb') as out:
    while data := source.read(chunk):
      written += out.write(data)
  return written, expected


def describe_error(error: BaseException) -> str:
  """One line for a storage error: the HTTP status and message of gcsfs/tensorstore, or the OS error."""
  code = getattr(error, 'code', None)
  text = ' '.join(str(error).split()) or type(error).__name__
  if isinstance(error, OSError) and error.strerror:
    text = f'{error.strerror}: {error.filename}' if error.filename else error.strerror
  return f'{text[:300]}' + (f' (HTTP {code})' if isinstance(code, int) and str(code) not in text else '')


def split_url(url: str) -> tuple[str, str]:
  """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
  rest = str(url).split('://', 1)[1]
  bucket, _, key = rest.partition('/')
  return bucket, key.strip('/')


def _status(error: BaseException) -> Optional[int]:
  """The HTTP status a storage error stands for (401, 403, 404), from gcsfs' exception types or codes and
  tensorstore's status names; None for anything else."""
  code = getattr(error, 'code', None)
  if isinstance(code, int) and code in (401, 403, 404):
    return code
  text = str(error)
  if type(error).__module__.startswith('google.auth'):  # No credentials found, or none that refresh.
    return 401
  if 'UNAUTHENTICATED' in text or 'HTTP 401' in text or 'Anonymous caller' in text or code == 401:
    return 401
  if isinstance(error, PermissionError) or 'PERMISSION_DENIED' in text or text.startswith('Forbidden'):
    return 403
  if isinstance(error, FileNotFoundError) or 'NOT_FOUND' in text or 'bucket does not exist' in text:
    return 404
  return None


def bucket_error(url: str, what: str, error: BaseException, reading: bool = False) -> str:
  """The one-line error of a bucket that cannot be used: missing, no permission, no credentials, or down."""
  action = 'read' if reading else 'write to'
  bucket = split_url(url)[0]
  detail = describe_error(error)
  status = _status(error)
  if status == 404:
    return (f'{what}={url}: bucket gs://{bucket} does not exist (or this account cannot see it); create it '
            f'(gcloud storage buckets create gs://{bucket}) or correct the URL.')
  if status == 403:
    return (f'{what}={url}: this account has no permission to {action} gs://{bucket} ({detail}); grant it a '
            'role that may create and delete objects there (e.g. roles/storage.objectUser), or run as an '
            'account that has one.')
  if status == 401:
    return (f'{what}={url}: no valid Google Cloud credentials reached the storage server ({detail}); run '
            '`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a service '
            "account key (on a TPU or GCE VM, the VM's service account is used).")
  return (f'{what}={url}: the storage server failed the request ({detail}); check the URL and that '
          'the server answers, then run the same command again.')


def check_writable(url: str, what: str) -> None:
  """Raises a one-line UsageError unless gcsfs (files) and tensorstore (arrays) can both write and delete
  an object under `url`: a missing bucket, no permission or no credentials fail here, before any work."""
  import socket
  name = join(url, f'.vit_jax_write_check-{socket.gethostname()}-{os.getpid()}')
  try:
    write_text(name, 'vit_jax checks that it may write here; deleted at once.\n')
    remove(name)
  except Exception as e:  # gcsfs raises OSError subclasses, HttpError, google-auth errors, ...
    raise UsageError(bucket_error(url, what, e)) from None
  import tensorstore as ts
  bucket, key = split_url(name)
  try:
    store = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket}).result()
    store.write(key, b'x').result()
    store.write(key, None).result()  # None deletes.
  except Exception as e:  # Tensorstore's status errors (ValueError and others).
    raise UsageError(bucket_error(url, what, e)) from None


@contextlib.contextmanager
def staged_folder(folder: str) -> Iterator[str]:
  """A local folder to write `folder`'s files into: `folder` itself when local (created); for a URL a
  temporary folder whose files are uploaded into `folder` when the block ends without an error."""
  if not is_url(folder):
    check_supported(folder)
    os.makedirs(folder, exist_ok=True)
    yield folder
    return
  with tempfile.TemporaryDirectory(prefix='vit_jax_upload_') as local:
    yield local
    for directory, _, names in os.walk(local):
      for name in names:
        relative = os.path.relpath(os.path.join(directory, name), local)
        with open(os.path.join(directory, name), 'rb') as f:
          write_bytes(join(folder, *relative.split(os.sep)), f.read())
