"""The pure, jit-compiled steps: the train step (generator + discriminator) and the eval step.

`train_step(state, batch, lpips_state) -> (state, metrics)` is compiled once, ahead of time on
the first batch's shapes, with explicit in/out shardings and the state donated. `eval_step`
restores a batch and returns its per-layer routing weights; training's validation, `restore`,
`evaluate` and the benchmarks all run it.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
from flax import nnx

from fape_jax import distributed
from fape_jax import losses
from fape_jax import sharding as shard_lib
from fape_jax import model_state
from fape_jax.model_state import Models
from fape_jax.models import discriminator as disc_lib


def generator_forward(models: Models, gen_params, gen_frozen, batch):
  gen = nnx.merge(models.gen_def, gen_params, gen_frozen, copy=True)
  return gen(batch["degraded"], batch.get("plan_tokens"), batch.get("plan_mask"))


def disc_logits(models: Models, dparams, drest, images, update_stats: bool):
  """D(images); with `update_stats`, also the advanced spectral-norm power-iteration state."""
  # copy=True: fresh Variables at this trace level, so the BatchStat write-back is legal under
  # jit + grad (see discriminator.py).
  disc = nnx.merge(models.disc_def, dparams, drest, copy=True)
  logits = disc(images, update_stats=update_stats)
  return logits, nnx.state(disc, nnx.Not(models.disc_trainable))


def generator_terms(models: Models, gparams, gfrozen, disc, batch, config):
  """(restored, {rec, mse, adv, freq}): the generator loss terms that need no extra weights (LPIPS
  does); the train step and the dry run's memory estimate differentiate the same ones. `rec` is
  the (task-balanced) reconstruction term that is optimised, `mse` the plain batch MSE (logged)."""
  restored, aux = generator_forward(models, gparams, gfrozen, batch)
  mse = jnp.mean(jnp.square(restored.astype(jnp.float32) - batch["clean"]))
  rec = losses.reconstruction_loss(restored, batch["clean"], batch["degraded"],
                                   config.loss.get("balance", "none"))
  fake_logits, _ = disc_logits(models, disc["params"], disc["rest"], restored,
                               update_stats=False)
  adv = disc_lib.generator_adversarial_loss(fake_logits, config.disc.real_target)
  return restored, {"rec": rec, "mse": mse, "adv": adv,
                    "freq": losses.frequency_loss(aux["freq_terms"])}


def train_step(state, batch, lpips_state, *, models: Models, config, lpips_def):
  """One generator update and (every `d_every` steps) one discriminator update.

  Deterministic: nothing in the step draws random numbers (no dropout, no noise), so the state
  carries no RNG key.
  """
  lw = config.loss
  g_tx, d_tx = models.g_tx, models.d_tx
  step = state["step"]
  adv_on = (step >= config.optim.d_warmup_steps).astype(jnp.float32)

  def g_loss_fn(gparams):
    restored, terms = generator_terms(models, gparams, state["gen"]["frozen"], state["disc"],
                                      batch, config)
    rec, adv, freq = terms["rec"], terms["adv"], terms["freq"]
    lp = (jnp.mean(nnx.merge(lpips_def, lpips_state)(restored, batch["clean"]))
          if lpips_def is not None else jnp.zeros(()))
    total = (lw.w_mse * rec + lw.w_lpips * lp + adv_on * lw.w_adv * adv + lw.w_freq * freq)
    return total, ({"loss": total, "mse": terms["mse"], "rec": rec, "lpips": lp, "adv": adv,
                    "freq": freq}, restored)

  (_, (g_metrics, restored)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      state["gen"]["params"])
  if config.optim.get("per_task_state", False):
    # One-task batches (data.batching='task'): update only this task's optimiser state.
    slot = model_state.task_slot(batch["task_id"][0])
    own = jax.tree.map(lambda x: x[slot], state["gen"]["opt"])
    g_updates, own = g_tx.update(g_grads, own, state["gen"]["params"])
    g_opt = jax.tree.map(lambda x, y: x.at[slot].set(y), state["gen"]["opt"], own)
  else:
    g_updates, g_opt = g_tx.update(g_grads, state["gen"]["opt"], state["gen"]["params"])
  gparams = optax.apply_updates(state["gen"]["params"], g_updates)

  fake = jax.lax.stop_gradient(restored)

  def d_update(dstate):
    def d_loss_fn(dparams):
      # Real and fake in one call: one power-iteration update per step.
      logits, rest = disc_logits(models, dparams, dstate["rest"],
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
  new_gen = {"params": gparams, "frozen": state["gen"]["frozen"], "opt": g_opt}
  if "ema" in state["gen"]:
    new_gen["ema"] = model_state.update_ema(state["gen"]["ema"], gparams, step,
                                            config.optim.ema_decay)
  new_state = {"step": step + 1, "gen": new_gen, "disc": disc_state}
  # The norm of the raveled gradient: one reduction instead of one per parameter (the same value).
  g_norm = jnp.linalg.norm(jax.flatten_util.ravel_pytree(g_grads)[0])
  metrics = {**g_metrics, **d_metrics, "g_grad_norm": g_norm}
  if "index" in batch:
    # Fingerprint of the data order (sum of the global batch's stream positions): a resumed or
    # differently-sharded run must reproduce it exactly.
    metrics["data_index_sum"] = jnp.sum(batch["index"]).astype(jnp.float32)
  return new_state, metrics


class TrainStep:
  """The train step `(state, batch) -> (state, metrics)`, compiled ahead of time, state donated.

  `compile(state, batch)` lowers and compiles it for those shapes and shardings (the trainer does
  so before its progress bar starts, saying so, and logs the time); a first call compiles it
  otherwise. Compiled once, it never retraces: a batch whose shape, dtype or sharding drifts
  raises instead of silently costing a compile per step.

  `lpips_state` (frozen LPIPS weights, or None when LPIPS is off) is an argument of the compiled
  program rather than a closure, so its arrays are not baked into it as constants.
  """

  def __init__(self, jitted, lpips_state):
    self.jitted = jitted            # the jax.jit object (cost analysis, benchmarks)
    self.lpips_state = lpips_state
    self.compiled = None
    self.compile_seconds = None

  def compile(self, state, batch) -> float:
    distributed.say("Compiling the train step (a minute on a laptop CPU, once per run)...")
    t0 = time.perf_counter()
    self.compiled = self.jitted.lower(state, batch, self.lpips_state).compile()
    self.compile_seconds = time.perf_counter() - t0
    logging.info("train step compiled in %.1f s", self.compile_seconds)
    return self.compile_seconds

  def __call__(self, state, batch):
    if self.compiled is None:
      self.compile(state, batch)
    return self.compiled(state, batch, self.lpips_state)


def make_train_step(models: Models, config, shardings, batch_sharding,
                    lpips_model=None) -> TrainStep:
  """The train step for `models` and `config`, with the state's and the batch's shardings."""
  replicated = shard_lib.NamedSharding(batch_sharding.mesh, shard_lib.P())
  lpips_def, lpips_state = nnx.split(lpips_model) if lpips_model is not None else (None, None)
  lpips_state = jax.device_put(lpips_state, replicated) if lpips_state is not None else None
  step_fn = functools.partial(train_step, models=models, config=config, lpips_def=lpips_def)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)
  return TrainStep(jitted, lpips_state)


def make_eval_step(models: Models, gen_shardings, batch_sharding):
  """Restores a batch; returns the restored images and the per-layer routing weights."""
  def eval_step(gen_params, gen_frozen, batch):
    restored, aux = generator_forward(models, gen_params, gen_frozen, batch)
    return jnp.clip(restored, -1.0, 1.0), aux["routing"]
  return jax.jit(eval_step, in_shardings=(gen_shardings["params"], gen_shardings["frozen"],
                                          batch_sharding))

