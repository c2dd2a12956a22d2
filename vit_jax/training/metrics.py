"""Where metrics go: metrics.jsonl, TensorBoard event files and the console.

Only process 0 writes; the other processes get a writer that does nothing.
"""

import datetime
import json
import os
import shutil
import tempfile
import time
from typing import Any

import tensorflow as tf

from vit_jax import storage


def _row_step(line: str) -> float:
  """The step of a metrics.jsonl row; infinity for a line cut short by a kill."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')


def recorded(workdir: str, step: int) -> dict[str, Any]:
  """The metrics.jsonl values recorded at `step`, its rows merged (e.g. the final train and eval metrics
  of a finished run); {} if there are none."""
  merged = {}
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
  except OSError:
    return merged
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:  # A line cut short by a kill.
      continue
    if row.get('step') == step:
      merged.update(row)
  merged.pop('step', None)
  return merged


class MetricWriter:
  """Appends `{'step': s, **metrics}` rows to workdir/metrics.jsonl and TensorBoard.

  A workdir in a bucket (vit_jax/storage.py) gets the same files: objects
  cannot be appended to, so metrics.jsonl is rewritten whole at each write
  (one upload: atomic), and TensorBoard's event file is written locally by
  tf.summary and uploaded after each flush.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    """Rows after `resume_step` (left by a run that was killed after its last
    checkpoint) are dropped, so that a resumed run's rows are not duplicated."""
    self.enabled = enabled
    if enabled:
      self._path = storage.join(workdir, 'metrics.jsonl')
      self._remote = storage.is_url(workdir)
      try:
        kept = [line for line in storage.read_text(self._path).splitlines(keepends=True)
                if _row_step(line) <= resume_step]
        # Written aside and renamed (or uploaded whole): a kill now cannot lose the kept rows.
        storage.write_text(self._path, ''.join(kept))
      except FileNotFoundError:
        kept = []
      self._text = ''.join(kept)
      if not self._remote:
        self._jsonl = open(self._path, 'a')
      self._events = storage.join(workdir, 'tensorboard')
      self._local_events = tempfile.mkdtemp(prefix='vit_jax_tensorboard_') if self._remote else self._events
      self._summary = tf.summary.create_file_writer(self._local_events)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = json.dumps({'step': int(step), **{k: float(v) for k, v in metrics.items()}}) + '\n'
    if self._remote:
      self._text += row
      storage.write_text(self._path, self._text)
    else:
      self._jsonl.write(row)
      self._jsonl.flush()
    with self._summary.as_default(step=int(step)):
      for key, value in metrics.items():
        tf.summary.scalar(key, float(value))
    self._summary.flush()
    self._upload_events()

  def _upload_events(self) -> None:
    """Copies the local event files into the bucket's tensorboard/ folder (a bucket workdir only)."""
    if self._remote:
      for name in os.listdir(self._local_events):
        with open(os.path.join(self._local_events, name), 'rb') as f:
          storage.write_bytes(storage.join(self._events, name), f.read())

  def close(self) -> None:
    if self.enabled:
      if not self._remote:
        self._jsonl.close()
      self._summary.close()
      self._upload_events()
      if self._remote:
        shutil.rmtree(self._local_events, ignore_errors=True)


class Progress:
  """Formats the console line: step, loss, images/s and time left."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()

  def rate(self, step: int) -> float:
    """Steps per second since the previous call (resets the interval)."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def line(self, step: int, steps_per_sec: float, metrics: dict[str, float]) -> str:
    eta = datetime.timedelta(seconds=round((self.total_steps - step) / max(steps_per_sec, 1e-9)))
    return (f'step {step}/{self.total_steps} | loss {metrics["train/loss"]:.4f} | '
            f'lr {metrics["train/lr"]:.2e} | {metrics["train/images_per_sec"]:.0f} img/s | ETA {eta}')
