"""PyTorch reference for the train-step benchmark: diffusers' UNet + a two-expert LoRA in torch.

The same executor as fape_jax's, built from the same config (read at run time, so a changed
`configs/base.py` UNet is benchmarked as it is):
  * diffusers `UNet2DConditionModel(**config.model.unet)` (+ `AutoencoderKL(**config.model.vae)`
    for latent configs), fixed timestep, no noise, `residual` as in the config;
  * the plan projector (LayerNorm without scale, Linear, SiLU, Linear; padded tokens zeroed);
  * q, k, v and out of every attention wrapped by `LoRAMoELinear`: a low- and a high-band expert
    (rank `config.model.lora.ranks`, scale alpha / rank, A Kaiming-uniform, B zero), band split by
    the Gaussian FFT low-pass on the token grid (transfer 2^(-(f / cutoff)^2), `torch.fft.rfft2`),
    cross-attention k/v see the plan context unsplit; router = text router (zero-initialised
    linear over the context tokens, softmax, masked mean) fused by a learned sigmoid scalar with
    the spectral prior softmax([p_low, 1 - p_low] / T), top-1 with a straight-through gradient;
  * loss = w_mse * MSE + w_freq * L_freq (L_freq: mean over image-token layers of
    mean(|H(y_low)|^2) + mean(|L(y_high)|^2)), AdamW, gradient clipping at `config.optim.clip_norm`.
This is the part of the fape_jax train step that has a like-for-like PyTorch counterpart (no
discriminator, no LPIPS, AdamW instead of Prodigy); `bench/train_step.py` times a JAX step with the
same objective next to it. Hand-written here (not in the library) because it exists only to be
timed against.

  .venv/bin/python bench/torch_reference.py [--config=configs/base.py[:variant]] [--steps=5]

prints eager (and `torch.compile`, when it works here) step times as JSON.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import measure  # noqa: F401  (puts the repo root on sys.path)
from inputs import random_batch


# --------------------------------------------------------------------------------------------
# Band split and routing (mirrors fape_jax.models.lora_moe; tests/test_bench.py checks parity).


def gaussian_transfer(h: int, w: int, cutoff: float) -> torch.Tensor:
  """rfft2-shaped (h, w // 2 + 1) Gaussian transfer function, 0.5 at `cutoff` cycles per step."""
  fy = torch.fft.fftfreq(h)[:, None]
  fx = torch.fft.rfftfreq(w)[None, :]
  return torch.exp2(-(fy ** 2 + fx ** 2) / cutoff ** 2)


def lowpass(tokens: torch.Tensor, grid: tuple[int, int], cutoff: float) -> torch.Tensor:
  """L(tokens) for (B, L, C) tokens laid out row-major on an (h, w) grid (circular, float32)."""
  b, n, c = tokens.shape
  h, w = grid
  x = tokens.float().reshape(b, h, w, c)
  spec = torch.fft.rfft2(x, dim=(1, 2))
  spec = spec * gaussian_transfer(h, w, cutoff).to(x.device)[None, :, :, None]
  return torch.fft.irfft2(spec, s=(h, w), dim=(1, 2)).reshape(b, n, c)


def token_grid(num_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int]:
  """(ceil(H / 2^k), ceil(W / 2^k)) holding `num_tokens` tokens, as fape_jax.models.lora_moe."""
  h, w = input_hw
  for k in range(32):
    hk, wk = -(-h // 2 ** k), -(-w // 2 ** k)
    if hk * wk == num_tokens:
      return hk, wk
  raise ValueError(f"{num_tokens} tokens are no downsampled grid of {h} x {w}")


class CallContext:
  """Per-call inputs (input size, projected plan tokens, mask) and outputs (L_freq terms)."""

  def __init__(self):
    self.input_hw: tuple[int, int] = (0, 0)
    self.context: torch.Tensor | None = None
    self.mask: torch.Tensor | None = None
    self.freq_terms: list[torch.Tensor] = []
    self.want_freq = True  # False when restoring: L_freq is a training term only


class LoRAMoELinear(nn.Module):
  """A frozen or trainable `nn.Linear` + a low- and a high-frequency LoRA expert + a router."""

  def __init__(self, base: nn.Linear, *, ranks: tuple[int, int], alpha: float, cutoff: float,
               temperature: float, lambda_init: float, context_input: bool, context_dim: int,
               ctx: CallContext):
    super().__init__()
    self.base = base
    self.a = nn.ModuleList([nn.Linear(base.in_features, r, bias=False) for r in ranks])
    self.b = nn.ModuleList([nn.Linear(r, base.out_features, bias=False) for r in ranks])
    for a, b in zip(self.a, self.b):
      # jax.nn.initializers.kaiming_uniform: variance 2 / fan_in, uniform.
      bound = math.sqrt(6.0 / base.in_features)
      nn.init.uniform_(a.weight, -bound, bound)
      nn.init.zeros_(b.weight)
    self.scales = [alpha / r for r in ranks]
    self.text = nn.Linear(context_dim, 2)
    nn.init.zeros_(self.text.weight)
    nn.init.zeros_(self.text.bias)
    self.context_input = context_input
    self.lambda_logit = (None if context_input else
                         nn.Parameter(torch.tensor(math.log(lambda_init / (1 - lambda_init)))))
    self.cutoff = cutoff
    self.temperature = temperature
    self.ctx = ctx

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.base(x)
    n_tokens = x.shape[1]
    if self.context_input:
      x_low = x_high = x
      prior = None
    else:
      grid = token_grid(n_tokens, self.ctx.input_hw)
      low = lowpass(x, grid, self.cutoff)
      high = x.float() - low
      with torch.no_grad():
        e_low, e_high = low.square().mean(dim=(1, 2)), high.square().mean(dim=(1, 2))
        p_low = e_low / (e_low + e_high + 1e-12)
        prior = torch.stack([p_low, 1.0 - p_low], dim=-1)
      x_low, x_high = low.to(x.dtype), high.to(x.dtype)
    y0 = self.b[0](self.a[0](x_low)) * self.scales[0]
    y1 = self.b[1](self.a[1](x_high)) * self.scales[1]
    weights = self._route(None if self.context_input else n_tokens, prior)
    out = y + (weights[:, None, 0:1] * y0 + weights[:, None, 1:2] * y1).to(y.dtype)
    if not self.context_input and self.ctx.want_freq:
      self.ctx.freq_terms.append(self._leakage(y0, y1, grid))
    return out

  def _route(self, max_tokens: int | None, prior: torch.Tensor | None) -> torch.Tensor:
    ctx, mask = self.ctx.context, self.ctx.mask
    if max_tokens is not None:
      ctx = ctx[:, :max_tokens]
      mask = None if mask is None else mask[:, :max_tokens]
    probs = torch.softmax(self.text(ctx).float(), dim=-1)
    if mask is None:
      w_text = probs.mean(dim=1)
    else:
      m = mask.float()[..., None]
      count = m.sum(dim=1)
      w_text = torch.where(count > 0, (probs * m).sum(dim=1) / count.clamp_min(1.0),
                           torch.full_like(count, 0.5))
    if prior is None:
      weights = w_text
    else:
      lam = torch.sigmoid(self.lambda_logit)
      weights = lam * w_text + (1 - lam) * torch.softmax(prior / self.temperature, dim=-1)
    hard = F.one_hot(weights.argmax(dim=-1), 2).to(weights.dtype)
    return hard + weights - weights.detach()  # top-1, straight-through gradient

  def _leakage(self, y0: torch.Tensor, y1: torch.Tensor, grid) -> torch.Tensor:
    y0, y1 = y0.float(), y1.float()
    leak_low = y0 - lowpass(y0, grid, self.cutoff)
    leak_high = lowpass(y1, grid, self.cutoff)
    return leak_low.square().mean() + leak_high.square().mean()


ADAPTED = ("to_q", "to_k", "to_v")


def add_adapters(unet: nn.Module, lora, ctx: CallContext, context_dim: int) -> list[str]:
  """Wraps q, k, v and out.0 of every diffusers `Attention` in `unet`; returns the paths."""
  from diffusers.models.attention_processor import Attention  # pylint: disable=g-import-not-at-top
  kw = dict(ranks=tuple(lora.ranks), alpha=float(lora.alpha), cutoff=float(lora.cutoff),
            temperature=float(lora.temperature), lambda_init=float(lora.lambda_init),
            context_dim=context_dim, ctx=ctx)
  paths = []
  for name, attn in list(unet.named_modules()):
    if not isinstance(attn, Attention):
      continue
    cross = attn.is_cross_attention
    for proj in ADAPTED:
      setattr(attn, proj, LoRAMoELinear(getattr(attn, proj), context_input=cross and proj != "to_q",
                                        **kw))
      paths.append(f"{name}.{proj}")
    attn.to_out[0] = LoRAMoELinear(attn.to_out[0], context_input=False, **kw)
    paths.append(f"{name}.to_out.0")
  return paths


class PlanProjector(nn.Module):
  def __init__(self, plan_dim: int, context_dim: int, hidden: int):
    super().__init__()
    self.norm = nn.LayerNorm(plan_dim, elementwise_affine=False, eps=1e-6)
    self.fc1 = nn.Linear(plan_dim, hidden)
    self.fc2 = nn.Linear(hidden, context_dim)

  def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = self.fc2(F.silu(self.fc1(self.norm(tokens))))
    return h * mask.to(h.dtype)[..., None]


class TorchExecutor(nn.Module):
  """(VAE) + adapted UNet + projector: degraded NCHW in [-1, 1] -> (restored, L_freq)."""

  def __init__(self, config):
    super().__init__()
    from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
    m = config.model
    ucfg = dict(m.unet.to_dict())
    self.unet = UNet2DConditionModel(**ucfg)
    context_dim = int(ucfg["cross_attention_dim"])
    self.vae = AutoencoderKL(**dict(m.vae.to_dict())) if m.get("vae") is not None else None
    self.scaling = float(m.vae.scaling_factor) if self.vae is not None else 1.0
    self.ctx = CallContext()
    self.adapted = add_adapters(self.unet, m.lora, self.ctx, context_dim)
    hidden = int(m.lora.projector_hidden) or context_dim
    self.projector = PlanProjector(int(config.plans.dim), context_dim, hidden)
    self.residual = bool(m.residual)
    self.timestep = int(m.timestep)
    self.multiple = 2 ** (len(ucfg["down_block_types"]) - 1) * (
        2 ** (len(m.vae.block_out_channels) - 1) if self.vae is not None else 1)
    if self.residual and config.train_base_unet:  # as fape_jax.model_state.build_generator
      nn.init.zeros_(self.unet.conv_out.weight)
      nn.init.zeros_(self.unet.conv_out.bias)
    # Trainable: adapters, routers and projector; the UNet too when trained from scratch.
    self.requires_grad_(False)
    for mod in self.modules():
      if isinstance(mod, LoRAMoELinear):
        for n, p in mod.named_parameters(recurse=True):
          if not n.startswith("base."):
            p.requires_grad_(True)
    self.projector.requires_grad_(True)
    if config.train_base_unet:
      self.unet.requires_grad_(True)

  def forward(self, degraded: torch.Tensor, plan_tokens: torch.Tensor, plan_mask: torch.Tensor):
    h, w = degraded.shape[-2:]
    if h % self.multiple or w % self.multiple:
      raise ValueError(f"image size {h}x{w} is not a multiple of {self.multiple}")
    context = self.projector(plan_tokens, plan_mask)
    if self.vae is not None:
      with torch.no_grad():
        z = self.vae.encode(degraded).latent_dist.mean * self.scaling
    else:
      z = degraded
    self.ctx.input_hw = tuple(z.shape[-2:])
    self.ctx.context, self.ctx.mask = context, plan_mask
    self.ctx.freq_terms = []
    t = torch.full((z.shape[0],), self.timestep, dtype=torch.long)
    out = self.unet(z, t, encoder_hidden_states=context, encoder_attention_mask=plan_mask,
                    return_dict=False)[0]
    if self.residual:
      out = z + out
    restored = self.vae.decode(out / self.scaling, return_dict=False)[0] if self.vae else out
    terms = self.ctx.freq_terms
    freq = torch.stack(terms).mean() if terms else torch.zeros(())
    self.ctx.context = self.ctx.mask = None
    self.ctx.freq_terms = []
    return restored, freq


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  return {"degraded": nchw(batch["degraded"]), "clean": nchw(batch["clean"]),
          "plan_tokens": torch.from_numpy(batch["plan_tokens"]),
          "plan_mask": torch.from_numpy(batch["plan_mask"])}


class TorchTrainStep:
  """One AdamW step of `TorchExecutor` on MSE + freq; `compile=True` wraps it in torch.compile."""

  def __init__(self, config, *, compile: bool = False, seed: int = 0):  # pylint: disable=redefined-builtin
    torch.manual_seed(seed)
    self.model = TorchExecutor(config)
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
    self.w_mse, self.w_freq = float(config.loss.w_mse), float(config.loss.w_freq)
    self.clip = float(config.optim.clip_norm)
    self.forward = torch.compile(self.model) if compile else self.model

  def num_params(self) -> dict[str, int]:
    return {"total": sum(p.numel() for p in self.model.parameters()),
            "trainable": sum(p.numel() for p in self.params)}

  def __call__(self, batch: dict[str, torch.Tensor]) -> float:
    self.opt.zero_grad(set_to_none=True)
    restored, freq = self.forward(batch["degraded"], batch["plan_tokens"], batch["plan_mask"])
    loss = self.w_mse * F.mse_loss(restored, batch["clean"]) + self.w_freq * freq
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    return float(loss.detach())

  def forward_flops(self, batch: dict[str, torch.Tensor]) -> int:
    """Forward+backward FLOPs of one step as counted by torch's FlopCounterMode (matmul/conv)."""
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    counter = FlopCounterMode(display=False)
    with counter:
      restored, freq = self.model(batch["degraded"], batch["plan_tokens"], batch["plan_mask"])
      loss = self.w_mse * F.mse_loss(restored, batch["clean"]) + self.w_freq * freq
      loss.backward()
    self.opt.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def set_threads(n: int) -> None:
  torch.set_num_threads(n)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:  # only settable before the first parallel work
    pass


def build_steps(config, *, want_compile: bool, log=measure.say) -> dict[str, Any]:
  """{'eager': step, 'compile': step or None, 'compile_error': str or None, 'compile_s': ...}.

  The compiled step is built and run once (that first call compiles) here, so its failure or its
  compile time is known before any timing starts.
  """
  out: dict[str, Any] = {"eager": TorchTrainStep(config), "compile": None, "compile_error": None,
                         "compile_s": None}
  if want_compile:
    try:
      step = TorchTrainStep(config, compile=True)
      batch = torch_batch(random_batch(config))
      t0 = time.perf_counter()
      step(batch)
      out["compile_s"] = time.perf_counter() - t0
      out["compile"] = step
    except Exception as e:  # pylint: disable=broad-except  (torch.compile may be unavailable here)
      out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      log(f"torch.compile failed: {out['compile_error']}")
  return out


def main(argv):
  del argv
  machine = measure.machine_info()  # date and load at the start
  config = FLAGS.config
  set_threads(FLAGS.threads)
  batch = torch_batch(random_batch(config))
  steps = build_steps(config, want_compile=FLAGS.compile)
  fns = {"torch_eager": lambda: steps["eager"](batch)}
  if steps["compile"] is not None:
    fns["torch_compile"] = lambda: steps["compile"](batch)
  for f in fns.values():
    f()  # warm-up
  timed = measure.alternate(fns, rounds=FLAGS.rounds, calls=FLAGS.steps, log=measure.say)
  b = config.data.batch_size
  result = {
      "benchmark": "torch_reference",
      "command": measure.command_line(),
      "machine": {**machine, "torch": torch.__version__,
                  "torch_threads": torch.get_num_threads()},
      "config": {"variant": config.get("variant"), "unet": config.model.unet.to_dict(),
                 "vae": config.model.vae is not None, "batch": b, "crop": config.data.crop},
      "params": steps["eager"].num_params(),
      "flops_per_step_torch_counter": steps["eager"].forward_flops(batch),
      "torch_eager_step_s": timed["torch_eager"]["median_s"],
      "torch_eager_images_per_s": b / timed["torch_eager"]["median_s"],
      "torch_compile_step_s": timed.get("torch_compile", {}).get("median_s"),
      "torch_compile_compile_s": steps["compile_s"],
      "torch_compile_error": steps["compile_error"],
      "timings": timed,
  }
  measure.write_result(FLAGS.name, result)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", str(measure.REPO / "configs" / "base.py"),
                                  "Training config (its model and batch are benchmarked).")
  flags.DEFINE_integer("threads", 2, "torch intra-op threads.")
  flags.DEFINE_integer("rounds", 5, "Alternation rounds.")
  flags.DEFINE_integer("steps", 3, "Timed steps per round (the round's median is kept).")
  flags.DEFINE_bool("compile", True, "Also time torch.compile (skipped with a note on failure).")
  flags.DEFINE_string("name", "torch_reference", "Result file name under bench/results/.")
  app.run(main)
