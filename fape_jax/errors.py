"""The one user-facing error type.

Every mistake a user can make (bad config option, missing file, corrupt image, mismatched store)
raises `FapeError` with a message that says what went wrong, where, and what to do. Entry points
start with `run(main)` (absl's `app.run`, with flag mistakes as one line) and run their work under
`exit_on_user_error()`, which prints the message without a traceback.

Exit codes of every entry point: 0 done, 1 a partial failure (some images, sets or variants failed;
the others are written) or an unexpected error (a traceback), 2 a usage error (a `FapeError`).
"""

import contextlib
import functools
import logging
import os
import sys
import traceback
from typing import Callable

from absl import app
from absl import flags
from absl import logging as absl_logging

PARTIAL_EXIT_CODE = 1
USAGE_EXIT_CODE = 2

# Called as hook(exit code, message, report) when an entry point fails, before it exits. A hook that
# takes the failure over calls `report()` (which prints it here) and ends the process itself; a
# multi-process run registers one that stops the other processes too (`distributed`).
on_failure: list[Callable[[int, str, Callable[[], None]], None]] = []


class FapeError(Exception):
  """A user-facing error: the message alone must be enough to fix the problem."""


@contextlib.contextmanager
def exit_on_user_error():
  """Turns a `FapeError` into its message on stderr and exit status 2 (a usage error).

  Any other exception keeps its traceback and exit status 1 (absl prints it).
  """
  try:
    yield
  except FapeError as e:
    message = str(e)
    report = lambda: print(f"error: {message}", file=sys.stderr)  # once: no absl line repeats it
    for hook in on_failure:
      hook(USAGE_EXIT_CODE, message, report)
    report()
    sys.exit(USAGE_EXIT_CODE)
  except Exception as e:  # noqa: BLE001 (re-raised: only the hooks see it here)
    for hook in on_failure:
      hook(1, f"{type(e).__name__}: {e}", traceback.print_exc)
    raise


def _innermost_message(e: BaseException) -> str:
  """ml_collections wraps a KeyError (whose str() is a repr) in an AttributeError: unwrap both."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def configs_dirs() -> list[str]:
  """Where the repository's `configs/` lies: beside the package in a checkout or an editable
  install, inside it (`fape_jax/configs`, pyproject.toml's package-dir) in an installed wheel."""
  package = os.path.dirname(os.path.abspath(__file__))
  return [d for d in (os.path.join(package, "configs"),
                      os.path.join(os.path.dirname(package), "configs")) if os.path.isdir(d)]


def resolve_config_paths(argv: list[str]) -> list[str]:
  """`--config=configs/NAME.py[:variant]` names the shipped config when the working directory has
  no such file, so the README's commands work from any directory once the package is installed;
  a file that exists where it is named always wins."""
  out = list(argv)
  for i, arg in enumerate(out):
    if not arg.startswith("--config="):
      continue
    path, sep, variant = arg[len("--config="):].partition(":")
    head, name = os.path.split(os.path.normpath(path))
    if head != "configs" or os.path.exists(path):
      continue
    for d in configs_dirs():
      if os.path.isfile(os.path.join(d, name)):
        out[i] = f"--config={os.path.join(d, name)}{sep}{variant}"
        break
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    argv = resolve_config_paths(argv)
    argv = flags.FLAGS(argv)
    for name in list(flags.FLAGS):  # config files load lazily: load them now, among the flags
      # The config file flags themselves (`--config`), not their `--config.KEY` overrides.
      if "." not in name and type(flags.FLAGS[name]).__module__.startswith("ml_collections"):
        config = getattr(flags.FLAGS, name)
        if config is not None:
          getattr(config, "keys")  # a config that failed to load raises its error here
    return argv
  except Exception as e:  # noqa: BLE001 (flags, config files and config overrides raise many types)
    what = _innermost_message(e)
    if "Traceback (most recent call last)" in what:  # a config file's own error, with its stack
      head = what.split("Traceback (most recent call last)")[0]
      what = head + what.strip().splitlines()[-1].strip()
    what = " ".join(what.split())
    print(f"error: bad command line ({type(e).__name__}): {what}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _not_library_chatter(record: logging.LogRecord) -> bool:
  """Drops what Orbax, Grain, TensorStore and TFDS log on their own: pages of INFO, routine
  WARNINGs and, when a write fails, the same error with its traceback once per background thread.
  What matters reaches this package as an exception and is reported once (a `FapeError` line or
  a traceback); jax's warnings (a missing GPU backend) and this package's records stay."""
  if record.pathname.startswith(_PACKAGE) or record.levelno >= logging.CRITICAL:
    return True
  return record.name.startswith("jax") and record.levelno >= logging.WARNING


def run(main) -> None:
  """`app.run(main)` where a mistyped flag or `--config.KEY` (unknown key, wrong type, bad config
  file) is one line on stderr and exit status 2, not a traceback, and libraries' routine log
  records are dropped (`--verbosity=1` shows everything)."""

  @functools.wraps(main)
  def quiet_main(argv):
    if flags.FLAGS.verbosity < 1:
      absl_logging.get_absl_handler().addFilter(_not_library_chatter)
    return main(argv)

  app.run(quiet_main, flags_parser=_parse_flags)
