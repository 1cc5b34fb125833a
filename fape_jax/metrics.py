"""PSNR and SSIM on the Y channel, at native resolution: host-side (numpy) and jit-able (JAX).

Convention (basicsr's `calculate_psnr/ssim(test_y_channel=True)`, the one restoration papers
report): RGB in [0, 1] -> ITU-R BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B, i.e. Y in
[16, 235], kept as float (no rounding to 8 bits); data range 255. SSIM: 11 x 11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances, computed only where the window fits
('valid'), averaged. `crop_border` px are dropped from every edge first (basicsr's SR convention;
0 by default). Grayscale inputs count as R = G = B, so their Y is 16 + 219 * gray.

Host side: `psnr_y`, `ssim_y` take one uint8 / uint16 / float-in-[0, 1] image pair (H x W x 3 or
H x W) and call scikit-image. Device side: `psnr_y_jax`, `ssim_y_jax` take float batches
(B, H, W, 3) in [0, 1] and call dm-pix; they return (B,). The device side scores Y / 255 with
range 1: the same numbers (PSNR, and SSIM with constants K * range, are scale invariant), and
float32 stays well conditioned. Images are never resized: the paper's authors stretch test pairs to
512 x 512 before scoring, we do not (METHOD.md section 6).
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fape_jax.errors import FapeError

# BT.601 luma for RGB in [0, 1] (MATLAB rgb2ycbcr / basicsr / skimage.color.rgb2ycbcr).
Y_OFFSET = 16.0
Y_COEFFS = (65.481, 128.553, 24.966)
DATA_RANGE = 255.0
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def to_unit_float(img, where: str = "image") -> np.ndarray:
  """uint8 / uint16 / float-in-[0, 1] image -> float64 in [0, 1]."""
  a = np.asarray(img)
  if a.dtype == np.uint8:
    return a.astype(np.float64) / 255.0
  if a.dtype == np.uint16:
    return a.astype(np.float64) / 65535.0
  if not np.issubdtype(a.dtype, np.floating):
    raise FapeError(f"{where}: dtype {a.dtype} is not supported; use uint8, uint16 or float in "
                    "[0, 1].")
  a = a.astype(np.float64)
  lo, hi = float(np.min(a)), float(np.max(a))
  if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
    raise FapeError(f"{where}: float values span [{lo:.4g}, {hi:.4g}], expected [0, 1]; clip "
                    "model outputs (np.clip(x, 0, 1)) or map [-1, 1] images with (x + 1) / 2.")
  return np.clip(a, 0.0, 1.0)


def rgb_to_y(img, where: str = "image") -> np.ndarray:
  """Y in [16, 235] (float64) of an H x W x 3 RGB or H x W gray image."""
  a = to_unit_float(img, where)
  if a.ndim == 2:
    return Y_OFFSET + sum(Y_COEFFS) * a
  if a.ndim == 3 and a.shape[-1] == 3:
    return rgb2ycbcr(a)[..., 0]
  raise FapeError(f"{where}: shape {a.shape} is neither H x W x 3 RGB nor H x W gray.")


def _y_pair(pred, target, crop_border: int, min_side: int = 1):
  pred_y, target_y = rgb_to_y(pred, "prediction"), rgb_to_y(target, "target")
  if pred_y.shape != target_y.shape:
    raise FapeError(f"Metrics at native resolution need equal sizes: prediction "
                    f"{np.shape(pred)} vs target {np.shape(target)}; restore at the target's size.")
  return _crop(pred_y, crop_border, min_side), _crop(target_y, crop_border, min_side)


def _crop(y, crop_border: int, min_side: int):
  if crop_border < 0:
    raise FapeError(f"crop_border={crop_border} must be >= 0.")
  h, w = y.shape[-2:]
  if min(h, w) - 2 * crop_border < min_side:
    raise FapeError(f"A {h} x {w} image minus crop_border={crop_border} on each edge is smaller "
                    f"than the {min_side} x {min_side} px this metric needs.")
  if crop_border:
    y = y[..., crop_border:h - crop_border, crop_border:w - crop_border]
  return y


def psnr_y(pred, target, *, crop_border: int = 0) -> float:
  """Y-channel PSNR in dB (inf for identical images)."""
  p, t = _y_pair(pred, target, crop_border)
  if np.array_equal(p, t):  # skimage warns and divides by zero; the answer is +inf
    return float("inf")
  return float(peak_signal_noise_ratio(t, p, data_range=DATA_RANGE))


def ssim_y(pred, target, *, crop_border: int = 0) -> float:
  """Y-channel SSIM (basicsr / Wang et al. 2004 settings, see the module docstring)."""
  p, t = _y_pair(pred, target, crop_border, SSIM_WINDOW)
  return float(structural_similarity(t, p, data_range=DATA_RANGE, gaussian_weights=True,
                                     sigma=SSIM_SIGMA, use_sample_covariance=False))


def rgb_to_y_jax(x: jax.Array) -> jax.Array:
  """(..., H, W, 3) RGB in [0, 1] -> (..., H, W) Y / 255, i.e. in [16/255, 235/255]."""
  return (Y_OFFSET + x @ jnp.asarray(Y_COEFFS, x.dtype)) / DATA_RANGE


def _y_batch(pred, target, crop_border: int, min_side: int = 1):
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  if pred.shape != target.shape or pred.ndim != 4 or pred.shape[-1] != 3:
    raise FapeError(f"Batched metrics need two (B, H, W, 3) batches of the same shape, got "
                    f"{pred.shape} and {target.shape}.")
  if not jnp.issubdtype(pred.dtype, jnp.floating):
    raise FapeError(f"Batched metrics take float images in [0, 1], got dtype {pred.dtype}.")
  # Clipped as saving to an 8-bit file would; values can't be checked inside jit.
  ys = [rgb_to_y_jax(jnp.clip(a.astype(jnp.float32), 0.0, 1.0)) for a in (pred, target)]
  return tuple(_crop(y, crop_border, min_side)[..., None] for y in ys)  # dm-pix wants NHWC


def psnr_y_jax(pred: jax.Array, target: jax.Array, *, crop_border: int = 0) -> jax.Array:
  """Per-image Y-channel PSNR in dB, (B,), for float (B, H, W, 3) batches in [0, 1]; jit-able."""
  p, t = _y_batch(pred, target, crop_border)
  return pix.psnr(p, t)


def ssim_y_jax(pred: jax.Array, target: jax.Array, *, crop_border: int = 0) -> jax.Array:
  """Per-image Y-channel SSIM, (B,), for float (B, H, W, 3) batches in [0, 1]; jit-able."""
  p, t = _y_batch(pred, target, crop_border, SSIM_WINDOW)
  return pix.ssim(p, t, max_val=1.0, filter_size=SSIM_WINDOW, filter_sigma=SSIM_SIGMA)
