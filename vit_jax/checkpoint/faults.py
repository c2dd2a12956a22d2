"""Telling a damaged checkpoint from one that cannot be read right now.

A checkpoint is damaged when its files read fine but do not make a
checkpoint: a truncated or garbled array file, a missing array file,
metadata that does not parse, a commit marker without the data. Only damage
may be set aside. Everything else is unavailability, a fault of the file
system or the machine rather than of the files: I/O errors (a network file
system that stops answering), denied permissions, a directory that is gone
or unmounted, time-outs, running out of host or device memory while
restoring. Then the run stops and nothing is moved.

Orbax and tensorstore report both kinds in many forms (tensorstore wraps the
OS error in a ValueError string; orbax reports an unreadable `_METADATA` as a
missing one), so the failed read is not judged by its exception alone: every
file of the checkpoint is read again, and only if all read fine (and the
error names no OS fault) is it damage. When unsure, it is unavailability.
"""

import errno
import os
import re
from typing import Optional

from vit_jax import storage
from vit_jax.errors import UsageError

# Tensorstore's status codes and texts that mean the machine or file system failed, not the files.
_UNAVAILABLE_TEXT = re.compile(r'PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|UNAUTHENTICATED')
# A thread that cannot start (its stack cannot be mapped) is the first sign of a full address space.
_MEMORY_TEXT = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|bad_alloc|Cannot allocate memory|"
                          r"can't start new thread")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class CheckpointUnavailable(UsageError):
  """A checkpoint that cannot be read right now (I/O, permissions, memory): stop, move nothing."""


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from or during."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def first_line(error: BaseException) -> str:
  """The first line of `error`'s message (its innermost tensorstore status if it has one), at most 300 chars."""
  for e in _chain(error):
    text = str(e)
    if re.match(r'[A-Z_]+: ', text):  # Tensorstore's 'NOT_FOUND: ...', clearer than orbax's wrapper.
      return text.splitlines()[0][:300]
  text = str(error).split(' See full TensorStore details')[0]  # Orbax's wrapper, then a long spec.
  return text.splitlines()[0][:300] if text else type(error).__name__


def unreadable(path: str) -> Optional[str]:
  """'<reason> on <file>' for the first directory or file under `path` that cannot be listed or read; None
  when every one reads (a missing `path` counts: it was there when listed). `path` may be a gs:// URL."""
  if storage.is_url(path):
    return _unreadable_objects(path)
  try:
    if not os.path.isdir(path):
      os.stat(path)  # Raises for a path that is gone or cannot be looked at.
      with open(path, 'rb') as f:
        while f.read(1 << 20):
          pass
      return None
    names = os.listdir(path)
  except OSError as e:
    return f'{e.strerror or type(e).__name__} on {path}'
  for name in sorted(names):
    reason = unreadable(os.path.join(path, name))
    if reason:
      return reason
  return None


def _unreadable_objects(url: str) -> Optional[str]:
  """`unreadable` in a bucket: every object under `url` is read; a listing or read that fails names it."""
  try:
    files = storage.list_files(url)
  except Exception as e:  # gcsfs raises OSError subclasses and HttpError.
    return f'{storage.describe_error(e)} on {url}'
  if not files:
    return f'No such file or directory on {url}'
  for name in files:
    try:
      storage.read_bytes(name)
    except Exception as e:
      return f'{storage.describe_error(e)} on {name}'
  return None


def unavailable_reason(error: BaseException, step_dir: str) -> Optional[str]:
  """Why reading `step_dir` failed with `error` when it is not damage ('Input/output error on FILE', 'out of
  memory ...'); None when it is damage: every file reads and the error names no OS or memory fault."""
  chain = _chain(error)
  memory = [e for e in chain if isinstance(e, MemoryError) or _MEMORY_TEXT.search(str(e))]
  if memory:  # The innermost says what could not be had.
    return f'out of memory while restoring ({type(memory[-1]).__name__}: {first_line(memory[-1])})'
  reason = unreadable(step_dir)
  if reason:
    return reason
  for e in chain:
    if isinstance(e, OSError) and e.errno not in (None, errno.ENOENT):
      return f'{e.strerror or first_line(e)} ({first_line(error)})'
    codes = [int(code) for code in _OS_ERROR_CODE.findall(str(e))]
    if any(code != errno.ENOENT for code in codes) or _UNAVAILABLE_TEXT.search(str(e)):
      return first_line(error)
  return None


def list_steps(directory: str, reader: bool = False) -> list[int]:
  """Steps of the finished checkpoints in `directory`, newest first; [] when it does not exist.

  Orbax renames a checkpoint to its step when it is complete; its temporary
  directories are not all digits. In a bucket (no atomic rename) orbax writes
  the step's folder under its final name and marks it finished last, with a
  `commit_success.txt`: a folder without one (a save cut short, e.g. a
  preempted worker) is not a checkpoint. A directory that exists but cannot be
  listed (I/O error, permissions, a dangling link to an unmounted file
  system) is CheckpointUnavailable, never an empty one: that would start the
  run over. `reader`: the error of a command that only reads (no resume).
  """
  if storage.is_url(directory):
    return _list_bucket_steps(directory, reader)
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    if os.path.lexists(directory):  # A link whose target is gone.
      raise unavailable_error(f'the checkpoints in {directory}', f'{directory} links to {os.path.realpath(directory)}, which does '
                              'not exist', reader) from None
    return []
  except NotADirectoryError:
    return []
  except OSError as e:
    raise unavailable_error(f'the checkpoints in {directory}', f'{e.strerror} on {directory}', reader) from None
  return sorted((int(name) for name in names if name.isdigit()), reverse=True)


COMMIT_FILE = 'commit_success.txt'  # Orbax's mark of a finished checkpoint in a bucket.


def _list_bucket_steps(directory: str, reader: bool) -> list[int]:
  try:
    names = storage.listdir(directory)
    steps = [int(name) for name in names if name.isdigit()]
    finished = [step for step in steps if storage.exists(storage.join(directory, str(step), COMMIT_FILE))]
  except FileNotFoundError:  # No object under the prefix: no checkpoint yet.
    return []
  except Exception as e:  # gcsfs raises OSError subclasses and HttpError.
    raise unavailable_error(f'the checkpoints in {directory}', f'{storage.describe_error(e)} on {directory}',
                            reader) from None
  return sorted(finished, reverse=True)


def unavailable_error(what: str, reason: str, reader: bool = False) -> CheckpointUnavailable:
  """The one-line error of a checkpoint that cannot be read now: what failed, on which file, what to do."""
  if reason.startswith('out of memory'):
    fix = ('resume on a machine with more host (or device) memory, or free memory used by other processes, '
           'and run the same command again')
  else:
    fix = ('check that the file system is mounted and answering (the bucket reachable) and that this user may '
           'read it, then run the same command again')
  kept = ('' if reader else '; nothing in the workdir was moved or written, and the run resumes from its '
          'latest checkpoint once it can be read')
  return CheckpointUnavailable(f'Cannot read {what} now: {reason}. This is not damage to the checkpoint: '
                               f'{fix}{kept}.')
