"""Classical, training-free restoration baselines for the evaluation report, one set per task.

`BASELINES[task][name](image) -> image`: an H x W x 3 uint8 / uint16 / float image in [0, 1] goes
in, the same shape and dtype comes out (integers rounded), deterministically. Wherever
scikit-image (or scipy) has the method, it is called; the dark-channel prior is hand-written
because neither library ships a dehazer.

  denoise            non-local means (sigma from `estimate_sigma`, h = 0.8 sigma) and TV
                     (Chambolle, weight = 0.5 sigma, so a clean image is barely touched)
  deblur             Richardson-Lucy, 20 iterations, with a guessed isotropic Gaussian PSF of
                     sigma 1.5 px (a mild defocus/Gaussian blur; the true kernel is unknown and
                     motion blur is not Gaussian, so this only sharpens); the image is
                     reflect-padded first because scikit-image convolves with zero padding, which
                     rings inward from the borders
  light_enhancement  adaptive gamma (brings the mean luminance to 0.45, only ever brightens) and
                     CLAHE (`exposure.equalize_adapthist` on the HSV value channel)
  dehazing           a global percentile contrast stretch (undoes homogeneous haze, not
                     depth-varying haze: one linear map for the whole frame) and the dark-channel
                     prior (He et al. 2009)
  deraining          3 x 3 per-channel median: thin streaks are a minority in every window
  desnowing          5 x 5 per-channel median: flakes are larger than rain streaks
  super_resolution   unsharp mask (radius 1 px, amount 1) on the bicubic-upsampled input, the
                     form in which the executor receives super-resolution inputs

scikit-image calls use `channel_axis=2`, not -1: `unsharp_mask` mishandles negative channel axes
(scikit-image#7264: it fills rows instead of channels and leaves the rest uninitialised).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from scipy import ndimage
from skimage import exposure, filters, restoration
from skimage.color import rgb2gray

from fape_jax import tasks as tasks_lib
from fape_jax.errors import FapeError
from fape_jax.metrics import to_unit_float

_CHANNELS = 2  # positive on purpose, see the module docstring

Baseline = Callable[[np.ndarray], np.ndarray]


def _image_in_image_out(fn: Callable[[np.ndarray], np.ndarray]) -> Baseline:
  """Wraps fn(float64 H x W x 3 in [0, 1]) to take and return the caller's dtype."""

  @functools.wraps(fn)
  def wrapped(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
      raise FapeError(f"Baseline {fn.__name__}: expected an H x W x 3 RGB image, got shape "
                      f"{image.shape}.")
    out = np.clip(fn(to_unit_float(image, f"baseline {fn.__name__} input")), 0.0, 1.0)
    if np.issubdtype(image.dtype, np.integer):
      top = np.iinfo(image.dtype).max
      return np.round(out * top).astype(image.dtype)
    return out.astype(image.dtype)

  return wrapped


def _noise_sigma(x: np.ndarray) -> float:
  return float(restoration.estimate_sigma(x, average_sigmas=True, channel_axis=_CHANNELS))


@_image_in_image_out
def nl_means(x: np.ndarray) -> np.ndarray:
  sigma = _noise_sigma(x)
  return restoration.denoise_nl_means(x, h=0.8 * sigma, sigma=sigma, patch_size=5,
                                      patch_distance=6, fast_mode=True, channel_axis=_CHANNELS)


@_image_in_image_out
def tv_chambolle(x: np.ndarray) -> np.ndarray:
  return restoration.denoise_tv_chambolle(x, weight=0.5 * _noise_sigma(x),
                                          channel_axis=_CHANNELS)


def gaussian_psf(sigma: float = 1.5) -> np.ndarray:
  """Normalised isotropic Gaussian kernel, radius ceil(3 sigma)."""
  r = int(np.ceil(3 * sigma))
  g = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
  k = np.outer(g, g)
  return k / k.sum()


@_image_in_image_out
def richardson_lucy(x: np.ndarray) -> np.ndarray:
  psf = gaussian_psf(1.5)
  pad = 2 * psf.shape[0]
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  out = np.stack([restoration.richardson_lucy(xp[..., c], psf, num_iter=20, clip=True)
                  for c in range(3)], axis=-1)
  return out[pad:-pad, pad:-pad]


@_image_in_image_out
def adaptive_gamma(x: np.ndarray, target: float = 0.45) -> np.ndarray:
  mean = float(np.clip(rgb2gray(x).mean(), 1e-3, 0.999))
  # gamma < 1 brightens; 1 (no change) once the image is as bright as the target.
  gamma = float(np.clip(np.log(target) / np.log(mean), 0.2, 1.0))
  return exposure.adjust_gamma(x, gamma)


@_image_in_image_out
def clahe(x: np.ndarray) -> np.ndarray:
  return exposure.equalize_adapthist(x, clip_limit=0.02)


@_image_in_image_out
def contrast_stretch(x: np.ndarray) -> np.ndarray:
  lo, hi = np.percentile(x, (1, 99))  # all channels together: keeps the hue
  if hi - lo < 1e-6:
    return x
  return exposure.rescale_intensity(x, in_range=(lo, hi), out_range=(0.0, 1.0))


@_image_in_image_out
def dark_channel_prior(x: np.ndarray, omega: float = 0.95, t_min: float = 0.1) -> np.ndarray:
  """He et al. 2009, with a Gaussian-smoothed transmission in place of soft matting.

  (Soft matting / a guided filter is not in our dependencies; the Gaussian leaves faint halos at
  depth edges.) The patch is 15 px on large images, ~1/9 of the short side on small ones.
  """
  patch = int(np.clip(min(x.shape[:2]) // 9, 3, 15)) | 1
  dark = ndimage.minimum_filter(x.min(axis=2), size=patch)
  n = max(1, dark.size // 1000)  # airlight: mean colour of the haziest 0.1 % of pixels
  idx = np.argpartition(dark.ravel(), -n)[-n:]
  airlight = np.maximum(x.reshape(-1, 3)[idx].mean(axis=0), 1e-3)
  t = 1.0 - omega * ndimage.minimum_filter((x / airlight).min(axis=2), size=patch)
  t = np.maximum(ndimage.gaussian_filter(t, patch / 2), t_min)
  return (x - airlight) / t[..., None] + airlight


def _median(size: int) -> Baseline:
  @_image_in_image_out
  def median(x: np.ndarray) -> np.ndarray:
    return filters.median(x, footprint=np.ones((size, size, 1), bool))
  median.__name__ = f"median_{size}x{size}"
  return median


@_image_in_image_out
def unsharp_mask(x: np.ndarray) -> np.ndarray:
  return filters.unsharp_mask(x, radius=1.0, amount=1.0, channel_axis=_CHANNELS)


BASELINES: dict[str, dict[str, Baseline]] = {
    "denoise": {"nl_means": nl_means, "tv_chambolle": tv_chambolle},
    "deblur": {"richardson_lucy": richardson_lucy},
    "light_enhancement": {"adaptive_gamma": adaptive_gamma, "clahe": clahe},
    "dehazing": {"contrast_stretch": contrast_stretch, "dark_channel_prior": dark_channel_prior},
    "deraining": {"median_3x3": _median(3)},
    "desnowing": {"median_5x5": _median(5)},
    "super_resolution": {"unsharp_mask": unsharp_mask},
}
assert set(BASELINES) == set(tasks_lib.TASKS)


def get_baseline(task: str, name: str) -> Baseline:
  """`BASELINES[task][name]` with a `FapeError` that lists the choices."""
  if task not in BASELINES:
    raise FapeError(f"No baselines for task {task!r}; tasks: {', '.join(BASELINES)}.")
  if name not in BASELINES[task]:
    raise FapeError(f"No baseline {name!r} for {task}; choose one of "
                    f"{', '.join(BASELINES[task])}.")
  return BASELINES[task][name]
