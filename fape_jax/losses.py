"""Loss functions of the training objective (METHOD.md section 5).

Pure functions of arrays, traced inside the jit-compiled train step.

Reconstruction: MSE, optionally balanced across samples (`reconstruction_loss`): trained together,
the seven tasks differ ~100x in input error (haze, low light vs sigma-15 noise), and a plain batch
MSE spends almost all of its gradient on the large-error tasks, so the full-resolution ones
(denoise, deblur, SR) never start in a short run.

Frequency loss: each MoE layer keeps its experts inside their bands,
  L_freq = sum over adapted layers of mean(|H(y_low)|^2 + |L(y_high)|^2),  H = I - L,
with y_low / y_high the low- and high-band experts' adapter outputs (scaled by alpha / rank,
before the routing weights) and L the same low-pass as the layer's band split (`BandFilter`, FFT
on the token grid by default). Keeping both expert outputs of every layer alive until the loss
would cost activation memory, so each wrapper reduces its own term with
`fape_jax.models.bands.band_leakage` and hands on the scalar; `frequency_loss` sums them
(METHOD.md section 5).

Why L_freq is tiny in short runs (the embedded default logs ~1e-11): the experts are per-token
linear maps M = B A (LoRA on the attention projections), which commute with any filter on the token
grid, so each layer's term is quadratic in M: exactly 0, with zero gradient, at B = 0, and ~|B|^2
while the adapters are small. It grows as the experts do; the README reports what it measured.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from fape_jax.errors import FapeError


BALANCE_MODES = ("none", "input", "psnr", "l1")


@jax.jit
def frequency_loss(freq_terms: Mapping[str, jax.Array]) -> jax.Array:
  """L_freq: the sum of the per-layer `band_leakage` terms (0 for a model without MoE layers).

  `freq_terms` is the executor's `aux["freq_terms"]` ({layer path: scalar}).
  """
  if not freq_terms:
    return jnp.zeros((), jnp.float32)
  return jnp.sum(jnp.stack([jnp.asarray(v, jnp.float32) for v in freq_terms.values()]))


def reconstruction_loss(restored: jax.Array, clean: jax.Array, degraded: jax.Array,
                        balance: str = "none", eps: float = 1e-4) -> jax.Array:
  """The batch's MSE term, with per-sample weights that make the tasks count alike.

  balance:
    'none'   plain MSE over the batch.
    'input'  sample i weighted by 1 / MSE(degraded_i, clean_i): each sample's error relative to
             what it started from (a restoration that halves its error counts the same on every
             task).
    'psnr'   sample i weighted by 1 / MSE(restored_i, clean_i): the gradient of the batch's mean
             log-MSE, i.e. of mean PSNR, the metric every table reports; a dB gained on noise
             counts as much as a dB gained on haze.
    'l1'     Charbonnier (smooth L1, eps 1e-3) per pixel: every pixel's gradient has about unit
             size whatever its error, so a small-error task is not drowned by a large-error one,
             without per-sample weights that single out near-perfect samples (what most
             all-in-one restorers train with).
  Weights are constants (stop-gradient) scaled by the batch mean of the reference error, w_i =
  mean(ref) / ref_i, so the term's value stays the plain MSE's (what its weight `w_mse` was set
  for) while its gradient goes to every sample in proportion to its relative error. (Weights
  normalised to mean 1 instead shrink the term ~10x on a mixed batch, and the adversarial term
  then outweighs it.) `eps` (in [-1, 1] pixel units; 1e-4 = PSNR ~46 dB) bounds the weight of
  near-perfect samples.
  """
  axes = tuple(range(1, restored.ndim))
  per = jnp.mean(jnp.square(restored.astype(jnp.float32) - clean), axis=axes)
  if balance == "none":
    return jnp.mean(per)
  if balance == "l1":
    err = restored.astype(jnp.float32) - clean
    charb = jnp.mean(jnp.sqrt(jnp.square(err) + 1e-6))
    # Rescaled to the MSE's value (a constant factor), so w_mse keeps its meaning.
    return charb * jax.lax.stop_gradient(jnp.mean(per) / charb)
  if balance == "input":
    ref = jnp.mean(jnp.square(degraded.astype(jnp.float32) - clean), axis=axes)
  elif balance == "psnr":
    ref = per
  else:
    raise FapeError(f"--config.loss.balance={balance!r}: use one of {BALANCE_MODES}.")
  w = jax.lax.stop_gradient(jnp.mean(ref) / (ref + eps))
  return jnp.mean(w * per)
