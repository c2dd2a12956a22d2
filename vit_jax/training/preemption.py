"""Stop requests from SIGTERM / SIGINT, agreed on by every process.

A cluster that preempts a job sends SIGTERM (Ctrl-C sends SIGINT). The
handler only sets a flag; the training loop polls `should_stop()` once per
step, saves a checkpoint and exits. With several processes the flags are
combined so that all of them stop after the same step.
"""

import signal

import jax

from vit_jax.training import sharding


class StopRequest:
  """Installs handlers for SIGTERM and SIGINT for the lifetime of a `with` block."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name

  def should_stop(self, step: int, every: int = 10) -> bool:
    """True on every process once any process has received a signal.

    With one process this is a flag check. With several, the processes agree
    with a small collective, only every `every` steps so that the loop does
    not wait on the other hosts each step (preemption notices give seconds).
    """
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    if step % every:
      return False
    return sharding.any_process(local)
