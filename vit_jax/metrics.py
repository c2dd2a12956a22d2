"""Where metrics go: metrics.jsonl, TensorBoard event files and the console.

Only process 0 writes; the other processes get a writer that does nothing.
"""

import datetime
import json
import os
import time
from typing import Any

import tensorflow as tf


class MetricWriter:
  """Appends `{'step': s, **metrics}` rows to workdir/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._summary = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    with self._summary.as_default(step=int(step)):
      for key, value in metrics.items():
        tf.summary.scalar(key, float(value))
    self._summary.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._summary.close()


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
