"""The one user-facing error type.

Every mistake a user can make (bad config option, missing file, corrupt image, mismatched store)
raises `FapeError` with a message that says what went wrong, where, and what to do. Entry points
run under `exit_on_user_error()`, which prints the message without a traceback.
"""

import contextlib
import sys

from absl import logging

USAGE_EXIT_CODE = 2


class FapeError(Exception):
  """A user-facing error: the message alone must be enough to fix the problem."""


@contextlib.contextmanager
def exit_on_user_error():
  """Turns a `FapeError` into its message on stderr and exit status 2 (a usage error)."""
  try:
    yield
  except FapeError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)
