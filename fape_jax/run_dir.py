"""The run directory's own record: the config it was started with, and who is training in it.

A resume must not break a run. `check_resume` compares the requested config with the run's
`config.json` before anything is written: fields that may change between invocations (step
counts, logging, evaluation and checkpoint cadence, wall budget, store locations, the mesh) are
allowed, anything else is refused with one line naming the fields. `record_config` replaces
`config.json` only once the resume has started cleanly (the state restored), and appends what
changed to `resumes.jsonl`.

`RunLock` keeps a second trainer out of a run directory: an exclusive `flock` on `WORKDIR/.lock`,
which holds the holder's host and pid for the message. The kernel drops the lock when its process
dies, however it dies, so a stale lock is simply taken over by the next trainer. File systems
without `flock` (object stores, some Lustre mounts) run without the lock, with a warning.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
from typing import Any

from etils import epath

from fape_jax import distributed
from fape_jax import run_log
from fape_jax import tasks
from fape_jax.errors import FapeError

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"
LOCK_FILE = ".lock"
# Dotted config fields a resume may change: how long and how often, where the stores live and
# the mesh (checkpoints reshard onto any mesh), never what is trained.
RESUMABLE = frozenset({
    "total_steps", "stop_after", "max_wall_minutes", "log_every", "eval_every", "ckpt_every",
    "keep_checkpoints", "num_eval_images", "num_sample_images", "data.read_threads",
    "data.prefetch", "data.data_dir", "plans.store.path", "plans.progress",
    "plans.build_if_missing", "mesh.shape", "mesh.dry_run_devices", "logical_axis_rules",
})
# Resolved from the per-shard sizes for the devices of each invocation (`preflight`), so they may
# change when those are set (the data position is kept in examples: `checkpoint`).
PER_SHARD = {"data.batch_size": "data.batch_size_per_shard",
             "data.eval_batch_size": "data.eval_batch_size_per_shard"}
# Fields added to the configs after runs were written with them absent, each with the value that
# does what the code did before the field existed: a run started before them resumes when the
# new config holds that value (any other value is a change like any other).
ADDED_FIELDS = {"optim.ema_decay": 0.0, "optim.g.estim_lr0": 1e-6, "optim.flatten": False,
                **{f"data.task_slots.{t}": 1 for t in tasks.TASKS}}


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old, new)} for every field that differs (missing = None); a field absent
  from `old` and at its ADDED_FIELDS value in `new` is what the old run did, so no change."""
  a, b = distributed.flatten_dotted(old), distributed.flatten_dotted(new)
  missing = object()
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
          and not (k not in a and ADDED_FIELDS.get(k, missing) == b.get(k))}


def _config_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def _short(value: Any, width: int = 40) -> str:
  text = json.dumps(value, default=str)
  return text if len(text) <= width else text[:width - 3] + "..."


def check_resume(workdir: epath.Path, config) -> dict[str, tuple[Any, Any]]:
  """The allowed changes against the run's config.json ({} for a new run); refuses the rest.

  Reads only: nothing in `workdir` is written here.
  """
  path = workdir / CONFIG_FILE
  if not path.exists():
    return {}
  try:
    old = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise FapeError(f"{path} is not valid JSON ({e}); this run directory was not written by "
                    "fape_jax.train. Use another --workdir.") from None
  changes = config_changes(old, json.loads(_config_json(config)))
  per_shard = {k for k, f in PER_SHARD.items()
               if distributed.flatten_dotted(old).get(f) and config.data.get(f.split(".")[1])}
  refused = {k: v for k, v in changes.items() if k not in RESUMABLE | per_shard}
  if refused:
    shown = ", ".join(f"{k} ({_short(a)} -> {_short(b)})"
                      for k, (a, b) in list(refused.items())[:6])
    more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
    raise FapeError(f"--workdir {workdir} holds a run with another config: {shown}{more}. A resume "
                    "may change only step counts, cadences, budgets, paths and the mesh; start "
                    "the new config in a new --workdir (nothing in this one was changed).")
  return changes


def record_config(workdir: epath.Path, config, changes: dict, step: int) -> None:
  """Writes config.json (the run's config from now on) and logs a resume's allowed changes."""
  if not distributed.is_main_process():
    return
  if changes:
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "step": step, "changed": {k: list(v) for k, v in changes.items()}}
    resumes = workdir / RESUMES_FILE
    before = resumes.read_text() if resumes.exists() else ""
    # Rewritten whole, not appended: object stores cannot append.
    run_log.rewrite(resumes, before + json.dumps(entry, default=str) + "\n")
    logging.info("Resuming at step %d with changed %s", step, sorted(changes))
  run_log.rewrite(workdir / CONFIG_FILE, _config_json(config))  # a reader never sees half of it


class RunLock:
  """An exclusive lock on a run directory for one trainer (process 0 of a multi-process run)."""

  def __init__(self, workdir: epath.Path):
    self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    import fcntl  # pylint: disable=g-import-not-at-top (POSIX only)
    if not distributed.is_main_process():
      return self
    if "://" in self.path:
      logging.warning("%s: no run lock on an object store; make sure one trainer writes here.",
                      self.path)
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise FapeError(f"Another trainer is running in {os.path.dirname(self.path)} ({holder}); "
                        "two trainers in one run directory would interleave their checkpoints. "
                        "Wait for it to end, stop it, or use another --workdir.") from None
      logging.warning("%s: this file system has no flock (%s); training without a run lock.",
                      self.path, e)
      return self
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}".encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused next time)
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
