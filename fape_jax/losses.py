"""Loss functions of the training objective (METHOD.md section 5).

Pure functions of arrays, traced inside the jit-compiled train step.

Frequency loss: each MoE layer keeps its experts inside their bands,
  L_freq = mean over adapted layers of mean(|H(y_low)|^2 + |L(y_high)|^2),  H = I - L,
with y_low / y_high the low- and high-band experts' adapter outputs (scaled by alpha / rank,
before the routing weights) and L the same low-pass as the layer's band split (`BandFilter`, FFT
on the token grid by default). Keeping both expert outputs of every layer alive until the loss
would cost activation memory, so each wrapper reduces its own term with
`fape_jax.models.bands.band_leakage` and hands on the scalar; `frequency_loss` averages them.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


@jax.jit
def frequency_loss(freq_terms: Mapping[str, jax.Array]) -> jax.Array:
  """L_freq: the mean of the per-layer `band_leakage` terms (0 for a model without MoE layers).

  `freq_terms` is the executor's `aux["freq_terms"]` ({layer path: scalar}).
  """
  if not freq_terms:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in freq_terms.values()]))
