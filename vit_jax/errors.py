"""The one exception type for mistakes a user can fix (bad config, missing data), and argparse to match."""

import argparse
import sys


class UsageError(Exception):
  """A problem with the user's input. The launcher prints it as one line and exits 2.

  The message names what is wrong, the offending value, and how to fix it.
  """


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the commands that use it, failing as every command does: one `error:` line, exit 2."""

  def error(self, message: str):
    print(f'error: {message} (vit-jax {self.prog.split()[-1]} --help lists the flags)', file=sys.stderr)
    sys.exit(2)
