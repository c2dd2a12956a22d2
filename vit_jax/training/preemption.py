"""Stop requests from signals (SIGTERM, SIGINT, SIGUSR1 by default), agreed on by every process.

A cluster that preempts or cancels a job sends SIGTERM (Ctrl-C sends SIGINT);
SLURM warns a job before its time limit with the signal of `--signal`
(SIGUSR1 is the usual choice; docs/scaling.md). The handler only sets a flag;
the training loop polls `should_stop()` once per step, saves a checkpoint and
exits. With several processes the flags are combined so that all of them stop
after the same step. Which signals count is the launcher's `--stop_signals`.

A signal can come at any moment, also while the launcher is still importing
and compiling: `vit-jax train` calls `catch_early()` before anything else, and
the launcher's StopRequest takes over what it caught, so that a stop before
the first step is a clean exit (nothing new to save), never a crash. A run
stopped before its end exits with STOPPED_EXIT_CODE: a job script requeues
the job on it, not when the run finished (experiments/slurm/train.sbatch).

This module imports JAX only inside the calls that need it (JAX is loaded by
then), so that the launcher can install the handlers before JAX loads.
"""

import signal
import sys
from typing import Optional, Sequence

from vit_jax.errors import UsageError

DEFAULT_SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')
# The launcher's exit status when a stop signal ended the run before config.total_steps: sysexits.h's
# EX_TEMPFAIL, "try again later". A finished run exits 0, also if a signal came during its last step.
STOPPED_EXIT_CODE = 75

_early: Optional['StopRequest'] = None  # catch_early's request, until a StopRequest takes it over.


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
  """Installs handlers for `signals` (default SIGTERM, SIGINT, SIGUSR1) for the lifetime of a `with` block.

  Entered again while installed (the launcher's request, passed to the loop), it installs its handlers
  again, in case a library took a signal since (JAX's distributed client takes SIGTERM for its own
  preemption notice), and leaves them installed until the outer block ends.
  The loop records in `stopped_at` the step it stopped at on the request (the step it started from,
  if before training); None means the run was not cut short.
  """

  def __init__(self, signals: Sequence[signal.Signals | str] = DEFAULT_SIGNALS):
    self.signals = tuple(signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals)
    self.signal_name: Optional[str] = None
    self.stopped_at: Optional[int] = None
    self._previous = {}
    self._depth = 0

  def __enter__(self) -> 'StopRequest':
    global _early
    self._depth += 1
    if self._depth > 1:
      for sig in self.signals:
        signal.signal(sig, self._handle)
      return self
    early, _early = _early, None
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    if early is not None:  # Take over what the launcher caught since it started.
      for sig in self.signals:
        if sig in early._previous:
          self._previous[sig] = early._previous[sig]
      caught = early.signal_name
      early._previous = {sig: h for sig, h in early._previous.items() if sig not in self.signals}
      early._restore()  # Its signals that do not stop this run act as before.
      if caught and signal.Signals[caught] in self.signals:
        self.signal_name = self.signal_name or caught
      elif caught:  # Not a stop signal of this run: what it would have done (KeyboardInterrupt for SIGINT).
        try:
          signal.raise_signal(signal.Signals[caught])
        except BaseException:
          self.__exit__()
          raise
    return self

  def __exit__(self, *exc) -> None:
    self._depth -= 1
    if not self._depth:
      self._restore()

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signal_name == 'SIGINT':  # Ctrl-C twice: quit now, as without us.
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print('Ctrl-C: the run stops at its next step and saves a checkpoint (Ctrl-C again to quit now).',
            file=sys.stderr, flush=True)

  def should_stop(self, step: int, every: int = 10) -> bool:
    """True on every process once any process has received a signal.

    With one process this is a flag check. With several, the processes agree
    with a small collective, only every `every` steps so that the loop does
    not wait on the other hosts each step (preemption notices give seconds).
    """
    import jax  # Loaded by now; not at the top (the module docstring says why).
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    if step % every:
      return False
    return self.agreed()

  def agreed(self) -> bool:
    """True on every process if any process has received a signal: a collective all processes call."""
    from vit_jax.training import sharding
    return sharding.any_process(self.signal_name is not None)


def catch_early(signals: Sequence[signal.Signals | str] = DEFAULT_SIGNALS) -> None:
  """Remembers `signals` instead of acting on them until the launcher's StopRequest takes over.

  The launcher calls it before its imports, which with its compilation take
  seconds to minutes: a stop signal then (a preemption, a time-limit warning)
  becomes the launcher's stop request, before the first step. `release_early()`
  undoes it if no StopRequest took over (a command that failed on its flags).
  """
  global _early
  release_early()
  _early = StopRequest(signals)
  for sig in _early.signals:
    _early._previous[sig] = signal.signal(sig, _early._handle)


def release_early() -> None:
  """Puts back the handlers that `catch_early` replaced, if no StopRequest took them over."""
  global _early
  early, _early = _early, None
  if early is not None:
    early._restore()
