"""Training: the loop of `train_and_evaluate(config, workdir)`.

The `train` entry point is a thin shell over it; tests call it with the `tiny` config. What the
loop drives lives in its own modules: `model_state` (models, optimisers, sharded state,
checkpoint views, pretrained weights), `steps` (the pure jit-compiled train and eval steps),
`train_data` (pairs and plan stores, iterators), `validation` (per-task PSNR tables, samples)
and `dry_run` (the memory table). Here: the run directory, the resume order, the step loop with
its logging, checkpoints, validation cadence, wall-clock budget and preemption.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from fape_jax import checkpoint as ckpt_lib
from fape_jax import distributed
from fape_jax import model_state
from fape_jax import preflight
from fape_jax import run_dir
from fape_jax import run_log
from fape_jax import sharding as shard_lib
from fape_jax import steps
from fape_jax import train_data
from fape_jax import validation
from fape_jax.errors import FapeError
from fape_jax.models import lpips as lpips_lib


def check_base_weights(config) -> None:
  """Refuses adapting a frozen base that would be random weights (before anything is written)."""
  if not (config.train_base_unet or config.init_from or config.get("allow_random_base", False)):
    raise FapeError(
        f"Config {config.get('variant', '?')!r} trains adapters on a frozen base UNet"
        f"{' and VAE' if config.model.vae else ''}, but --config.init_from is empty, so that base "
        "would be random weights. Point it at a local diffusers folder holding unet/ (and vae/), "
        "e.g. --config.init_from=/models/sd-turbo (downloaded once with `huggingface-cli download "
        "stabilityai/sd-turbo --local-dir /models/sd-turbo`); for smoke tests on random weights "
        "pass --config.allow_random_base=True.")


def initial_state(config, mesh, ckpt: ckpt_lib.Checkpointer, data: train_data.TrainData,
                  abstract, shardings):
  """(state, start step, train stream): where a run starts, first match wins.

  1. this workdir's newest checkpoint (a resumed run; it also restores the data stream, on this
     process count or another: `Checkpointer.restore_stream`);
  2. `config.init_from`: a local diffusers folder (base UNet/VAE) or exported adapters;
  3. scratch: the config's seed.
  A resume restores straight into the `abstract` state's shapes and `shardings`: the seed's state
  is created (a compiled init program, tens of seconds on a CPU) only when something must come
  from it: a fresh run, or the frozen base weights that a run from `init_from` does not checkpoint
  (those are taken from `init_from` again).
  """
  where = f"on a {dict(mesh.shape)} mesh ({jax.device_count()} {jax.default_backend()} devices)"
  start, stream, restored = 0, None, None
  if ckpt.latest_step() is not None:
    distributed.say(f"Restoring the train state from {ckpt.directory} {where}...")
    start, restored, stream = ckpt.restore_stream(
        model_state.restore_target(abstract, shardings, config), data.train_iterator)
    logging.info("Resumed from %s at step %d (global example %d).", ckpt.directory, start,
                 stream.examples)
    if "frozen" in restored["gen"]:
      return restored, int(start), stream
  distributed.say(f"Creating the train state {where}...")
  state = model_state.init_state(config, shardings)
  # Exported adapters are where a run started; a resumed run has trained them further.
  if config.init_from and not (restored is not None and config.init_from.endswith(".safetensors")):
    state = model_state.init_from_pretrained(state, shardings, config)
  if restored is None:
    return state, 0, data.train_iterator()
  return model_state.merge_restored(state, restored), int(start), stream


PREEMPTED_EXIT = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as a killed process


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is safely written."""


def _host_scalars(metrics: list[dict]) -> dict:
  """Mean of a window of per-step device metrics, fetched to the host once."""
  fetched = jax.device_get(metrics)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _check_finite(step: int, scalars: dict, last_saved: int | None) -> None:
  bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
  if bad:
    kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None \
        else "no checkpoint had been written yet"
    raise FapeError(f"Non-finite training metrics at step {step}: {bad}; {kept} and nothing was "
                    "saved after it. Lower the learning rate or check the data, then restart "
                    "with the same --workdir to resume from that checkpoint.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), validates, returns the last table.

  The run directory is only ever appended to: a resume whose config changes more than step
  counts, cadences and budgets is refused before anything is written (`run_dir`), a second
  trainer is refused by the run lock, and `config.json` is replaced once the state is restored.
  """
  started = time.monotonic()  # the wall-clock budget counts from here (see `_train`)
  # Orbax wants absolute paths; cloud paths (gs://...) already are.
  workdir = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
  distributed.assert_same_across_processes("config", config.to_json_best_effort(sort_keys=True))
  # Before the first step, on every process: batches that fit this run's devices, and one workdir.
  dp = preflight.data_parallel_size(config)
  config = preflight.resolve_batches(config, dp)
  preflight.check_url(workdir, "--workdir")
  preflight.check_url(config.data.data_dir, "config.data.data_dir", stores=True)
  preflight.check_url(config.plans.store.get("path", ""), "config.plans.store.path", stores=True)
  check_base_weights(config)
  workdir.mkdir(parents=True, exist_ok=True)
  preflight.check_shared_dir(workdir, "--workdir")
  with run_dir.RunLock(workdir), contextlib.ExitStack() as cleanup:
    changes = run_dir.check_resume(workdir, config)
    preflight.check_batches(config, dp)
    return _train(config, workdir, changes, cleanup, started)


def _train(config, workdir: epath.Path, changes: dict, cleanup: contextlib.ExitStack,
           started: float) -> dict:
  """The job; whatever it opens is closed by `cleanup` (in reverse order), however it ends."""
  log = cleanup.enter_context(contextlib.closing(run_log.RunLog(workdir)))
  data = train_data.prepare_data(config)
  mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  batch_sharding = shard_lib.batch_sharding(mesh, config.data_axes)

  ckpt = cleanup.enter_context(contextlib.closing(ckpt_lib.Checkpointer(
      workdir / "checkpoints", save_every=config.ckpt_every, keep=config.keep_checkpoints)))
  abstract, models = model_state.abstract_state(config)
  shardings = model_state.state_shardings(abstract, mesh, config)
  lpips_model = lpips_lib.maybe_load_lpips(config.lpips.vgg16_path, config.lpips.lin_path)
  step_fn = steps.make_train_step(models, config, shardings, batch_sharding, lpips_model)
  eval_fn = steps.make_eval_step(models, shardings["gen"], batch_sharding)
  to_device = lambda b: shard_lib.global_batch(b, batch_sharding)
  # Creating the seed's state and compiling the train step are both mostly single-threaded XLA
  # compiling: the step compiles in a second thread, against the state's shapes, meanwhile (on the
  # 2-core VM the pair took 47 s + 82 s one after the other).
  compiling = None
  if (ckpt.latest_step() or 0) < config.total_steps:
    pool = concurrent.futures.ThreadPoolExecutor(1, "compile")
    # No waiting for the compile when the set-up below fails: its error is shown at once.
    cleanup.callback(pool.shutdown, wait=False)
    # Lowering reads only shapes and shardings: any batch of the stream will do.
    compiling = pool.submit(step_fn.compile, model_state.sharded_spec(abstract, shardings),
                            to_device(data.example_batch()))
  state, start, train_iter = initial_state(config, mesh, ckpt, data, abstract, shardings)
  run_dir.record_config(workdir, config, changes, start)  # restore/evaluate rebuild models from it
  last_saved = start if start else None
  if compiling is not None:
    compiling.result()
  # The wall-clock budget counts everything this invocation did before the final validation:
  # building missing stores, creating the state and compiling, so `make train` keeps its 10 minutes
  # on a fresh, slow machine (it then trains fewer steps; the same command resumes).
  deadline = started + 60 * config.max_wall_minutes if config.max_wall_minutes else None
  batch = None

  preempt = ckpt_lib.PreemptionFlag()
  cleanup.callback(preempt.restore_handlers)
  progress = cleanup.enter_context(contextlib.closing(
      distributed.progress(desc="train", unit="step", total=config.total_steps, initial=start)))
  window, t_window, table = [], time.perf_counter(), {}
  step, last_eval = start, None
  while step < config.total_steps:
    if batch is None:
      batch = to_device(next(train_iter))
    state, metrics = step_fn(state, batch)
    batch = None
    step += 1
    window.append(metrics)
    progress.update(1)
    on_log = step % config.log_every == 0 or step == config.total_steps
    on_save = step % config.ckpt_every == 0 or step == config.total_steps
    if on_log or on_save:
      scalars = _host_scalars(window)
      _check_finite(step, scalars, last_saved)
      if on_log:
        dt = time.perf_counter() - t_window
        scalars["images_per_s"] = len(window) * config.data.batch_size / max(dt, 1e-9)
        log.scalars(step, scalars)
        # Every process logs its own view of the (replicated) metrics: they must agree.
        logging.info("process %d step %d metrics %s", jax.process_index(), step,
                     json.dumps({k: scalars[k] for k in ("loss", "mse", "d_loss")}))
        progress.set_postfix(loss=f"{scalars['loss']:.4f}",
                             img_s=f"{scalars['images_per_s']:.1f}")
        window, t_window = [], time.perf_counter()
    if on_save:
      ckpt.save(step, model_state.checkpoint_view(state, config), train_iter, force=True)
      last_saved = step
    if step % config.eval_every == 0 or step == config.total_steps:
      table = validation.validate(state, eval_fn, data, config, batch_sharding, step,
                                  workdir, log)
      last_eval, t_window = step, time.perf_counter()
    out_of_time = (deadline is not None and time.monotonic() > deadline) or (
        config.get("stop_after", 0) and step - start >= config.stop_after)
    # Agreed across processes (each reads its own clock): one stopping alone would save and
    # exit while the others wait in their next collective.
    preempted, out_of_time = preempt.poll(bool(out_of_time))
    if preempted or out_of_time:
      if last_saved != step:
        scalars = _host_scalars(window) if window else {}
        _check_finite(step, scalars, last_saved)
        ckpt.save(step, model_state.checkpoint_view(state, config), train_iter, force=True)
        last_saved = step
      if out_of_time and not preempted:
        distributed.say(
            f"Stopping at step {step}: this invocation's budget is spent (max_wall_minutes="
            f"{config.max_wall_minutes}, stop_after={config.get('stop_after', 0)}); checkpoint "
            "saved, the same command resumes.")
        if last_eval != step:
          table = validation.validate(state, eval_fn, data, config, batch_sharding, step,
                                      workdir, log)
        break
      logging.warning("%s received: checkpoint for step %d saved in %s; restart with the same "
                      "--workdir to resume.", preempt.signal_name, step, ckpt.directory)
      raise Preempted(PREEMPTED_EXIT.get(preempt.signal_name or "SIGTERM", 143))
  return table
