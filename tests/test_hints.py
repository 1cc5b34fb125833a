"""Hints: the METHOD.md formulas on images with known answers, and each cue moving the right way
under the data side's synthetic degradations."""

import math

import numpy as np
import pytest
from PIL import Image

from fape_jax.data import corpus, degrade
from fape_jax.errors import FapeError
from fape_jax.planning import hints as hints_lib
from fape_jax.planning.hints import compute_hints

SIZE = 160


def _sig(x):
  return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def cleans():
  out = {}
  for entry in corpus.split("train")[:4]:
    img = corpus.load(entry)
    h, w = img.shape[:2]
    s = SIZE / max(h, w)
    out[entry.name] = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)),
                                                             Image.Resampling.BOX))
  return out


@pytest.fixture(scope="module")
def table(cleans):
  """hints[image][task or 'clean'] over a few training images and two variants per task."""
  out = {}
  for name, img in cleans.items():
    out[name] = {"clean": [compute_hints(img)]}
    for task in ("deraining", "desnowing", "dehazing", "deblur", "denoise", "light_enhancement",
                 "super_resolution"):
      out[name][task] = [compute_hints(degrade.degrade(img, task, (1, v)).degraded)
                         for v in range(2)]
  return out


def test_formulas_on_known_images():
  # Vertical stripes: every gradient is horizontal, so one orientation bin holds all the mass.
  stripes = np.zeros((64, 64, 3), np.uint8)
  stripes[:, ::4] = 255
  h = compute_hints(stripes)
  assert h.rain_line == pytest.approx(1.0, abs=1e-6)
  assert h.rain_anisotropy == pytest.approx(17.0, abs=1e-4)   # (max - mean) / mean, 18 bins
  assert h.rain and not h.snow
  # A flat mid-gray: no residual, no saturation, no depth gradient -> the formulas' constants.
  gray = np.full((64, 96, 3), 128, np.uint8)
  h = compute_hints(gray)
  v = 128 / 255
  assert h.noise_mad == 0 and h.noise_chroma == 0
  assert h.noise_score == pytest.approx(0.6 * _sig(50 * -0.005) + 0.4 * _sig(50 * -0.0095))
  assert h.haze_dark == pytest.approx(v, abs=1e-6) and h.haze_saturation == 0
  assert h.haze_score == pytest.approx(
      0.4 * _sig(7 * (v - 0.33)) + 0.3 * _sig(7 * 0.30) + 0.3 * _sig(8 * -0.03), abs=1e-6)
  assert h.luma_mean == pytest.approx(v, abs=1e-6) and not h.under_exposed
  # Bright blobs of 3-200 px are counted, a 300 px one is not.
  dots = np.zeros((100, 100, 3), np.uint8)
  for i in range(5):
    dots[10 + 15 * i:12 + 15 * i, 10:12] = 255          # 4 px each
  dots[80:95, 50:70] = 255                              # 300 px
  assert compute_hints(dots).snow_blobs == 5
  # Dark image: under-exposed by the authors' mean/median rule.
  assert compute_hints(np.full((32, 32, 3), 50, np.uint8)).under_exposed


def test_size_rule_and_downscale():
  rng = np.random.default_rng(0)
  small = compute_hints(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
  assert small.low_resolution and "super_resolution" in small.strong_evidence()
  big = np.asarray(Image.fromarray(rng.integers(0, 256, (60, 120, 3), dtype=np.uint8)).resize(
      (2400, 1200), Image.Resampling.NEAREST))
  hb = compute_hints(big)
  assert (hb.height, hb.width) == (1200, 2400) and not hb.low_resolution
  # The statistics are those of the image downscaled to a 1024 px long side.
  ref = compute_hints(hints_lib.downscale(big))
  assert hb.blur_grad95 == ref.blur_grad95 and hb.snow_blobs == ref.snow_blobs
  assert hints_lib.downscale(big).shape == (512, 1024, 3)
  with pytest.raises(FapeError, match="uint8 RGB"):
    compute_hints(np.zeros((32, 32), np.uint8))
  with pytest.raises(FapeError, match="uint8 RGB"):
    compute_hints(np.zeros((32, 32, 3), np.float32))


def _moves(table, task, key, sign):
  """Fraction of (image, variant) where hint `key` moved by `sign` from the clean image."""
  moved = [sign * (getattr(h, key) - getattr(t["clean"][0], key)) > 0
           for t in table.values() for h in t[task]]
  return np.mean(moved)


@pytest.mark.parametrize("task, key, sign", [
    # rain_line: see test_rain_line_moves_up_on_most_rain (faint sparse rain barely moves it).
    ("deraining", "rain_fft_ratio", +1),
    ("desnowing", "snow_blobs", +1),
    ("denoise", "noise_score", +1),
    ("denoise", "noise_mad", +1),
    ("denoise", "noise_chroma", +1),
    ("deblur", "blur_laplacian_var", -1),
    ("deblur", "blur_fft_ratio", -1),
    ("deblur", "blur_grad95", -1),
    ("dehazing", "haze_score", +1),
    ("dehazing", "haze_dark", +1),
    ("light_enhancement", "luma_mean", -1),
    ("light_enhancement", "luma_median", -1),
    ("super_resolution", "detail_ratio", -1),
])
def test_each_cue_moves_the_right_way(table, task, key, sign):
  assert _moves(table, task, key, sign) == 1.0


def test_rain_line_moves_up_on_most_rain(table):
  # The training draw reaches faint, sparse rain (0.05 % streak density, intensity 0.2), which
  # hardly changes a photo's gradient-orientation histogram: 76 % of 80 draws moved it (the
  # narrower recipe 1 moved 89 %); 6 of these 8 samples do.
  assert _moves(table, "deraining", "rain_line", +1) >= 0.75


def test_strong_flags_fire_on_their_degradation(table):
  def rate(task, flag):
    return np.mean([getattr(h, flag) for t in table.values() for h in t[task]])

  # The authors' thresholds as specified. (Their snow flag needs orientation anisotropy <= 0.42,
  # i.e. a line score <= 0.079: nearly isotropic gradients, which natural photos rarely have, so
  # it is not asserted here; the rule planner counts blobs per area instead.)
  assert rate("denoise", "noisy") >= 0.75
  assert rate("light_enhancement", "under_exposed") == 1.0
  assert rate("dehazing", "hazy") >= 0.75
  assert rate("deraining", "rain") >= 0.5
  assert rate("deblur", "blurry") >= 0.75
  # ...and more often than on the clean images they came from.
  for task, flag in (("denoise", "noisy"), ("dehazing", "hazy"), ("deraining", "rain"),
                     ("deblur", "blurry"), ("light_enhancement", "under_exposed")):
    assert rate(task, flag) > np.mean([getattr(t["clean"][0], flag) for t in table.values()])
  lines = "\n".join(table["astronaut"]["dehazing"][0].lines())
  assert "haze:" in lines and "STRONG" in lines
