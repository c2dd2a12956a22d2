"""Stop requests from signals (SIGTERM, SIGINT, SIGUSR1 by default), agreed on by every process.

A cluster that preempts or cancels a job sends SIGTERM (Ctrl-C sends SIGINT);
SLURM warns a job before its time limit with the signal of `--signal`
(SIGUSR1 is the usual choice; docs/scaling.md). The handler only sets a flag;
the training loop polls `should_stop()` once per step, saves a checkpoint and
exits. With several processes the flags are combined so that all of them stop
after the same step. Which signals count is the launcher's `--stop_signals`.
"""

import signal
from typing import Sequence

import jax

from vit_jax.errors import UsageError
from vit_jax.training import sharding

DEFAULT_SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
  """`'TERM,INT,USR1'` (with or without the SIG prefix, or numbers) as signals; UsageError for bad names."""
  names = [name.strip().upper() for name in text.split(',') if name.strip()]
  signals = []
  for name in names:
    try:
      signals.append(signal.Signals(int(name)) if name.isdigit() else
                     signal.Signals[name if name.startswith('SIG') else 'SIG' + name])
    except (KeyError, ValueError):
      raise UsageError(f'--stop_signals={text}: {name!r} is not a signal; give a comma-separated list such as '
                       f'{",".join(s.removeprefix("SIG") for s in DEFAULT_SIGNALS)} (or USR2, HUP).') from None
  catchable = [s for s in signals if s not in (signal.SIGKILL, signal.SIGSTOP)]
  if not catchable or len(catchable) < len(signals):
    raise UsageError(f'--stop_signals={text}: give one or more signals a process can catch (SIGKILL and '
                     'SIGSTOP cannot be), e.g. TERM,INT,USR1.')
  return tuple(dict.fromkeys(catchable))


class StopRequest:
  """Installs handlers for `signals` (default SIGTERM, SIGINT, SIGUSR1) for the lifetime of a `with` block."""

  def __init__(self, signals: Sequence[signal.Signals | str] = DEFAULT_SIGNALS):
    self.signals = tuple(signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals)
    self.signal_name = None
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    for sig in self.signals:
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
