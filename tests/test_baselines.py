"""Classical baselines: each improves PSNR on a simple synthetic case of its task (64 x 64)."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import data, transform

from fape_jax import baselines
from fape_jax.errors import FapeError
from fape_jax.metrics import psnr_y
from fape_jax.tasks import TASKS

MARGIN_DB = 0.5


@pytest.fixture(scope="module")
def clean_images():
  """Three photos bundled with scikit-image, 64 x 64, float in [0, 1]."""
  return [np.clip(transform.resize(getattr(data, n)()[..., :3], (64, 64), anti_aliasing=True), 0, 1)
          for n in ("astronaut", "chelsea", "coffee")]


def _noise(x, rng):
  return np.clip(x + rng.normal(0, 25 / 255, x.shape), 0, 1)


def _blur(x, rng):  # Gaussian blur of the PSF the baseline guesses, plus mild sensor noise
  return np.clip(ndimage.gaussian_filter(x, (1.5, 1.5, 0)) + rng.normal(0, 0.005, x.shape), 0, 1)


def _low_light(x, rng):  # exposure x gamma, like the synthesiser's recipe, plus read noise
  return np.clip(0.3 * x ** 1.6 + rng.normal(0, 0.005, x.shape), 0, 1)


def _uniform_haze(x, rng):
  return x * 0.6 + 0.9 * 0.4


def _depth_haze(x, rng):  # t = exp(-beta d), depth a vertical ramp (top of the frame far)
  d = np.linspace(1, 0, x.shape[0])[:, None, None]
  t = np.exp(-1.2 * d)
  return x * t + 0.85 * (1 - t)


def _rain(x, rng):  # 1 px wide vertical streaks, additive
  m = np.zeros(x.shape[:2])
  for _ in range(60):
    i, j = rng.integers(0, x.shape[0] - 10), rng.integers(0, x.shape[1])
    m[i:i + 10, j] = 1
  return np.clip(x + 0.5 * m[..., None], 0, 1)


def _snow(x, rng):  # 1-2 px white flakes, occluding
  m = np.zeros(x.shape[:2])
  for _ in range(120):
    i, j, s = rng.integers(0, x.shape[0] - 1), rng.integers(0, x.shape[1] - 1), rng.integers(1, 3)
    m[i:i + s, j:j + s] = 1
  return x * (1 - m[..., None]) + m[..., None]


def _low_resolution(x, rng):  # x2 down (anti-aliased), bicubic back up: the executor's SR input
  small = transform.rescale(x, 0.5, channel_axis=2, anti_aliasing=True)
  return np.clip(transform.resize(small, x.shape, order=3), 0, 1)


CASES = [
    ("denoise", "nl_means", _noise),
    ("denoise", "tv_chambolle", _noise),
    ("deblur", "richardson_lucy", _blur),
    ("light_enhancement", "adaptive_gamma", _low_light),
    ("light_enhancement", "clahe", _low_light),
    # A global stretch is one linear map: it cannot undo depth-varying haze, so only uniform haze.
    ("dehazing", "contrast_stretch", _uniform_haze),
    ("dehazing", "dark_channel_prior", _uniform_haze),
    ("dehazing", "dark_channel_prior", _depth_haze),
    ("deraining", "median_3x3", _rain),
    ("desnowing", "median_5x5", _snow),
    ("super_resolution", "unsharp_mask", _low_resolution),
]


def test_every_task_and_baseline_is_covered():
  assert set(baselines.BASELINES) == set(TASKS)
  assert {(t, n) for t, n, _ in CASES} == {(t, n) for t, d in baselines.BASELINES.items()
                                           for n in d}


@pytest.mark.parametrize("task, name, degrade", CASES,
                         ids=[f"{t}-{n}-{d.__name__[1:]}" for t, n, d in CASES])
def test_baseline_improves_psnr(clean_images, task, name, degrade):
  fn = baselines.get_baseline(task, name)
  rng = np.random.default_rng(0)
  for clean in clean_images:
    degraded = np.round(degrade(clean, rng) * 255).astype(np.uint8)
    restored = fn(degraded)
    assert restored.dtype == np.uint8 and restored.shape == degraded.shape
    before, after = psnr_y(degraded, clean), psnr_y(restored, clean)
    assert after > before + MARGIN_DB, (before, after)


@pytest.mark.parametrize("task, name", [(t, n) for t, d in baselines.BASELINES.items() for n in d])
def test_deterministic_and_dtype_preserving(clean_images, task, name):
  fn = baselines.BASELINES[task][name]
  x = _noise(clean_images[0][:40, :48], np.random.default_rng(1)).astype(np.float32)
  a, b = fn(x), fn(x.copy())
  assert a.dtype == np.float32 and a.shape == x.shape
  np.testing.assert_array_equal(a, b)
  assert a.min() >= 0 and a.max() <= 1
  u16 = fn(np.round(x * 65535).astype(np.uint16))
  assert u16.dtype == np.uint16 and u16.shape == x.shape


def test_bad_inputs_raise_fape_error():
  with pytest.raises(FapeError, match="H x W x 3"):
    baselines.nl_means(np.zeros((8, 8)))
  with pytest.raises(FapeError, match=r"expected \[0, 1\]"):
    baselines.clahe(np.full((8, 8, 3), 2.0))
  with pytest.raises(FapeError, match="choose one of"):
    baselines.get_baseline("denoise", "bm3d")
  with pytest.raises(FapeError, match="No baselines for task"):
    baselines.get_baseline("inpainting", "nl_means")
