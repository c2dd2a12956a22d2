"""The one exception type for mistakes a user can fix (bad config, missing data), and argparse to match."""

import argparse
import contextlib
import sys
from typing import Iterator


class UsageError(Exception):
  """A problem with the user's input. The launcher prints it as one line and exits 2.

  The message names what is wrong, the offending value, and how to fix it.
  """


class ParsedFlags(Exception):
  """Raised by `ArgumentParser.parse_args` under `parse_only()`, with the parsed flags."""

  def __init__(self, namespace: argparse.Namespace):
    super().__init__('flags parsed')
    self.namespace = namespace


_PARSE_ONLY = [False]


@contextlib.contextmanager
def parse_only() -> Iterator[None]:
  """Within it, a command's `parse_args` raises ParsedFlags instead of returning: its flags are checked
  and nothing runs (`vit_jax.cli.check_flags`)."""
  _PARSE_ONLY[0] = True
  try:
    yield
  finally:
    _PARSE_ONLY[0] = False


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the commands that use it, failing as every command does: one `error:` line, exit 2."""

  def parse_args(self, args=None, namespace=None):
    parsed = super().parse_args(args, namespace)
    if _PARSE_ONLY[0]:
      raise ParsedFlags(parsed)
    return parsed

  def error(self, message: str):
    print(f'error: {message} (vit-jax {self.prog.split()[-1]} --help lists the flags)', file=sys.stderr)
    sys.exit(2)
