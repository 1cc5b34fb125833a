"""Validation during training: PSNR (Y channel) per task on the validation split, degraded vs
restored, written to `validation.json`, TensorBoard and stdout, plus sample grids (each with a
JSON sidecar naming its rows' task, id and plan), and the mean routing weights per task and
adapted layer with their summary (`routing_summary`). Every process restores its own rows of each
global batch; the PSNR and routing sums are gathered to process 0.

validation.json:
  {"step": 1100,
   "tasks": {task: {"degraded_psnr", "restored_psnr", "n"}},
   "routing": {task: {layer path: [w_low, w_high]}},   # mean over the task's images; {} if dense
   "routing_summary": routing_summary(routing)}
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
from etils import epath

from fape_jax import distributed
from fape_jax import metrics as metrics_lib
from fape_jax import model_state
from fape_jax import run_log
from fape_jax import sharding as shard_lib
from fape_jax import tasks as tasks_lib
from fape_jax.models import lora_moe


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
    restored, routing = eval_fn(model_state.inference_params(state), state["gen"]["frozen"],
                                shard_lib.global_batch(host, batch_sharding))
    yield host, _local_rows(restored, mesh, data_axes), jax.tree.map(
        lambda r: _local_rows(r, mesh, data_axes), routing)


def validate(state, eval_fn, data, config, batch_sharding, step: int, workdir: epath.Path,
             log: run_log.RunLog) -> dict:
  """PSNR (Y channel) per task, degraded vs restored, on the validation split; sample grids;
  mean routing weights per task and adapted layer (validation.json only, not the returned table).
  """
  ntask = len(tasks_lib.TASKS)
  sums = np.zeros((3, ntask), np.float64)  # degraded PSNR, restored PSNR, count
  rsums = None  # (task, layer, expert) sums of routing weights, once the layers are known
  layers: list[str] = []
  samples: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
  local = config.data.eval_batch_size // jax.process_count()
  batches = data.eval_batches(local, config.num_eval_images)
  total = len(batches) if hasattr(batches, "__len__") else None
  bar = distributed.progress(restore_batches(state, eval_fn, batches, batch_sharding,
                                             config.data_axes),
                             desc="validation", unit="batch", total=total, leave=False)
  for host, restored, routed in bar:
    valid = np.flatnonzero(host["valid"])
    if rsums is None:
      layers = sorted(routed)  # the same on every process: the same model
      rsums = np.zeros((ntask, len(layers), 2), np.float64)
    tids = np.asarray(host["task_id"])[valid].astype(int)
    for j, name in enumerate(layers):
      np.add.at(rsums[:, j], tids, np.asarray(routed[name], np.float64)[valid])
    for i in valid:
      t = int(host["task_id"][i])
      clean, degraded = _to_uint8(host["clean"][i]), _to_uint8(host["degraded"][i])
      out8 = _to_uint8(restored[i])
      sums[:, t] += (metrics_lib.psnr_y(degraded, clean), metrics_lib.psnr_y(out8, clean), 1)
      shots = samples.setdefault(tasks_lib.TASKS[t], [])
      if len(shots) < config.num_sample_images:
        shots.append((degraded, out8, clean, str(host["id"][i])))
  if rsums is None:
    rsums = np.zeros((ntask, 0, 2), np.float64)
  sums, rsums = _sum_over_processes(sums, rsums)
  table = {tasks_lib.TASKS[t]: {"degraded_psnr": float(sums[0, t] / sums[2, t]),
                                "restored_psnr": float(sums[1, t] / sums[2, t]),
                                "n": int(sums[2, t])}
           for t in range(ntask) if sums[2, t]}
  # Every valid row routes through every layer: a task's routing count is its image count.
  routing = {tasks_lib.TASKS[t]: {name: [round(float(w), 6) for w in rsums[t, j] / sums[2, t]]
                                  for j, name in enumerate(layers)}
             for t in range(ntask) if sums[2, t] and layers}
  summary = routing_summary(routing, config.model.lora.get("context_patterns",
                                                           _CONTEXT_PATTERNS))
  if distributed.is_main_process() and table:
    flat = {f"psnr/{t}": r["restored_psnr"] for t, r in table.items()}
    flat["psnr/mean_gain"] = float(np.mean([r["restored_psnr"] - r["degraded_psnr"]
                                            for r in table.values()]))
    log.scalars(step, flat, split="val")
    (workdir / "validation.json").write_text(json.dumps(
        {"step": step, "tasks": table, "routing": routing, "routing_summary": summary}, indent=2))
    _write_sample_grid(workdir / "samples" / f"step_{step:07d}.png", samples, log, step,
                       data.plans)
    # The table on stdout; one line in the log (absl echoes INFO to stderr: no second table).
    logging.info("Validation at step %d: %s", step, json.dumps(flat))
    print(f"\nValidation at step {step} (PSNR on Y, dB)\n{format_psnr_table(table)}", flush=True)
    if routing:
      print(format_routing_summary(summary), flush=True)
  return table


def _sum_over_processes(*arrays: np.ndarray) -> list[np.ndarray]:
  """float64 arrays summed over all processes (every process gets the sums)."""
  if jax.process_count() == 1:
    return list(arrays)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # Gathered as raw bytes: a float64 array would arrive as float32 (jax_enable_x64 is off), and
  # its numpy float32 values would then fail json.dumps on process 0 alone, leaving the other
  # processes waiting in their next collective. One gather for all the arrays.
  flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
  raw = np.asarray(multihost_utils.process_allgather(np.frombuffer(flat.tobytes(), np.uint8)))
  total = np.stack([np.frombuffer(r.tobytes(), np.float64) for r in raw]).sum(0)
  out, at = [], 0
  for a in arrays:
    out.append(total[at:at + a.size].reshape(a.shape))
    at += a.size
  return out


_CONTEXT_PATTERNS = tuple(lora_moe.default_lora_config().context_patterns)


def is_spatial_layer(name: str, context_patterns=_CONTEXT_PATTERNS) -> bool:
  """Whether an adapted layer's input is image features (True) or the plan context (False).

  Context layers are those matching the lora config's `context_patterns`, by default the
  cross-attention key/value projections `...attn2.to_k` / `...attn2.to_v`: their input is the
  projected plan tokens, which have no spatial spectrum, so both experts see the same input and
  the router has no spectral prior (lora_moe.py). Every other adapted layer is spatial: self-
  attention `attn1.to_{q,k,v,out.0}`, the cross-attention query and output `attn2.to_q` /
  `attn2.to_out.0` (image tokens in and out), conv-LoRA `resnets.N.conv{1,2}`, and any
  `proj_in` / `proj_out` a config adds; their input is band-split on the image grid.
  """
  return not lora_moe.is_context_layer(name, context_patterns)


def routing_summary(routing: dict, context_patterns=_CONTEXT_PATTERNS) -> dict:
  """Summary of per-task mean routing {task: {layer: [w_low, w_high]}} (issue 14: no dead experts).

    layers                     number of adapted layers (over all tasks)
    single_expert_layers       layers where every task's dominant expert (the larger mean
                               weight) is the same one: the other expert never leads there. A
                               task whose two weights tie (|w_low - w_high| < 1e-6, e.g. soft
                               0.5/0.5) has no dominant expert, so such a layer does not count.
    single_expert_layer_names  those layers, sorted
    high_weight_high_band_tasks  mean w_high over the high-band tasks (tasks.FOCUS) and the
    high_weight_low_band_tasks   spatial layers (`is_spatial_layer`); low-band likewise. None
                                 when there is no such task or layer (mixes have no band).
    premise_holds              high-band mean > low-band mean (the method's premise that
                               high-frequency tasks route to the high-frequency expert); None
                               when either mean is None.
  Pure (no JAX): validation.json, the evaluate report and tests share it. Empty routing (the
  dense variant) gives 0 layers and None means.
  """
  layers = sorted({l for r in routing.values() for l in r})
  single = []
  for l in layers:
    ws = [r[l] for r in routing.values() if l in r]
    dominant = {None if abs(w[1] - w[0]) < 1e-6 else int(w[1] > w[0]) for w in ws}
    if len(dominant) == 1 and None not in dominant:
      single.append(l)

  def band_mean(band):
    ws = [w[1] for t, r in routing.items() if tasks_lib.FOCUS.get(t) == band
          for l, w in r.items() if is_spatial_layer(l, context_patterns)]
    return round(float(np.mean(ws)), 6) if ws else None

  high, low = band_mean("high"), band_mean("low")
  return {"layers": len(layers), "single_expert_layers": len(single),
          "single_expert_layer_names": single,
          "high_weight_high_band_tasks": high, "high_weight_low_band_tasks": low,
          "premise_holds": None if high is None or low is None else bool(high > low)}


def format_routing_summary(summary: dict) -> str:
  """One line: 'Routing: 24 adapted layers, 3 with the same dominant expert for every task; ...'."""
  f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
  premise = {True: "premise holds", False: "premise fails", None: "premise untested"}
  return (f"Routing: {summary['layers']} adapted layers, {summary['single_expert_layers']} with "
          "the same dominant expert for every task; mean weight on the high expert (spatial "
          f"layers): high-band tasks {f(summary['high_weight_high_band_tasks'])}, low-band tasks "
          f"{f(summary['high_weight_low_band_tasks'])} "
          f"({premise[summary['premise_holds']]})")


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


def _write_sample_grid(path: epath.Path, samples: dict, log: run_log.RunLog, step: int,
                       plans=None) -> None:
  """One row per sample: degraded | restored | clean, rows grouped by task; beside it (same name,
  .json) each row's task, id, plan text and image size, so that `fape_jax.report` can cut the
  grid back into labelled images."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  shots = [(task, shot) for task, ss in samples.items() for shot in ss]
  rows = [np.concatenate(shot[:3], axis=1) for _, shot in shots]
  if not rows:
    return
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
  grid = np.concatenate(rows, axis=0)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:  # through epath: a gs:// workdir too (PIL opens local paths only)
    Image.fromarray(grid).save(f, format="PNG")
  plan = lambda i: plans.record(i)["text"] if plans is not None and i in plans else None
  path.with_suffix(".json").write_text(json.dumps(
      {"step": step, "columns": ["degraded", "restored", "clean"],
       "rows": [{"task": task, "id": shot[3], "plan": plan(shot[3]),
                 "height": int(shot[0].shape[0]), "width": int(shot[0].shape[1])}
                for task, shot in shots]}, indent=2))
  log.image(step, "samples", grid)
