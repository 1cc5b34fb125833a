"""Frequency loss: zero for experts that stay in their bands, growing with leakage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fape_jax import losses
from fape_jax.models import bands

H, W = 16, 16


def _wave(fy, fx, c=4):
  yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  s = np.cos(2 * np.pi * (fy * yy + fx * xx))
  return jnp.asarray(np.repeat(s[None, :, :, None], c, -1).reshape(1, H * W, c), jnp.float32)


@pytest.mark.parametrize("mode", ["fft2d", "fir1d"])
def test_band_leakage_is_zero_in_band_and_grows_with_leaks(mode):
  band = bands.BandFilter(mode)
  lowpass = lambda y: band.lowpass(y, (H, W))  # noqa: E731
  # In band: a constant for the low expert, the Nyquist checkerboard for the high expert.
  y_low = 0.7 * jnp.ones((1, H * W, 4))
  y_high = _wave(0.5, 0.5) if mode == "fft2d" else _wave(0.0, 0.5)
  clean = float(bands.band_leakage(y_low, y_high, lowpass))
  # FIR zero-padding leaks a little at the sequence ends; the FFT filter is circular (exact).
  assert clean < (1e-10 if mode == "fft2d" else 0.05)
  previous = clean
  for amount in (0.1, 0.3, 1.0):  # the low expert picks up high frequencies
    leaky = float(bands.band_leakage(y_low + amount * y_high, y_high, lowpass))
    assert leaky > previous + 0.005
    previous = leaky
  swapped = float(bands.band_leakage(y_high, y_low, lowpass))  # both experts out of band
  assert swapped > 0.4


def test_frequency_loss_is_the_mean_over_layers_under_jit():
  terms = {"a.to_q": jnp.float32(0.2), "b.to_k": jnp.float32(0.4)}
  assert float(losses.frequency_loss(terms)) == pytest.approx(0.3)
  assert float(losses.frequency_loss({})) == 0.0
  grad = jax.grad(lambda t: losses.frequency_loss(t))(terms)
  np.testing.assert_allclose([grad["a.to_q"], grad["b.to_k"]], [0.5, 0.5])
