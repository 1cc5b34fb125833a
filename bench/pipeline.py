"""Input-pipeline benchmark: Grain batches/s against what the train step consumes.

  .venv/bin/python bench/pipeline.py [--config=configs/base.py] [--measure_step]

Measures, on the config's own stores (built under config.data.data_dir when missing, as training
does):
  pipeline        batches/s of `TrainData.train_iterator()` (the training pipeline: shuffled
                  reads, crops, flips, plan join by id, batching, prefetch), after a warm-up that
                  fills its prefetch buffers; median over rounds;
  pairs_reads     records/s of random access to the pairs store (decode of both images);
  plan_reads      records/s of random access to the plan store by id (`PlanStore[id]`);
  step            batches/s the train step consumes = 1 / step time: read from
                  bench/results/train_step.json when it was measured on the same model/batch,
                  or, with --measure_step (or when no matching result exists), measured here:
                  the library step on a fixed batch alternating with pipeline rounds, plus the
                  step fed from the live iterator (`fed`: next batch + transfer + step), which
                  shows what the pipeline's threads cost the step on a shared CPU.
`headroom` = pipeline batches/s / step batches/s (the goal is >= 3).
"""

from __future__ import annotations

import json
import time
from typing import Any

import measure  # noqa: F401  (puts the repo root on sys.path; import first)

import numpy as np


def _rate(n: int, seconds: float) -> float:
  return n / seconds if seconds > 0 else float("inf")


def _timed_reads(fn, keys, repeats: int) -> dict[str, Any]:
  """Records/s of calling fn(key) over `keys`, `repeats` times (median of the passes)."""
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for k in keys:
      fn(k)
    rates.append(_rate(len(keys), time.perf_counter() - t0))
  return {"records_per_s": measure.median(rates), "passes_records_per_s": rates,
          "records_per_pass": len(keys)}


def _step_from_results(config) -> dict[str, Any] | None:
  """The library step time from bench/results/train_step.json when it matches this config."""
  from train_step import config_summary  # pylint: disable=g-import-not-at-top
  path = measure.RESULTS / "train_step.json"
  if not path.exists():
    return None
  saved = json.loads(path.read_text())
  want = json.loads(json.dumps(config_summary(config), default=list))
  have = saved.get("config", {})
  keys = ("unet", "vae", "dtype", "batch_size", "crop", "plan_tokens", "lora", "disc", "optim_g")
  if any(have.get(k) != want.get(k) for k in keys):
    return None
  step_s = saved["library_step"]["step_s"]
  return {"source": "bench/results/train_step.json", "measured": saved["machine"]["date"],
          "commit": saved["machine"]["commit"], "step_s": step_s,
          "batches_per_s": 1.0 / step_s}


def main(argv):
  del argv
  config = FLAGS.config
  machine = measure.machine_info()  # date and load at the start
  say = measure.say
  from fape_jax import train_data  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  data = train_data.prepare_data(config)
  prepare_s = time.perf_counter() - t0
  say(f"stores ready in {prepare_s:.1f} s: {len(data.train)} train pairs, "
      f"{len(data.plans) if data.plans is not None else 0} plans")

  it = data.train_iterator()
  for _ in range(FLAGS.warmup):
    next(it)

  def pipeline_round():
    for _ in range(FLAGS.batches):
      next(it)

  fns: dict[str, Any] = {"pipeline": pipeline_round}
  step = _step_from_results(config) if not FLAGS.measure_step else None
  lib = None
  if step is None:
    import jax  # pylint: disable=g-import-not-at-top
    from fape_jax import sharding as shard_lib  # pylint: disable=g-import-not-at-top
    from train_step import LibraryStep  # pylint: disable=g-import-not-at-top
    say("compiling the library train step (no matching bench/results/train_step.json, or "
        "--measure_step) ...")
    mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)
    lib = LibraryStep(config, mesh)
    bsh = shard_lib.batch_sharding(mesh, config.data_axes)
    keys = tuple(lib.batch)

    def fed():
      batch = {k: v for k, v in next(it).items() if k in keys}
      lib.batch = jax.device_put(batch, bsh)
      lib()

    lib()
    fns["step_fixed_batch"] = lib
    fns["step_fed_by_pipeline"] = fed
  timed = measure.alternate(fns, rounds=FLAGS.rounds, calls=1 if lib is None else 2, log=say)
  pipe_bps = FLAGS.batches / timed["pipeline"]["median_s"]
  if lib is not None:
    step = {"source": "measured in this run (alternating with the pipeline rounds)",
            "step_s": timed["step_fixed_batch"]["median_s"],
            "batches_per_s": 1.0 / timed["step_fixed_batch"]["median_s"],
            "fed_step_s": timed["step_fed_by_pipeline"]["median_s"],
            "compile_s": lib.compile_s}

  rng = np.random.default_rng(0)
  idx = rng.choice(len(data.train), size=min(FLAGS.reads, len(data.train)), replace=False)
  pairs_reads = _timed_reads(lambda i: data.train[int(i)], idx, FLAGS.read_passes)
  plan_reads = None
  if data.plans is not None:
    ids = [data.plans.ids[i] for i in rng.choice(len(data.plans), size=min(FLAGS.reads,
                                                                          len(data.plans)),
                                                 replace=False)]
    plan_reads = _timed_reads(lambda i: data.plans[i], ids, FLAGS.read_passes)

  d = config.data
  result = {
      "benchmark": "pipeline",
      "command": measure.command_line(),
      "machine": machine,
      "config": {"variant": config.get("variant"), "data_dir": d.data_dir, "name": d.name,
                 "batch_size": d.batch_size, "crop": d.crop, "read_threads": d.read_threads,
                 "prefetch": d.prefetch, "plans": bool(config.plans.enabled),
                 "train_pairs": len(data.train)},
      "prepare_s": prepare_s,
      "pipeline_batches_per_s": pipe_bps,
      "pipeline_images_per_s": pipe_bps * d.batch_size,
      "step": step,
      "step_batches_per_s": step["batches_per_s"],
      "headroom": pipe_bps / step["batches_per_s"],
      "pairs_reads": pairs_reads,
      "plan_reads": plan_reads,
      "load_average_end": measure.load_average(),
      "timings": timed,
  }
  measure.write_result(FLAGS.name, result)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", str(measure.REPO / "configs" / "base.py"),
                                  "Training config whose data pipeline is measured.")
  flags.DEFINE_integer("warmup", 4, "Batches drawn before timing (fills the prefetch buffers).")
  flags.DEFINE_integer("batches", 10, "Batches per timed pipeline round.")
  flags.DEFINE_integer("rounds", 5, "Rounds (medians are over rounds).")
  flags.DEFINE_integer("reads", 200, "Random records per store-read pass.")
  flags.DEFINE_integer("read_passes", 3, "Store-read passes (median).")
  flags.DEFINE_bool("measure_step", False, "Measure the train step here instead of reading "
                    "bench/results/train_step.json.")
  flags.DEFINE_string("name", "pipeline", "Result file name under bench/results/.")
  app.run(main)
