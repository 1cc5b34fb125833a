"""Loss functions of the training objective (METHOD.md section 5).

Pure functions of arrays, traced inside the jit-compiled train step.

Frequency loss: each MoE layer keeps its experts inside their bands,
  L_freq = mean over adapted layers of mean(|H(y_low)|^2 + |L(y_high)|^2),  H = I - L,
with y_low / y_high the low- and high-band experts' adapter outputs (scaled by alpha / rank,
before the routing weights) and L the same low-pass as the layer's band split (`BandFilter`, FFT
on the token grid by default). Keeping both expert outputs of every layer alive until the loss
would cost activation memory, so each wrapper reduces its own term with `band_leakage` and sows
the scalar; `frequency_loss` averages those scalars.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp


def band_leakage(y_low: jax.Array, y_high: jax.Array,
                 lowpass: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """mean(|H(y_low)|^2 + |L(y_high)|^2) of one layer; `lowpass` is that layer's L (float32 out)."""
  y_low = y_low.astype(jnp.float32)
  y_high = y_high.astype(jnp.float32)
  leak_low = y_low - lowpass(y_low)  # H(y_low): what the low expert puts above the cutoff
  leak_high = lowpass(y_high)  # L(y_high): what the high expert puts below it
  return jnp.mean(jnp.square(leak_low)) + jnp.mean(jnp.square(leak_high))


@jax.jit
def frequency_loss(freq_terms: Mapping[str, jax.Array]) -> jax.Array:
  """L_freq: the mean of the per-layer `band_leakage` terms (0 for a model without MoE layers).

  `freq_terms` is the executor's `aux["freq_terms"]` ({layer path: scalar}).
  """
  if not freq_terms:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in freq_terms.values()]))
