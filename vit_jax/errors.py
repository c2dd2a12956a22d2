"""The one exception type for mistakes a user can fix (bad config, missing data)."""


class UsageError(Exception):
  """A problem with the user's input. The launcher prints it as one line and exits 2.

  The message names what is wrong, the offending value, and how to fix it.
  """
