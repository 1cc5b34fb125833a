"""Restore benchmark: latency per image and peak memory at 256^2, 512^2 and tiled 1024^2.

  .venv/bin/python bench/restore.py [--config=configs/base.py] [--sizes=256,512,1024]

Uses the executor of the config (randomly initialised: latency and memory do not depend on the
weights' values, only on their shapes) through the same pieces the restore CLI uses:
`steps.make_eval_step` (the jit-compiled executor call) and `fape_jax.tiling.tiled_apply`
(overlap-blended tiles). For each size:
  whole   the image in one executor call (the executor pads it to its size multiple), when
          size <= --whole_max;
  tiled   tiles of --tile px overlapping by --overlap, --tile_batch tiles per call, when
          size > --tile. The defaults are the restore CLI's (fape_jax/restore_lib.py): the tile
          is the training crop rounded up to the executor's size multiple, the overlap a
          quarter of it, 4 tiles per call.
Every (size, mode) runs in its own subprocess, so its peak resident memory (`ru_maxrss`) is its
own; XLA's planned buffer sizes (`memory_analysis`: arguments, outputs, temporaries) and, on
GPU/TPU, the device's `peak_bytes_in_use` are reported beside it. A whole-image call whose
planned temporaries exceed --max_temp_gb is compiled but not run (its plan is still reported).
Planning (the rule planner's pixel hints + the plan encoder) is timed per image separately, in
the parent process, since it runs on the host in PyTorch/NumPy, not in the compiled executor.

With --torch (the default), every (size, mode) is also run by the PyTorch reference executor
(bench/torch_reference.py: diffusers' UNet + the same two-expert LoRA, eager, inference mode,
the same thread count) through the same tiling code, in its own subprocess. Each row gives the
latency with the compile excluded (median of --repeats images after a warm-up) and the first
image's latency with it included (JAX: lowering + compiling + the first call; PyTorch eager has
nothing to compile, its first call is its warm-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import measure  # noqa: F401  (puts the repo root on sys.path; import first)

import numpy as np


def init_generator(config, mesh):
  """(trainable, frozen, shardings, Models): the executor only, created with its shardings.

  Like `model_state.create_state` minus the discriminator and optimiser states, which restoring
  does not hold (so they do not count in its memory).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from fape_jax import model_state  # pylint: disable=g-import-not-at-top

  abstract, models = model_state.abstract_state(config)
  shardings = model_state.state_shardings(abstract, mesh, config)

  def init():
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    gen = model_state.build_generator(config, nnx.Rngs(key))
    _, params, frozen = nnx.split(gen, models.gen_trainable, ...)
    return params, frozen

  params, frozen = jax.jit(init, out_shardings=(shardings["gen"]["params"],
                                                shardings["gen"]["frozen"]))()
  return params, frozen, shardings, models


def _worker(config, size: int, mode: str) -> dict[str, Any]:
  """One (size, mode) measurement in this process: compile, warm up, time, memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from fape_jax import sharding as shard_lib  # pylint: disable=g-import-not-at-top
  from fape_jax import tiling  # pylint: disable=g-import-not-at-top
  from fape_jax import steps  # pylint: disable=g-import-not-at-top
  from inputs import random_batch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  out: dict[str, Any] = {"size": size, "mode": mode, "framework": "jax"}
  # One device: latency per image, not throughput over a data-parallel mesh.
  mesh = shard_lib.make_mesh(config.mesh.axes, [1] * len(config.mesh.axes), jax.devices()[:1])
  t0 = time.perf_counter()
  gen_params, gen_frozen, shardings, models = init_generator(config, mesh)
  jax.block_until_ready((gen_params, gen_frozen))
  out["init_s"] = time.perf_counter() - t0
  out["rss_after_init_bytes"] = measure.max_rss_bytes()
  multiple = int(nnx.merge(models.gen_def, gen_params, gen_frozen).multiple)
  bsh = shard_lib.batch_sharding(mesh, config.data_axes)
  eval_step = steps.make_eval_step(models, shardings["gen"], bsh)

  tile, overlap, rows, side = _call_geometry(out, config, size, mode, multiple)
  example = random_batch(config, batch_size=rows, size=side)
  example = {k: v for k, v in example.items() if k in ("degraded", "plan_tokens", "plan_mask")}
  t_first = t0 = time.perf_counter()
  compiled = eval_step.lower(gen_params, gen_frozen, jax.device_put(example, bsh)).compile()
  out["compile_s"] = time.perf_counter() - t0
  out["xla_memory"] = measure.memory_analysis(compiled)

  temp = (out["xla_memory"] or {}).get("temp_size_in_bytes", 0)
  if mode == "whole" and temp > FLAGS.max_temp_gb * 2 ** 30:
    out["skipped"] = (f"XLA plans {temp / 2 ** 30:.1f} GiB of temporaries for one call "
                      f"(> --max_temp_gb={FLAGS.max_temp_gb}); not run on this shared machine")
    out["max_rss_bytes"] = measure.max_rss_bytes()
    return out

  tokens, mask = example.get("plan_tokens"), example.get("plan_mask")

  def call(tiles: np.ndarray) -> np.ndarray:
    batch = {"degraded": tiles.astype(np.float32)}
    if tokens is not None:
      n = tiles.shape[0]
      batch["plan_tokens"], batch["plan_mask"] = tokens[:1].repeat(n, 0), mask[:1].repeat(n, 0)
    restored, _ = compiled(gen_params, gen_frozen, jax.device_put(batch, bsh))
    return np.asarray(restored)

  _time_restores(out, call, size, mode, tile, overlap, multiple, t_first)
  out["max_rss_bytes"] = measure.max_rss_bytes()
  stats = jax.local_devices()[0].memory_stats()
  out["device_peak_bytes"] = (int(stats["peak_bytes_in_use"])
                              if stats and "peak_bytes_in_use" in stats else None)
  return out


def _call_geometry(out: dict, config, size: int, mode: str, multiple: int):
  """(tile, overlap, rows, side) of one executor call, also recorded in `out`: tiles of the
  restore CLI's size, --tile_batch per call, or the whole image padded to the size multiple."""
  tile, overlap = tiling_for(config, multiple)
  rows = FLAGS.tile_batch if mode == "tiled" else 1
  side = tile if mode == "tiled" else -(-size // multiple) * multiple
  out["tile"], out["overlap"], out["executor_call_shape"] = tile, overlap, [rows, side, side, 3]
  return tile, overlap, rows, side


def _time_restores(out: dict, call, size: int, mode: str, tile: int, overlap: int,
                   multiple: int, t_first: float) -> None:
  """Times restoring one random image with `call` (tiles or the padded whole image -> output).

  `t_first`: when this framework's preparation for the call (compiling) started; the warm-up
  image ends the first-image latency.
  """
  from fape_jax import tiling  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).uniform(-1, 1, (size, size, 3)).astype(np.float32)
  if mode == "whole":
    pad = -(-size // multiple) * multiple - size
    run = lambda: call(np.pad(image, ((0, pad), (0, pad), (0, 0)), mode="reflect")[None])  # noqa: E731
    out["tiles"] = 1
  else:
    run = lambda: tiling.tiled_apply(call, image, tile=tile, overlap=overlap,  # noqa: E731
                                     multiple=multiple, batch=FLAGS.tile_batch)
    starts = len(tiling.tile_starts(-(-size // multiple) * multiple, tile, overlap))
    out["tiles"] = starts * starts
  run()  # warm-up
  out["first_image_s"] = time.perf_counter() - t_first
  times = measure.time_calls(run, FLAGS.repeats)
  out["latency_s"] = measure.median(times)
  out["latency_calls_s"] = times
  out["load_average"] = measure.load_average()


def _torch_worker(config, size: int, mode: str) -> dict[str, Any]:
  """The same measurement for the PyTorch reference executor (eager, inference mode)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  from inputs import random_batch  # pylint: disable=g-import-not-at-top

  out: dict[str, Any] = {"size": size, "mode": mode, "framework": "torch"}
  torch_reference.set_threads(FLAGS.torch_threads or os.cpu_count() or 1)
  torch.manual_seed(config.seed)
  t0 = time.perf_counter()
  model = torch_reference.TorchExecutor(config).eval()
  model.ctx.want_freq = False
  out["init_s"] = time.perf_counter() - t0
  out["rss_after_init_bytes"] = measure.max_rss_bytes()
  multiple = model.multiple
  tile, overlap, rows, side = _call_geometry(out, config, size, mode, multiple)
  example = random_batch(config, batch_size=rows, size=side)
  tokens, mask = example.get("plan_tokens"), example.get("plan_mask")
  if tokens is None:  # the reference executor always takes plans; no plans = none valid
    tokens = np.zeros((rows, 1, int(config.plans.dim)), np.float32)
    mask = np.zeros((rows, 1), bool)

  def call(tiles: np.ndarray) -> np.ndarray:
    n = tiles.shape[0]
    x = torch.from_numpy(np.ascontiguousarray(tiles.astype(np.float32).transpose(0, 3, 1, 2)))
    with torch.inference_mode():
      restored, _ = model(x, torch.from_numpy(tokens[:1].repeat(n, 0)),
                          torch.from_numpy(mask[:1].repeat(n, 0)))
    return restored.clamp(-1.0, 1.0).numpy().transpose(0, 2, 3, 1)

  _time_restores(out, call, size, mode, tile, overlap, multiple, time.perf_counter())
  out["max_rss_bytes"] = measure.max_rss_bytes()
  return out


def _planning(config, sizes: list[int]) -> dict[str, Any]:
  """Per-image planning latency (rule-planner hints + plan encoder) at each size."""
  if not config.plans.enabled:
    return {"skipped": "config.plans.enabled is False"}
  if config.plans.planner.kind != "rule" or config.plans.encoder.kind != "text":
    return {"skipped": f"only the rule planner + text encoder are timed here (config has "
                       f"{config.plans.planner.kind} + {config.plans.encoder.kind})"}
  from fape_jax.planning import encoders, planners  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  planner = planners.build_planner(config.plans.planner)
  encoder = encoders.build_encoder(config.plans.encoder)
  out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "per_size": {}}
  for size in sizes:
    image = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    run = lambda: encoder.encode([planner.plan([image])[0].text])  # noqa: E731
    run()
    times = measure.time_calls(run, FLAGS.repeats)
    out["per_size"][str(size)] = {"latency_s": measure.median(times), "calls_s": times}
  return out


def config_summary(config) -> dict[str, Any]:
  """The config fields restore latency depends on (report.py flags the table when they change)."""
  m = config.model
  return {"variant": config.get("variant"), "unet": m.unet.to_dict(), "vae": m.vae is not None,
          "dtype": m.dtype, "plan_tokens": [config.plans.encoder.max_tokens, config.plans.dim],
          "lora": {"ranks": list(m.lora.ranks), "band_mode": m.lora.band_mode,
                   "top1": m.lora.top1},
          "crop": config.data.crop}


def tiling_for(config, multiple: int) -> tuple[int, int]:
  """(tile, overlap): the flags, or the restore CLI's defaults for this config."""
  tile = FLAGS.tile or -(-int(config.data.crop or 256) // multiple) * multiple
  overlap = tile // 4 if FLAGS.overlap < 0 else FLAGS.overlap
  return tile, overlap


def restore_jobs(sizes: list[int], *, whole_max: int, tile: int) -> list[tuple[int, str]]:
  """(size, mode) pairs: whole images up to `whole_max`, tiles for sizes above `tile`."""
  jobs = []
  for s in sizes:
    if s <= whole_max:
      jobs.append((s, "whole"))
    if s > tile:
      jobs.append((s, "tiled"))
  return jobs


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.worker:
    size, mode, framework = (FLAGS.worker.split(":") + ["jax"])[:3]
    worker = _torch_worker if framework == "torch" else _worker
    print(json.dumps(worker(config, int(size), mode)), flush=True)
    return
  machine = measure.machine_info()  # date and load at the start
  sizes = [int(s) for s in FLAGS.sizes]
  passthrough = [a for a in sys.argv[1:] if not a.startswith(("--worker", "--name"))]
  results = []
  # The tile only decides which sizes get a tiled run; the CLI default is at most the crop size.
  tile_bound = FLAGS.tile or int(config.data.crop or 256)
  frameworks = ["jax", "torch"] if FLAGS.torch else ["jax"]
  for size, mode in restore_jobs(sizes, whole_max=FLAGS.whole_max, tile=tile_bound):
    for framework in frameworks:
      measure.say(f"restore {size}^2 {mode}, {framework} (subprocess) ...")
      proc = subprocess.run([sys.executable, __file__, *passthrough,
                             f"--worker={size}:{mode}:{framework}"],
                            capture_output=True, text=True, check=False)
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
      if proc.returncode or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        results.append({"size": size, "mode": mode, "framework": framework,
                        "error": f"exit {proc.returncode}: {tail}"})
      else:
        results.append(json.loads(lines[-1]))
      r = results[-1]
      measure.say(f"  latency {r.get('latency_s')} s, first image {r.get('first_image_s')} s, "
                  f"max RSS {(r.get('max_rss_bytes') or 0) / 2 ** 20:.0f} MiB "
                  f"{r.get('skipped', '')}{r.get('error', '')}")
  measure.say("planning latency (rule planner + plan encoder) ...")
  planning = _planning(config, sizes)
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  result = {
      "benchmark": "restore",
      "command": measure.command_line(),
      "machine": {**machine, "jax": jax.__version__, "backend": dev.platform,
                  "device_kind": dev.device_kind},
      "config": config_summary(config),
      "config_digest": measure.config_digest(config_summary(config)),
      "weights": "random init (latency and memory depend on shapes only)",
      "tiling": {"tile": FLAGS.tile or "restore CLI default (training crop)",
                 "overlap": FLAGS.overlap if FLAGS.overlap >= 0 else "tile // 4",
                 "tile_batch": FLAGS.tile_batch},
      "executor": results,
      "planning": planning,
      "load_average_end": measure.load_average(),
  }
  measure.write_result(FLAGS.name, result)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", str(measure.REPO / "configs" / "base.py"),
                                  "Training config whose executor is measured.")
  flags.DEFINE_list("sizes", ["256", "512", "1024"], "Square image sides.")
  flags.DEFINE_integer("whole_max", 512, "Largest side restored in one call.")
  flags.DEFINE_integer("tile", 0, "Tile side for tiled restoration (0: the restore CLI's "
                       "default, the training crop rounded up to the size multiple).")
  flags.DEFINE_integer("overlap", -1, "Tile overlap in pixels (-1: tile // 4, as the CLI).")
  flags.DEFINE_integer("tile_batch", 4, "Tiles per executor call.")
  flags.DEFINE_integer("repeats", 5, "Timed images per (size, mode); the median is reported.")
  flags.DEFINE_float("max_temp_gb", 6.0, "Do not run whole-image calls planning more than this.")
  flags.DEFINE_bool("torch", True, "Also time the PyTorch reference executor "
                    "(bench/torch_reference.py) on every (size, mode).")
  flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads (0: one per core, as "
                       "XLA's CPU runtime).")
  flags.DEFINE_string("worker", "", "Internal: SIZE:MODE[:jax|torch], measure one job and print "
                      "JSON.")
  flags.DEFINE_string("name", "restore", "Result file name under bench/results/.")
  app.run(main)
