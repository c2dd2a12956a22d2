"""The workdir before a run writes to it: writable, with room for two checkpoints, resumable.

A local workdir is probed with a temporary file and its free space; a gs://
workdir with a test object written and deleted through both storage clients
(vit_jax/storage.py): a missing bucket, no permission or no credentials fail
here, in one line, before any work.
"""

import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections

from vit_jax import storage
from vit_jax.checkpoint import faults, published
from vit_jax.checkpoint.manager import check_resumable
from vit_jax.errors import UsageError


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds at least one finished step directory."""
  return bool(faults.list_steps(storage.join(workdir, 'checkpoints')))


def check_workdir(workdir: str, config: ml_collections.ConfigDict, abstract_state: Any = None) -> None:
  """Fails, before anything is written, if `workdir` cannot be used for this config.

  A workdir must be writable, have room for two checkpoints of
  `abstract_state` (one being written while the previous is kept), and if it
  already holds checkpoints, the newest readable one must have the tree and
  shapes of `abstract_state` (check_resumable). A gs:// workdir must be a
  bucket that this account may write to (storage.check_writable); buckets
  have no free space to check. A config.init.path that could never be read
  (published.check_source) fails here too.
  """
  if config.init.path:
    published.check_source(config.init.path, 'config.init.path')
  if storage.is_url(workdir):
    storage.check_writable(workdir, '--workdir')
    if abstract_state is not None:
      check_resumable(workdir, config, abstract_state)
    return
  storage.check_supported(workdir, '--workdir')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f'--workdir {workdir} is a file, not a directory; choose another path.')
  probe_dir = workdir if os.path.isdir(workdir) else os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(probe_dir):
    probe_dir = os.path.dirname(probe_dir)
  try:
    with tempfile.TemporaryFile(dir=probe_dir):
      pass
  except OSError as e:
    raise UsageError(f'--workdir {workdir} is not writable ({e.strerror}); choose a writable '
                     'directory with free space.') from None
  if abstract_state is not None:
    needed = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    free = shutil.disk_usage(probe_dir).free
    if free < needed:
      raise UsageError(f'--workdir {workdir} has {free / 2**20:,.1f} MiB free, but two checkpoints of '
                       f'this model need {needed / 2**20:,.1f} MiB; free space or choose another '
                       '--workdir.')
    check_resumable(workdir, config, abstract_state)
