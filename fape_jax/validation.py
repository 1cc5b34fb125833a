"""Validation during training: PSNR (Y channel) per task on the validation split, degraded vs
restored, written to `validation.json`, TensorBoard and stdout, plus sample grids. Every
process restores its own rows of each global batch; the PSNR sums are gathered to process 0.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
from etils import epath

from fape_jax import distributed
from fape_jax import metrics as metrics_lib
from fape_jax import run_log
from fape_jax import sharding as shard_lib
from fape_jax import tasks as tasks_lib


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _local_rows(x: jax.Array, mesh, data_axes) -> np.ndarray:
  """This process's rows of a batch-sharded global array (its own examples, in order)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  spec = shard_lib.P(tuple(a for a in data_axes if a in mesh.axis_names))
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def restore_batches(state, eval_fn, batches, batch_sharding, data_axes):
  """Runs the executor over evaluation batches; yields (host batch, restored, routing) per batch.

  Each process gets back its own examples' results (rows of the global arrays it fed).
  """
  mesh = batch_sharding.mesh
  for host in batches:
    restored, routing = eval_fn(state["gen"]["params"], state["gen"]["frozen"],
                                shard_lib.global_batch(host, batch_sharding))
    yield host, _local_rows(restored, mesh, data_axes), jax.tree.map(
        lambda r: _local_rows(r, mesh, data_axes), routing)


def validate(state, eval_fn, data, config, batch_sharding, step: int, workdir: epath.Path,
             log: run_log.RunLog) -> dict:
  """PSNR (Y channel) per task, degraded vs restored, on the validation split; sample grids."""
  ntask = len(tasks_lib.TASKS)
  sums = np.zeros((3, ntask), np.float64)  # degraded PSNR, restored PSNR, count
  samples: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
  local = config.data.eval_batch_size // jax.process_count()
  batches = data.eval_batches(local, config.num_eval_images)
  for host, restored, _ in restore_batches(state, eval_fn, batches, batch_sharding,
                                           config.data_axes):
    for i in np.flatnonzero(host["valid"]):
      t = int(host["task_id"][i])
      clean, degraded = _to_uint8(host["clean"][i]), _to_uint8(host["degraded"][i])
      out8 = _to_uint8(restored[i])
      sums[:, t] += (metrics_lib.psnr_y(degraded, clean), metrics_lib.psnr_y(out8, clean), 1)
      shots = samples.setdefault(tasks_lib.TASKS[t], [])
      if len(shots) < config.num_sample_images:
        shots.append((degraded, out8, clean))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Gathered as raw bytes: a float64 array would arrive as float32 (jax_enable_x64 is off), and
    # its numpy float32 values would then fail json.dumps on process 0 alone, leaving the other
    # processes waiting in their next collective.
    raw = np.asarray(multihost_utils.process_allgather(np.frombuffer(sums.tobytes(), np.uint8)))
    sums = np.stack([np.frombuffer(r.tobytes(), np.float64).reshape(sums.shape) for r in raw]
                    ).sum(0)
  table = {tasks_lib.TASKS[t]: {"degraded_psnr": float(sums[0, t] / sums[2, t]),
                                "restored_psnr": float(sums[1, t] / sums[2, t]),
                                "n": int(sums[2, t])}
           for t in range(ntask) if sums[2, t]}
  if distributed.is_main_process() and table:
    flat = {f"psnr/{t}": r["restored_psnr"] for t, r in table.items()}
    flat["psnr/mean_gain"] = float(np.mean([r["restored_psnr"] - r["degraded_psnr"]
                                            for r in table.values()]))
    log.scalars(step, flat, split="val")
    (workdir / "validation.json").write_text(json.dumps({"step": step, "tasks": table}, indent=2))
    _write_sample_grid(workdir / "samples" / f"step_{step:07d}.png", samples, log, step)
    # The table on stdout; one line in the log (absl echoes INFO to stderr: no second table).
    logging.info("Validation at step %d: %s", step, json.dumps(flat))
    print(f"\nValidation at step {step} (PSNR on Y, dB)\n{format_psnr_table(table)}", flush=True)
  return table


def format_psnr_table(table: dict) -> str:
  lines = [f"{'task':<30} {'n':>4} {'degraded':>9} {'restored':>9} {'gain':>7}"]
  for t, r in table.items():
    gain = r["restored_psnr"] - r["degraded_psnr"]
    lines.append(f"{t:<30} {r['n']:>4} {r['degraded_psnr']:>9.2f} {r['restored_psnr']:>9.2f} "
                 f"{gain:>+7.2f}")
  if table:
    mean = lambda k: float(np.mean([r[k] for r in table.values()]))
    lines.append(f"{'mean':<30} {sum(r['n'] for r in table.values()):>4} "
                 f"{mean('degraded_psnr'):>9.2f} {mean('restored_psnr'):>9.2f} "
                 f"{mean('restored_psnr') - mean('degraded_psnr'):>+7.2f}")
  return "\n".join(lines)


def _write_sample_grid(path: epath.Path, samples: dict, log: run_log.RunLog, step: int) -> None:
  """One row per sample: degraded | restored | clean, rows grouped by task."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows = [np.concatenate(triple, axis=1) for shots in samples.values() for triple in shots]
  if not rows:
    return
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
  grid = np.concatenate(rows, axis=0)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid).save(str(path))
  log.image(step, "samples", grid)

