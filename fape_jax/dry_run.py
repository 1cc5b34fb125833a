"""Dry run: shapes, shardings and per-device memory of the train state and the backward passes,
for the config's mesh, without allocating anything (`python -m fape_jax.train ... --dry_run`).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from fape_jax import preflight
from fape_jax import sharding as shard_lib
from fape_jax import steps
from fape_jax.errors import FapeError
from fape_jax.model_state import Models, abstract_state, state_shardings
from fape_jax.models import discriminator as disc_lib


def _abstract_mesh(config):
  """The config's mesh over `config.mesh.dry_run_devices` devices (no real devices needed)."""
  n = int(config.mesh.get("dry_run_devices", 0) or jax.device_count())
  shape = shard_lib.fill_mesh_shape(config.mesh.axes, config.mesh.shape, n)
  return jax.sharding.AbstractMesh(shape, tuple(config.mesh.axes))


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
      _, t = steps.generator_terms(models, p, gfrozen, disc, batch, config)
      return lw.w_mse * t["rec"] + lw.w_adv * t["adv"] + lw.w_freq * t["freq"]
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
      logits, _ = steps.disc_logits(models, p, drest, images, update_stats=True)
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
  config = preflight.resolve_batches(config, dp)  # per-shard sizes for the dry run's devices
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
      *([("generator weight average (EMA)", count(abstract["gen"]["ema"]),
          _per_device_bytes(abstract["gen"]["ema"], sh["gen"]["ema"], mesh))]
        if "ema" in abstract["gen"] else []),
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

