"""diffusers-compatible `AutoencoderKL` (the Stable Diffusion VAE) in Flax NNX, NHWC.

  vae = from_diffusers("/path/to/sd-turbo")               # pipeline or vae/ folder
  mean = vae.encode(images)                              # posterior mean, unscaled
  z = vae.encode(images, rng=key)                        # a posterior sample, unscaled
  images = vae.decode(z)                                 # unscaled latents in
  scaled = mean * vae.config["scaling_factor"]           # what the UNet sees, as in diffusers

Module names mirror diffusers' (`encoder.down_blocks.0.resnets.0.conv1`,
`decoder.mid_block.attentions.0.to_q`, `quant_conv`, ...); `convert.py` also accepts the old
`query`/`key`/`value`/`proj_attn` attention names. Only `DownEncoderBlock2D`/`UpDecoderBlock2D`
with SiLU are implemented; other options are a FapeError naming the option.
`scaling_factor`, `shift_factor`, `latents_mean`, `latents_std`, `force_upcast`, `sample_size`
are kept in `config` for callers (diffusers' pipelines apply them, not the model).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fape_jax.errors import FapeError
from fape_jax.models import convert
from fape_jax.models.layers import (Attention, Downsample2D, ResnetBlock2D, Upsample2D,
                                    call_maybe_remat, conv)

Array = jax.Array
_NAME = "AutoencoderKL"
_EPS = 1e-6  # diffusers hard-codes the VAE's norm epsilon

CONFIG_SPEC = convert.ConfigSpec(
    class_name=_NAME,
    supported={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"],
        "block_out_channels": [64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    },
    fixed={},
)


def _is_pos_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_config(raw: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
  """Checks a diffusers AutoencoderKL config; returns it with defaults filled."""
  config = convert.parse_config(raw, CONFIG_SPEC, where)
  req = lambda cond, key, msg: convert.require(cond, _NAME, where, key, msg)
  channels = config["block_out_channels"]
  req(isinstance(channels, (list, tuple)) and len(channels) >= 1
      and all(_is_pos_int(c) for c in channels), "block_out_channels",
      f"must be a non-empty list of positive ints, got {channels!r}.")
  n = len(channels)
  for key, want in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    types = config[key]
    req(isinstance(types, (list, tuple)) and len(types) == n, key,
        f"needs one entry per block_out_channels entry ({n}), got {types!r}.")
    for t in types:
      req(t == want, key, f"block type {t!r} is not supported; use {want!r}.")
  req(config["act_fn"] in ("silu", "swish"), "act_fn",
      f"{config['act_fn']!r} is not supported; only 'silu' (alias 'swish').")
  groups = config["norm_num_groups"]
  req(_is_pos_int(groups) and all(c % groups == 0 for c in channels), "norm_num_groups",
      f"{groups!r} must be a positive int dividing every block_out_channels entry {channels}.")
  for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
    req(_is_pos_int(config[key]), key, f"must be a positive int, got {config[key]!r}.")
  for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
    req(isinstance(config[key], bool), key, f"must be true or false, got {config[key]!r}.")
  return config


class DownEncoderBlock2D(nnx.Module):
  """resnet x num_layers (no time embedding), then an optional stride-2 downsampler."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
               add_downsample: bool, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                      groups=groups, eps=_EPS, dtype=dtype, rngs=rngs)
        for i in range(num_layers)])
    # The VAE pads right/bottom by one then convolves without padding (`padding=0`).
    self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype,
                                                rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x: Array, remat: bool) -> Array:
    for resnet in self.resnets:
      x = call_maybe_remat(resnet, x, remat=remat)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """resnet x num_layers (no skips, no time embedding), then an optional upsampler."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
               add_upsample: bool, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                      groups=groups, eps=_EPS, dtype=dtype, rngs=rngs)
        for i in range(num_layers)])
    self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x: Array, remat: bool) -> Array:
    for resnet in self.resnets:
      x = call_maybe_remat(resnet, x, remat=remat)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNetMidBlock2D(nnx.Module):
  """resnet -> single-head spatial self-attention (optional) -> resnet."""

  def __init__(self, channels: int, *, groups: int, add_attention: bool,
               attention_impl: str | None, dtype: Any, rngs: nnx.Rngs):
    resnet = lambda: ResnetBlock2D(channels, channels, temb_channels=None, groups=groups,
                                   eps=_EPS, dtype=dtype, rngs=rngs)
    self.resnets = nnx.List([resnet(), resnet()])
    self.attentions = (nnx.List([Attention(channels, heads=1, dim_head=channels, bias=True,
                                           norm_num_groups=groups, eps=_EPS,
                                           residual_connection=True,
                                           attention_impl=attention_impl, dtype=dtype,
                                           rngs=rngs)])
                       if add_attention else None)

  def __call__(self, x: Array, remat: bool) -> Array:
    x = call_maybe_remat(self.resnets[0], x, remat=remat)
    if self.attentions is not None:
      x = call_maybe_remat(self.attentions[0], x, remat=remat)
    return call_maybe_remat(self.resnets[1], x, remat=remat)


class Encoder(nnx.Module):
  """conv_in -> down_blocks -> mid_block -> norm/SiLU -> conv_out (2 x latent channels)."""

  def __init__(self, config: Mapping[str, Any], *, attention_impl: str | None, dtype: Any,
               rngs: nnx.Rngs):
    channels, groups = list(config["block_out_channels"]), config["norm_num_groups"]
    common = dict(dtype=dtype, rngs=rngs)
    self.conv_in = conv(config["in_channels"], channels[0], 3, **common)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], c, num_layers=config["layers_per_block"],
                           groups=groups, add_downsample=i < len(channels) - 1, **common)
        for i, c in enumerate(channels)])
    self.mid_block = UNetMidBlock2D(channels[-1], groups=groups,
                                    add_attention=config["mid_block_add_attention"],
                                    attention_impl=attention_impl, **common)
    self.conv_norm_out = nnx.GroupNorm(channels[-1], groups, epsilon=_EPS,
                                       use_fast_variance=False, **common)
    self.conv_out = conv(channels[-1], 2 * config["latent_channels"], 3, **common)

  def __call__(self, x: Array, remat: bool) -> Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x, remat)
    x = self.mid_block(x, remat)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """conv_in -> mid_block -> up_blocks (layers_per_block + 1 resnets) -> norm/SiLU -> conv_out."""

  def __init__(self, config: Mapping[str, Any], *, attention_impl: str | None, dtype: Any,
               rngs: nnx.Rngs):
    channels, groups = list(config["block_out_channels"]), config["norm_num_groups"]
    rev = list(reversed(channels))
    common = dict(dtype=dtype, rngs=rngs)
    self.conv_in = conv(config["latent_channels"], channels[-1], 3, **common)
    self.mid_block = UNetMidBlock2D(channels[-1], groups=groups,
                                    add_attention=config["mid_block_add_attention"],
                                    attention_impl=attention_impl, **common)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(rev[max(i - 1, 0)], c, num_layers=config["layers_per_block"] + 1,
                         groups=groups, add_upsample=i < len(rev) - 1, **common)
        for i, c in enumerate(rev)])
    self.conv_norm_out = nnx.GroupNorm(channels[0], groups, epsilon=_EPS,
                                       use_fast_variance=False, **common)
    self.conv_out = conv(channels[0], config["out_channels"], 3, **common)

  def __call__(self, z: Array, remat: bool) -> Array:
    x = self.conv_in(z)
    x = self.mid_block(x, remat)
    for block in self.up_blocks:
      x = block(x, remat)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder of Stable Diffusion, NHWC, diffusers-named.

  Args:
    config: a diffusers AutoencoderKL config dict; kept, defaults filled, as `self.config`.
    dtype: compute dtype (float32 or bfloat16); parameters are always float32.
    remat: rematerialise each resnet and attention in the backward pass (`nnx.remat`).
    attention_impl: `jax.nn.dot_product_attention(implementation=...)` (None: jax chooses).
    rngs: initialisers' randomness (use `from_diffusers` or `nnx.eval_shape` to skip init).
  """

  def __init__(self, config: Mapping[str, Any], *, dtype: Any = jnp.float32, remat: bool = False,
               attention_impl: str | None = None, rngs: nnx.Rngs):
    config = parse_config(config)
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)):
      raise FapeError(f"{_NAME}: compute dtype {dtype} is not supported; use float32 or "
                      f"bfloat16.")
    self.config = config
    self.dtype = dtype
    self.remat = remat
    latent = config["latent_channels"]
    common = dict(attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.encoder = Encoder(config, **common)
    self.decoder = Decoder(config, **common)
    self.quant_conv = (conv(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs)
                       if config["use_quant_conv"] else None)
    self.post_quant_conv = (conv(latent, latent, 1, dtype=dtype, rngs=rngs)
                            if config["use_post_quant_conv"] else None)

  def _check(self, x: Array, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
      raise FapeError(f"{_NAME}.{what}: input must be NHWC with {channels} channels, got shape "
                      f"{tuple(x.shape)}.")

  def encode_moments(self, x: Array) -> tuple[Array, Array]:
    """(mean, logvar) of the diagonal Gaussian posterior for NHWC images in [-1, 1].

    logvar is clipped to [-30, 20] like diffusers' `DiagonalGaussianDistribution`.
    """
    self._check(x, self.config["in_channels"], "encode")
    moments = self.encoder(x.astype(self.dtype), self.remat)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x: Array, *, rng: Array | None = None) -> Array:
    """Unscaled latents of NHWC images in [-1, 1].

    Without `rng`: the posterior mean (diffusers' `latent_dist.mean`). With a jax PRNG key
    `rng`: a posterior sample, `mean + exp(logvar / 2) * jax.random.normal(rng, mean.shape)`
    (the noise drawn in float32). Multiply by `config["scaling_factor"]` for the UNet.
    """
    mean, logvar = self.encode_moments(x)
    if rng is None:
      return mean
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
            ).astype(mean.dtype)

  def decode(self, z: Array) -> Array:
    """NHWC images (about [-1, 1]) from unscaled latents (divide UNet latents by the factor)."""
    self._check(z, self.config["latent_channels"], "decode")
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z, self.remat)

  def __call__(self, x: Array, *, rng: Array | None = None) -> Array:
    """Reconstruction `decode(encode(x, rng=rng))`."""
    return self.decode(self.encode(x, rng=rng))


def from_diffusers(path: str | os.PathLike[str], dtype: Any = jnp.float32, remat: bool = False,
                   *, attention_impl: str | None = None) -> AutoencoderKL:
  """Loads a diffusers AutoencoderKL (model folder, or pipeline folder with `vae/`).

  Same reading and strict filling as `unet.from_diffusers`; old attention names are renamed.
  """
  raw, tensors, folder = convert.read_model_folder(path, "vae")
  config = parse_config(raw, where=os.path.join(folder, "config.json"))
  model = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, remat=remat,
                                               attention_impl=attention_impl,
                                               rngs=nnx.Rngs(0)))
  return convert.load_state_into(model, tensors, strict=True, where=folder)
