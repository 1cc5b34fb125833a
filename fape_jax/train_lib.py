"""Training: sharded state creation, the one jit-compiled train step, checkpoints, logs, validation.

`train_and_evaluate(config, workdir)` is the whole job (the `train` entry point is a thin shell
over it; tests call it with the `tiny` config). The train step is pure:
`train_step(state, batch) -> (state, metrics)`, compiled once with explicit in/out shardings and
the state donated. The state is a plain pytree:

  step, rng                  int32 scalar, uint32[2] (the step is folded into the RNG)
  gen.params                 trainable generator variables (adapters/routers/projector, plus the
                             UNet itself when `train_base_unet`)
  gen.frozen                 everything else of the generator: frozen base weights (never
                             differentiated, so never all-reduced, and not in the optimiser)
  gen.opt                    Prodigy state over gen.params only
  disc.params / disc.rest    discriminator heads (+ trainable backbone) / spectral-norm power
                             iteration vectors and a frozen pretrained backbone
  disc.opt                   AdamW state
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from etils import epath

from fape_jax import checkpoint as ckpt_lib
from fape_jax import distributed
from fape_jax import losses
from fape_jax import metrics as metrics_lib
from fape_jax import run_log
from fape_jax import sharding as shard_lib
from fape_jax import tasks as tasks_lib
from fape_jax.data import pairs
from fape_jax.data import pipeline
from fape_jax.errors import FapeError
from fape_jax.models import discriminator as disc_lib
from fape_jax.models import executor as executor_lib
from fape_jax.models import lora_moe
from fape_jax.models import lpips as lpips_lib


# ----------------------------------------------------------------------------------------------
# Models and optimisers
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Models:
  """Static halves (graph definitions) of the models; the arrays live in the train state."""
  gen_def: Any
  disc_def: Any
  gen_trainable: Any   # nnx filter
  disc_trainable: Any  # nnx filter


def gen_trainable_filter(config):
  """Adapters, routers and projector always train; the base UNet only when trained from scratch."""
  if config.train_base_unet:
    return nnx.Any(lora_moe.AdapterParam, nnx.All(nnx.Param, nnx.PathContains("unet")))
  return lora_moe.AdapterParam


def build_generator(config, rngs: nnx.Rngs):
  model = config.model.to_dict()
  model["plan_dim"] = config.plans.dim if config.plans.enabled else None
  gen = executor_lib.build_executor(model, rngs=rngs)
  if config.model.residual and config.train_base_unet:
    # A from-scratch residual executor starts at the identity: zero the UNet's last conv, so step
    # 0 already returns the degraded input (as zero-initialised output layers do in ControlNet).
    conv = gen.unet.conv_out
    conv = getattr(conv, "base", conv)  # conv-LoRA may wrap it
    conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
    conv.bias[...] = jnp.zeros_like(conv.bias[...])
  return gen


def build_discriminator(config, rngs: nnx.Rngs):
  return disc_lib.Discriminator(config.disc, rngs=rngs)


def _schedule(cfg, total_steps: int):
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0 if cfg.warmup_steps else cfg.lr, cfg.lr, max(cfg.warmup_steps, 0),
        max(total_steps, cfg.warmup_steps + 1))
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.lr)
  raise FapeError(f"config.optim.*.schedule={cfg.schedule!r}: use 'cosine' or 'constant'.")


def make_optimizer(cfg, clip_norm: float, total_steps: int) -> optax.GradientTransformation:
  sched = _schedule(cfg, total_steps)
  if cfg.name == "prodigy":
    opt = optax.contrib.prodigy(sched, betas=(cfg.b1, cfg.b2), weight_decay=cfg.weight_decay)
  elif cfg.name == "adamw":
    opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  else:
    raise FapeError(f"config.optim.*.name={cfg.name!r}: use 'prodigy' or 'adamw'.")
  return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm else opt


# ----------------------------------------------------------------------------------------------
# State creation (shapes first, then sharded creation)
# ----------------------------------------------------------------------------------------------

class _TracedInitRngStream(nnx.RngStream):
  """`nnx.RngStream` whose counter update stays cheap inside a trace; the same keys.

  flax 0.12's `RngStream.__call__` bumps its counter with `count[...] += 1`; an indexed write
  compares the new value's `.sharding` with the old one, and on a jit/eval_shape tracer that
  attribute raises an error whose message scans every equation traced so far. One key per
  parameter makes building a model under a trace quadratic: 70+ s for the SD-2.1-scale executor's
  abstract state. Replacing the whole value (no index) skips that comparison.
  """

  def __call__(self) -> jax.Array:
    check = getattr(self.count, "_check_can_update", None)  # flax's own __call__ does this
    if check is not None:
      check()
    key = jax.random.fold_in(self.key.get_value(), self.count.get_value())
    self.count.set_value(self.count.get_value() + 1)
    return key


def _init_rngs(config) -> nnx.Rngs:
  # The init RNG implementation matters on CPU: "rbg" compiles the init program several times
  # faster than threefry (tens of seconds saved per run); numbers differ, quality does not.
  key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
  rngs = nnx.Rngs(key)
  try:
    rngs.default = _TracedInitRngStream(key, tag="default")
  except TypeError:  # a flax whose RngStream takes other arguments: correct, only slower
    logging.warning("This flax's nnx.RngStream(key, tag=) differs: model init under jit uses the "
                    "stock stream (same result, slower to trace).")
  return rngs


def _init_state(config, models_out: list | None = None):
  """Builds models and optimiser states from the seed; pure, so it can run under jit/eval_shape."""
  rngs = _init_rngs(config)
  gen = build_generator(config, rngs)
  disc = build_discriminator(config, rngs)
  gen_filter = gen_trainable_filter(config)
  disc_filter = disc_lib.TRAINABLE
  gen_def, gparams, gfrozen = nnx.split(gen, gen_filter, ...)
  disc_def, dparams, drest = nnx.split(disc, disc_filter, ...)
  g_tx = make_optimizer(config.optim.g, config.optim.clip_norm, config.total_steps)
  d_tx = make_optimizer(config.optim.d, config.optim.clip_norm, config.total_steps)
  if models_out is not None:
    models_out.append(Models(gen_def, disc_def, gen_filter, disc_filter))
  return {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.PRNGKey(config.seed + 1),
      "gen": {"params": gparams, "frozen": gfrozen, "opt": g_tx.init(gparams)},
      "disc": {"params": dparams, "rest": drest, "opt": d_tx.init(dparams)},
  }


def abstract_state(config):
  """(abstract state, Models) without allocating anything."""
  models = []
  abstract = jax.eval_shape(functools.partial(_init_state, config, models))
  return abstract, models[0]


def state_shardings(abstract, mesh, config):
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  is_adapter = lambda v: isinstance(v, lora_moe.AdapterParam)
  out = {"step": shard_lib.NamedSharding(mesh, shard_lib.P()),
         "rng": shard_lib.NamedSharding(mesh, shard_lib.P())}
  for part in ("gen", "disc"):
    pkey, okey = "params", "opt"
    rest_key = "frozen" if part == "gen" else "rest"
    params_sh = shard_lib.state_shardings(abstract[part][pkey], mesh, rules, is_adapter)
    out[part] = {
        pkey: params_sh,
        rest_key: shard_lib.state_shardings(abstract[part][rest_key], mesh, rules, is_adapter),
        okey: shard_lib.tree_shardings_like(abstract[part][okey], abstract[part][pkey],
                                            params_sh, mesh),
    }
  return out


def create_state(config, mesh):
  """The train state, created directly with its shardings (no host copy of the full model)."""
  abstract, models = abstract_state(config)
  shardings = state_shardings(abstract, mesh, config)
  state = jax.jit(functools.partial(_init_state, config), out_shardings=shardings)()
  return state, shardings, models


# ----------------------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------------------

def _generator_forward(models: Models, gen_params, gen_frozen, batch):
  gen = nnx.merge(models.gen_def, gen_params, gen_frozen, copy=True)
  return gen(batch["degraded"], batch.get("plan_tokens"), batch.get("plan_mask"))


def _disc_logits(models: Models, dparams, drest, images, update_stats: bool):
  """D(images); with `update_stats`, also the advanced spectral-norm power-iteration state."""
  # copy=True: fresh Variables at this trace level, so the BatchStat write-back is legal under
  # jit + grad (see discriminator.py).
  disc = nnx.merge(models.disc_def, dparams, drest, copy=True)
  logits = disc(images, update_stats=update_stats)
  return logits, nnx.state(disc, nnx.Not(models.disc_trainable))


def _generator_terms(models: Models, gparams, gfrozen, disc, batch, config):
  """(restored, {mse, adv, freq}): the generator loss terms that need no extra weights (LPIPS
  does); the train step and the dry run's memory estimate differentiate the same ones."""
  restored, aux = _generator_forward(models, gparams, gfrozen, batch)
  mse = jnp.mean(jnp.square(restored.astype(jnp.float32) - batch["clean"]))
  fake_logits, _ = _disc_logits(models, disc["params"], disc["rest"], restored,
                                update_stats=False)
  adv = disc_lib.generator_adversarial_loss(fake_logits, config.disc.real_target)
  return restored, {"mse": mse, "adv": adv, "freq": losses.frequency_loss(aux["freq_terms"])}


def train_step(state, batch, lpips_state, *, models: Models, config, g_tx, d_tx, lpips_def):
  """One generator update and (every `d_every` steps) one discriminator update.

  `lpips_state` (frozen LPIPS weights, or None when LPIPS is off) is an argument rather than a
  closure so its arrays are not baked into the compiled program as constants.
  """
  lw = config.loss
  step = state["step"]
  adv_on = (step >= config.optim.d_warmup_steps).astype(jnp.float32)

  def g_loss_fn(gparams):
    restored, terms = _generator_terms(models, gparams, state["gen"]["frozen"], state["disc"],
                                       batch, config)
    mse, adv, freq = terms["mse"], terms["adv"], terms["freq"]
    lp = (jnp.mean(nnx.merge(lpips_def, lpips_state)(restored, batch["clean"]))
          if lpips_def is not None else jnp.zeros(()))
    total = (lw.w_mse * mse + lw.w_lpips * lp + adv_on * lw.w_adv * adv + lw.w_freq * freq)
    return total, ({"loss": total, "mse": mse, "lpips": lp, "adv": adv, "freq": freq},
                   restored)

  (_, (g_metrics, restored)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      state["gen"]["params"])
  g_updates, g_opt = g_tx.update(g_grads, state["gen"]["opt"], state["gen"]["params"])
  gparams = optax.apply_updates(state["gen"]["params"], g_updates)

  fake = jax.lax.stop_gradient(restored)

  def d_update(dstate):
    def d_loss_fn(dparams):
      # Real and fake in one call: one power-iteration update per step.
      logits, rest = _disc_logits(models, dparams, dstate["rest"],
                                  jnp.concatenate([batch["clean"], fake]), True)
      real_logits, fake_logits = jnp.split(logits, 2)
      loss = disc_lib.discriminator_loss(real_logits, fake_logits, config.disc.real_target)
      return loss, (rest, jnp.mean(real_logits), jnp.mean(fake_logits))
    (dloss, (rest, real_m, fake_m)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        dstate["params"])
    updates, dopt = d_tx.update(d_grads, dstate["opt"], dstate["params"])
    new = {"params": optax.apply_updates(dstate["params"], updates), "rest": rest, "opt": dopt}
    return new, {"d_loss": dloss, "d_real": real_m, "d_fake": fake_m}

  def d_skip(dstate):
    zero = jnp.zeros((), jnp.float32)
    return dstate, {"d_loss": zero, "d_real": zero, "d_fake": zero}

  disc_state, d_metrics = jax.lax.cond(step % config.optim.d_every == 0, d_update, d_skip,
                                       state["disc"])
  new_state = {
      "step": step + 1,
      "rng": state["rng"],
      "gen": {"params": gparams, "frozen": state["gen"]["frozen"], "opt": g_opt},
      "disc": disc_state,
  }
  metrics = {**g_metrics, **d_metrics, "g_grad_norm": optax.tree.norm(g_grads)}
  if "index" in batch:
    # Fingerprint of the data order (sum of the global batch's stream positions): a resumed or
    # differently-sharded run must reproduce it exactly.
    metrics["data_index_sum"] = jnp.sum(batch["index"]).astype(jnp.float32)
  return new_state, metrics


def _limit_traces(fn, max_traces: int):
  """`fn` that raises when traced more than `max_traces` times (i.e. when jit would recompile).

  chex.assert_max_traces counts per function *code*, shared by every step built in a process
  (tests build several); this counts per step object.
  """
  traces = 0

  @functools.wraps(fn)
  def counted(*args, **kwargs):
    nonlocal traces
    traces += 1
    if traces > max_traces:
      raise AssertionError(f"the train step was traced {traces} times (max {max_traces}): an input "
                           "shape, dtype or sharding changed between steps.")
    return fn(*args, **kwargs)
  return counted


def make_train_step(models: Models, config, shardings, batch_sharding, lpips_model=None,
                    max_traces: int = 1):
  """The compiled step `(state, batch) -> (state, metrics)`, state donated.

  The step may be traced `max_traces` times at most (chex raises on the next trace), so an
  accidental recompilation (a shape or dtype drifting between steps) fails loudly instead of
  silently costing a compile per step.
  """
  g_tx = make_optimizer(config.optim.g, config.optim.clip_norm, config.total_steps)
  d_tx = make_optimizer(config.optim.d, config.optim.clip_norm, config.total_steps)
  replicated = shard_lib.NamedSharding(batch_sharding.mesh, shard_lib.P())
  lpips_def, lpips_state = nnx.split(lpips_model) if lpips_model is not None else (None, None)
  lpips_state = jax.device_put(lpips_state, replicated) if lpips_state is not None else None
  step_fn = functools.partial(train_step, models=models, config=config, g_tx=g_tx, d_tx=d_tx,
                              lpips_def=lpips_def)
  step_fn = _limit_traces(step_fn, max_traces)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)

  def step(state, batch):
    return jitted(state, batch, lpips_state)

  step.jitted = jitted  # exposed for compile-cache checks and cost analysis
  step.lpips_state = lpips_state
  return step


def make_eval_step(models: Models, gen_shardings, batch_sharding):
  """Restores a batch; returns the restored images and the per-layer routing weights."""
  def eval_step(gen_params, gen_frozen, batch):
    restored, aux = _generator_forward(models, gen_params, gen_frozen, batch)
    return jnp.clip(restored, -1.0, 1.0), aux["routing"]
  return jax.jit(eval_step, in_shardings=(gen_shardings["params"], gen_shardings["frozen"],
                                          batch_sharding))


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------

PREEMPTED_EXIT = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as a killed process


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is safely written."""


def _as_abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def checkpoint_view(state, config):
  """What goes into a checkpoint: frozen base weights loaded from `init_from` are not re-saved."""
  if config.init_from and not config.train_base_unet:
    return {k: v for k, v in state.items() if k != "gen"} | {
        "gen": {k: v for k, v in state["gen"].items() if k != "frozen"}}
  return state


def _merge_restored(state, restored):
  if "frozen" not in restored["gen"]:
    restored["gen"]["frozen"] = state["gen"]["frozen"]
  return restored


def _write_config(workdir: epath.Path, config) -> None:
  """Keeps the config beside the checkpoints (restore/evaluate rebuild the model from it)."""
  if jax.process_index() != 0:
    return
  path = workdir / "config.json"
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists() and path.read_text() != text:
    old = json.loads(path.read_text())
    new = json.loads(text)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    logging.warning("The config differs from the one this workdir was started with (top-level "
                    "keys %s); the run resumes with the new one. Model shape changes will fail "
                    "to restore: use a new --workdir for those.", changed)
    path.rename(workdir / f"config.{int(time.time())}.json")
  path.write_text(text)


def _to_global(batch: dict, batch_sharding) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in batch.items() if k in _DEVICE_KEYS}


_DEVICE_KEYS = ("degraded", "clean", "plan_tokens", "plan_mask", "task_id", "index")


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
  """Trains (resuming from `workdir` if it holds checkpoints), validates, returns the last table."""
  # Orbax wants absolute paths; cloud paths (gs://...) already are.
  workdir = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  distributed.assert_same_across_processes("config", config.to_json_best_effort(sort_keys=True))
  _write_config(workdir, config)
  log = run_log.RunLog(workdir)

  data = prepare_data(config)
  mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  batch_sharding = shard_lib.batch_sharding(mesh, config.data_axes)
  dp = shard_lib.data_parallel_size(mesh, config.data_axes)
  if config.data.batch_size % dp:
    raise FapeError(f"config.data.batch_size={config.data.batch_size} must be a multiple of the "
                    f"data-parallel size {dp} (mesh {dict(mesh.shape)}).")

  state, shardings, models = create_state(config, mesh)
  state = init_from_pretrained(state, shardings, config)
  lpips_model = lpips_lib.maybe_load_lpips(config.lpips.vgg16_path, config.lpips.lin_path)
  step_fn = make_train_step(models, config, shardings, batch_sharding, lpips_model)
  eval_fn = make_eval_step(models, shardings["gen"], batch_sharding)

  train_iter = data.train_iterator()
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=config.ckpt_every,
                               keep=config.keep_checkpoints)
  view = checkpoint_view(state, config)
  abstract = _as_abstract(view, checkpoint_view(shardings, config))
  start, restored = ckpt.restore(abstract, train_iter)
  if restored is not None:
    state = _merge_restored(state, restored)
    logging.info("Resumed from %s at step %d.", ckpt.directory, start)
  start = int(start or 0)
  last_saved = start if restored is not None else None

  preempt = ckpt_lib.PreemptionFlag()
  progress = _progress(start, config.total_steps)
  window, t_window, table = [], time.perf_counter(), {}
  deadline = time.monotonic() + 60 * config.max_wall_minutes if config.max_wall_minutes else None
  step, last_eval = start, None
  try:
    while step < config.total_steps:
      batch = _to_global(next(train_iter), batch_sharding)
      state, metrics = step_fn(state, batch)
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
        ckpt.save(step, checkpoint_view(state, config), train_iter, force=True)
        last_saved = step
      if step % config.eval_every == 0 or step == config.total_steps:
        table = validate(state, eval_fn, data, config, batch_sharding, step, workdir, log)
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
          ckpt.save(step, checkpoint_view(state, config), train_iter, force=True)
          last_saved = step
        if out_of_time and not preempted:
          _say(f"Stopping at step {step}: this invocation's budget is spent (max_wall_minutes="
               f"{config.max_wall_minutes}, stop_after={config.get('stop_after', 0)}); checkpoint "
               "saved, the same command resumes.")
          if last_eval != step:
            table = validate(state, eval_fn, data, config, batch_sharding, step, workdir, log)
          break
        logging.warning("%s received: checkpoint for step %d saved in %s; restart with the same "
                        "--workdir to resume.", preempt.signal_name, step, ckpt.directory)
        raise Preempted(PREEMPTED_EXIT.get(preempt.signal_name or "SIGTERM", 143))
  finally:
    progress.close()
    preempt.restore_handlers()
    ckpt.close()
    log.close()
  return table


def _progress(start: int, total: int):
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

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
                                _to_global(host, batch_sharding))
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
  if jax.process_index() == 0 and table:
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


def _task_order(name: str) -> tuple:
  return (tasks_lib.TASK_ID.get(name, len(tasks_lib.TASKS)), name)


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


# ----------------------------------------------------------------------------------------------
# Dry run: shapes, shardings and per-device memory without allocating anything
# ----------------------------------------------------------------------------------------------

def _abstract_mesh(config):
  """The config's mesh over `config.mesh.dry_run_devices` devices (no real devices needed)."""
  shape = list(config.mesh.shape)
  n = int(config.mesh.get("dry_run_devices", 0) or jax.device_count())
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if n % known:
      raise FapeError(f"dry run: {n} devices do not divide by the mesh's fixed axes {shape}.")
    shape[shape.index(-1)] = n // known
  return jax.sharding.AbstractMesh(tuple(shape), tuple(config.mesh.axes))


def _per_device_bytes(abstract_tree, shardings_tree, mesh) -> int:
  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings_tree)):
    n = math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
    for axes in s.spec:
      if axes is None:
        continue
      for ax in (axes,) if isinstance(axes, str) else axes:
        n //= mesh.shape[ax]
    total += n
  return total


def _with_remat(models: Models, abstract, remat: bool) -> Models:
  """`models` with the UNet's and VAE's static `remat` switch set, from the same abstract state.

  `remat` is a static attribute of the graph, not an array: toggling it on a merged abstract
  module and splitting again gives the other graph without building (tracing) the model again.
  """
  gen = nnx.merge(models.gen_def, abstract["gen"]["params"], abstract["gen"]["frozen"])
  for part in (gen.unet, gen.vae):
    if part is not None:
      part.remat = remat
  gen_def, _, _ = nnx.split(gen, models.gen_trainable, ...)
  return dataclasses.replace(models, gen_def=gen_def)


def _batch_spec(config, b) -> dict:
  size = config.data.crop
  batch = {"degraded": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
           "clean": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)}
  if config.plans.enabled:
    k = config.plans.encoder.max_tokens
    batch["plan_tokens"] = jax.ShapeDtypeStruct((b, k, config.plans.dim), jnp.float32)
    batch["plan_mask"] = jax.ShapeDtypeStruct((b, k), jnp.bool_)
  return batch


def _bytes_per_example(residuals_at) -> int:
  """Bytes of the residuals that grow with the batch, per example.

  `residuals_at(b)` is eval_shape of a `jax.vjp` closure for batch size `b`: that closure is a
  pytree whose leaves are exactly the values the backward pass keeps, so nothing is compiled or
  allocated. It is traced once with a symbolic batch size b: each residual's size is then a
  polynomial in b, and the coefficient of b is what one example adds. The leaves whose size does
  not depend on b are batch-independent (the weights the backward reads, and with bf16 compute
  their bf16 casts): the weights are the parameter rows of the table, their casts are not counted
  (see `dry_run`). Should the model not trace with a symbolic batch, it is traced at b = 1 and
  b = 2 and the difference taken (twice the tracing time, same number).
  """
  size = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  arrays = lambda tree: [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
  try:
    b, = jax.export.symbolic_shape("b")
    total = 0
    for x in arrays(residuals_at(b)):
      n = size(x)
      if isinstance(n, int):
        continue  # batch-independent
      per = n // b
      if not isinstance(per, int) or n != per * b:
        raise ValueError(f"a residual of shape {x.shape} is not proportional to the batch")
      total += per
    return total
  except Exception as e:  # noqa: BLE001 (any symbolic-shape failure: measure concretely)
    logging.info("dry run: symbolic-batch trace failed (%s: %s); tracing at batch 1 and 2.",
                 type(e).__name__, str(e)[:200])
  one, two = (sum(size(x) for x in arrays(residuals_at(b))) for b in (1, 2))
  return max(0, two - one)


def _residual_bytes(config, abstract, models: Models, per_device_batch: int, remat: bool) -> int:
  """Bytes the generator update's backward pass keeps alive for one device's micro-batch.

  What is counted: the residuals of the generator loss as the train step differentiates it
  (executor forward, MSE, the discriminator's forward on the restored images for the adversarial
  term, the frequency regulariser) that grow with the batch, i.e. the saved activations, times
  the per-device batch. LPIPS is not (its VGG16 needs weights; see `dry_run`).
  """
  models = _with_remat(models, abstract, remat)
  lw = config.loss

  def residuals(gparams, gfrozen, disc, batch):
    def loss(p):
      _, t = _generator_terms(models, p, gfrozen, disc, batch, config)
      return lw.w_mse * t["mse"] + lw.w_adv * t["adv"] + lw.w_freq * t["freq"]
    return jax.vjp(loss, gparams)[1]

  g = abstract["gen"]
  per_example = _bytes_per_example(lambda b: jax.eval_shape(
      residuals, g["params"], g["frozen"], abstract["disc"], _batch_spec(config, b)))
  return per_example * per_device_batch


def _disc_residual_bytes(config, abstract, models: Models, per_device_batch: int) -> int:
  """The same for the discriminator update: D on the real and restored images (2 per example)."""
  size = config.data.crop

  def residuals(dparams, drest, images):
    def loss(p):
      logits, _ = _disc_logits(models, p, drest, images, update_stats=True)
      real, fake = jnp.split(logits, 2)
      return disc_lib.discriminator_loss(real, fake, config.disc.real_target)
    return jax.vjp(loss, dparams)[1]

  d = abstract["disc"]
  per_example = _bytes_per_example(lambda b: jax.eval_shape(
      residuals, d["params"], d["rest"],
      jax.ShapeDtypeStruct((2 * b, size, size, 3), jnp.float32)))
  return per_example * per_device_batch


def dry_run(config) -> str:
  """Memory/sharding table for the config's mesh; builds everything abstractly.

  Per device: parameters and optimiser states by their shardings on the config's mesh, and the
  activations the backward passes keep (`_residual_bytes`, remat off and on, and the
  discriminator update's). The estimated peak is their sum (the larger of the two updates'
  activations: they run one after the other). Not counted: XLA's temporaries and fusion buffers,
  gradients (the size of the trainable parameters), all-gathered weight shards in flight, the
  casts of the weights to the compute dtype kept for the backward (bf16: up to half the frozen
  weights' bytes, sharded or not as XLA schedules them), and LPIPS when configured.
  The model is built (traced) once: the remat variants share its abstract state.
  """
  mesh = _abstract_mesh(config)
  abstract, models = abstract_state(config)
  sh = state_shardings(abstract, mesh, config)
  dp = math.prod(mesh.shape[a] for a in config.data_axes if a in mesh.axis_names)
  if config.data.batch_size % dp:
    raise FapeError(f"config.data.batch_size={config.data.batch_size} must be a multiple of the "
                    f"data-parallel size {dp}.")
  per_dev_batch = config.data.batch_size // dp
  count = lambda t: sum(math.prod(a.shape) for a in jax.tree.leaves(t))
  rows = [
      ("generator trainable params", count(abstract["gen"]["params"]),
       _per_device_bytes(abstract["gen"]["params"], sh["gen"]["params"], mesh)),
      ("generator frozen params", count(abstract["gen"]["frozen"]),
       _per_device_bytes(abstract["gen"]["frozen"], sh["gen"]["frozen"], mesh)),
      ("generator optimiser state", count(abstract["gen"]["opt"]),
       _per_device_bytes(abstract["gen"]["opt"], sh["gen"]["opt"], mesh)),
      ("discriminator params + state", count(abstract["disc"]["params"]) +
       count(abstract["disc"]["rest"]),
       _per_device_bytes(abstract["disc"]["params"], sh["disc"]["params"], mesh) +
       _per_device_bytes(abstract["disc"]["rest"], sh["disc"]["rest"], mesh)),
      ("discriminator optimiser state", count(abstract["disc"]["opt"]),
       _per_device_bytes(abstract["disc"]["opt"], sh["disc"]["opt"], mesh)),
  ]
  static = sum(r[2] for r in rows)
  act = {r: _residual_bytes(config, abstract, models, per_dev_batch, r) for r in (False, True)}
  d_act = _disc_residual_bytes(config, abstract, models, per_dev_batch)
  gib = lambda b: b / 2**30
  lines = [f"dry run: config {config.get('variant', '?')}, mesh "
           f"{dict(zip(mesh.axis_names, mesh.axis_sizes))} ({math.prod(mesh.axis_sizes)} devices), "
           f"global batch {config.data.batch_size} ({per_dev_batch}/device), "
           f"{config.data.crop}x{config.data.crop} px, compute {config.model.dtype}",
           f"{'item':<34} {'elements':>15} {'GiB/device':>11}"]
  lines += [f"{name:<34} {n:>15,} {gib(b):>11.3f}" for name, n, b in rows]
  lines.append(f"{'params + optimiser (total)':<34} {'':>15} {gib(static):>11.3f}")
  lines.append(f"{'activations, discriminator update':<34} {'':>15} {gib(d_act):>11.3f}")
  for r in (False, True):
    lines.append(f"{'activations, remat ' + ('on' if r else 'off'):<34} {'':>15} "
                 f"{gib(act[r]):>11.3f}")
    lines.append(f"{'  => estimated peak, remat ' + ('on' if r else 'off'):<34} {'':>15} "
                 f"{gib(static + max(act[r], d_act)):>11.3f}")
  lines.append("activations: what the backward passes keep for the per-device batch; not counted: "
               "XLA temporaries, gradients, gathered weight shards, weight casts to the compute "
               "dtype" + (", LPIPS" if config.lpips.vgg16_path else "") + ".")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Data: the pairs store, the plan store and their pipelines
# ----------------------------------------------------------------------------------------------

def _say(msg: str) -> None:
  """Progress a user should see (stdout, process 0), also logged."""
  logging.info("%s", msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def plan_cache_config(config) -> ml_collections.ConfigDict:
  """The plan-cache job's config (configs/plan_cache.py layout) for this training config."""
  d = config.data
  return ml_collections.ConfigDict(dict(
      pairs=dict(data_dir=d.data_dir, name=d.name, splits=("train", "validation"),
                 variants_per_image=d.variants_per_image, train_max_side=d.train_max_side,
                 val_size=d.val_size, val_variants=d.val_variants, seed=config.seed),
      planner=config.plans.planner.to_dict(), encoder=config.plans.encoder.to_dict(),
      store=dict(path=config.plans.store_path, records_per_file=1024),
      batch_size=32, limit=0, progress=jax.process_index() == 0))


def open_plans(config, sources: dict) -> Any:
  """Opens (building it first, when allowed and missing) the plan store for `sources`."""
  from fape_jax.planning import job, store  # pylint: disable=g-import-not-at-top (torch side)
  pc = plan_cache_config(config)
  path = job.store_path(pc)
  ids = [s[i]["id"] for s in sources.values() for i in range(len(s))]
  if jax.process_index() == 0:
    complete = False
    if epath.Path(path, store.MANIFEST).exists():
      complete = not store.PlanStore(path).missing(ids)
    if not complete:
      if not config.plans.build_if_missing:
        raise FapeError(f"No complete plan store at {path}. Build it first: python -m "
                        "fape_jax.plan_cache --config=configs/plan_cache.py (see launch/ for "
                        "clusters), or set --config.plans.store_path.")
      _say(f"Planning {len(ids)} images with the {pc.planner.kind} planner and the "
           f"{pc.encoder.kind} encoder into {path} (first run only)...")
      job.run(pc, shard_index=0, num_shards=1, sources=sources)
  _barrier("plan_store_ready")
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

  def train_iterator(self):
    d = self.config.data
    return pipeline.train_iterator(
        self.train, self.plans, crop=d.crop, batch_size=d.batch_size, seed=self.config.seed,
        read_threads=d.read_threads, prefetch=d.prefetch)

  def eval_batches(self, local_batch: int, limit: int = 0):
    source = self.val if not limit else _Head(self.val, limit)
    return pipeline.eval_dataset(source, self.plans, batch_size=local_batch, split="validation")


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
  d = config.data
  if jax.process_index() == 0:
    if d.name == "synthetic":
      _say(f"Pairs store: synthetic seven-task pairs in {d.data_dir} (built on first use).")
      pairs.prepare_synthetic(d.data_dir, d, skip_bad=d.skip_bad)
    elif d.get("manual_dir"):
      pairs.prepare_folder(d.data_dir, d.name, d.manual_dir, skip_bad=d.skip_bad)
  _barrier("pairs_store_ready")
  train = pairs.open_pairs(d.data_dir, d.name, "train", d)
  val = pairs.open_pairs(d.data_dir, d.name, "validation", d)
  plans = open_plans(config, {"train": train, "validation": val}) if config.plans.enabled \
      else None
  return TrainData(config, train, val, plans)


# ----------------------------------------------------------------------------------------------
# Pretrained weights (--config.init_from)
# ----------------------------------------------------------------------------------------------

def _base_path(path: tuple) -> tuple:
  """Executor path -> the plain UNet/VAE path: adapter wrappers hold the original as `base`."""
  return tuple(p for p in path if p != "base")


def init_from_pretrained(state, shardings, config):
  """Loads a local diffusers folder's UNet (+ VAE) into the base weights of the sharded state.

  Strict: every UNet/VAE parameter must be set and every checkpoint tensor used; shapes must
  match (the error names the tensor and both shapes). Exported adapter files (a `.safetensors`
  from adapter export) load into the adapter/router/projector weights instead.
  """
  if not config.init_from:
    return state
  from fape_jax.models import convert  # pylint: disable=g-import-not-at-top
  src = epath.Path(config.init_from)
  if src.suffix == ".safetensors":
    return _init_adapters_from(state, shardings, src)
  parts = [("unet", "unet")] + ([("vae", "vae")] if config.model.vae is not None else [])
  new = {k: nnx.to_flat_state(state["gen"][k]) for k in ("params", "frozen")}
  shards = {k: dict(nnx.to_flat_state(shardings["gen"][k])) for k in ("params", "frozen")}
  for prefix, sub in parts:
    _, tensors, folder = convert.read_model_folder(src, sub)
    used, missing = set(), []
    for kind in ("params", "frozen"):
      flat = []
      for path, var in new[kind]:
        if not path or path[0] != prefix or isinstance(var, lora_moe.AdapterParam) \
            or not isinstance(var, nnx.Param):
          flat.append((path, var))
          continue
        name = convert.diffusers_name(_base_path(path[1:]))
        if name not in tensors:
          missing.append(name)
          flat.append((path, var))
          continue
        arr = convert.to_flax_layout(tensors[name])
        if tuple(arr.shape) != tuple(var.get_value().shape):
          raise FapeError(f"init_from {folder}: tensor {name} has shape {tuple(arr.shape)} (Flax "
                          f"layout) but the model expects {tuple(var.get_value().shape)}; does "
                          "config.model match the checkpoint's config.json?")
        used.add(name)
        value = jax.device_put(arr.astype(var.get_value().dtype), shards[kind][path].get_value())
        flat.append((path, var.replace(value)))
      new[kind] = flat
    unused = sorted(set(tensors) - used)
    if missing or unused:
      raise FapeError(f"init_from {folder}: {len(missing)} parameter(s) without a tensor "
                      f"{missing[:10]} and {len(unused)} unused tensor(s) {unused[:10]}; the "
                      "folder does not hold the model config.model describes.")
    _say(f"Loaded pretrained {prefix} weights from {folder} ({len(used)} tensors).")
  state["gen"]["params"] = nnx.from_flat_state(new["params"])
  state["gen"]["frozen"] = nnx.from_flat_state(new["frozen"])
  return state


def _init_adapters_from(state, shardings, path: epath.Path):
  from fape_jax.models import adapters_io  # pylint: disable=g-import-not-at-top
  loaded = adapters_io.read_adapters(str(path))
  flat, wrong = [], []
  sh = dict(nnx.to_flat_state(shardings["gen"]["params"]))
  for p, var in nnx.to_flat_state(state["gen"]["params"]):
    name = shard_lib.path_str(p)
    if isinstance(var, lora_moe.AdapterParam) and name in loaded:
      value = loaded.pop(name)
      if tuple(value.shape) != tuple(var.get_value().shape):
        wrong.append(f"{name} {tuple(value.shape)} vs {tuple(var.get_value().shape)}")
        continue
      flat.append((p, var.replace(jax.device_put(value, sh[p].get_value()))))
    else:
      flat.append((p, var))
  if wrong:
    raise FapeError(f"init_from {path}: {len(wrong)} adapter tensor(s) have another shape (file "
                    f"vs model), e.g. {wrong[:3]}; export and train with the same config.")
  if loaded:
    raise FapeError(f"init_from {path}: {len(loaded)} adapter tensor(s) match no adapter of this "
                    f"model, e.g. {sorted(loaded)[:5]}; was it exported from the same config?")
  state["gen"]["params"] = nnx.from_flat_state(flat)
  _say(f"Loaded adapters from {path}.")
  return state
