"""The one user-facing error type.

Every mistake a user can make (bad config option, missing file, corrupt image, mismatched store)
raises `FapeError` with a message that says what went wrong, where, and what to do. Entry points
start with `run(main)` (absl's `app.run`, with flag mistakes as one line) and run their work under
`exit_on_user_error()`, which prints the message without a traceback.
"""

import contextlib
import os
import sys

from absl import app
from absl import flags

USAGE_EXIT_CODE = 2


class FapeError(Exception):
  """A user-facing error: the message alone must be enough to fix the problem."""


@contextlib.contextmanager
def exit_on_user_error():
  """Turns a `FapeError` into its message on stderr and exit status 2 (a usage error)."""
  try:
    yield
  except FapeError as e:
    print(f"error: {e}", file=sys.stderr)  # once: no absl log line repeating it
    sys.exit(USAGE_EXIT_CODE)


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


def run(main) -> None:
  """`app.run(main)` where a mistyped flag or `--config.KEY` (unknown key, wrong type, bad config
  file) is one line on stderr and exit status 2, not a traceback."""
  app.run(main, flags_parser=_parse_flags)
