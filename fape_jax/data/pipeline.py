"""Grain input pipelines over a pairs source, joined by id with a plan store.

Training (`train_dataset` / `train_iterator`):
  range(N) -> shuffle(seed) -> repeat (each epoch reshuffles: grain reseeds by epoch) ->
  example k = the pair at shuffled position k: the same random crop on degraded and clean, random
  flips (the crop and flips are drawn from Generator([seed, k]), so they do not depend on the host
  count) -> this host's slice [process_index::process_count] -> threaded reads (ReadOptions) ->
  local batches of batch_size / process_count (drop_remainder) -> a prefetch thread.
Global batch b is the stream positions [b * batch_size, (b + 1) * batch_size): hosts hold
disjoint interleaved parts of it and together cover every position once. An example depends on its
global position only (not on the host count), so a pipeline started at position `start` on any
number of hosts continues the same stream: that is how a resume on another process count picks up
where the checkpoint left off (`train_data.TrainStream`).

With `task_batches=True` the shuffle is replaced by one-task batches (`TaskBatchOrder`): every
global batch holds pairs of a single task, each cycle visits every task `task_slots[task]` times
(once by default; in a shuffled order), and each task walks through its own reshuffled pairs
(`data.batching='task'`, `data.task_slots`; README "What the embedded default trains on",
Batching and "Crop and task slots", has the runs that chose them).

Batches are dicts of numpy arrays:
  degraded, clean  float32 NHWC in [-1, 1]
  task_id          int32 (fape_jax.tasks.TASK_ID; -1 for a mix)
  index            int64 global stream position (epoch * N + position in the epoch)
  record           int64 index of the pair in the source
  plan_tokens      float32 (B, K, D) and plan_mask bool (B, K); absent when plans is None
Evaluation batches also hold `id` and `task` (numpy str arrays) and `valid` (False on padding).

Super-resolution pairs stored at different sizes (degraded smaller by an integer factor s): the crop
box is cut at the same place in both (crop / s on the degraded grid) and the degraded crop is
resized bicubically to the clean crop's size, since the executor takes input and output at one size.

The training iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` resume the exact
sequence, and `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` are the Orbax args
that go into the training `ocp.CheckpointManager` (see fape_jax/checkpoint.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import grain
import jax
import numpy as np
from PIL import Image

from fape_jax import tasks as tasks_lib
from fape_jax.errors import FapeError

_STRING_FIELDS = ("id", "task")


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pc = jax.process_count() if process_count is None else int(process_count)
  pi = jax.process_index() if process_index is None else int(process_index)
  if pc < 1 or not 0 <= pi < pc:
    raise FapeError(f"process_index={pi} must lie in [0, process_count={pc}).")
  return pi, pc


def _to_signed(a: np.ndarray) -> np.ndarray:
  return a.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def _task_id(task: str) -> int:
  return tasks_lib.TASK_ID.get(task, -1)


def _scale(rec: Mapping[str, Any]) -> int:
  (hd, wd), (hc, wc) = rec["degraded"].shape[:2], rec["clean"].shape[:2]
  if (hd, wd) == (hc, wc):
    return 1
  if hd and wd and hc % hd == 0 and wc % wd == 0 and hc // hd == wc // wd:
    return hc // hd
  raise FapeError(f"Pair {rec['id']}: degraded {wd}x{hd} and clean {wc}x{hc} differ by a "
                  "non-integer factor; rebuild the pairs store.")


def _upsample(img: np.ndarray, h: int, w: int) -> np.ndarray:
  return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))


def _join_plan(out: dict, rid: str, plans) -> None:
  if plans is None:
    return
  try:
    plan = plans[rid]
  except KeyError:
    raise FapeError(f"The plan store has no plan for pair {rid!r}: it was built for another "
                    "pairs store. Rebuild it (python -m fape_jax.plan_cache) or train with "
                    "plans disabled.") from None
  out["plan_tokens"] = np.asarray(plan["tokens"], np.float32)
  out["plan_mask"] = np.asarray(plan["mask"], bool)


def _train_example(k: int, r: int, *, source, plans, crop: int, seed: int, hflip: bool,
                   vflip: bool) -> dict:
  rec = source[r]
  deg, clean = rec["degraded"], rec["clean"]
  s = _scale(rec)
  if crop % s:
    raise FapeError(f"Crop {crop} is not divisible by the x{s} scale of pair {rec['id']}; use a "
                    f"crop that is a multiple of {s}.")
  cd = crop // s
  hd, wd = deg.shape[:2]
  if hd < cd or wd < cd:
    raise FapeError(f"Pair {rec['id']} ({clean.shape[1]}x{clean.shape[0]}) is smaller than the "
                    f"{crop}x{crop} training crop; lower config.data.crop or drop the pair.")
  rng = np.random.default_rng([seed, k])
  y0, x0 = int(rng.integers(0, hd - cd + 1)), int(rng.integers(0, wd - cd + 1))
  d = deg[y0:y0 + cd, x0:x0 + cd]
  c = clean[y0 * s:(y0 + cd) * s, x0 * s:(x0 + cd) * s]
  if s != 1:
    d = _upsample(d, crop, crop)
  if hflip and rng.random() < 0.5:
    d, c = d[:, ::-1], c[:, ::-1]
  if vflip and rng.random() < 0.5:
    d, c = d[::-1], c[::-1]
  out = {"degraded": _to_signed(d), "clean": _to_signed(c),
         "task_id": np.int32(_task_id(rec["task"])), "index": np.int64(k),
         "record": np.int64(r)}
  _join_plan(out, rec["id"], plans)
  return out


class TaskBatchOrder:
  """Stream position k -> pair index, in one-task global batches of `batch_size`.

  A cycle holds `slots[task]` batches of every task (1 each by default, 0 leaves a task out),
  in an order drawn from Generator([seed, c]) for cycle c; batch b is the (b % cycle length)-th
  of cycle b // cycle length. Each task takes its next `batch_size` pairs from its own list,
  reshuffled every pass over it (Generator([seed, task, pass])). Pure in k, so resumes and host
  slices need no state.
  """

  def __init__(self, tasks: list[str], batch_size: int, seed: int,
               slots: dict[str, int] | None = None):
    names = sorted(set(tasks))
    slots = dict(slots or {})
    unknown = sorted(set(slots) - set(tasks_lib.TASKS) - set(names))
    if unknown:
      raise FapeError(f"data.task_slots names {unknown}, which are not tasks; use the names in "
                      f"fape_jax/tasks.py: {list(tasks_lib.TASKS)}.")
    counts = [slots.get(name, 1) for name in names]
    if any(not isinstance(n, int) or n < 0 for n in counts) or not any(counts):
      raise FapeError(f"data.task_slots must be whole numbers >= 0, at least one > 0; got "
                      f"{dict(zip(names, counts))}.")
    self.by_task = [np.asarray([i for i, t in enumerate(tasks) if t == name]) for name in names]
    self.slots = counts
    self.cycle = np.repeat(np.arange(len(names)), counts)   # a cycle's batches, before shuffling
    self.batch_size, self.seed = batch_size, seed

  @functools.lru_cache(maxsize=64)
  def _cycle(self, c: int) -> np.ndarray:
    return np.random.default_rng([self.seed, c]).permutation(self.cycle)

  @functools.lru_cache(maxsize=256)
  def _pass(self, t: int, e: int) -> np.ndarray:
    return self.by_task[t][np.random.default_rng([self.seed, t, e]).permutation(
        len(self.by_task[t]))]

  def __call__(self, k: int) -> int:
    b, p = divmod(int(k), self.batch_size)
    c, j = divmod(b, len(self.cycle))
    order = self._cycle(c)
    t = int(order[j])
    # This task's batches so far: slots[t] per earlier cycle plus its earlier ones in this cycle.
    done = c * self.slots[t] + int(np.count_nonzero(order[:j] == t))
    e, m = divmod(done * self.batch_size + p, len(self.by_task[t]))
    return int(self._pass(t, e)[m])


def record_tasks(source) -> list[str]:
  """The task of every pair of `source` (its `tasks()` when it has one: no image decoding)."""
  if hasattr(source, "tasks"):
    return list(source.tasks())
  return [str(source[i]["task"]) for i in range(len(source))]


def train_dataset(source, plans=None, *, crop: int, batch_size: int, seed: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  num_epochs: int | None = None, hflip: bool = True, vflip: bool = False,
                  read_threads: int = 2, prefetch: int = 2, start: int = 0,
                  task_batches: bool = False,
                  task_slots: dict[str, int] | None = None) -> grain.IterDataset:
  """The training input pipeline for this host (see the module docstring).

  Args:
    source: a random-access pairs source (pairs.open_pairs).
    plans: an object with plans[id] -> {"tokens": (K, D), "mask": (K,)}, or None (no plans).
    crop: training crop size in clean pixels (the same box on degraded and clean).
    batch_size: the *global* batch size; each host gets batch_size / process_count.
    seed: shuffle, crop and flip seed.
    process_index, process_count: default jax.process_index() / jax.process_count().
    num_epochs: None repeats forever.
    hflip, vflip: random flips (vertical off by default: rain falls down, haze thickens upward).
    read_threads: threads reading and transforming examples.
    prefetch: batches prepared ahead by a background thread (0: none).
    start: the global stream position of the first batch (0, or where a resume on another
      process count continues: the positions before it were consumed by the earlier run).
    task_batches: one task per global batch (`TaskBatchOrder`) instead of a plain shuffle.
    task_slots: with task_batches, batches per cycle for each task (default 1; 0 leaves it out).
  """
  n = len(source)
  if n == 0:
    raise FapeError("The training pairs source is empty; rebuild the pairs store.")
  pi, pc = _hosts(process_index, process_count)
  if batch_size < 1 or batch_size % pc:
    raise FapeError(f"Global batch size {batch_size} must be a positive multiple of the "
                    f"{pc} processes.")
  if crop < 1:
    raise FapeError(f"Training crop must be >= 1, got {crop}.")
  if not 0 <= seed < 2 ** 32:
    raise FapeError(f"Data seed {seed} must lie in [0, 2**32).")
  if start < 0:
    raise FapeError(f"Training stream start {start} must be >= 0.")
  if task_batches:
    # An epoch is still n stream positions; the order within it comes from TaskBatchOrder, which
    # depends on the position only, so `start` below resumes it like the shuffle.
    order = TaskBatchOrder(record_tasks(source), batch_size, seed, task_slots)
    ds = grain.MapDataset.range(n).repeat(num_epochs).map_with_index(lambda k, _: order(k))
  else:
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map_with_index(functools.partial(
      _train_example, source=source, plans=plans, crop=crop, seed=seed, hflip=hflip,
      vflip=vflip))
  # From global position `start` on (a resume on another process count), host pi's share.
  ds = ds[start + pi::pc]
  local = batch_size // pc
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(read_threads, 0),
                                            prefetch_buffer_size=max(local * prefetch, 1)))
  it = it.batch(local, drop_remainder=True)
  if prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
  return it


def train_iterator(source, plans=None, **kwargs) -> grain.DatasetIterator:
  """`iter(train_dataset(...))`: a checkpointable iterator (get_state / set_state)."""
  return iter(train_dataset(source, plans, **kwargs))


def _eval_example(r: int, *, source, plans, n: int) -> dict:
  rec = source[min(r, n - 1)]
  deg, clean = rec["degraded"], rec["clean"]
  if _scale(rec) != 1:
    deg = _upsample(deg, clean.shape[0], clean.shape[1])
  out = {"degraded": _to_signed(deg), "clean": _to_signed(clean),
         "task_id": np.int32(_task_id(rec["task"])), "index": np.int64(r),
         "valid": np.bool_(r < n), "id": rec["id"], "task": rec["task"]}
  _join_plan(out, rec["id"], plans)
  return out


def _stack(examples, split: str) -> dict:
  shapes = {e["clean"].shape for e in examples}
  if len(shapes) > 1:
    raise FapeError(f"Evaluation split {split!r} holds images of different sizes "
                    f"({sorted(shapes)[:3]}...); evaluate it with batch_size=1.")
  return {k: np.stack([e[k] for e in examples]) if k not in _STRING_FIELDS
          else np.asarray([e[k] for e in examples]) for k in examples[0]}


def eval_dataset(source, plans=None, *, batch_size: int = 1, process_index: int | None = None,
                 process_count: int | None = None, split: str = "") -> grain.MapDataset:
  """Deterministic evaluation batches over a whole split: full images, no crop or flip.

  Every host gets the same number of batches (global arrays need that): the split is padded with
  copies of its last pair marked `valid=False`. `batch_size` > 1 needs equal image sizes
  (the synthetic validation split has them); use 1 for benchmarks with varying sizes.
  """
  n = len(source)
  if n == 0:
    raise FapeError(f"Evaluation split {split or getattr(source, 'split', '')!r} is empty.")
  pi, pc = _hosts(process_index, process_count)
  if batch_size < 1:
    raise FapeError(f"Evaluation batch size must be >= 1, got {batch_size}.")
  per_host = math.ceil(math.ceil(n / pc) / batch_size) * batch_size
  ds = grain.MapDataset.range(per_host * pc).map(
      functools.partial(_eval_example, source=source, plans=plans, n=n))
  ds = ds[pi::pc]
  name = split or getattr(source, "split", "")
  return ds.batch(batch_size, batch_fn=functools.partial(_stack, split=name))


def steps_per_epoch(num_pairs: int, batch_size: int) -> int:
  return num_pairs // batch_size
