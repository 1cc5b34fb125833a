"""The one user-facing error type.

Every mistake a user can make (bad config option, missing file, corrupt image, mismatched store)
raises `FapeError` with a message that says what went wrong, where, and what to do. Entry points
catch it and print the message without a traceback.
"""


class FapeError(Exception):
  """A user-facing error: the message alone must be enough to fix the problem."""
