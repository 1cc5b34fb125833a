"""The one-step executor (METHOD.md section 3): degraded image + plan tokens -> restored image.

  executor = build_executor(config, rngs=nnx.Rngs(0))          # from configs (training)
  executor = Executor(unet, vae, lora_config=..., plan_dim=3584, rngs=nnx.Rngs(0))  # pretrained
  restored, aux = executor(degraded_nhwc, plan_tokens, plan_mask)

The degraded image (NHWC, [-1, 1]) is encoded (VAE posterior mean times `scaling_factor`, or the
identity for pixel-space configs without a VAE), run once through the adapted UNet at a fixed
timestep (300) with the projected plan tokens as context and no added noise, and decoded. The
UNet output is the clean latent, or with `residual=True` a residual added to the input latent (a
freshly initialised UNet does not start at the identity; a pretrained one roughly does). Any
image size works: the input is reflect-padded to the UNet's multiple (2^(down blocks - 1), times
the VAE factor) and the output cropped back.

`aux` = {'routing': {layer path: (B, 2)}, 'freq_terms': {layer path: scalar}} (see
`lora_moe.run_adapted`); `losses.frequency_loss(aux['freq_terms'])` is L_freq. The restored image
is on the [-1, 1] scale but not clipped, so losses keep their gradient everywhere; clip before
writing images.

Trainable: `AdapterParam` (adapters, routers, projector, null token); everything else is frozen.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fape_jax.errors import FapeError
from fape_jax.models import lora_moe


def _single_cross_attention_dim(unet_config: Mapping[str, Any]) -> int:
  dim = unet_config["cross_attention_dim"]
  dims = set(dim) if isinstance(dim, (list, tuple)) else {dim}
  if len(dims) != 1:
    raise FapeError(f"Executor: the UNet's cross_attention_dim {dim} differs per block; the plan "
                    "projector needs one context width.")
  return int(dims.pop())


def _reflect_pad(x: jax.Array, multiple: int) -> jax.Array:
  h, w = x.shape[1:3]
  ph, pw = -h % multiple, -w % multiple
  if not (ph or pw):
    return x
  # numpy-style 'reflect' mirrors repeatedly, so pads larger than the image work too.
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")


class Executor(nnx.Module):
  """Adapted UNet + optional VAE + plan projector; see the module docstring.

  Args:
    unet: a built (random or pretrained) `UNet2DConditionModel`, or any module with the same call
      signature, a `config` dict (in/out_channels, down_block_types, cross_attention_dim) and
      `nnx.Linear` projections at diffusers paths. Adapters are added to it in place.
    vae: an `AutoencoderKL` (encode -> posterior mean, decode, config['scaling_factor']) or None
      for a pixel-space UNet (3 channels in and out).
    lora_config: adapter settings (`lora_moe.default_lora_config()` fields).
    plan_dim: width of the cached plan tokens (384 MiniLM, 3584 Qwen2.5-VL-7B), or None for the
      "no plan context" ablation (a learned null token is the only context).
    timestep: the fixed diffusion timestep of the one step.
    residual: the UNet predicts a residual on the input latent.
  """

  def __init__(self, unet: nnx.Module, vae: nnx.Module | None = None, *, lora_config,
               plan_dim: int | None, timestep: int = 300, residual: bool = False,
               rngs: nnx.Rngs):
    config = lora_moe.check_lora_config(lora_config)
    ucfg = unet.config
    context_dim = _single_cross_attention_dim(ucfg)
    if vae is None:
      if ucfg["in_channels"] != 3 or ucfg["out_channels"] != 3:
        raise FapeError(f"Executor: without a VAE the UNet works on pixels and needs 3 input and "
                        f"output channels, got {ucfg['in_channels']}/{ucfg['out_channels']}.")
      vae_factor = 1
    else:
      latent = vae.config["latent_channels"]
      if ucfg["in_channels"] != latent or ucfg["out_channels"] != latent:
        raise FapeError(f"Executor: the UNet has {ucfg['in_channels']}/{ucfg['out_channels']} "
                        f"in/out channels but the VAE's latents have {latent}.")
      vae_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    if plan_dim is not None and not (isinstance(plan_dim, int) and plan_dim > 0):
      raise FapeError(f"Executor: plan_dim={plan_dim!r} must be a positive integer or None.")
    if not 0 <= timestep < 1000:
      raise FapeError(f"Executor: timestep={timestep} must be in [0, 1000).")
    self.adapted = tuple(lora_moe.add_adapters(unet, config, context_dim=context_dim, rngs=rngs))
    self.unet = unet
    self.vae = vae
    self.projector = lora_moe.PlanProjector(plan_dim, context_dim,
                                            hidden_dim=config.projector_hidden, rngs=rngs)
    self.lora_config = config
    self.plan_dim = plan_dim
    self.timestep = int(timestep)
    self.residual = bool(residual)
    self.multiple = 2 ** (len(ucfg["down_block_types"]) - 1) * vae_factor

  def context(self, batch: int, plan_tokens: jax.Array | None, plan_mask: jax.Array | None
              ) -> tuple[jax.Array, jax.Array | None]:
    """The UNet's cross-attention context and mask: projected plan tokens or the null token."""
    if plan_tokens is None:
      if plan_mask is not None:
        raise FapeError("Executor: plan_mask given without plan_tokens.")
      return self.projector.null_context(batch), None
    if plan_tokens.ndim != 3 or plan_tokens.shape[0] != batch:
      raise FapeError(f"Executor: plan_tokens must be (B={batch}, K, D), got "
                      f"{tuple(plan_tokens.shape)}.")
    if plan_mask is not None and tuple(plan_mask.shape) != tuple(plan_tokens.shape[:2]):
      raise FapeError(f"Executor: plan_mask must be (B, K) = {tuple(plan_tokens.shape[:2])}, got "
                      f"{tuple(plan_mask.shape)}.")
    return self.projector(plan_tokens, plan_mask), plan_mask

  def encode(self, images: jax.Array) -> jax.Array:
    if self.vae is None:
      return images
    z = self.vae.encode(images)
    shift = self.vae.config.get("shift_factor")
    if shift is not None:
      z = z - shift
    return z * self.vae.config["scaling_factor"]

  def decode(self, latents: jax.Array) -> jax.Array:
    if self.vae is None:
      return latents
    z = latents / self.vae.config["scaling_factor"]
    shift = self.vae.config.get("shift_factor")
    if shift is not None:
      z = z + shift
    return self.vae.decode(z)

  def __call__(self, degraded: jax.Array, plan_tokens: jax.Array | None = None,
               plan_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    if degraded.ndim != 4 or degraded.shape[-1] != 3:
      raise FapeError(f"Executor: degraded images must be NHWC RGB in [-1, 1], got shape "
                      f"{tuple(degraded.shape)}.")
    batch, h, w, _ = degraded.shape
    context, mask = self.context(batch, plan_tokens, plan_mask)
    descriptor = (lora_moe.image_frequency_descriptor(degraded, self.lora_config.descriptor_bands)
                  if self.lora_config.image_descriptor else None)
    z = self.encode(_reflect_pad(degraded.astype(jnp.float32), self.multiple))
    t = jnp.full((batch,), self.timestep, jnp.int32)
    out, aux = lora_moe.run_adapted(
        self.unet, z, t, context, encoder_attention_mask=mask, input_hw=z.shape[1:3],
        context=context, context_mask=mask, descriptor=descriptor)
    out = out.astype(jnp.float32)
    if self.residual:
      out = z + out
    return self.decode(out)[:, :h, :w], aux


def build_executor(config: ml_collections.ConfigDict | Mapping[str, Any], *,
                   rngs: nnx.Rngs) -> Executor:
  """Builds UNet (+ VAE) from configs and adds adapters: what training uses.

  `config` fields: `unet` (diffusers UNet config dict), `vae` (AutoencoderKL config dict or None
  for pixel space), `lora` (adapter settings, see `lora_moe.default_lora_config`), `plan_dim`
  (plan token width or None), and optionally `timestep` (300), `residual` (False), `dtype`
  ('float32' | 'bfloat16', the UNet's compute dtype; the VAE runs in float32), `remat` (False).
  Wrap in `nnx.eval_shape` to get the abstract executor without allocating weights.
  """
  # Imported here: the UNet and VAE modules are only needed when building from configs.
  from fape_jax.models.unet import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  missing = [k for k in ("unet", "lora", "plan_dim") if k not in cfg]
  if missing:
    raise FapeError(f"executor config: missing field(s) {missing}.")
  unknown = sorted(set(cfg) - {"unet", "vae", "lora", "plan_dim", "timestep", "residual", "dtype",
                               "remat"})
  if unknown:
    raise FapeError(f"executor config: unknown field(s) {unknown}.")
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  dtype = cfg.get("dtype", "float32")
  if dtype not in dtypes:
    raise FapeError(f"executor config.dtype={dtype!r}: must be one of {tuple(dtypes)}.")
  unet = UNet2DConditionModel(dict(cfg["unet"]), dtype=dtypes[dtype],
                              remat=bool(cfg.get("remat", False)), rngs=rngs)
  vae = None
  if cfg.get("vae") is not None:
    from fape_jax.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
    vae = AutoencoderKL(dict(cfg["vae"]), dtype=jnp.float32, remat=bool(cfg.get("remat", False)),
                        rngs=rngs)
  return Executor(unet, vae, lora_config=cfg["lora"], plan_dim=cfg["plan_dim"],
                  timestep=cfg.get("timestep", 300), residual=cfg.get("residual", False),
                  rngs=rngs)
