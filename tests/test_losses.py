"""Frequency loss: zero for experts that stay in their bands, growing with leakage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fape_jax import losses
from fape_jax.errors import FapeError
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


def test_frequency_loss_is_the_sum_over_layers_under_jit():
  # METHOD.md section 5: summed, so a bigger UNet (96 layers at SD-2.1 scale) is not weakened.
  terms = {"a.to_q": jnp.float32(0.2), "b.to_k": jnp.float32(0.4)}
  assert float(losses.frequency_loss(terms)) == pytest.approx(0.6)
  assert float(losses.frequency_loss({})) == 0.0
  grad = jax.grad(lambda t: losses.frequency_loss(t))(terms)
  np.testing.assert_allclose([grad["a.to_q"], grad["b.to_k"]], [1.0, 1.0])


def test_frequency_loss_is_quadratic_in_the_experts():
  """Why L_freq logs ~1e-11 early on (losses.py docstring): a per-token linear expert M = B A
  commutes with the token-grid low-pass, so the leakage is quadratic in M: zero with zero
  gradient at B = 0, and tiny while the adapters are small."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, H * W, 8)), jnp.float32)
  m = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
  band = bands.BandFilter("fft2d")
  lp = lambda y: band.lowpass(y, (H, W))  # noqa: E731
  x_low = lp(x)
  leak = lambda s: bands.band_leakage(x_low @ (s * m), (x - x_low) @ (s * m), lp)  # noqa: E731
  assert float(leak(1.0)) > 1e-3
  np.testing.assert_allclose(float(leak(1e-3)), 1e-6 * float(leak(1.0)), rtol=1e-3)
  assert float(leak(0.0)) == 0.0 and float(jax.grad(leak)(0.0)) == 0.0


def _pair(err_scales):
  rng = np.random.default_rng(1)
  clean = jnp.asarray(rng.uniform(-1, 1, (len(err_scales), 8, 8, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((1,) + clean.shape[1:]), jnp.float32)  # one pattern
  scales = jnp.asarray(err_scales, jnp.float32)[:, None, None, None]
  return clean, noise * scales


def test_reconstruction_loss_balance_modes():
  clean, err = _pair([0.05, 1.0])     # a light-noise sample and a heavy-haze-like sample
  restored, degraded = clean + err, clean + 2 * err
  plain = losses.reconstruction_loss(restored, clean, degraded, "none")
  np.testing.assert_allclose(plain, jnp.mean(jnp.square(err)), rtol=1e-6)

  def per_sample_grad_norms(mode):
    g = jax.grad(lambda r: losses.reconstruction_loss(r, clean, degraded, mode))(restored)
    return np.sqrt(np.sum(np.square(np.asarray(g)), axis=(1, 2, 3)))
  # Plain MSE: the heavy sample gets ~20x the gradient; balanced, each sample's gradient scales
  # with 1 / its error, so a relative improvement is worth the same on both.
  g_none, g_psnr, g_input, g_l1 = (per_sample_grad_norms(m)
                                   for m in ("none", "psnr", "input", "l1"))
  assert g_none[1] / g_none[0] > 15
  assert g_psnr[0] / g_psnr[1] > 15 and g_input[0] / g_input[1] > 15
  assert 0.8 < g_l1[0] / g_l1[1] < 1.25  # L1: the same gradient size per sample
  # The term keeps MSE's scale: equal errors give the plain MSE (up to eps) in every mode, and
  # on a mixed batch the psnr-balanced value is the plain MSE (again up to eps).
  same_c, same_e = _pair([0.3, 0.3])
  for mode in losses.BALANCE_MODES:
    np.testing.assert_allclose(
        losses.reconstruction_loss(same_c + same_e, same_c, same_c + same_e, mode),
        jnp.mean(jnp.square(same_e)), rtol=2e-3)
  np.testing.assert_allclose(losses.reconstruction_loss(restored, clean, degraded, "psnr"), plain,
                             rtol=0.1)
  with pytest.raises(FapeError, match="loss.balance"):
    losses.reconstruction_loss(restored, clean, degraded, "per_task")
