"""Degradation synthesis: determinism, each degradation moves the image the expected way, the
validation draws are held out from the training draws, and a changed recipe bumps its version."""

import hashlib
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

# The recipe's fingerprint per RECIPE_VERSION. If this test fails, what a seed produces changed:
# bump degrade.RECIPE_VERSION (synthetic stores are then rebuilt, never reused) and add its value.
FINGERPRINTS = {2: "484911bab72357f9", 3: "093e0b34ce80b1e1"}
# Noise added to the clean-only benchmark sets (PairedFolders): frozen across recipe versions.
BENCHMARK_NOISE_SHA = {15: "80018c34918eaab6", 25: "404cbe2772665a8c", 50: "ede7094870663f31"}


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


@pytest.mark.parametrize("evaluation", [False, True])
@pytest.mark.parametrize("task", ALL)
def test_same_seed_same_bytes_different_seed_differs(photo, task, evaluation):
  a = D.degrade(photo, task, [3, 1], evaluation=evaluation)
  b = D.degrade(photo, task, [3, 1], evaluation=evaluation)
  c = D.degrade(photo, task, [3, 2], evaluation=evaluation)
  assert a.degraded.dtype == np.uint8 and a.degraded.shape == photo.shape
  assert a.degraded.tobytes() == b.degraded.tobytes()
  assert a.params == b.params
  assert a.degraded.tobytes() != c.degraded.tobytes()
  assert not np.array_equal(a.degraded, photo)
  # Params are JSON-able and name the task, the recipe, the draw and every step, in order.
  p = json.loads(json.dumps(a.params))
  assert p["task"] == task and [s["task"] for s in p["steps"]] == task.split("+")
  assert p["recipe"] == D.RECIPE_VERSION and p["evaluation"] == evaluation


def test_a_changed_recipe_bumps_the_version():
  assert D.recipe_fingerprint() == FINGERPRINTS.get(D.RECIPE_VERSION), (
      "The synthesis draws something else than the pinned recipe: bump degrade.RECIPE_VERSION "
      f"and pin {D.recipe_fingerprint()!r} for it in FINGERPRINTS.")


def test_benchmark_noise_is_frozen_across_recipes():
  img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
  got = {}
  for sigma in D.EVAL_SIGMAS:  # as builders._noisy_records asks for it
    s = D.degrade(img, "denoise", [1, 2, sigma], evaluation=True,
                  options={"denoise": {"sigma": sigma}})
    got[sigma] = hashlib.sha256(s.degraded.tobytes()).hexdigest()[:16]
    assert s.params["steps"][0]["noise"] == "gaussian"
  assert got == BENCHMARK_NOISE_SHA


@pytest.mark.parametrize("sigma", D.EVAL_SIGMAS)
def test_noise_std_matches_sigma(sigma):
  flat = np.full((128, 128, 3), 128, np.uint8)  # mid-gray: clipping never bites at 3 sigma
  s = D.degrade(flat, "denoise", 0, options={"denoise": {"sigma": sigma}})
  resid = s.degraded.astype(np.float64) - 128
  assert abs(resid.std() - sigma) < 0.05 * sigma
  assert abs(resid.mean()) < 0.5
  assert s.params["steps"][0]["sigma"] == sigma


@pytest.mark.parametrize("kind", D.NOISE_KINDS)
def test_every_noise_kind_has_the_drawn_sigma_at_mid_gray(kind):
  flat = np.full((128, 128, 3), 128, np.uint8)
  s = D.degrade(flat, "denoise", 0, options={"denoise": {"sigma": 20, "kind": kind}})
  resid = s.degraded.astype(np.float64) - 128
  assert abs(resid.std() - 20) < 0.08 * 20 and abs(resid.mean()) < 1
  assert s.params["steps"][0]["noise"] == kind and s.params["steps"][0]["sigma"] == 20


def test_noise_kinds_differ_the_documented_way():
  def resid(kind, level=128):
    img = np.full((128, 128, 3), level, np.uint8)
    s = D.degrade(img, "denoise", 0, options={"denoise": {"sigma": 20, "kind": kind}})
    return s.degraded.astype(np.float64) - level, s.params["steps"][0]
  across = lambda r: np.corrcoef(r[..., 0].ravel(), r[..., 1].ravel())[0, 1]
  along = lambda r: np.corrcoef(r[:, :-1, 0].ravel(), r[:, 1:, 0].ravel())[0, 1]
  r, _ = resid("gaussian")
  assert abs(across(r)) < 0.05 and abs(along(r)) < 0.05
  r, p = resid("gray")  # channels correlate by the drawn rho
  assert abs(across(r) - p["rho"]) < 0.05 and abs(along(r)) < 0.05
  r, p = resid("correlated")  # neighbours correlate, channels do not
  assert along(r) > 0.15 and abs(across(r)) < 0.05 and 0.5 <= p["correlation_px"] <= 1.5
  # Shot noise grows with the signal.
  assert resid("poisson_gaussian", 200)[0].std() > 1.25 * resid("poisson_gaussian", 40)[0].std()


def test_noise_eval_and_train_sigma_ranges(photo):
  evals = [D.degrade(photo, "denoise", i, evaluation=True).params["steps"][0] for i in range(30)]
  assert {p["sigma"] for p in evals} == set(map(float, D.EVAL_SIGMAS))
  assert {p["noise"] for p in evals} == {"gaussian"}  # the literature's test noise
  train = [D.degrade(photo, "denoise", i).params["steps"][0] for i in range(30)]
  assert all(D.TRAIN_SIGMA_RANGE[0] <= p["sigma"] <= D.TRAIN_SIGMA_RANGE[1] for p in train)
  assert len({p["sigma"] for p in train}) == 30


@pytest.mark.parametrize("evaluation", [False, True])
def test_low_light_lowers_luminance(photo, evaluation):
  for seed in range(4):
    s = D.degrade(photo, "light_enhancement", seed, evaluation=evaluation)
    assert _luma(s.degraded).mean() < 0.5 * _luma(photo).mean()
    p = s.params["steps"][0]
    assert 0.08 <= p["exposure"] <= 0.5 and 0.9 <= p["gamma"] <= 3.0


@pytest.mark.parametrize("evaluation", [False, True])
def test_haze_lowers_contrast_and_saturation(photo, evaluation):
  sat = lambda a: skimage.color.rgb2hsv(a)[..., 1].mean()
  for seed in range(4):
    s = D.degrade(photo, "dehazing", seed, evaluation=evaluation)
    assert _local_contrast(s.degraded) < 0.9 * _local_contrast(photo)
    assert sat(s.degraded) < 0.9 * sat(photo)
    assert s.params["steps"][0]["depth"] == "proxy"
  thin, thick = (D.degrade(photo, "dehazing", 0, options={"dehazing": {"beta": b}}).degraded
                 for b in (0.5, 2.0))
  assert _local_contrast(thick) < 0.7 * _local_contrast(thin)


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


@pytest.mark.parametrize("evaluation", [False, True])
@pytest.mark.parametrize("task", ["deblur", "super_resolution"])
def test_blur_and_sr_remove_high_frequencies(photo, task, evaluation):
  for seed in range(4):
    s = D.degrade(photo, task, seed, evaluation=evaluation)
    assert _hf_energy(s.degraded) < 0.5 * _hf_energy(photo), (task, seed, s.params)


@pytest.mark.parametrize("pipeline", ["realesrgan", "classical"])
@pytest.mark.parametrize("scale", D.SR_SCALES)
def test_sr_goes_down_by_its_scale_then_back_to_input_size(photo, scale, pipeline):
  s = D.degrade(photo, "super_resolution", 1,
                options={"super_resolution": {"scale": scale, "pipeline": pipeline}})
  p = s.params["steps"][0]
  assert s.degraded.shape == photo.shape
  assert p["scale"] == scale and p["lr_size"] == [photo.shape[0] // scale, photo.shape[1] // scale]
  assert p["pipeline"] == pipeline and p["upsample"] == "bicubic"
  assert {"round1", "round2", "final"} <= set(p) if pipeline == "realesrgan" else (
      {"blur", "downsample", "noise_sigma", "jpeg"} <= set(p))


def test_sr_validation_is_x4_with_the_held_out_kernel(photo):
  p = D.degrade(photo, "super_resolution", 1, evaluation=True).params["steps"][0]
  assert (p["scale"], p["pipeline"], p["downsample"]) == (4, "classical", "lanczos")
  assert p["lr_size"] == [photo.shape[0] // 4, photo.shape[1] // 4]


def test_deblur_kinds():
  img = np.zeros((64, 64, 3), np.uint8)
  img[32, 32] = 255  # a point: the blurred image is the kernel
  for kind in D.BLUR_KINDS + D.BLUR_HELD_OUT:
    s = D.degrade(img, "deblur", 0, options={"deblur": {"kind": kind}})
    spread = (s.degraded[..., 0] > 0).sum()
    assert spread > 9, kind
    assert s.params["steps"][0]["kind"] == kind
  with pytest.raises(FapeError, match="Unknown blur kind"):
    D.degrade(img, "deblur", 0, options={"deblur": {"kind": "box"}})


@pytest.mark.parametrize("angle,evaluation", [(0.0, False), (20.0, False), (-25.0, False),
                                              (52.0, True), (-50.0, True)])
def test_rain_adds_bright_oriented_streaks(angle, evaluation):
  flat = np.full((128, 128, 3), 60, np.uint8)
  s = D.degrade(flat, "deraining", 5, evaluation=evaluation,
                options={"deraining": {"angle": angle, "layers": 1}})
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
  assert _local_contrast(x_haze) < 0.8 * _local_contrast(x_rain)
  assert np.percentile(x_haze, 5) > np.percentile(x_rain, 5)
  assert [p["task"] for p in s.params["steps"]] == mix.split("+")
  # A validation mix draws every part's held-out variant.
  low, rain, haze = D.degrade(photo, mix, [7, 7], evaluation=True).params["steps"]
  assert D.LOW_GAMMA_GAP[0] <= low["gamma"] <= D.LOW_GAMMA_GAP[1] and rain["composite"] == "screen"
  assert D.HAZE_BETA_GAP[0] <= haze["beta"] <= D.HAZE_BETA_GAP[1]


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


# ----------------------------------------------------------------------------------------------
# Training draws are wide and never produce the held-out validation choices
# ----------------------------------------------------------------------------------------------

N_TRAIN, N_EVAL = 200, 60


@pytest.fixture(scope="module")
def draws():
  """{(task, evaluation): step params} over many seeds on a tiny image (draws ignore content)."""
  tiny = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  return {(t, ev): [D.degrade(tiny, t, [s, 99], evaluation=ev).params["steps"][0]
                    for s in range(N_EVAL if ev else N_TRAIN)]
          for t in tasks_lib.TASKS for ev in (False, True)}


def _inside(v, lo_hi):
  return lo_hi[0] <= v <= lo_hi[1]


def test_denoise_draws(draws):
  train, val = draws["denoise", False], draws["denoise", True]
  sig = [p["sigma"] for p in train]
  assert all(_inside(s, D.TRAIN_SIGMA_RANGE) for s in sig) and min(sig) < 8 and max(sig) > 52
  kinds = [p["noise"] for p in train]
  assert set(kinds) == set(D.NOISE_KINDS) and max(set(kinds), key=kinds.count) == "gaussian"
  assert {(p["noise"], p["sigma"]) for p in val} == {("gaussian", float(s)) for s in D.EVAL_SIGMAS}


def test_deblur_draws(draws):
  train, val = draws["deblur", False], draws["deblur", True]
  assert {p["kind"] for p in train} == set(D.BLUR_KINDS)
  assert {p["kind"] for p in val} == set(D.BLUR_HELD_OUT)
  ext = [p["extent"] for p in train if p["kind"] == "motion"]
  assert all(_inside(e, (5, 25)) for e in ext) and min(ext) < 7 and max(ext) > 23
  gauss = [p for p in train if p["kind"] == "gaussian"]
  assert {p["isotropic"] for p in gauss} == {True, False}
  assert all(_inside(p[k], (0.6, 3.5)) for p in gauss for k in ("sigma_x", "sigma_y"))
  assert max(p["kernel_size"] for p in train + val) <= 27  # small next to a 256 px image


def test_rain_draws(draws):
  train, val = draws["deraining", False], draws["deraining", True]
  angles = [abs(layer["angle"]) for p in train for layer in p["layers"]]
  assert max(angles) <= D.RAIN_MAX_ANGLE and max(angles) > 50 and min(angles) < 10
  assert not any(D.RAIN_GAP[0] < a < D.RAIN_GAP[1] for a in angles)
  assert all(D.RAIN_GAP[0] < abs(layer["angle"]) < D.RAIN_GAP[1]
             for p in val for layer in p["layers"])
  assert {p["composite"] for p in train} == {"add"} and {p["composite"] for p in val} == {"screen"}
  layers = [layer for p in train for layer in p["layers"]]
  for key, lo_hi in (("width", (1, 4)), ("intensity", (0.2, 0.8)), ("length", (10, 50))):
    assert all(_inside(layer[key], lo_hi) for layer in layers), key
  assert 0 < np.mean([layer["blur"] > 0 for layer in layers]) < 0.5


def test_snow_draws(draws):
  train, val = draws["desnowing", False], draws["desnowing", True]
  assert all(layer["kind"] == "flake" and layer["radius"] <= D.SNOW_MAX_RADIUS
             for p in train for layer in p["layers"])
  assert all(any(layer["kind"] == "bokeh" and layer["radius"] > D.SNOW_MAX_RADIUS + 0.4
                 for layer in p["layers"]) for p in val)


def _in_gap(v, gap):
  return gap[0] < v < gap[1]


def test_haze_draws(draws):
  train, val = draws["dehazing", False], draws["dehazing", True]
  assert all(_inside(p["beta"], D.HAZE_BETA) and _inside(p["airlight_base"], D.HAZE_AIRLIGHT)
             for p in train)
  assert not any(_in_gap(p["beta"], D.HAZE_BETA_GAP) or
                 _in_gap(p["airlight_base"], D.HAZE_AIRLIGHT_GAP) for p in train)
  # Both sides of each gap are trained on; validation lies inside both gaps.
  for key, gap in (("beta", D.HAZE_BETA_GAP), ("airlight_base", D.HAZE_AIRLIGHT_GAP)):
    assert min(p[key] for p in train) < gap[0] and max(p[key] for p in train) > gap[1]
    assert all(_inside(p[key], gap) for p in val)


def test_low_light_draws(draws):
  train, val = draws["light_enhancement", False], draws["light_enhancement", True]
  assert all(_inside(p["gamma"], D.LOW_GAMMA) and _inside(p["exposure"], D.LOW_EXPOSURE)
             for p in train)
  assert not any(_in_gap(p["gamma"], D.LOW_GAMMA_GAP) for p in train)
  assert min(p["gamma"] for p in train) < 1.2 and max(p["gamma"] for p in train) > 2.6
  assert all(_inside(p["gamma"], D.LOW_GAMMA_GAP) for p in val)


def _sr_modes(p):
  if p["pipeline"] == "classical":
    return {p["downsample"]}
  return {p["round1"]["resize"]["mode"], p["round2"]["resize"]["mode"], p["final"]["resize_mode"]}


def test_sr_draws(draws):
  train, val = draws["super_resolution", False], draws["super_resolution", True]
  assert {p["scale"] for p in train} == set(D.SR_SCALES)
  assert {p["pipeline"] for p in train} == {"realesrgan", "classical"}
  assert set().union(*map(_sr_modes, train)) == set(D.SR_TRAIN_DOWN)  # never lanczos
  assert {(p["scale"], p["pipeline"], p["downsample"]) for p in val} == {
      (4, "classical", "lanczos")}
