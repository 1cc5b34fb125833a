"""Y-channel PSNR/SSIM: parity with scikit-image on hand-computed BT.601 luma, numpy vs JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fape_jax import metrics
from fape_jax.errors import FapeError

SIZES = [(32, 32), (37, 53), (64, 41)]  # includes odd sizes


def _hand_y(img_u8):
  """BT.601 luma written out (MATLAB rgb2ycbcr / basicsr), independent of skimage.color."""
  rgb = img_u8.astype(np.float64) / 255.0
  return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def _pair(size, seed, sigma=20.0):
  rng = np.random.default_rng(seed)
  # A smooth image plus texture, and a noisy copy: realistic SSIM values, not ~0.
  yy, xx = np.mgrid[:size[0], :size[1]]
  base = 128 + 60 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None] * [1, 0.8, 0.6]
  target = np.clip(base + rng.normal(0, 10, size + (3,)), 0, 255).astype(np.uint8)
  pred = np.clip(target + rng.normal(0, sigma, target.shape), 0, 255).astype(np.uint8)
  return pred, target


@pytest.mark.parametrize("size", SIZES)
def test_numpy_and_jax_match_skimage_on_bt601_luma(size):
  preds, targets = zip(*[_pair(size, seed) for seed in range(3)])
  want_psnr, want_ssim = [], []
  for p, t in zip(preds, targets):
    py, ty = _hand_y(p), _hand_y(t)
    want_psnr.append(peak_signal_noise_ratio(ty, py, data_range=255))
    want_ssim.append(structural_similarity(ty, py, data_range=255, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False))
    assert abs(metrics.psnr_y(p, t) - want_psnr[-1]) < 1e-3
    assert abs(metrics.ssim_y(p, t) - want_ssim[-1]) < 1e-3
  assert 0.2 < min(want_ssim) and max(want_ssim) < 0.95  # a pair that exercises SSIM
  batch = lambda imgs: jnp.asarray(np.stack(imgs), jnp.float32) / 255.0
  psnr_fn = jax.jit(metrics.psnr_y_jax)
  ssim_fn = jax.jit(metrics.ssim_y_jax)
  got_psnr = np.asarray(psnr_fn(batch(preds), batch(targets)))
  got_ssim = np.asarray(ssim_fn(batch(preds), batch(targets)))
  assert got_psnr.shape == got_ssim.shape == (3,)
  np.testing.assert_allclose(got_psnr, want_psnr, atol=1e-3)
  np.testing.assert_allclose(got_ssim, want_ssim, atol=1e-3)


def test_luma_convention_and_known_values():
  white, black = np.full((2, 2, 3), 255, np.uint8), np.zeros((2, 2, 3), np.uint8)
  np.testing.assert_allclose(metrics.rgb_to_y(white), 235.0)
  np.testing.assert_allclose(metrics.rgb_to_y(black), 16.0)
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_allclose(metrics.rgb_to_y(rgb), _hand_y(rgb), atol=1e-9)
  np.testing.assert_allclose(np.asarray(metrics.rgb_to_y_jax(jnp.asarray(rgb / 255.0))),
                             _hand_y(rgb) / 255.0, atol=1e-6)
  # Gray counts as R = G = B; uint16 and float inputs give the same luma as uint8.
  gray = rgb[..., 0]
  np.testing.assert_allclose(metrics.rgb_to_y(gray), _hand_y(np.repeat(gray[..., None], 3, -1)))
  np.testing.assert_allclose(metrics.rgb_to_y(rgb.astype(np.uint16) * 257), _hand_y(rgb))
  np.testing.assert_allclose(metrics.rgb_to_y(rgb / 255.0), _hand_y(rgb))
  # A uniform offset d on gray images shifts Y by 219 d: PSNR = 20 log10(255 / (219 d)).
  t = np.full((16, 16, 3), 0.5)
  d = 0.01
  np.testing.assert_allclose(metrics.psnr_y(t + d, t), 20 * np.log10(255 / (219 * d)), rtol=1e-9)
  assert metrics.psnr_y(t, t) == float("inf")
  assert metrics.ssim_y(t, t) == pytest.approx(1.0)


def test_crop_border_drops_edge_differences():
  pred, target = _pair((40, 40), seed=5)
  pred = pred.copy()
  pred[4:-4, 4:-4] = target[4:-4, 4:-4]
  assert np.isfinite(metrics.psnr_y(pred, target))
  assert metrics.psnr_y(pred, target, crop_border=4) == float("inf")
  assert metrics.ssim_y(pred, target, crop_border=4) == pytest.approx(1.0)
  b = lambda a: jnp.asarray(a[None], jnp.float32) / 255.0
  assert float(metrics.ssim_y_jax(b(pred), b(target), crop_border=4)[0]) == pytest.approx(1.0)
  assert np.isinf(float(metrics.psnr_y_jax(b(pred), b(target), crop_border=4)[0]))


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.psnr_y(np.zeros((8, 8, 3)), np.zeros((8, 9, 3))), "equal sizes"),
    (lambda: metrics.psnr_y(np.full((8, 8, 3), -0.5), np.zeros((8, 8, 3))), r"\[-1, 1\]"),
    (lambda: metrics.psnr_y(np.zeros((8, 8, 3), np.int32), np.zeros((8, 8, 3))), "dtype"),
    (lambda: metrics.psnr_y(np.zeros((8, 8, 4)), np.zeros((8, 8, 4))), "H x W x 3"),
    (lambda: metrics.ssim_y(np.zeros((10, 30, 3)), np.zeros((10, 30, 3))), "11 x 11"),
    (lambda: metrics.ssim_y(np.zeros((20, 20, 3)), np.zeros((20, 20, 3)), crop_border=5),
     "crop_border"),
    (lambda: metrics.psnr_y_jax(jnp.zeros((1, 8, 8, 3)), jnp.zeros((8, 8, 3))), "same shape"),
    (lambda: metrics.ssim_y_jax(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3))), "11 x 11"),
])
def test_bad_inputs_raise_fape_error(call, match):
  with pytest.raises(FapeError, match=match):
    call()
