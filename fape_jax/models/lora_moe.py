"""Frequency-aware LoRA mixture of experts (METHOD.md section 4): band split, experts, routers.

Adapters are added to an already-built UNet by *module surgery*: every `nnx.Linear` (and, with
`conv_lora`, every `nnx.Conv`) whose path matches the config's patterns is replaced by a wrapper
that keeps the original as `base` and adds LoRA experts and a router. The UNet's module
definitions stay untouched.

Variable types carry the training contract:
  * `AdapterParam` (a subclass of `nnx.Param`): every expert, router and projector weight. Training
    splits the model with `nnx.split(model, AdapterParam, ...)`; base weights are plain `nnx.Param`
    and never reach the optimiser.
  * `RoutingInput`: per-call inputs (projected plan tokens, mask, image descriptor) that
    `run_adapted` writes into each wrapper before the UNet runs.
  * `AdapterAux` (an `nnx.Intermediate`): per-call outputs of each wrapper (routing weights and
    its frequency-loss term); `run_adapted` creates them before the call, each wrapper overwrites
    its own, and `run_adapted` reads them afterwards.
`run_adapted` does this on a per-call copy of the module graph (same arrays), so the caller's
module only ever holds parameters.

Why Variables on the wrappers: a value a wrapper reads from a contextvar inside `nnx.remat`
becomes a constant of the traced checkpoint, and JAX caches that trace per function object, so a
UNet that builds its remat'd block function once would silently reuse the first call's plan
tokens. Variables are ordinary inputs and outputs of every transform (jit, remat in graph and tree
mode, split/merge), so they are never stale. Outputs are written into Variables that exist before
the call rather than sown: tree-mode `nnx.remat` drops Variables created inside it, and (flax
0.12.8) `nnx.capture` breaks `nnx.remat` over any module holding an `nnx.List`. The grid size is
a static attribute for the same reason as the inputs (it shapes reshapes: a Python int).

Each MoE wrapper computes
  out = base(x) + sum_i a_i * s_i * B_i A_i x_i,   x_0 = L(x), x_1 = x - L(x),   s_i = alpha / r_i,
with `a` the routing weights. Band split (`bands.BandFilter`):
  * 'grid2d' (default) / 'fft2d': Gaussian low-pass on the H x W token grid, transfer
    2^(-(f/cutoff)^2) (half gain at `cutoff` cycles per token step), circular; applied as two
    dense circulant matmuls (the transfer is separable) or with `jnp.fft.rfft2`: the same numbers.
  * 'fir1d': the authors' 9-tap Gaussian FIR (sigma 2) along the flattened token axis, zero 'same'
    padding.
A linear wrapper sees (B, L, C) tokens; the grid (h, w) is found from L and the UNet input size
(h = ceil(H / 2^k), w = ceil(W / 2^k)). Conv wrappers see NHWC directly.

Projections whose input is the plan context (cross-attention k/v, `context_patterns`): the tokens
of a plan have no spatial spectrum, so both experts see the full context (no band split), the
layer has no frequency-loss term, and the visual prior comes from the image descriptor when
enabled (else the text router alone decides).

Routers (per wrapper, all weights `AdapterParam`, all zero-initialised so every router starts
uniform and training moves it):
  * text: per-token linear + softmax over the projected plan tokens (truncated to the layer's token
    count, as the paper pads/truncates to the image length), masked mean pool -> w_text (B, 2).
  * spectral prior: p_low = e_low / (e_low + e_high) of the layer input, w_visual =
    softmax([p_low, 1 - p_low] / T); with the image descriptor a learned linear term is added to
    those logits. The energies are a measurement: gradient is stopped at them.
  * fusion: a = lambda_s * w_text + (1 - lambda_s) * w_visual, lambda_s = sigmoid(learned scalar).
  * optional token gate (authors' code): g = softmax(gate(x) / 5) per token, blended with `a` by a
    second sigmoid scalar. Token-wise on linear layers, mean-pooled over pixels on conv layers.
  * top-1 ('all' layers, the 'first' adapted layer only as in the authors' code, or 'none' = soft):
    - 'ste': forward exactly one-hot; backward the straight-through estimator, i.e. the
      gradient of the soft weights `a`, so the routers and lambda_s learn from the task loss.
    - 'epsilon' (authors; default, with top1='first'): the loser keeps `epsilon` of its weight, renormalised
      (w = a * [1 | eps] / sum); near one-hot forward, genuine gradient through `a` for both shares.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fape_jax.errors import FapeError
from fape_jax.models.bands import BandFilter, band_leakage, token_grid
from fape_jax.models.paths import path_str


class AdapterParam(nnx.Param):
  """A trainable adapter, router or projector weight (everything else in the executor is frozen)."""


class AdapterAux(nnx.Intermediate):
  """Per-call outputs of a wrapper: routing weights (B, 2) and its frequency-loss term."""


class RoutingInput(nnx.Variable):
  """Per-call routing inputs written into the wrappers by `run_adapted` and removed after it."""


VARIANTS = ("moe", "dense")
BAND_MODES = ("fft2d", "grid2d", "fir1d")
TOP1_LAYERS = ("all", "first", "none")
TOP1_MODES = ("ste", "epsilon")


def default_lora_config() -> ml_collections.ConfigDict:
  """The adapter settings, paper defaults. Fields:

  variant: 'moe' (two frequency experts + routers) or 'dense' (one plain LoRA, no routing:
    an ablation).
  ranks: rank per expert (low, high); 'dense' uses ranks[0]. The paper uses 8/8; 8/16 also works.
  alpha: LoRA alpha; each expert's output is scaled by alpha / its rank.
  patterns: regexes over module paths ('down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q')
    selecting the `nnx.Linear` layers to adapt. Default: q, k, v and out of every attention.
  conv_lora: also adapt the `nnx.Conv` layers matching `conv_patterns` (ResNet convs) with conv-LoRA
    (A = conv with the base kernel size/stride/padding to rank channels, B = 1x1 to out channels).
  context_patterns: adapted layers whose input is the plan context (cross-attention k/v).
  band_mode: 'fft2d' (Gaussian on the token grid, via rfft2), 'grid2d' (the same filter as two
    dense matmuls) or 'fir1d' (authors' 1-D FIR).
  cutoff: 'fft2d' half-gain frequency in cycles per token step (0 < cutoff <= 0.5); 0.094 matches
    the transfer function of a Gaussian with sigma 2 tokens, the authors' FIR.
  fir_taps, fir_sigma: the 'fir1d' filter (odd tap count).
  text_router / spectral_router / token_gate: which routers feed the fusion (at least one).
  temperature: T of the spectral prior softmax([p_low, 1 - p_low] / T).
  gate_temperature: the token gate's softmax temperature (authors: 5).
  lambda_init: initial lambda_s (text vs visual); the token-gate blend starts at 0.5.
  image_descriptor: feed radial FFT band energies of the degraded image to the visual prior.
  descriptor_bands: number of radial bands of that descriptor.
  top1: 'all' | 'first' | 'none' (soft mixing). 'first' = the first adapted layer in module-tree
    order (sorted paths; on the SD UNet down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k)
    routes top-1, the others mix softly (authors' code). top1_mode: 'ste' | 'epsilon';
    top1_epsilon: the loser's share in 'epsilon' mode (authors: 0.01).
  projector_hidden: hidden width of the plan projector MLP; 0 = the UNet's cross_attention_dim.
  """
  c = ml_collections.ConfigDict()
  c.variant = "moe"
  c.ranks = (8, 8)
  c.alpha = 1.0
  c.patterns = (r"(^|\.)attn\d+\.to_(q|k|v|out\.0)$",)
  c.conv_lora = False
  c.conv_patterns = (r"(^|\.)resnets\.\d+\.conv[12]$",)
  c.context_patterns = (r"(^|\.)attn2\.to_(k|v)$",)
  c.band_mode = "grid2d"  # = fft2d up to rounding, ~2x faster on CPU (BENCHMARKS.md)
  c.cutoff = 0.094
  c.fir_taps = 9
  c.fir_sigma = 2.0
  c.text_router = True
  c.spectral_router = True
  c.token_gate = False
  c.temperature = 1.0
  c.gate_temperature = 5.0
  c.lambda_init = 0.5
  c.image_descriptor = False
  c.descriptor_bands = 8
  # The authors' scheme: top-1 in the first adapted layer only, the loser keeping 1 % (so it still
  # gets a gradient), soft mixing elsewhere. Straight-through top-1 on every layer with B = 0 at
  # start leaves the expert that loses the first argmax with exactly zero output and gradient.
  c.top1 = "first"
  c.top1_mode = "epsilon"
  c.top1_epsilon = 0.01
  c.projector_hidden = 0
  return c


def check_lora_config(config: Mapping[str, Any] | ml_collections.ConfigDict
                      ) -> ml_collections.FrozenConfigDict:
  """Defaults filled in, every field checked; returns a frozen (hashable) copy. Raises FapeError."""
  c = default_lora_config().to_dict()
  given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(given) - set(c))
  if unknown:
    raise FapeError(f"lora config: unknown field(s) {unknown}; known fields: {sorted(c)}.")
  c.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})

  def bad(field, why):
    raise FapeError(f"lora config.{field}={c[field]!r}: {why}")

  def number(field):
    return isinstance(c[field], (int, float)) and not isinstance(c[field], bool)

  for field, options in (("variant", VARIANTS), ("band_mode", BAND_MODES), ("top1", TOP1_LAYERS),
                         ("top1_mode", TOP1_MODES)):
    if c[field] not in options:
      bad(field, f"must be one of {options}.")
  if isinstance(c["ranks"], int) and not isinstance(c["ranks"], bool):
    c["ranks"] = (c["ranks"],) * 2
  ranks = c["ranks"]
  if (not isinstance(ranks, tuple) or len(ranks) != 2 or
      not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks)):
    bad("ranks", "give two positive integer ranks (low-band expert, high-band expert), e.g. "
        "(8, 8), or one integer for both.")
  for field in ("alpha", "temperature", "gate_temperature", "fir_sigma"):
    if not (number(field) and c[field] > 0):
      bad(field, "must be a number > 0.")
  if not (number("cutoff") and 0 < c["cutoff"] <= 0.5):
    bad("cutoff", "must be in (0, 0.5] cycles per token step.")
  if not (number("lambda_init") and 0 < c["lambda_init"] < 1):
    bad("lambda_init", "must be in (0, 1) (it is a sigmoid's value).")
  if not (number("top1_epsilon") and 0 < c["top1_epsilon"] < 1):
    bad("top1_epsilon", "must be in (0, 1).")
  if not (isinstance(c["fir_taps"], int) and c["fir_taps"] > 0 and c["fir_taps"] % 2 == 1):
    bad("fir_taps", "must be a positive odd integer.")
  if not (isinstance(c["descriptor_bands"], int) and c["descriptor_bands"] >= 2):
    bad("descriptor_bands", "must be an integer >= 2.")
  if not (isinstance(c["projector_hidden"], int) and c["projector_hidden"] >= 0):
    bad("projector_hidden", "must be an integer >= 0 (0 = cross_attention_dim).")
  if c["variant"] == "moe" and not (c["text_router"] or c["spectral_router"] or c["token_gate"]
                                    or c["image_descriptor"]):
    raise FapeError("lora config: variant 'moe' with every router off (text_router, "
                    "spectral_router, token_gate, image_descriptor); enable one, or use "
                    "variant='dense' for a single LoRA.")
  for field in ("patterns", "conv_patterns", "context_patterns"):
    if isinstance(c[field], str):
      c[field] = (c[field],)
    for p in c[field]:
      try:
        re.compile(p)
      except (re.error, TypeError) as e:
        raise FapeError(f"lora config.{field}: {p!r} is not a valid regex ({e}).") from None
  return ml_collections.FrozenConfigDict(c)


# ------------------------------------------------------------------------------------------------
# Routers.


def spectral_prior_logits(x_low: jax.Array, x_high: jax.Array) -> jax.Array:
  """[p_low, 1 - p_low] per sample from the band energies of (B, L, C) tokens; no gradient."""
  e_low = jnp.mean(jnp.square(x_low), axis=(1, 2))
  e_high = jnp.mean(jnp.square(x_high), axis=(1, 2))
  p_low = e_low / (e_low + e_high + 1e-12)
  return jax.lax.stop_gradient(jnp.stack([p_low, 1.0 - p_low], axis=-1))


def pooled_token_weights(logits: jax.Array, mask: jax.Array | None,
                         max_tokens: int | None = None) -> jax.Array:
  """Masked mean over tokens of softmax(logits) (B, K, 2) -> (B, 2); tokens past `max_tokens` drop.

  A sample with no valid token gets uniform weights.
  """
  if max_tokens is not None:
    logits = logits[:, :max_tokens]
    mask = None if mask is None else mask[:, :max_tokens]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if mask is None:
    return jnp.mean(probs, axis=1)
  m = mask.astype(jnp.float32)[..., None]
  count = jnp.sum(m, axis=1)
  pooled = jnp.sum(probs * m, axis=1) / jnp.maximum(count, 1.0)
  return jnp.where(count > 0, pooled, 0.5)


def top1(weights: jax.Array, mode: str = "ste", epsilon: float = 0.01) -> jax.Array:
  """Top-1 routing over the last axis (see the module docstring for the gradient of each mode)."""
  hard = jax.nn.one_hot(jnp.argmax(weights, axis=-1), weights.shape[-1], dtype=weights.dtype)
  if mode == "ste":
    # Parenthesised: (a - sg(a)) is exactly 0, while (hard + a) - a is not exactly hard.
    return hard + (weights - jax.lax.stop_gradient(weights))
  if mode == "epsilon":
    kept = weights * jnp.where(hard > 0, 1.0, epsilon)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)
  raise FapeError(f"top1 mode {mode!r}: must be one of {TOP1_MODES}.")


def image_frequency_descriptor(images: jax.Array, num_bands: int = 8) -> jax.Array:
  """Radial FFT band energies of NHWC images: (B, num_bands), log10 energy fraction / 8.

  The gray image's mean is removed (brightness is not a frequency), the power spectrum is summed
  over `num_bands` equal-width rings of normalised radius (1 = the corner frequency), and each
  ring's share of the total is log-scaled to about [-1, 0]. Shapes are static: runs under jit.
  """
  if images.ndim != 4:
    raise FapeError(f"image descriptor: expected NHWC images, got shape {images.shape}.")
  gray = jnp.mean(images.astype(jnp.float32), axis=-1)
  gray = gray - jnp.mean(gray, axis=(1, 2), keepdims=True)
  _, h, w = gray.shape
  power = jnp.square(jnp.abs(jnp.fft.rfft2(gray)))
  radius = jnp.sqrt(jnp.fft.fftfreq(h)[:, None] ** 2 + jnp.fft.rfftfreq(w)[None, :] ** 2)
  ring = jnp.minimum((radius / math.sqrt(0.5) * num_bands).astype(jnp.int32), num_bands - 1)
  # rfft2 stores half the spectrum: the columns that stand for two frequencies count twice.
  col = jnp.arange(w // 2 + 1)
  weight = jnp.where((col == 0) | ((w % 2 == 0) & (col == w // 2)), 1.0, 2.0)
  energy = jax.ops.segment_sum((power * weight).reshape(power.shape[0], -1).T, ring.ravel(),
                               num_segments=num_bands).T
  frac = energy / (jnp.sum(energy, axis=-1, keepdims=True) + 1e-12)
  return jnp.log10(frac + 1e-8) / 8.0


# ------------------------------------------------------------------------------------------------
# Layers.


def _retype_as_adapter(layer: nnx.Module) -> nnx.Module:
  """Turns a fresh layer's `nnx.Param`s into `AdapterParam`s (the train-only-adapters filter)."""
  for name in ("kernel", "bias"):
    var = getattr(layer, name, None)
    if isinstance(var, nnx.Param):
      setattr(layer, name, AdapterParam(var.get_value()))
  return layer


def adapter_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                   kernel_init=nnx.initializers.zeros_init(), dtype=None) -> nnx.Linear:
  """An `nnx.Linear` whose weights are `AdapterParam` (zero-initialised unless told otherwise)."""
  return _retype_as_adapter(nnx.Linear(in_features, out_features, use_bias=use_bias,
                                       kernel_init=kernel_init, dtype=dtype, rngs=rngs))


class LoRAExpert(nnx.Module):
  """One LoRA expert s * B(A(x)): A Kaiming-uniform, B zero. Conv bases get conv-LoRA."""

  def __init__(self, base: nnx.Linear | nnx.Conv, rank: int, alpha: float, *, rngs: nnx.Rngs):
    kaiming = jax.nn.initializers.kaiming_uniform()
    if isinstance(base, nnx.Conv):
      if base.feature_group_count != 1 or base.mask is not None:
        raise FapeError("conv-LoRA supports plain convolutions only (feature_group_count=1, no "
                        "mask); leave grouped/masked convs out of lora config.conv_patterns.")
      self.A = _retype_as_adapter(nnx.Conv(
          base.in_features, rank, kernel_size=base.kernel_size, strides=base.strides,
          padding=base.padding, input_dilation=base.input_dilation,
          kernel_dilation=base.kernel_dilation, use_bias=False, kernel_init=kaiming,
          dtype=base.dtype, rngs=rngs))
    else:
      self.A = adapter_linear(base.in_features, rank, use_bias=False, kernel_init=kaiming,
                              dtype=base.dtype, rngs=rngs)
    self.B = adapter_linear(rank, base.out_features, use_bias=False, dtype=base.dtype, rngs=rngs)
    self.scale = alpha / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.B(self.A(x)) * self.scale


class Router(nnx.Module):
  """The learned parts of one layer's routing (the spectral prior itself has no weights)."""

  def __init__(self, in_features: int, config, *, context_dim: int, spectral: bool,
               rngs: nnx.Rngs):
    if config.text_router:
      self.text = adapter_linear(context_dim, 2, rngs=rngs)
    if config.image_descriptor:
      self.descriptor = adapter_linear(config.descriptor_bands, 2, rngs=rngs)
    if config.text_router and (spectral or config.image_descriptor):
      lam = config.lambda_init
      self.lambda_logit = AdapterParam(jnp.asarray(math.log(lam / (1 - lam)), jnp.float32))
    if config.token_gate:
      self.gate = adapter_linear(in_features, 2, rngs=rngs)
      self.gate_mix = AdapterParam(jnp.zeros((), jnp.float32))  # sigmoid(0) = 0.5


def _routing_inputs(layer: nnx.Module) -> dict[str, jax.Array]:
  return {name: getattr(layer, name).get_value() for name in ("context", "context_mask",
                                                               "descriptor")
          if isinstance(getattr(layer, name, None), RoutingInput)}


class LoRAMoE(nnx.Module):
  """A frozen `nnx.Linear`/`nnx.Conv` plus a low- and a high-frequency LoRA expert and a router."""

  def __init__(self, base: nnx.Linear | nnx.Conv, config, *, context_input: bool, top1: bool,
               context_dim: int, rngs: nnx.Rngs):
    self.base = base
    self.expert0 = LoRAExpert(base, config.ranks[0], config.alpha, rngs=rngs)
    self.expert1 = LoRAExpert(base, config.ranks[1], config.alpha, rngs=rngs)
    self.spectral = config.spectral_router and not context_input
    self.router = Router(base.in_features, config, context_dim=context_dim,
                         spectral=self.spectral, rngs=rngs)
    self.band = BandFilter.from_config(config)
    self.context_input = context_input
    self.temperature = float(config.temperature)
    self.gate_temperature = float(config.gate_temperature)
    self.top1 = top1
    self.top1_mode = config.top1_mode
    self.top1_epsilon = float(config.top1_epsilon)
    self.input_hw: tuple[int, int] | None = None  # set per call by `run_adapted`

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.input_hw is None:
      raise FapeError("An adapted UNet layer was called without routing inputs: run the UNet "
                      "through `Executor` or `lora_moe.run_adapted(unet, ..., input_hw=...)`.")
    inputs = _routing_inputs(self)
    y = self.base(x)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.context_input:
      x_low = x_high = x
      prior_logits = None
    else:
      grid = x.shape[1:3] if x.ndim == 4 else token_grid(x.shape[1], self.input_hw)
      low, high = self.band.split(tokens, grid)
      prior_logits = spectral_prior_logits(low, high) if self.spectral else None
      x_low, x_high = low.reshape(x.shape).astype(x.dtype), high.reshape(x.shape).astype(x.dtype)
    y0, y1 = self.expert0(x_low), self.expert1(x_high)
    weights = self._route(tokens, inputs, prior_logits)
    # (B, 2) per sample, or (B, L, 2) per token with the token gate on a linear layer.
    w = weights if weights.ndim == y.ndim else weights.reshape(
        (weights.shape[0],) + (1,) * (y.ndim - 2) + (2,))
    out = y + (w[..., 0:1] * y0 + w[..., 1:2] * y1).astype(y.dtype)
    pooled = weights if weights.ndim == 2 else jnp.mean(weights, axis=1)
    self.aux_routing.set_value(pooled.astype(jnp.float32))
    if not self.context_input:
      out_grid = (y0.shape[1], y0.shape[2]) if y0.ndim == 4 else grid
      flat = lambda a: a.reshape(a.shape[0], -1, a.shape[-1])  # noqa: E731
      self.aux_freq.set_value(band_leakage(
          flat(y0), flat(y1), lambda t: self.band.lowpass(t, out_grid)))
    return out

  def _route(self, tokens: jax.Array, inputs: Mapping[str, jax.Array],
             prior_logits: jax.Array | None) -> jax.Array:
    r = self.router
    batch = tokens.shape[0]
    w_text = None
    if hasattr(r, "text"):
      if "context" not in inputs:
        raise FapeError("The text router needs the projected plan tokens: run the UNet through "
                        "`Executor` or pass `context=` to `lora_moe.run_adapted`.")
      ctx = inputs["context"]
      max_tokens = None if self.context_input else tokens.shape[1]
      w_text = pooled_token_weights(r.text(ctx), inputs.get("context_mask"), max_tokens)
    visual_logits = prior_logits
    if hasattr(r, "descriptor"):
      if "descriptor" not in inputs:
        raise FapeError("lora config.image_descriptor is on but no image descriptor was given; "
                        "run the UNet through `Executor`.")
      d = r.descriptor(inputs["descriptor"].astype(jnp.float32))
      visual_logits = d if visual_logits is None else visual_logits + d
    w_visual = (None if visual_logits is None
                else jax.nn.softmax(visual_logits / self.temperature, axis=-1))
    if w_text is not None and w_visual is not None:
      lam = jax.nn.sigmoid(r.lambda_logit.get_value())
      weights = lam * w_text + (1.0 - lam) * w_visual
    else:
      weights = w_text if w_text is not None else w_visual
    if hasattr(r, "gate"):
      gate = jax.nn.softmax(r.gate(tokens).astype(jnp.float32) / self.gate_temperature, axis=-1)
      if isinstance(self.base, nnx.Conv):  # conv outputs may live on another grid: pool
        gate = jnp.mean(gate, axis=1)
      if weights is None:
        weights = gate
      else:
        mix = jax.nn.sigmoid(r.gate_mix.get_value())
        weights = mix * gate + (1.0 - mix) * (weights if gate.ndim == 2 else weights[:, None])
    if weights is None:  # a context layer with only the spectral router on: nothing to go by
      weights = jnp.full((batch, 2), 0.5, jnp.float32)
    if self.top1:
      weights = top1(weights, self.top1_mode, self.top1_epsilon)
    return weights


class DenseLoRA(nnx.Module):
  """The 'dense' ablation: a frozen layer plus one plain LoRA, no band split, no routing."""

  def __init__(self, base: nnx.Linear | nnx.Conv, config, *, rngs: nnx.Rngs):
    self.base = base
    self.expert0 = LoRAExpert(base, config.ranks[0], config.alpha, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    return y + self.expert0(x).astype(y.dtype)


ADAPTED_TYPES = (LoRAMoE, DenseLoRA)


# ------------------------------------------------------------------------------------------------
# Surgery and calling.


def _child(node, key):
  return node[key] if isinstance(key, int) else getattr(node, key)


def _replace_child(root: nnx.Module, path: Sequence[Any], new: nnx.Module) -> None:
  parent = root
  for key in path[:-1]:
    parent = _child(parent, key)
  key = path[-1]
  if isinstance(key, int):
    parent[key] = new
  else:
    setattr(parent, key, new)


def is_context_layer(name: str, context_patterns: Sequence[str]) -> bool:
  """Whether the adapted layer at module path `name` takes the plan context as input (no band
  split, no spectral prior): it matches one of the lora config's `context_patterns`."""
  return any(re.search(p, name) for p in context_patterns)


def add_adapters(model: nnx.Module, config, *, context_dim: int, rngs: nnx.Rngs) -> list[str]:
  """Replaces every matched layer of `model` (in place) with an adapted wrapper; returns the paths.

  `context_dim` is the width of the (projected) plan tokens the text router reads, i.e. the UNet's
  cross_attention_dim. Raises FapeError when nothing matches, a pattern hits a layer of the wrong
  type, or the model already has adapters.
  """
  config = check_lora_config(config)
  linear_re = [re.compile(p) for p in config.patterns]
  conv_re = [re.compile(p) for p in config.conv_patterns] if config.conv_lora else []
  targets = []
  for path, module in nnx.iter_modules(model):
    name = path_str(path)
    if isinstance(module, ADAPTED_TYPES):
      raise FapeError(f"{name} already has adapters; build the executor from a plain UNet.")
    want_linear = any(p.search(name) for p in linear_re)
    want_conv = any(p.search(name) for p in conv_re)
    if not (want_linear or want_conv):
      continue
    if (want_linear and isinstance(module, nnx.Linear) or
        want_conv and isinstance(module, nnx.Conv)):
      targets.append((path, name, module))
    elif want_linear:
      raise FapeError(f"lora config.patterns matched {name}, a {type(module).__name__}, not an "
                      "nnx.Linear; narrow the pattern.")
    elif want_conv:
      raise FapeError(f"lora config.conv_patterns matched {name}, a {type(module).__name__}, not "
                      "an nnx.Conv; narrow the pattern.")
  if not targets:
    conv = f" or conv_patterns {tuple(config.conv_patterns)}" if config.conv_lora else ""
    raise FapeError(f"lora config: no layer of the {type(model).__name__} matches patterns "
                    f"{tuple(config.patterns)}{conv}; paths look like "
                    "'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'.")
  for i, (path, name, module) in enumerate(targets):
    if config.variant == "dense":
      wrapped = DenseLoRA(module, config, rngs=rngs)
    else:
      wrapped = LoRAMoE(module, config, context_input=is_context_layer(name, config.context_patterns),
                        top1=config.top1 == "all" or (config.top1 == "first" and i == 0),
                        context_dim=context_dim, rngs=rngs)
    _replace_child(model, path, wrapped)
  return [name for _, name, _ in targets]


def adapted_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  """(path, wrapper) for every adapted layer of `model`."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, ADAPTED_TYPES):
      yield path_str(path), module


@contextlib.contextmanager
def bound_routing_inputs(model: nnx.Module, *, batch: int, input_hw: Sequence[int],
                         context: jax.Array | None = None, context_mask: jax.Array | None = None,
                         descriptor: jax.Array | None = None):
  """Gives every MoE wrapper its per-call inputs and fresh output slots; yields the wrappers.

  On exit the inputs and output slots are removed again, so the model's state between calls holds
  parameters only.
  """
  given = {"context": context, "context_mask": context_mask, "descriptor": descriptor}
  given = {k: v for k, v in given.items() if v is not None}
  layers = [(name, m) for name, m in adapted_layers(model) if isinstance(m, LoRAMoE)]
  for _, m in layers:
    m.input_hw = (int(input_hw[0]), int(input_hw[1]))
    for name, value in given.items():
      setattr(m, name, RoutingInput(value))
    m.aux_routing = AdapterAux(jnp.full((batch, 2), 0.5, jnp.float32))
    if not m.context_input:
      m.aux_freq = AdapterAux(jnp.zeros((), jnp.float32))
  try:
    yield layers
  finally:
    for _, m in layers:
      m.input_hw = None
      for name in (*given, "aux_routing", "aux_freq"):
        if hasattr(m, name):
          delattr(m, name)


def run_adapted(model: nnx.Module, sample: jax.Array, *args, input_hw: Sequence[int],
                context: jax.Array | None = None, context_mask: jax.Array | None = None,
                descriptor: jax.Array | None = None, **kwargs) -> tuple[Any, dict[str, Any]]:
  """Calls `model(sample, *args, **kwargs)` with routing inputs bound; returns (output, aux).

  `input_hw` is the (H, W) of the UNet input, `context` (B, K, cross_attention_dim) the projected
  plan tokens, `context_mask` (B, K) their validity, `descriptor` (B, bands) the image descriptor.
  aux = {'routing': {layer path: (B, 2) weights}, 'freq_terms': {layer path: scalar}}; for a
  layer with token-wise routing the weights are averaged over tokens.
  """
  aux = {"routing": {}, "freq_terms": {}}
  # Bind on a fresh copy of the graph (new Module and Variable objects, the same arrays), so the
  # caller's module is never mutated: this works on a module closed over by `jax.jit`, and under
  # `jax.grad` of an `nnx.merge`d module, where nnx.remat's write-back would otherwise touch
  # Variables of an outer trace.
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, state, copy=True)
  with bound_routing_inputs(model, batch=sample.shape[0], input_hw=input_hw, context=context,
                            context_mask=context_mask, descriptor=descriptor) as layers:
    out = model(sample, *args, **kwargs)
    for name, m in layers:
      aux["routing"][name] = m.aux_routing.get_value()
      if not m.context_input:
        aux["freq_terms"][name] = m.aux_freq.get_value()
  return out, aux


def parameter_counts(model: nnx.Module) -> dict[str, int]:
  """Numbers of base (frozen `nnx.Param`) and trainable (`AdapterParam`) parameters."""
  count = lambda state: sum(int(np.prod(np.shape(v.get_value())))  # noqa: E731
                            for _, v in nnx.to_flat_state(state))
  adapters = nnx.state(model, AdapterParam)
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam)))
  return {"base": count(base), "trainable": count(adapters)}


# ------------------------------------------------------------------------------------------------
# Plan projector.


class PlanProjector(nnx.Module):
  """Plan tokens (B, K, plan_dim) -> context (B, K, context_dim); padded tokens zeroed.

  LayerNorm (no learned scale: the cached widths differ wildly in magnitude, MiniLM vs Qwen hidden
  states) -> Linear -> SiLU -> Linear. `plan_dim=None` (the "no plan context" ablation) keeps only
  the learned null context token, which is also what `null_context` returns when a batch comes
  without plan tokens. All weights are `AdapterParam`.
  """

  def __init__(self, plan_dim: int | None, context_dim: int, *, hidden_dim: int = 0,
               rngs: nnx.Rngs):
    self.plan_dim = plan_dim
    self.context_dim = context_dim
    if plan_dim is not None:
      hidden_dim = hidden_dim or context_dim
      lecun = nnx.initializers.lecun_normal()
      self.norm = nnx.LayerNorm(plan_dim, use_scale=False, use_bias=False, rngs=rngs)
      self.fc1 = adapter_linear(plan_dim, hidden_dim, kernel_init=lecun, rngs=rngs)
      self.fc2 = adapter_linear(hidden_dim, context_dim, kernel_init=lecun, rngs=rngs)
    # Zero = "no information": cross-attention then adds only its output bias until trained.
    self.null_token = AdapterParam(jnp.zeros((1, 1, context_dim), jnp.float32))

  def null_context(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(self.null_token.get_value(), (batch, 1, self.context_dim))

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if self.plan_dim is None:
      raise FapeError("This executor was built without plan context (plan_dim=None) but got plan "
                      "tokens; pass plan_tokens=None or build it with the plan width.")
    if tokens.ndim != 3 or tokens.shape[-1] != self.plan_dim:
      raise FapeError(f"plan tokens: expected (B, K, {self.plan_dim}), got {tokens.shape}; the "
                      "executor's plan_dim must match the plan store's token width.")
    h = self.fc2(jax.nn.silu(self.fc1(self.norm(tokens.astype(jnp.float32)))))
    if mask is not None:
      if mask.shape != tokens.shape[:2]:
        raise FapeError(f"plan mask: expected shape {tokens.shape[:2]}, got {mask.shape}.")
      h = h * mask.astype(h.dtype)[..., None]
    return h
