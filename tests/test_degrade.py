"""Degradation synthesis: determinism, and each degradation moves the image the expected way."""

import json

import numpy as np
import pytest
import skimage.color
import skimage.data
import skimage.transform
from scipy import ndimage

from fape_jax import tasks as tasks_lib
from fape_jax.data import degrade as D
from fape_jax.errors import FapeError

ALL = tuple(tasks_lib.TASKS) + D.MIX_NAMES


@pytest.fixture(scope="module")
def photo():
  img = skimage.transform.resize(skimage.data.coffee(), (96, 128), anti_aliasing=True)
  return (img * 255 + 0.5).astype(np.uint8)


def _f(a):
  return a.astype(np.float64) / 255.0


def _luma(a):
  return _f(a) @ np.array([0.299, 0.587, 0.114])


def _local_contrast(a):
  """Mean absolute deviation from a local (Gaussian, sigma 2 px) mean: detail contrast that a
  global std would confuse with the brightness ramp that depth-dependent haze adds."""
  y = _luma(a) if a.dtype == np.uint8 else a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  return np.abs(y - ndimage.gaussian_filter(y, 2.0)).mean()


def _hf_energy(a, cutoff=0.5):
  """Fraction of spectral energy (mean removed) above `cutoff` x Nyquist radius."""
  y = _luma(a)
  p = np.abs(np.fft.fftshift(np.fft.fft2(y - y.mean()))) ** 2
  h, w = y.shape
  fy, fx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  return p[np.hypot(fy, fx) > cutoff].sum() / p.sum()


def _orientation(diff):
  """Dominant gradient direction (deg, x right / y down) and coherence of a 2-D map."""
  gy, gx = np.gradient(diff)
  jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
  theta = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))
  return theta, np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy)


@pytest.mark.parametrize("task", ALL)
def test_same_seed_same_bytes_different_seed_differs(photo, task):
  a = D.degrade(photo, task, [3, 1])
  b = D.degrade(photo, task, [3, 1])
  c = D.degrade(photo, task, [3, 2])
  assert a.degraded.dtype == np.uint8 and a.degraded.shape == photo.shape
  assert a.degraded.tobytes() == b.degraded.tobytes()
  assert a.params == b.params
  assert a.degraded.tobytes() != c.degraded.tobytes()
  assert not np.array_equal(a.degraded, photo)
  # Params are JSON-able and name the task and every step, in order.
  p = json.loads(json.dumps(a.params))
  assert p["task"] == task and [s["task"] for s in p["steps"]] == task.split("+")


@pytest.mark.parametrize("sigma", D.EVAL_SIGMAS)
def test_noise_std_matches_sigma(sigma):
  flat = np.full((128, 128, 3), 128, np.uint8)  # mid-gray: clipping never bites at 3 sigma
  s = D.degrade(flat, "denoise", 0, options={"denoise": {"sigma": sigma}})
  resid = s.degraded.astype(np.float64) - 128
  assert abs(resid.std() - sigma) < 0.05 * sigma
  assert abs(resid.mean()) < 0.5
  assert s.params["steps"][0]["sigma"] == sigma


def test_noise_eval_and_train_sigma_ranges(photo):
  evals = {D.degrade(photo, "denoise", i, evaluation=True).params["steps"][0]["sigma"]
           for i in range(30)}
  assert evals == set(map(float, D.EVAL_SIGMAS))
  train = [D.degrade(photo, "denoise", i).params["steps"][0]["sigma"] for i in range(30)]
  assert all(D.TRAIN_SIGMA_RANGE[0] <= s <= D.TRAIN_SIGMA_RANGE[1] for s in train)
  assert len(set(train)) == 30


def test_low_light_lowers_luminance(photo):
  for seed in range(4):
    s = D.degrade(photo, "light_enhancement", seed)
    assert _luma(s.degraded).mean() < 0.5 * _luma(photo).mean()
    p = s.params["steps"][0]
    assert 0.15 <= p["exposure"] <= 0.45 and 1.3 <= p["gamma"] <= 2.2


def test_haze_lowers_contrast_and_saturation(photo):
  sat = lambda a: skimage.color.rgb2hsv(a)[..., 1].mean()
  for seed in range(4):
    s = D.degrade(photo, "dehazing", seed)
    assert _local_contrast(s.degraded) < 0.8 * _local_contrast(photo)
    assert sat(s.degraded) < 0.8 * sat(photo)
    assert s.params["steps"][0]["depth"] == "proxy"


def test_haze_uses_a_given_depth_map(photo):
  depth = np.zeros(photo.shape[:2])
  depth[photo.shape[0] // 2:] = 10.0  # bottom half far
  s = D.degrade(photo, "dehazing", 0, depth=depth, options={"dehazing": {"beta": 1.5}})
  change = np.abs(_f(s.degraded) - _f(photo)).mean(axis=(1, 2))
  half = photo.shape[0] // 2
  assert change[:half].max() < 1.5 / 255  # t = 1 where depth is 0: only rounding
  assert change[half:].mean() > 0.1
  assert s.params["steps"][0]["depth"] == "given"
  with pytest.raises(FapeError, match="Depth map"):
    D.degrade(photo, "dehazing", 0, depth=np.zeros((5, 5)))


@pytest.mark.parametrize("task", ["deblur", "super_resolution"])
def test_blur_and_sr_remove_high_frequencies(photo, task):
  for seed in range(4):
    s = D.degrade(photo, task, seed)
    assert _hf_energy(s.degraded) < 0.5 * _hf_energy(photo), (task, seed, s.params)


def test_sr_is_x4_then_back_to_input_size(photo):
  s = D.degrade(photo, "super_resolution", 1)
  p = s.params["steps"][0]
  assert s.degraded.shape == photo.shape
  assert p["scale"] == 4 and p["lr_size"] == [photo.shape[0] // 4, photo.shape[1] // 4]
  assert {"round1", "round2", "final"} <= set(p)


def test_deblur_kinds():
  img = np.zeros((64, 64, 3), np.uint8)
  img[32, 32] = 255  # a point: the blurred image is the kernel
  for kind in ("motion", "defocus", "gaussian"):
    s = D.degrade(img, "deblur", 0, options={"deblur": {"kind": kind}})
    spread = (s.degraded[..., 0] > 0).sum()
    assert spread > 9, kind
    assert s.params["steps"][0]["kind"] == kind


@pytest.mark.parametrize("angle", [0.0, 20.0, -25.0])
def test_rain_adds_bright_oriented_streaks(angle):
  flat = np.full((128, 128, 3), 60, np.uint8)
  s = D.degrade(flat, "deraining", 5, options={"deraining": {"angle": angle, "layers": 1}})
  diff = s.degraded.astype(np.float64).mean(axis=2) - 60
  assert diff.min() >= -0.5 and diff.mean() > 2  # additive, bright
  theta, coherence = _orientation(diff)
  layer_angle = s.params["steps"][0]["layers"][0]["angle"]
  # A streak tilted by `a` (top end to the left) has its gradient at -a from the x axis.
  assert coherence > 0.6
  assert abs(theta + layer_angle) < 10


def test_snow_adds_bright_particles_of_several_sizes():
  flat = np.full((160, 160, 3), 60, np.uint8)
  s = D.degrade(flat, "desnowing", 2)
  diff = s.degraded.astype(np.float64).mean(axis=2) - 60
  assert diff.min() >= -0.5 and diff.mean() > 1
  labels, n = ndimage.label(diff > 60)  # clearly bright specks
  sizes = np.bincount(labels.ravel())[1:]
  assert n >= 20
  assert sizes.max() >= 8 * np.median(sizes)  # small flakes and big ones
  _, coherence = _orientation(diff)
  assert coherence < 0.5  # round-ish blobs, unlike rain streaks


def test_mix_is_the_composition_of_its_parts(photo):
  mix = "light_enhancement+deraining+dehazing"
  s = D.degrade(photo, mix, [7, 7])
  rng = np.random.default_rng([7, 7])
  x = photo.astype(np.float32) / 255.0
  x_low, _ = D.add_low_light(x.copy(), rng)
  x_rain, _ = D.add_rain(x_low.copy(), rng)
  x_haze, _ = D.add_haze(x_rain.copy(), rng)
  np.testing.assert_array_equal(s.degraded, (np.clip(x_haze, 0, 1) * 255 + 0.5).astype(np.uint8))
  # Each part left its mark: darker, then bright streaks, then flatter contrast and a lifted floor.
  assert x_low.mean() < 0.5 * x.mean()
  assert x_rain.mean() > x_low.mean() and (x_rain - x_low).max() > 0.2
  assert _local_contrast(x_haze) < 0.8 * _local_contrast(x_rain) and x_haze.min() > x_rain.min()
  assert [p["task"] for p in s.params["steps"]] == mix.split("+")


def test_every_mix_in_tasks_is_supported(photo):
  assert D.MIX_NAMES == tuple("+".join(m) for m in tasks_lib.MIXES)
  for mix in tasks_lib.MIXES:
    s = D.degrade(photo, mix, 0)  # a tuple works as well as a name
    assert s.params["task"] == "+".join(mix)


def test_bad_input_raises_fape_error(photo):
  with pytest.raises(FapeError, match="uint8"):
    D.degrade(photo.astype(np.float32), "denoise", 0)
  with pytest.raises(FapeError, match="uint8"):
    D.degrade(photo[..., 0], "denoise", 0)
  with pytest.raises(FapeError, match="Unknown degradation"):
    D.degrade(photo, "derain", 0)
  with pytest.raises(FapeError, match="Unknown degradation"):
    D.degrade(photo, "denoise+", 0)
