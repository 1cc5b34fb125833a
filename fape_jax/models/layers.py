"""Building blocks shared by the UNet and the VAE, mirroring diffusers' module tree.

Every attribute name here is the name diffusers gives the same sub-module, so that a parameter's
Flax path joined with dots *is* its diffusers state-dict name (`convert.py` only renames the leaf:
`kernel`/`scale` -> `weight`). Tensors are NHWC; token sequences are (B, L, C) with L = H * W
flattened row-major, exactly as diffusers flattens its NCHW maps after moving channels last.

Parameters are always float32 (`param_dtype`); `dtype` is the compute dtype. Normalisation
statistics and attention softmax run in float32 whatever `dtype` is (flax and `attend` upcast
internally).

Projections are always *called* (`self.to_q(x)`), never read as `.kernel` in a forward pass, so
another module (the LoRA-MoE adapters) can replace `to_q`, `to_k`, `to_v`, `to_out[0]` and the
resnets' `conv1`/`conv2` with wrappers of the same call signature.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Dtype = Any

# flax's default `use_fast_variance=True` computes E[x^2] - E[x]^2, which loses precision on
# activations with large means; diffusers (torch) uses the two-pass variance. We match it.
_NORM_KW = {"use_fast_variance": False}


def call_maybe_remat(module: Callable[..., Any], *args: Any, remat: bool) -> Any:
  """Calls `module(*args)`, under `nnx.remat` (gradient rematerialisation) when `remat` is set.

  Used per resnet and per transformer (the same granularity as diffusers' gradient
  checkpointing): their activations are recomputed in the backward pass instead of stored.
  """
  if not remat:
    return module(*args)
  return nnx.remat(lambda m, *a: m(*a))(module, *args)


def group_norm(norm: nnx.GroupNorm, x: Array, *, silu: bool = False) -> Array:
  """`norm(x)`, then SiLU when `silu`: the one place the UNet normalises, so an implementation
  can be swapped and timed (a fused custom-VJP version measured slower: bench/whatif.py)."""
  y = norm(x)
  return jax.nn.silu(y) if silu else y


def timestep_embedding(timesteps: Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> Array:
  """Sinusoidal timestep features, as diffusers' `get_timestep_embedding` (float32 out)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """`time_embedding`: linear_1 -> SiLU -> linear_2."""

  def __init__(self, in_features: int, time_embed_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.linear_1 = nnx.Linear(in_features, time_embed_dim, dtype=dtype, rngs=rngs)
    self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


def conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1,
         padding: Any = None, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """An NHWC `nnx.Conv` with torch's symmetric `kernel // 2` padding unless told otherwise."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride, padding=padding,
                  dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
  """diffusers' `ResnetBlock2D` with `time_embedding_norm="default"` and SiLU.

  norm1 -> silu -> conv1 (+ time_emb_proj(silu(temb))) -> norm2 -> silu -> conv2, plus the input
  (through `conv_shortcut` when channels change), divided by `output_scale_factor`.
  """

  def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None,
               groups: int, eps: float, groups_out: int | None = None,
               output_scale_factor: float = 1.0, dtype: Dtype, rngs: nnx.Rngs):
    groups_out = groups if groups_out is None else groups_out
    self.output_scale_factor = output_scale_factor
    self.norm1 = nnx.GroupNorm(in_channels, groups, epsilon=eps, dtype=dtype, rngs=rngs, **_NORM_KW)
    self.conv1 = conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.time_emb_proj = (nnx.Linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
                          if temb_channels is not None else None)
    self.norm2 = nnx.GroupNorm(out_channels, groups_out, epsilon=eps, dtype=dtype, rngs=rngs,
                               **_NORM_KW)
    self.conv2 = conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: Array, temb: Array | None = None) -> Array:
    h = self.conv1(group_norm(self.norm1, x, silu=True))
    if self.time_emb_proj is not None and temb is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(group_norm(self.norm2, h, silu=True))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nnx.Module):
  """Stride-2 3x3 `conv`. `padding=0` pads right/bottom by one first, like diffusers."""

  def __init__(self, channels: int, *, padding: int, dtype: Dtype, rngs: nnx.Rngs):
    pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding),) * 2
    self.conv = conv(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  # torch's `F.interpolate(mode="nearest", size=...)`: src = floor(dst * in / out).
  return np.minimum(np.floor(np.arange(size_out) * (size_in / size_out)).astype(np.int32),
                    size_in - 1)


def upsample_nearest(x: Array, output_size: tuple[int, int] | None = None) -> Array:
  """Nearest-neighbour upsampling of NHWC `x`: 2x, or to `output_size` with torch's rounding."""
  if output_size is None:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  h, w = x.shape[1:3]
  x = jnp.take(x, _nearest_indices(h, output_size[0]), axis=1)
  return jnp.take(x, _nearest_indices(w, output_size[1]), axis=2)


class Upsample2D(nnx.Module):
  """Nearest 2x (or to a given size) then a 3x3 `conv`."""

  def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, output_size: tuple[int, int] | None = None) -> Array:
    return self.conv(upsample_nearest(x, output_size))


# jax.nn.dot_product_attention's fill for masked logits: exp() of it minus any real logit is 0.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


# `_attention_deferred` takes long query sequences (whole-image restoration, SD-2.1-sized
# latents) in blocks of about this many queries, one block's (B, N, block, S) scores at a time.
# Each query row's softmax is independent, so the result is the same (to float32 rounding: the
# matmul kernels may split other row counts differently); the score tensor never exists whole
# (6 GiB of temporaries planned for a whole 512^2 image at the base config, 320 MiB blocked),
# and the blocks stay in cache: 2.9x faster at 4,096 tokens, 1.6x at 1,024 on the 2-core CPU
# (XLA:CPU's passes over the score tensor are memory-bound). Shorter sequences (training
# crops) keep the single-block program.
_QUERY_BLOCK = 256
_BLOCKED_FROM = 4 * _QUERY_BLOCK


def _attention_deferred(q: Array, k: Array, v: Array, kv_mask: Array | None) -> Array:
  """softmax(q k^T / sqrt(d)) v with the softmax's division after the value matmul.

  q (B, T, N, D), k and v (B, S, N, D), kv_mask (B, S) bool; float32 logits and sums as
  `jax.nn.dot_product_attention`'s XLA path, with the same masked fill, so a fully masked row
  is uniform there too. Dividing the (B, T, N, D) result instead of the (B, N, T, S)
  probabilities skips a pass over the score tensor forward and backward: 1-2.5 % of the base
  config's train step on CPU (BENCHMARKS.md, `attention_deferred`). From `_BLOCKED_FROM`
  queries on, the queries go through in blocks (`jax.lax.map`), as above.
  """
  b, t, n, d = q.shape
  if t < _BLOCKED_FROM:
    return _attention_block(q, k, v, kv_mask)
  blocks = -(-t // _QUERY_BLOCK)
  size = -(-t // blocks)  # equal blocks, padded by fewer than `blocks` query rows
  q = jnp.pad(q, ((0, 0), (0, blocks * size - t), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(b, blocks, size, n, d), 1, 0)
  out = jax.lax.map(lambda qb: _attention_block(qb, k, v, kv_mask), q)
  return jnp.moveaxis(out, 0, 1).reshape(b, blocks * size, n, d)[:, :t]


def _attention_block(q: Array, k: Array, v: Array, kv_mask: Array | None) -> Array:
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(q.shape[-1]))
  if kv_mask is not None:
    logits = jnp.where(kv_mask[:, None, None, :], logits, _MASKED_LOGIT)
  # Any per-row shift gives the same result; the max keeps exp() finite. No gradient needed.
  p = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  total = jnp.sum(p, axis=-1)                                    # (B, N, T)
  out = jnp.einsum("bnts,bsnd->btnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / jnp.swapaxes(total, 1, 2)[..., None]).astype(q.dtype)


def attend(q: Array, k: Array, v: Array, kv_mask: Array | None,
           implementation: str | None = None) -> Array:
  """Multi-head attention of (B, T, N, D) queries over (B, S, N, D) keys/values.

  `jax.nn.dot_product_attention` (cuDNN on GPUs when asked for), except with no implementation
  asked for on CPU, where `_attention_deferred` computes the same numbers faster.
  """
  if implementation is None and jax.default_backend() == "cpu":
    return _attention_deferred(q, k, v, kv_mask)
  mask = None if kv_mask is None else kv_mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class Attention(nnx.Module):
  """diffusers' `Attention` with its default processor, through `attend`.

  Self-attention when `context` is None, else cross-attention over `context` (B, K, C_ctx).
  `mask` (B, K) bool marks context tokens to keep; masked tokens get exactly zero weight, and a
  query whose context is entirely masked gets a zero attention result (so `to_out[0]` sees 0),
  unlike a softmax over an all-masked row, so padded tokens never influence the output.
  The VAE variant (`norm_num_groups` set) takes NHWC maps, group-normalises them, adds the input
  back and divides by `rescale_output_factor`, as diffusers' deprecated-attention-block path does.

  The logits and softmax are float32 for any compute dtype (`attend` upcasts them), which is what
  diffusers' `upcast_attention` asks for; bfloat16 also has float32's exponent range, so the fp16
  overflow that flag guards against cannot happen here.
  """

  def __init__(self, query_dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: int | None = None, bias: bool = False,
               out_bias: bool = True, norm_num_groups: int | None = None, eps: float = 1e-5,
               residual_connection: bool = False, rescale_output_factor: float = 1.0,
               attention_impl: str | None = None, dtype: Dtype, rngs: nnx.Rngs):
    inner = heads * dim_head
    kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
    self.heads = heads
    self.residual_connection = residual_connection
    self.rescale_output_factor = rescale_output_factor
    self.attention_impl = attention_impl
    self.group_norm = (nnx.GroupNorm(query_dim, norm_num_groups, epsilon=eps, dtype=dtype,
                                     rngs=rngs, **_NORM_KW)
                       if norm_num_groups is not None else None)
    self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
    self.to_k = nnx.Linear(kv_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
    self.to_v = nnx.Linear(kv_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
    # diffusers' to_out is [Linear, Dropout]; only index 0 holds parameters.
    self.to_out = nnx.List([nnx.Linear(inner, query_dim, use_bias=out_bias, dtype=dtype,
                                       rngs=rngs)])

  def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None) -> Array:
    residual = x
    spatial_shape = x.shape if x.ndim == 4 else None
    if spatial_shape is not None:
      b, h, w, c = spatial_shape
      x = x.reshape(b, h * w, c)
    if self.group_norm is not None:
      x = self.group_norm(x)
    ctx = x if context is None else context
    q = self.to_q(x)
    k = self.to_k(ctx).astype(q.dtype)
    v = self.to_v(ctx).astype(q.dtype)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, t.shape[2] // self.heads)
    kv_mask = None if mask is None else mask.astype(bool)
    out = attend(split(q), split(k), split(v), kv_mask, self.attention_impl)
    if mask is not None:
      out = jnp.where(jnp.any(mask.astype(bool), axis=-1)[:, None, None, None], out, 0)
    out = self.to_out[0](out.reshape(q.shape[0], q.shape[1], -1))
    if spatial_shape is not None:
      out = out.reshape(spatial_shape[:3] + (out.shape[-1],))
    if self.residual_connection:
      out = out + residual
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out


class GEGLU(nnx.Module):
  """`ff.net.0`: proj to 2x inner width, `hidden * gelu(gate)` (exact erf GELU, as torch)."""

  def __init__(self, dim_in: int, dim_out: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.proj = nnx.Linear(dim_in, dim_out * 2, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """`ff`: net = [GEGLU, Dropout (rate 0, no parameters), Linear], as diffusers indexes it."""

  def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype, rngs: nnx.Rngs):
    inner = dim * mult
    self.net = nnx.List([GEGLU(dim, inner, dtype=dtype, rngs=rngs), nnx.Dropout(0.0),
                         nnx.Linear(inner, dim, dtype=dtype, rngs=rngs)])

  def __call__(self, x: Array) -> Array:
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm (eps 1e-5), residuals."""

  def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int,
               attention_impl: str | None, dtype: Dtype, rngs: nnx.Rngs):
    ln = lambda: nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs, **_NORM_KW)
    attn = lambda ctx_dim: Attention(dim, heads=heads, dim_head=dim_head,
                                     cross_attention_dim=ctx_dim, attention_impl=attention_impl,
                                     dtype=dtype, rngs=rngs)
    self.norm1 = ln()
    self.attn1 = attn(None)
    self.norm2 = ln()
    self.attn2 = attn(cross_attention_dim)
    self.norm3 = ln()
    self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context, mask)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm (eps 1e-6) -> proj_in -> transformer_blocks -> proj_out, plus the input.

  `proj_in`/`proj_out` are 1x1 convs, or Linears with `use_linear_projection` (SD 2.x).
  """

  def __init__(self, in_channels: int, *, heads: int, dim_head: int, num_layers: int,
               cross_attention_dim: int, norm_num_groups: int, use_linear_projection: bool,
               attention_impl: str | None, dtype: Dtype, rngs: nnx.Rngs):
    inner = heads * dim_head
    self.use_linear_projection = use_linear_projection
    self.norm = nnx.GroupNorm(in_channels, norm_num_groups, epsilon=1e-6, dtype=dtype, rngs=rngs,
                              **_NORM_KW)
    if use_linear_projection:
      self.proj_in = nnx.Linear(in_channels, inner, dtype=dtype, rngs=rngs)
    else:
      self.proj_in = conv(in_channels, inner, 1, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads=heads, dim_head=dim_head,
                              cross_attention_dim=cross_attention_dim,
                              attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    if use_linear_projection:
      self.proj_out = nnx.Linear(inner, in_channels, dtype=dtype, rngs=rngs)
    else:
      self.proj_out = conv(inner, in_channels, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
    b, h, w, c = x.shape
    residual = x
    x = group_norm(self.norm, x)
    if self.use_linear_projection:
      x = self.proj_in(x.reshape(b, h * w, c))
    else:
      x = self.proj_in(x)
      x = x.reshape(b, h * w, x.shape[-1])
    for block in self.transformer_blocks:
      x = block(x, context, mask)
    if self.use_linear_projection:
      x = self.proj_out(x).reshape(b, h, w, c)
    else:
      x = self.proj_out(x.reshape(b, h, w, x.shape[-1]))
    return x + residual
