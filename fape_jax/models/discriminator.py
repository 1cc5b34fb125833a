"""The multi-level spectral-norm discriminator (METHOD.md section 5) and the adversarial losses.

A feature backbone gives maps at three depths (the first at least 25 %, 50 %, 100 % of its layers
deep, by default) and a pooled embedding. Each map gets a trainable head

    BlurPool -> SN conv3x3 stride 2 (head_width) -> LeakyReLU 0.2 -> BlurPool -> SN conv1x1 -> 1 ch

averaged over space; the embedding gets SN-Linear -> LeakyReLU -> SN-Linear. D(x), a logit of shape
(B,), is the mean of the L + 1 level scores. Images are NHWC in [-1, 1].

Backbones (`config.backbone`):
- "conv": a small trainable conv stack (the embedded default, widths `config.conv_widths`), one
  SN conv3x3 stride 2 + LeakyReLU per stage. Its convs are spectral-normed too: the heads' Lipschitz
  bound would mean little on top of an unconstrained trainable backbone.
- "vgg16": a frozen pretrained torchvision VGG16 (`fape_jax.models.lpips.VGG16Features`, taps
  relu1_2 ... relu5_3) loaded from `config.vgg16_path`. The paper uses a frozen SigLIP-v2 vision
  tower; VGG16 is the only pretrained backbone we have in JAX, so it stands in.

Variable types, so that the train step can split the module by filter instead of copying it:
- `nnx.Param` (`TRAINABLE`): heads and the conv backbone: the discriminator optimiser's filter.
- `nnx.BatchStat` (`POWER_ITERATION_STATE`): each SN layer's power-iteration vector `u` and last
  `sigma`, created by `nnx.SpectralNorm`.
- `PretrainedWeight` (`FROZEN`): the VGG16 backbone; never in `nnx.Param`, so never optimised
  (gradients still flow through it to the input image, as the generator's adversarial term needs).

Spectral norm in a pure train step. `nnx.SpectralNorm` runs `n_steps` of power iteration on each
call and, when `update_stats` is true, writes the new `u`/`sigma` into its `nnx.BatchStat`
variables. So the discriminator step calls D once on the concatenated real+fake batch with
`update_stats=True` and returns the new BatchStat state as an auxiliary output:

    graphdef, params, stats, frozen = nnx.split(disc, TRAINABLE, POWER_ITERATION_STATE, ...)

    def d_loss(params, stats, real, fake):
      d = nnx.merge(graphdef, params, stats, frozen, copy=True)
      logits = d(jnp.concatenate([real, fake]), update_stats=True)
      loss = discriminator_loss(logits[:len(real)], logits[len(real):])
      return loss, nnx.state(d, POWER_ITERATION_STATE)

    (loss, stats), grads = jax.value_and_grad(d_loss, has_aux=True)(params, stats, real, fake)

`copy=True` gives the merged module fresh Variables at the current trace level: without it, under
`jax.jit` + `jax.grad`, the BatchStat write-back raises flax's TraceContextError (the Variables in
`stats` belong to the outer jit trace). With NNX's own transforms (`nnx.value_and_grad(...,
argnums=nnx.DiffState(0, TRAINABLE))` and `nnx.Optimizer(disc, tx, wrt=TRAINABLE)`), the BatchStat
writes simply persist in the module. The generator step calls D with `update_stats=False` (it
must not advance D's state), and so does evaluation. Without the argument, the mode set by
`disc.train()` / `disc.eval()` applies.

Flax's `nnx.SpectralNorm` also overwrites the wrapped kernel with the normalised one on every call
(google/flax#5576), which under `nnx.grad`/`nnx.Optimizer` would make the optimiser step the
normalised kernel with the raw kernel's gradient. `_SpectralNorm` below restores the raw kernel
after the call, giving the paper's (and torch's/Linen's) W / sigma(W) reparameterisation whichever
way the train step is written.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from fape_jax.errors import FapeError
from fape_jax.models.lpips import TAP_DEPTHS, PretrainedWeight, load_vgg16_features

TRAINABLE = nnx.Param
POWER_ITERATION_STATE = nnx.BatchStat
FROZEN = PretrainedWeight
BACKBONES = ("conv", "vgg16")


def default_discriminator_config() -> ml_collections.ConfigDict:
  """Discriminator settings; the embedded default is the trainable conv backbone."""
  c = ml_collections.ConfigDict()
  c.backbone = "conv"  # "conv" (trainable, no weights needed) or "vgg16" (frozen, pretrained)
  c.vgg16_path = ""  # torchvision VGG16 checkpoint (.pth/.safetensors/.npz) for backbone="vgg16"
  c.conv_widths = (32, 64, 128, 128)  # conv backbone: one stride-2 stage per width
  c.level_fractions = (0.25, 0.5, 1.0)  # depths whose feature maps get a head (paper: 3 levels)
  c.head_width = 512  # paper: 512 channels in each head's conv3x3
  c.blur_stride = 2  # BlurPool = binomial blur + subsampling (Zhang 2019)
  c.leaky_slope = 0.2
  c.power_iterations = 1  # per call, as in torch.nn.utils.spectral_norm
  c.real_target = 0.8  # one-sided label smoothing; fake target is 0
  return c


class _SpectralNorm(nnx.SpectralNorm):
  """`nnx.SpectralNorm` that leaves the raw kernel untouched (see the module docstring)."""

  def __call__(self, x, update_stats: bool | None = None):
    raw = self.layer_instance.kernel[...]
    y = super().__call__(x, update_stats)
    self.layer_instance.kernel[...] = raw
    return y


def _sn(layer: nnx.Module, n_steps: int, rngs: nnx.Rngs) -> _SpectralNorm:
  return _SpectralNorm(layer, n_steps=n_steps, rngs=rngs)


def blur_pool(x: jax.Array, stride: int) -> jax.Array:
  """Depthwise [1, 2, 1] x [1, 2, 1] / 16 blur with reflect padding, then subsampling.

  Hand-written: no JAX library ships BlurPool; this is antialiased-cnns' filt_size=3 variant.
  """
  c = x.shape[-1]
  k = jnp.asarray(np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0, x.dtype)
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  return jax.lax.conv_general_dilated(x, jnp.tile(k[:, :, None, None], (1, 1, 1, c)),
                                      (stride, stride), "VALID", feature_group_count=c,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvBackbone(nnx.Module):
  """Trainable SN conv stack: per stage conv3x3 stride 2 + LeakyReLU; returns every stage's map."""

  def __init__(self, widths: Sequence[int], slope: float, n_steps: int, *, rngs: nnx.Rngs):
    cins = (3,) + tuple(widths[:-1])
    self.convs = nnx.List([
        _sn(nnx.Conv(ci, co, (3, 3), strides=2, padding="SAME", rngs=rngs), n_steps, rngs)
        for ci, co in zip(cins, widths)])
    self.slope = slope
    self.channels = tuple(widths)

  def __call__(self, x: jax.Array, update_stats: bool | None = None) -> list[jax.Array]:
    maps = []
    for conv in self.convs:
      x = jax.nn.leaky_relu(conv(x, update_stats), self.slope)
      maps.append(x)
    return maps


class _Head(nnx.Module):
  """BlurPool -> SN conv3x3 s2 -> LeakyReLU -> BlurPool -> SN conv1x1 -> 1 ch -> spatial mean."""

  def __init__(self, cin: int, width: int, blur_stride: int, slope: float, n_steps: int, *,
               rngs: nnx.Rngs):
    self.conv = _sn(nnx.Conv(cin, width, (3, 3), strides=2, padding="SAME", rngs=rngs), n_steps,
                    rngs)
    self.out = _sn(nnx.Conv(width, 1, (1, 1), rngs=rngs), n_steps, rngs)
    self.blur_stride = blur_stride
    self.slope = slope

  def __call__(self, f: jax.Array, update_stats: bool | None) -> jax.Array:
    h = self.conv(blur_pool(f, self.blur_stride), update_stats)
    h = jax.nn.leaky_relu(h, self.slope)
    h = self.out(blur_pool(h, self.blur_stride), update_stats)
    return jnp.mean(h, axis=(1, 2, 3))


class _PooledHead(nnx.Module):
  """SN-Linear -> LeakyReLU -> SN-Linear on the pooled embedding."""

  def __init__(self, cin: int, width: int, slope: float, n_steps: int, *, rngs: nnx.Rngs):
    self.fc1 = _sn(nnx.Linear(cin, width, rngs=rngs), n_steps, rngs)
    self.fc2 = _sn(nnx.Linear(width, 1, rngs=rngs), n_steps, rngs)
    self.slope = slope

  def __call__(self, e: jax.Array, update_stats: bool | None) -> jax.Array:
    return self.fc2(jax.nn.leaky_relu(self.fc1(e, update_stats), self.slope), update_stats)[:, 0]


def _pick_levels(depth_fractions: Sequence[float], wanted: Sequence[float], where: str
                 ) -> tuple[int, ...]:
  """For each wanted fraction, the shallowest backbone map at least that deep; must be distinct.

  "At least that deep" rather than "nearest" has no ties: with 3 stages (depths 1/3, 2/3, 1),
  (0.25, 0.5, 1.0) picks all three; VGG16 gives relu2_2, relu3_3, relu5_3 (4/13, 7/13, 13/13).
  """
  if not wanted or any(not 0.0 < f <= 1.0 for f in wanted):
    raise FapeError(f"{where}.level_fractions={tuple(wanted)}: give one or more depth fractions "
                    "in (0, 1], e.g. (0.25, 0.5, 1.0).")
  idx = tuple(next(i for i, d in enumerate(depth_fractions) if d >= f - 1e-9) for f in wanted)
  if len(set(idx)) != len(idx):
    raise FapeError(f"{where}.level_fractions={tuple(wanted)} map to the same backbone layers "
                    f"{idx} (the backbone has {len(depth_fractions)} feature maps); use fewer "
                    "levels or a deeper backbone (more conv_widths).")
  return idx


class Discriminator(nnx.Module):
  """D(x) -> (B,) logits for NHWC images in [-1, 1]; see the module docstring."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               where: str = "config.discriminator"):
    if config.backbone not in BACKBONES:
      raise FapeError(f"{where}.backbone={config.backbone!r}: choose one of {BACKBONES}.")
    n_steps = int(config.power_iterations)
    if config.backbone == "vgg16":
      if not config.vgg16_path:
        raise FapeError(f"{where}.backbone='vgg16' needs {where}.vgg16_path (a local torchvision "
                        "VGG16 checkpoint); set it, or use backbone='conv'.")
      depths = TAP_DEPTHS
    else:
      widths = tuple(int(w) for w in config.conv_widths)
      if not widths or min(widths) < 1:
        raise FapeError(f"{where}.conv_widths={widths}: give one or more positive widths.")
      depths = tuple((i + 1) / len(widths) for i in range(len(widths)))
    # Checked before any weights are built or read.
    self.levels = _pick_levels(depths, tuple(config.level_fractions), where)
    if config.backbone == "vgg16":
      self.backbone = load_vgg16_features(config.vgg16_path)
    else:
      self.backbone = ConvBackbone(widths, config.leaky_slope, n_steps, rngs=rngs)
    chans = self.backbone.channels
    self.heads = nnx.List([
        _Head(chans[i], config.head_width, config.blur_stride, config.leaky_slope, n_steps,
              rngs=rngs) for i in self.levels])
    self.pooled = _PooledHead(chans[-1], config.head_width, config.leaky_slope, n_steps,
                              rngs=rngs)

  def __call__(self, x: jax.Array, update_stats: bool | None = None) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise FapeError(f"Discriminator: expected NHWC RGB images in [-1, 1], got shape {x.shape}.")
    if isinstance(self.backbone, ConvBackbone):
      maps = self.backbone(x, update_stats)
    else:
      maps = self.backbone(x)
    scores = [head(maps[i], update_stats) for head, i in zip(self.heads, self.levels)]
    scores.append(self.pooled(jnp.mean(maps[-1], axis=(1, 2)), update_stats))
    return jnp.mean(jnp.stack(scores), axis=0)


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array,
                       real_target: float = 0.8) -> jax.Array:
  """BCE with logits: real -> `real_target` (one-sided smoothing), fake -> 0; sum of both means."""
  real = optax.sigmoid_binary_cross_entropy(real_logits, jnp.full_like(real_logits, real_target))
  fake = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
  return jnp.mean(real) + jnp.mean(fake)


def generator_adversarial_loss(fake_logits: jax.Array, real_target: float = 0.8) -> jax.Array:
  """BCE(D(x_hat), real_target): the generator is pushed toward the (smoothed) real label."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      fake_logits, jnp.full_like(fake_logits, real_target)))
