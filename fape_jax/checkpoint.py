"""Orbax checkpoints of the train state together with the Grain iterator.

One `ocp.CheckpointManager` in `WORKDIR/checkpoints` with three items: `state` (a pytree of
arrays: trainable parameters, optimiser states, discriminator, step), `data` (the Grain iterator,
one JSON per process: `process_{i}-of-{n}.json`) and `position` (one JSON: the global stream
position reached, the process count and the global batch). On the same process count the Grain
state restores the data exactly; on another (`restore_stream`) the stream is rebuilt from the
position, which continues the same example order (`data/pipeline.py`). Saves are atomic (Orbax writes to a temporary folder and renames it), happen
every `save_every` steps, on preemption (SIGTERM/SIGINT) and at the end; the last `keep` are kept.
Restoring targets an abstract state whose leaves carry the *current* mesh's shardings, so a
checkpoint written on 8 devices lands on 1 device or on a 2x2 mesh.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from fape_jax.errors import FapeError


# Orbax's replica-parallel save splits every replicated array across its replicas, each slice a
# jitted op compiled per shape: for the many small replicated adapters and optimiser leaves that
# costs more (seconds of compiles per save) than it saves in writing. Only slices of at least this
# size are written replica-parallel; smaller arrays are written whole by one replica.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20
POSITION = "position"


def _register_array_handler() -> None:
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES),
      override=True)


def _summary(e: BaseException, width: int = 300) -> str:
  """One line for a failed read: Orbax's messages run to pages (tree diffs, TensorStore specs)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = lines[0] if lines else ""
  if "tree structures do not match" in text and len(lines) > 2:
    text = f"{text.rstrip(':')} (first: {lines[1]} {lines[2].lstrip('- ')})"
  text = f"{type(e).__name__}: {text}"
  # TensorStore puts the path first and the cause ("No space left on device") last: keep both ends.
  return text if len(text) <= width else f"{text[:width // 2 - 3]} ... {text[-(width // 2 - 2):]}"


class Checkpointer:
  """Save/restore the train state and the data iterator as one step."""

  def __init__(self, directory: str | epath.Path, *, save_every: int, keep: int,
               read_only: bool = False):
    # Orbax wants absolute paths; cloud paths (gs://...) already are.
    self.directory = epath.Path(directory if "://" in str(directory)
                                else os.path.abspath(directory))
    _register_array_handler()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, save_every), create=not read_only,
        read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); blocks until the save is complete.

    A failed write (a full disk, a lost mount) raises one FapeError; the earlier steps are kept.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      # A `train_data.TrainStream` (Grain's iterator and its global position) or a bare iterator.
      items["data"] = grain.checkpoint.CheckpointSave(getattr(data_iter, "iterator", data_iter))
      if hasattr(data_iter, "position"):
        items["position"] = ocp.args.JsonSave(data_iter.position())
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (a full disk or a failed write, whatever type raises)
      # Orbax writes into a temporary folder and renames it when complete: the failed step never
      # became a checkpoint, and the earlier ones are as they were.
      kept = [s for s in self.all_steps() if s != step]
      raise FapeError(
          f"Could not write the checkpoint of step {step} in {self.directory} ({_summary(e)}). "
          f"The earlier checkpoints ({kept or 'none'}) are intact: free space or fix the folder, "
          "then run the same command to resume"
          f"{f' from step {kept[-1]}' if kept else ''}.") from e
    return saved

  def restore(self, abstract_state: Any, data_iter=None, *, step: int | None = None):
    """Restores `step` (default: the newest that reads back), returns (step, state).

    A step that fails to read (a truncated or corrupt folder) is skipped and the previous one is
    tried, so one bad write never strands a run (a warning names what was skipped, and why). When
    none reads back, one FapeError says so. Returns (None, None) when the directory holds no
    checkpoint.
    """
    def data_items(_):
      if data_iter is None:
        return {}, None
      return {"data": grain.checkpoint.CheckpointRestore(data_iter)}, None

    got, state, _ = self._restore_newest(abstract_state, step, data_items)
    return got, state

  def _restore_newest(self, abstract_state, step, data_items):
    """`restore`'s loop: (step, state, extra) for the newest step that reads back, where
    `data_items(step)` -> (items to restore with the state, *extra)."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if step is not None and step not in self.all_steps():
      raise FapeError(f"No checkpoint for step {step} in {self.directory}; "
                      f"available steps: {self.all_steps() or 'none'}.")
    errors = []
    for s in steps:
      try:
        data, *extra = data_items(s)
        items = {"state": ocp.args.StandardRestore(abstract_state), **data}
        restored = self._manager.restore(s, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 (any read failure means "this step is unusable")
        logging.info("Checkpoint step %d in %s could not be restored (%s).", s, self.directory,
                     _summary(e))
        errors.append((s, e))
        continue
      for bad, e in errors:
        logging.warning("Checkpoint step %d in %s could not be restored (%s).", bad,
                        self.directory, _summary(e))
      if errors:
        logging.warning("Resumed from step %d instead of the newest step %d.", s, errors[0][0])
      return s, restored["state"], tuple(extra)
    if errors:
      raise FapeError(
          f"None of the checkpoints in {self.directory} could be restored (steps "
          f"{[s for s, _ in errors]}); last error: {_summary(errors[-1][1])}. If the model "
          "config changed since they were written, use a new --workdir.")
    return None, None, None

  def position(self, step: int) -> dict | None:
    """The data position saved with `step` (None for checkpoints from before it was saved)."""
    if not (self.directory / str(step) / POSITION).exists():
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{POSITION: ocp.args.JsonRestore()}))
    return dict(restored[POSITION])

  def restore_stream(self, abstract_state: Any, make_stream: Callable[[int], Any]):
    """Restores the newest readable step with its data stream: (step, state, stream).

    `make_stream(start)` builds a `train_data.TrainStream` from global position `start`. Written
    by as many processes as now: Grain's own state restores it exactly. Written by another number
    of processes (whose per-process Grain files do not map onto these): the stream is rebuilt at
    the saved global position, the same examples in the same order, split among these processes.
    Returns (None, None, None) when the directory holds no checkpoint.
    """
    now = jax.process_count()

    def data_items(step):
      pos = self.position(step)
      if pos is not None and int(pos["process_count"]) != now:
        logging.warning(
            "Checkpoint step %d was written by %d processes, this run has %d: the data stream "
            "continues from global example %d (the same order; Grain's per-process state is not "
            "used).", step, pos["process_count"], now, pos["examples"])
        return {}, make_stream(int(pos["examples"])), pos
      stream = make_stream(int(pos["start"]) if pos else 0)
      return {"data": grain.checkpoint.CheckpointRestore(stream.iterator)}, stream, pos

    got, state, extra = self._restore_newest(abstract_state, None, data_items)
    if got is None:
      return None, None, None
    stream, pos = extra
    # Older checkpoints hold no position: one global batch per step, as this run's.
    stream.skip_to(int(pos["examples"]) if pos else got * stream.batch_size)
    return got, state, stream

  def close(self):
    self._manager.close()


class PreemptionFlag:
  """Set by SIGTERM/SIGINT; the train loop saves at the next step boundary and exits.

  All processes must agree before one saves (Orbax saves are collective), so `is_set()` is
  OR-reduced across processes in multi-process runs.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self.signal_name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def is_set(self) -> bool:
    return self.poll()[0]

  def poll(self, out_of_time: bool = False) -> tuple[bool, bool]:
    """(a signal arrived, `out_of_time`), each true when true on any process (one collective).

    Every process must call it at the same point: it is an all-gather in multi-process runs.
    """
    local = [self._event.is_set(), bool(out_of_time)]
    if jax.process_count() == 1:
      return local[0], local[1]
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    flags = np.asarray(multihost_utils.process_allgather(np.asarray(local, dtype=np.int32)))
    either = flags.reshape(-1, 2).any(axis=0)
    return bool(either[0]), bool(either[1])

  def restore_handlers(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
