"""The model state, shared by training and inference: models, optimisers, sharded creation,
checkpoint views and pretrained weights.

The state is a plain pytree (shapes first: `abstract_state`, then `create_state` builds it already
sharded with `jax.jit(init, out_shardings=...)`; the same abstract tree is the Orbax restore
target, so a checkpoint lands on whatever mesh runs now):

  step                       int32 scalar
  gen.params                 trainable generator variables (adapters/routers/projector, plus the
                             UNet itself when `train_base_unet`)
  gen.frozen                 everything else of the generator: frozen base weights (never
                             differentiated, so never all-reduced, and not in the optimiser)
  gen.opt                    Prodigy state over gen.params only
  disc.params / disc.rest    discriminator heads (+ trainable backbone) / spectral-norm power
                             iteration vectors and a frozen pretrained backbone
  disc.opt                   AdamW state

`restore`, `evaluate` and the benchmarks build models from here; none of them import the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from etils import epath
from flax import nnx

from fape_jax import distributed
from fape_jax import sharding as shard_lib
from fape_jax import tasks as tasks_lib
from fape_jax.errors import FapeError
from fape_jax.models import discriminator as disc_lib
from fape_jax.models import executor as executor_lib
from fape_jax.models import lora_moe
from fape_jax.models.paths import path_str



@dataclasses.dataclass(frozen=True)
class Models:
  """Static halves of the models (graph definitions, trainable filters) and their optimisers;
  the arrays live in the train state."""
  gen_def: Any
  disc_def: Any
  gen_trainable: Any   # nnx filter
  disc_trainable: Any  # nnx filter
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation


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


# `optim.per_task_state`: one generator optimiser state per task (and one for mixes), stacked on
# a leading axis; each one-task batch updates only its task's moments and Prodigy step size.
TASK_SLOTS = len(tasks_lib.TASKS) + 1


def task_slot(task_id: jax.Array) -> jax.Array:
  """The optimiser-state slot of a batch's task id (-1, a mix, gets the last slot)."""
  return jnp.where(task_id < 0, TASK_SLOTS - 1, task_id)


def make_optimizer(cfg, clip_norm: float, total_steps: int,
                   flatten: bool = False) -> optax.GradientTransformation:
  """One optimiser from a `config.optim.g` / `config.optim.d` block.

  `flatten` (`config.optim.flatten`): the update runs on all parameters raveled into one vector
  (`optax.flatten`), so the state holds one vector per moment. The same arithmetic (the clip's
  global norm and Prodigy's sums are over all parameters either way), but a few ops instead of a
  few per parameter: it halves the train step's program and its compile time. The vector is
  replicated, so a run whose trainable parameters are sharded (fsdp) should turn it off.
  """
  sched = _schedule(cfg, total_steps)
  if cfg.name == "prodigy":
    opt = optax.contrib.prodigy(sched, betas=(cfg.b1, cfg.b2), weight_decay=cfg.weight_decay,
                                estim_lr0=cfg.get("estim_lr0", 1e-6))
  elif cfg.name == "adamw":
    opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  else:
    raise FapeError(f"config.optim.*.name={cfg.name!r}: use 'prodigy' or 'adamw'.")
  opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm else opt
  return optax.flatten(opt) if flatten else opt


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
  flatten = config.optim.get("flatten", False)  # runs written before the field: per-leaf states
  g_tx = make_optimizer(config.optim.g, config.optim.clip_norm, config.total_steps, flatten)
  d_tx = make_optimizer(config.optim.d, config.optim.clip_norm, config.total_steps, flatten)
  if models_out is not None:
    models_out.append(Models(gen_def, disc_def, gen_filter, disc_filter, g_tx, d_tx))
  g_opt = g_tx.init(gparams)
  if config.optim.get("per_task_state", False):
    g_opt = jax.tree.map(lambda x: jnp.stack([x] * TASK_SLOTS), g_opt)
  gen = {"params": gparams, "frozen": gfrozen, "opt": g_opt}
  if config.optim.get("ema_decay", 0.0):
    gen["ema"] = jax.tree.map(jnp.copy, gparams)
  return {
      "step": jnp.zeros((), jnp.int32),
      "gen": gen,
      "disc": {"params": dparams, "rest": drest, "opt": d_tx.init(dparams)},
  }


# `optim.ema_decay` > 0: the state also holds an exponential moving average of the generator's
# trainable weights, and validation, restore, evaluate and export use it. Kept by hand rather
# than with optax.ema, which stores the zero-initialised (biased) average: this one is usable
# weights at every step, so every reader takes it as it is. The decay ramps up as in
# tf.train.ExponentialMovingAverage(num_updates=step), so early averages do not drag in the
# initial weights.
def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, params, step: jax.Array, decay: float):
  d = ema_decay_at(step, decay)
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def inference_params(state):
  """The generator weights to restore with: the moving average when the run keeps one."""
  return state["gen"]["ema"] if "ema" in state["gen"] else state["gen"]["params"]


def abstract_state(config):
  """(abstract state, Models) without allocating anything."""
  models = []
  abstract = jax.eval_shape(functools.partial(_init_state, config, models))
  return abstract, models[0]


# Sharded trainable parameters (elements) above which a replicated, flattened optimiser state is
# worth a warning: two float32 moments of 16M parameters are 128 MiB per device.
_REPLICATED_OPT_WARN = 1 << 24


def state_shardings(abstract, mesh, config):
  """NamedShardings for every leaf of the (abstract) state, from the config's logical rules."""
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  is_adapter = lambda v: isinstance(v, lora_moe.AdapterParam)
  out = {"step": shard_lib.NamedSharding(mesh, shard_lib.P())}
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
    if "ema" in abstract[part]:
      out[part]["ema"] = params_sh
    sharded = sum(math.prod(a.shape) for a, s in zip(jax.tree.leaves(abstract[part][pkey]),
                                                      jax.tree.leaves(params_sh))
                  if not s.is_fully_replicated)
    if sharded > _REPLICATED_OPT_WARN and config.optim.get("flatten", False):
      logging.warning(
          "%.0fM trainable %s parameters are sharded over the mesh, but config.optim.flatten "
          "keeps the optimiser state as one replicated vector (each device holds all of it); pass "
          "--config.optim.flatten=False to shard it like the parameters.", sharded / 1e6, part)
  return out


def init_state(config, shardings):
  """The seed's train state, created directly with `shardings` (no host copy of the full model)."""
  return jax.jit(functools.partial(_init_state, config), out_shardings=shardings)()


def create_state(config, mesh):
  """(state, shardings, Models): the seed's train state on `mesh`."""
  abstract, models = abstract_state(config)
  shardings = state_shardings(abstract, mesh, config)
  return init_state(config, shardings), shardings, models


# ----------------------------------------------------------------------------------------------
# Checkpoint views
# ----------------------------------------------------------------------------------------------

def checkpoint_view(state, config):
  """What goes into a checkpoint: frozen base weights loaded from `init_from` are not re-saved."""
  if config.init_from and not config.train_base_unet:
    return {k: v for k, v in state.items() if k != "gen"} | {
        "gen": {k: v for k, v in state["gen"].items() if k != "frozen"}}
  return state


def sharded_spec(abstract, shardings):
  """The state's shapes and dtypes, each leaf carrying its sharding (to lower or restore with)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore_target(abstract, shardings, config):
  """The Orbax restore target: the checkpoint view's shapes, each leaf carrying its sharding."""
  return checkpoint_view(sharded_spec(abstract, shardings), config)


def merge_restored(state, restored):
  """A restored checkpoint view completed with the frozen weights it does not hold."""
  if "frozen" not in restored["gen"]:
    restored["gen"]["frozen"] = state["gen"]["frozen"]
  return restored


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
    distributed.say(f"Loaded pretrained {prefix} weights from {folder} ({len(used)} tensors).")
  state["gen"]["params"] = nnx.from_flat_state(new["params"])
  state["gen"]["frozen"] = nnx.from_flat_state(new["frozen"])
  return _restart_ema(state)


def _restart_ema(state):
  """The moving average starts from the weights just loaded, not from the random init."""
  if "ema" in state["gen"]:
    state["gen"]["ema"] = jax.tree.map(jnp.copy, state["gen"]["params"])
  return state


def _init_adapters_from(state, shardings, path: epath.Path):
  from fape_jax.models import adapters_io  # pylint: disable=g-import-not-at-top
  loaded = adapters_io.read_adapters(str(path))
  flat, wrong = [], []
  sh = dict(nnx.to_flat_state(shardings["gen"]["params"]))
  for p, var in nnx.to_flat_state(state["gen"]["params"]):
    name = path_str(p)
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
  distributed.say(f"Loaded adapters from {path}.")
  return _restart_ema(state)
