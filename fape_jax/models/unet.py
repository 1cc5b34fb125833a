"""diffusers-compatible `UNet2DConditionModel` in Flax NNX (Stable Diffusion 1.x / 2.x / Turbo).

The module tree mirrors diffusers' state-dict names (`down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q`, `mid_block.resnets.1.conv2`, ...), so converting a checkpoint is
a mechanical rename (see `convert.py`). Tensors are NHWC.

  model = UNet2DConditionModel(config_dict, dtype=jnp.bfloat16, remat=True, rngs=nnx.Rngs(0))
  eps = model(sample_nhwc, timesteps, encoder_hidden_states, encoder_attention_mask=None)
  model = from_diffusers("/path/to/sd-turbo")            # pipeline or unet/ folder

Supported config: down/up blocks `CrossAttnDownBlock2D`, `DownBlock2D`, `CrossAttnUpBlock2D`,
`UpBlock2D`, mid block `UNetMidBlock2DCrossAttn` (or none), per-block or global
`layers_per_block`, `attention_head_dim` (diffusers' name for the number of heads),
`cross_attention_dim`, `transformer_layers_per_block`; `use_linear_projection`, `upcast_attention`,
`norm_num_groups`, `norm_eps`, `flip_sin_to_cos`, `freq_shift`, `center_input_sample`,
`downsample_padding`, `mid_block_scale_factor`, `time_embedding_dim`, `conv_in_kernel`,
`conv_out_kernel`, SiLU. Anything else (class/addition embeddings, `time_cond_proj_dim`, gated
attention, scale-shift resnets, ...) is a FapeError naming the option.
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
from fape_jax.models.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding,
                                    Transformer2DModel, Upsample2D, call_maybe_remat, conv,
                                    group_norm,
                                    timestep_embedding)

Array = jax.Array
_NAME = "UNet2DConditionModel"
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)


def _all_false(value: Any) -> bool:
  if isinstance(value, (list, tuple)):
    return all(v is False for v in value)
  return value is False


CONFIG_SPEC = convert.ConfigSpec(
    class_name=_NAME,
    supported={
        "sample_size": None,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 1280,
        "transformer_layers_per_block": 1,
        "attention_head_dim": 8,
        "use_linear_projection": False,
        "upcast_attention": False,
        "time_embedding_dim": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
    },
    fixed={
        "only_cross_attention": (_all_false, "False"),
        "dual_cross_attention": (convert.is_value(False), "False"),
        "class_embed_type": (convert.is_value(None), "None"),
        "num_class_embeds": (convert.is_value(None), "None"),
        "addition_embed_type": (convert.is_value(None), "None"),
        "addition_time_embed_dim": (convert.is_value(None), "None"),
        "time_cond_proj_dim": (convert.is_value(None), "None"),
        "attention_type": (convert.is_value("default"), "'default'"),
        "resnet_time_scale_shift": (convert.is_value("default"), "'default'"),
        "encoder_hid_dim": (convert.is_value(None), "None"),
        "encoder_hid_dim_type": (convert.is_value(None), "None"),
        "num_attention_heads": (convert.is_value(None), "None (diffusers itself rejects it)"),
        "reverse_transformer_layers_per_block": (convert.is_value(None), "None"),
        "time_embedding_type": (convert.is_value("positional"), "'positional'"),
        "time_embedding_act_fn": (convert.is_value(None), "None"),
        "timestep_post_act": (convert.is_value(None), "None"),
        "dropout": (convert.is_value(0.0), "0.0 (the base UNet is frozen)"),
    },
    # Knobs of class/addition embeddings and of block types rejected above: no-ops here.
    ignored=frozenset({
        "addition_embed_type_num_heads", "projection_class_embeddings_input_dim",
        "class_embeddings_concat", "resnet_skip_time_act", "resnet_out_scale_factor",
        "cross_attention_norm", "mid_block_only_cross_attention",
    }),
)


def _is_pos_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _per_block(config: Mapping[str, Any], key: str, n: int, where: str) -> list[int]:
  value = config[key]
  if isinstance(value, (list, tuple)):
    convert.require(len(value) == n, _NAME, where, key,
                    f"has {len(value)} entries but there are {n} down blocks.")
    values = list(value)
  else:
    values = [value] * n
  convert.require(all(_is_pos_int(v) for v in values), _NAME, where, key,
                  f"must be a positive int or a list of positive ints (one per block), got "
                  f"{value!r}.")
  return values


def parse_config(raw: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
  """Checks a diffusers UNet config (as read from config.json); returns it with defaults filled.

  Raises FapeError naming the option for anything unsupported or inconsistent.
  """
  config = convert.parse_config(raw, CONFIG_SPEC, where)
  req = lambda cond, key, msg: convert.require(cond, _NAME, where, key, msg)
  down, up = list(config["down_block_types"]), list(config["up_block_types"])
  for key, types, allowed in (("down_block_types", down, _DOWN_TYPES),
                              ("up_block_types", up, _UP_TYPES)):
    for t in types:
      req(t in allowed, key, f"block type {t!r} is not supported; use {' or '.join(allowed)}.")
  req(config["mid_block_type"] in _MID_TYPES, "mid_block_type",
      f"{config['mid_block_type']!r} is not supported; use 'UNetMidBlock2DCrossAttn' or None.")
  n = len(down)
  req(n >= 1 and len(up) == n, "up_block_types",
      f"needs as many entries as down_block_types ({n}), got {len(up)}.")
  channels = _per_block(config, "block_out_channels", n, where)
  req(isinstance(config["block_out_channels"], (list, tuple)), "block_out_channels",
      "must be a list with one entry per block.")
  req(config["act_fn"] in ("silu", "swish"), "act_fn",
      f"{config['act_fn']!r} is not supported; only 'silu' (alias 'swish').")
  groups = config["norm_num_groups"]
  req(_is_pos_int(groups), "norm_num_groups", f"must be a positive int, got {groups!r}.")
  req(all(c % groups == 0 for c in channels), "norm_num_groups",
      f"{groups} must divide every block_out_channels entry {channels}.")
  heads = _per_block(config, "attention_head_dim", n, where)
  for i, (c, h) in enumerate(zip(channels, heads)):
    req(c % h == 0, "attention_head_dim",
        f"block {i}: {h} heads (diffusers' `attention_head_dim` is the head count) must divide "
        f"its {c} channels.")
  _per_block(config, "layers_per_block", n, where)
  _per_block(config, "cross_attention_dim", n, where)
  tl = config["transformer_layers_per_block"]
  req(not (isinstance(tl, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tl)),
      "transformer_layers_per_block", "nested (asymmetric) lists are not supported.")
  _per_block(config, "transformer_layers_per_block", n, where)
  for key in ("in_channels", "out_channels"):
    req(_is_pos_int(config[key]), key, f"must be a positive int, got {config[key]!r}.")
  for key in ("conv_in_kernel", "conv_out_kernel"):
    req(_is_pos_int(config[key]) and config[key] % 2 == 1, key,
        f"must be a positive odd int, got {config[key]!r}.")
  req(config["downsample_padding"] in (0, 1), "downsample_padding",
      f"must be 0 or 1, got {config['downsample_padding']!r}.")
  req(config["time_embedding_dim"] is None or _is_pos_int(config["time_embedding_dim"]),
      "time_embedding_dim", f"must be None or a positive int, got "
      f"{config['time_embedding_dim']!r}.")
  for key in ("use_linear_projection", "upcast_attention", "center_input_sample",
              "flip_sin_to_cos"):
    req(isinstance(config[key], bool), key, f"must be true or false, got {config[key]!r}.")
  return config


class CrossAttnDownBlock2D(nnx.Module):
  """(resnet -> transformer) x num_layers, then an optional stride-2 downsampler."""

  def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int, num_layers: int,
               transformer_layers: int, heads: int, cross_attention_dim: int, groups: int,
               eps: float, use_linear_projection: bool, add_downsample: bool,
               downsample_padding: int, attention_impl: str | None, dtype: Any,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                      temb_channels=temb_channels, groups=groups, eps=eps, dtype=dtype, rngs=rngs)
        for i in range(num_layers)])
    self.attentions = nnx.List([
        Transformer2DModel(out_channels, heads=heads, dim_head=out_channels // heads,
                           num_layers=transformer_layers, cross_attention_dim=cross_attention_dim,
                           norm_num_groups=groups, use_linear_projection=use_linear_projection,
                           attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=downsample_padding,
                                                dtype=dtype, rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x, temb, context, mask, remat: bool):
    outputs = ()
    for resnet, attn in zip(self.resnets, self.attentions):
      x = call_maybe_remat(resnet, x, temb, remat=remat)
      x = call_maybe_remat(attn, x, context, mask, remat=remat)
      outputs += (x,)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      outputs += (x,)
    return x, outputs


class DownBlock2D(nnx.Module):
  """resnet x num_layers, then an optional stride-2 downsampler."""

  def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int, num_layers: int,
               groups: int, eps: float, add_downsample: bool, downsample_padding: int,
               dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                      temb_channels=temb_channels, groups=groups, eps=eps, dtype=dtype, rngs=rngs)
        for i in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=downsample_padding,
                                                dtype=dtype, rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x, temb, context, mask, remat: bool):
    del context, mask  # no attention here; same signature as CrossAttnDownBlock2D
    outputs = ()
    for resnet in self.resnets:
      x = call_maybe_remat(resnet, x, temb, remat=remat)
      outputs += (x,)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      outputs += (x,)
    return x, outputs


def _up_resnets(in_channels: int, out_channels: int, prev_output_channel: int, num_layers: int,
                temb_channels: int, groups: int, eps: float, dtype: Any,
                rngs: nnx.Rngs) -> nnx.List:
  # Resnet i sees the previous output concatenated with a skip; diffusers' channel bookkeeping.
  return nnx.List([
      ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                    + (in_channels if i == num_layers - 1 else out_channels), out_channels,
                    temb_channels=temb_channels, groups=groups, eps=eps, dtype=dtype, rngs=rngs)
      for i in range(num_layers)])


class CrossAttnUpBlock2D(nnx.Module):
  """(concat skip -> resnet -> transformer) x num_layers, then an optional upsampler."""

  def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, *,
               temb_channels: int, num_layers: int, transformer_layers: int, heads: int,
               cross_attention_dim: int, groups: int, eps: float, use_linear_projection: bool,
               add_upsample: bool, attention_impl: str | None, dtype: Any, rngs: nnx.Rngs):
    self.resnets = _up_resnets(in_channels, out_channels, prev_output_channel, num_layers,
                               temb_channels, groups, eps, dtype, rngs)
    self.attentions = nnx.List([
        Transformer2DModel(out_channels, heads=heads, dim_head=out_channels // heads,
                           num_layers=transformer_layers, cross_attention_dim=cross_attention_dim,
                           norm_num_groups=groups, use_linear_projection=use_linear_projection,
                           attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x, skips, temb, context, mask, upsample_size, remat: bool):
    for resnet, attn in zip(self.resnets, self.attentions):
      x = jnp.concatenate([x, skips[-1].astype(x.dtype)], axis=-1)
      skips = skips[:-1]
      x = call_maybe_remat(resnet, x, temb, remat=remat)
      x = call_maybe_remat(attn, x, context, mask, remat=remat)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UpBlock2D(nnx.Module):
  """(concat skip -> resnet) x num_layers, then an optional upsampler."""

  def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, *,
               temb_channels: int, num_layers: int, groups: int, eps: float,
               add_upsample: bool, dtype: Any, rngs: nnx.Rngs):
    self.resnets = _up_resnets(in_channels, out_channels, prev_output_channel, num_layers,
                               temb_channels, groups, eps, dtype, rngs)
    self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x, skips, temb, context, mask, upsample_size, remat: bool):
    del context, mask  # no attention here; same signature as CrossAttnUpBlock2D
    for resnet in self.resnets:
      x = jnp.concatenate([x, skips[-1].astype(x.dtype)], axis=-1)
      skips = skips[:-1]
      x = call_maybe_remat(resnet, x, temb, remat=remat)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UNetMidBlock2DCrossAttn(nnx.Module):
  """resnet -> (transformer -> resnet); resnets divide by `output_scale_factor`."""

  def __init__(self, channels: int, *, temb_channels: int, transformer_layers: int, heads: int,
               cross_attention_dim: int, groups: int, eps: float, output_scale_factor: float,
               use_linear_projection: bool, attention_impl: str | None, dtype: Any,
               rngs: nnx.Rngs):
    resnet = lambda: ResnetBlock2D(channels, channels, temb_channels=temb_channels, groups=groups,
                                   eps=eps, output_scale_factor=output_scale_factor, dtype=dtype,
                                   rngs=rngs)
    self.resnets = nnx.List([resnet(), resnet()])
    self.attentions = nnx.List([
        Transformer2DModel(channels, heads=heads, dim_head=channels // heads,
                           num_layers=transformer_layers, cross_attention_dim=cross_attention_dim,
                           norm_num_groups=groups, use_linear_projection=use_linear_projection,
                           attention_impl=attention_impl, dtype=dtype, rngs=rngs)])

  def __call__(self, x, temb, context, mask, remat: bool):
    x = call_maybe_remat(self.resnets[0], x, temb, remat=remat)
    x = call_maybe_remat(self.attentions[0], x, context, mask, remat=remat)
    return call_maybe_remat(self.resnets[1], x, temb, remat=remat)


class UNet2DConditionModel(nnx.Module):
  """The conditional UNet of Stable Diffusion 1.x/2.x/Turbo, NHWC, diffusers-named.

  Args:
    config: a diffusers UNet config dict (as read from config.json); checked by `parse_config`
      and kept, defaults filled, as the plain dict `self.config`.
    dtype: compute dtype (float32 or bfloat16); parameters are always float32.
    remat: rematerialise each resnet and transformer in the backward pass (`nnx.remat`).
    attention_impl: passed to `jax.nn.dot_product_attention(implementation=...)`: None lets jax
      choose (XLA today), 'cudnn' asks for the fused GPU kernel (bf16/fp16 only).
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
    n = len(config["down_block_types"])
    channels = list(config["block_out_channels"])
    heads = _per_block(config, "attention_head_dim", n, "config")
    layers = _per_block(config, "layers_per_block", n, "config")
    cross = _per_block(config, "cross_attention_dim", n, "config")
    tlayers = _per_block(config, "transformer_layers_per_block", n, "config")
    groups, eps = config["norm_num_groups"], config["norm_eps"]
    linear_proj = config["use_linear_projection"]
    common = dict(dtype=dtype, rngs=rngs)

    self.conv_in = conv(config["in_channels"], channels[0], config["conv_in_kernel"], **common)
    temb_dim = config["time_embedding_dim"] or channels[0] * 4
    self.time_embedding = TimestepEmbedding(channels[0], temb_dim, **common)

    down_blocks = []
    out_ch = channels[0]
    for i, block_type in enumerate(config["down_block_types"]):
      in_ch, out_ch = out_ch, channels[i]
      kw = dict(temb_channels=temb_dim, num_layers=layers[i], groups=groups, eps=eps,
                add_downsample=i < n - 1, downsample_padding=config["downsample_padding"],
                **common)
      if block_type == "CrossAttnDownBlock2D":
        down_blocks.append(CrossAttnDownBlock2D(
            in_ch, out_ch, transformer_layers=tlayers[i], heads=heads[i],
            cross_attention_dim=cross[i], use_linear_projection=linear_proj,
            attention_impl=attention_impl, **kw))
      else:
        down_blocks.append(DownBlock2D(in_ch, out_ch, **kw))
    self.down_blocks = nnx.List(down_blocks)

    mid_block = None
    if config["mid_block_type"] == "UNetMidBlock2DCrossAttn":
      mid_block = UNetMidBlock2DCrossAttn(
          channels[-1], temb_channels=temb_dim, transformer_layers=tlayers[-1], heads=heads[-1],
          cross_attention_dim=cross[-1], groups=groups, eps=eps,
          output_scale_factor=config["mid_block_scale_factor"],
          use_linear_projection=linear_proj, attention_impl=attention_impl, **common)
    self.mid_block = mid_block

    rev = lambda xs: list(reversed(xs))
    r_channels, r_heads, r_layers = rev(channels), rev(heads), rev(layers)
    r_cross, r_tlayers = rev(cross), rev(tlayers)
    up_blocks = []
    out_ch = r_channels[0]
    for i, block_type in enumerate(config["up_block_types"]):
      prev_ch, out_ch = out_ch, r_channels[i]
      in_ch = r_channels[min(i + 1, n - 1)]
      kw = dict(temb_channels=temb_dim, num_layers=r_layers[i] + 1, groups=groups, eps=eps,
                add_upsample=i < n - 1, **common)
      if block_type == "CrossAttnUpBlock2D":
        up_blocks.append(CrossAttnUpBlock2D(
            in_ch, out_ch, prev_ch, transformer_layers=r_tlayers[i], heads=r_heads[i],
            cross_attention_dim=r_cross[i], use_linear_projection=linear_proj,
            attention_impl=attention_impl, **kw))
      else:
        up_blocks.append(UpBlock2D(in_ch, out_ch, prev_ch, **kw))
    self.up_blocks = nnx.List(up_blocks)

    self.conv_norm_out = nnx.GroupNorm(channels[0], groups, epsilon=eps, use_fast_variance=False,
                                       **common)
    self.conv_out = conv(channels[0], config["out_channels"], config["conv_out_kernel"], **common)

  def _check_inputs(self, sample: Array, context: Array, mask: Array | None) -> None:
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg["in_channels"]:
      raise FapeError(f"{_NAME}: sample must be NHWC with {cfg['in_channels']} channels, got "
                      f"shape {tuple(sample.shape)}.")
    ctx_dims = set(_per_block(cfg, "cross_attention_dim", len(cfg["down_block_types"]), "config"))
    if (context.ndim != 3 or context.shape[0] != sample.shape[0]
        or context.shape[-1] not in ctx_dims):
      raise FapeError(f"{_NAME}: encoder_hidden_states must be (B={sample.shape[0]}, K, "
                      f"{'/'.join(map(str, sorted(ctx_dims)))}), got {tuple(context.shape)}.")
    if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
      raise FapeError(f"{_NAME}: encoder_attention_mask must be (B, K) = "
                      f"{tuple(context.shape[:2])}, got {tuple(mask.shape)}.")

  def __call__(self, sample: Array, timesteps: Array | float | int, encoder_hidden_states: Array,
               encoder_attention_mask: Array | None = None) -> Array:
    """Predicts the model output (noise / v / x0 per the checkpoint's training) for NHWC `sample`.

    Args:
      sample: (B, H, W, in_channels).
      timesteps: scalar or (B,) (ints or floats).
      encoder_hidden_states: (B, K, cross_attention_dim) context tokens.
      encoder_attention_mask: optional (B, K) bool/0-1, True = keep. Masked tokens get zero
        attention weight: their values cannot influence the output.
    Returns:
      (B, H, W, out_channels) in the compute dtype.
    """
    cfg = self.config
    self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask)
    batch = sample.shape[0]
    t = jnp.asarray(timesteps)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
      raise FapeError(f"{_NAME}: timesteps must be a scalar or shape ({batch},), got "
                      f"{tuple(t.shape)}.")
    t = jnp.broadcast_to(t.reshape(-1), (batch,))
    mask = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
    context = encoder_hidden_states.astype(self.dtype)

    x = sample.astype(self.dtype)
    if cfg["center_input_sample"]:
      x = 2 * x - 1.0
    t_emb = timestep_embedding(t, cfg["block_out_channels"][0],
                               flip_sin_to_cos=cfg["flip_sin_to_cos"],
                               freq_shift=cfg["freq_shift"]).astype(self.dtype)
    emb = self.time_embedding(t_emb)

    x = self.conv_in(x)
    skips = (x,)
    for block in self.down_blocks:
      x, outputs = block(x, emb, context, mask, self.remat)
      skips += outputs
    if self.mid_block is not None:
      x = self.mid_block(x, emb, context, mask, self.remat)

    # Sizes that are not a multiple of 2**(number of upsamplers) upsample to the skip's size.
    factor = 2 ** (len(self.up_blocks) - 1)
    forward_size = any(d % factor for d in sample.shape[1:3])
    for i, block in enumerate(self.up_blocks):
      n_res = len(block.resnets)
      res, skips = skips[-n_res:], skips[:-n_res]
      upsample_size = (tuple(skips[-1].shape[1:3])
                       if forward_size and i < len(self.up_blocks) - 1 else None)
      x = block(x, res, emb, context, mask, upsample_size, self.remat)

    x = group_norm(self.conv_norm_out, x, silu=True)
    return self.conv_out(x)


def from_diffusers(path: str | os.PathLike[str], dtype: Any = jnp.float32, remat: bool = False,
                   *, attention_impl: str | None = None) -> UNet2DConditionModel:
  """Loads a diffusers UNet (model folder, or pipeline folder with `unet/`) as a ready module.

  Reads `config.json` and `diffusion_pytorch_model[.fp16].safetensors` (sharded or not; `.bin`
  only if torch is installed) to numpy, builds the module abstractly (no random init) and fills
  it strictly: unused tensors, missing parameters and shape mismatches are FapeErrors.
  """
  raw, tensors, folder = convert.read_model_folder(path, "unet")
  config = parse_config(raw, where=os.path.join(folder, "config.json"))
  model = nnx.eval_shape(lambda: UNet2DConditionModel(config, dtype=dtype, remat=remat,
                                                      attention_impl=attention_impl,
                                                      rngs=nnx.Rngs(0)))
  return convert.load_state_into(model, tensors, strict=True, where=folder)
