"""Training data set-up: the pairs store (train / validation), the plan store joined to it by id,
and their Grain iterators. Process 0 builds what is missing (the embedded default's synthetic
pairs and its rule-planner plans); every process then opens the same stores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from fape_jax import distributed
from fape_jax import preflight
from fape_jax.distributed import say
from fape_jax.data import pairs
from fape_jax.data import pipeline
from fape_jax.errors import FapeError


def open_plans(config, sources: dict) -> Any:
  """Opens (building it first, when allowed and missing) the plan store for `sources`."""
  from fape_jax.planning import job, store  # pylint: disable=g-import-not-at-top (torch side)
  pc = config.plans   # the plan-cache job's own settings block (configs/base.py)
  path = job.store_path(pc, config.data)
  ids = [s[i]["id"] for s in sources.values() for i in range(len(s))]
  if distributed.is_main_process():
    complete = False
    if epath.Path(path, store.MANIFEST).exists():
      complete = not store.PlanStore(path).missing(ids)
    if not complete:
      if not config.plans.build_if_missing:
        raise FapeError(f"No complete plan store at {path}. Build it first: python -m "
                        "fape_jax.plan_cache --config=configs/plan_cache.py (see launch/ for "
                        "clusters), or set --config.plans.store.path.")
      say(f"Planning {len(ids)} images with the {pc.planner.kind} planner and the "
          f"{pc.encoder.kind} encoder into {path} (first run only)...")
      job.run(pc, pairs=config.data, shard_index=0, num_shards=1, sources=sources)
  distributed.barrier("plan_store_ready")
  plans = store.open_plan_store(path, expect={"config_hash": job.config_hash(pc)},
                                require_ids=ids)
  if plans.d != config.plans.dim:
    raise FapeError(f"The plan store at {path} holds {plans.d}-d tokens but config.plans.dim="
                    f"{config.plans.dim}; set --config.plans.dim={plans.d}.")
  distributed.assert_same_across_processes("plan store manifest", plans.manifest)
  return plans


@dataclasses.dataclass
class TrainData:
  """The training and validation pairs, the plans joined to them, and their iterators."""
  config: Any
  train: Any
  val: Any
  plans: Any

  def train_iterator(self, start: int = 0) -> "TrainStream":
    """The training batches from global stream position `start` on (see `TrainStream`)."""
    d = self.config.data
    batching = d.get("batching", "mixed")
    if batching not in ("mixed", "task"):
      raise FapeError(f"--config.data.batching={batching!r}: use 'mixed' or 'task'.")
    if self.config.optim.get("per_task_state", False) and batching != "task":
      raise FapeError("--config.optim.per_task_state=True keeps one optimiser state per task and "
                      "needs one-task batches: add --config.data.batching=task.")
    slots = dict(d.get("task_slots", None) or {})
    if batching != "task" and any(n != 1 for n in slots.values()):
      raise FapeError(f"--config.data.task_slots={slots} weighs tasks within one-task batches; "
                      "add --config.data.batching=task or leave the slots at 1.")
    it = pipeline.train_iterator(
        self.train, self.plans, crop=d.crop, batch_size=d.batch_size, seed=self.config.seed,
        read_threads=d.read_threads, prefetch=d.prefetch, start=start,
        task_batches=batching == "task", task_slots=slots)
    return TrainStream(it, start, d.batch_size)

  def example_batch(self) -> dict:
    """One local batch from the stream's start: every training batch has its shapes and dtypes."""
    return next(self.train_iterator().iterator)

  def eval_batches(self, local_batch: int, limit: int = 0):
    source = self.val if not limit else _Head(self.val, limit)
    return pipeline.eval_dataset(source, self.plans, batch_size=local_batch, split="validation")


class TrainStream:
  """The training iterator and how far the run has read the global example stream.

  `iterator` is Grain's (its state, saved per process, resumes it exactly on the same process
  count); `position()` is the same place in process-count-free terms, saved beside it, from which
  a run on another process count rebuilds the stream (`pipeline.train_dataset(start=...)`).
  """

  def __init__(self, iterator, start: int, batch_size: int):
    self.iterator, self.start, self.batch_size = iterator, int(start), int(batch_size)
    self.examples = int(start)  # global stream positions consumed so far

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.iterator)
    self.examples += self.batch_size
    return batch

  def skip_to(self, examples: int) -> None:
    """Restored Grain state: the positions consumed before it (from the saved position)."""
    self.examples = int(examples)

  def position(self) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    return {"examples": self.examples, "start": self.start, "batch_size": self.batch_size,
            "process_count": jax.process_count()}


class _Head:
  """The first `n` records of a source (quick validation in tests and short runs)."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source))
    self.split = getattr(source, "split", "")

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]


def prepare_data(config) -> TrainData:
  """Builds what is missing (process 0), then opens the pairs and plan stores on every process."""
  d = config.data
  # Process 0 builds the stores here and every process reads them: one folder seen by all hosts.
  preflight.check_shared_dir(d.data_dir, "config.data.data_dir")
  if distributed.is_main_process():
    if d.name == "synthetic":
      say(f"Pairs store: synthetic seven-task pairs in {d.data_dir} (built on first use).")
      pairs.prepare_synthetic(d.data_dir, d, skip_bad=d.skip_bad)
    elif d.get("manual_dir"):
      pairs.prepare_folder(d.data_dir, d.name, d.manual_dir, skip_bad=d.skip_bad)
  distributed.barrier("pairs_store_ready")
  train = pairs.open_pairs(d.data_dir, d.name, "train", d)
  val = pairs.open_pairs(d.data_dir, d.name, "validation", d)
  plans = open_plans(config, {"train": train, "validation": val}) if config.plans.enabled \
      else None
  return TrainData(config, train, val, plans)

