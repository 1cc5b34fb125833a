"""Label-free degradation hints computed from pixels (METHOD.md section 2).

The planner's prompt carries a few hand-computed statistics next to the image, and the same numbers
drive the rule planner and the "does the answer contradict strong evidence" check. Every statistic
is computed on the image downscaled so that its long side is at most 1024 px (the SR size rule uses
the original size). Where METHOD.md leaves a detail open, the choice is stated next to the code.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color

from fape_jax.errors import FapeError

MAX_SIDE = 1024          # hints are computed on the image downscaled to this long side
SR_MAX_SIDE = 512        # both sides below this -> a low-resolution input (SR size rule)

# The authors' conflict thresholds: above (or, for blur, below) these the evidence is "strong".
RAIN_LINE = 0.16
RAIN_ANISOTROPY = 0.40
SNOW_BLOBS = 25
SNOW_MAX_ANISOTROPY = 0.42
NOISE_SCORE = 0.45
BLUR_GRAD95 = 0.17
HAZE_SCORE = 0.50
HAZE_DEPTH = 0.03
LOW_LIGHT_MEAN = 0.32
LOW_LIGHT_MEDIAN = 0.26


@dataclasses.dataclass(frozen=True)
class Hints:
  """The statistics of one image. All intensities are in [0, 1] units."""
  height: int                  # original size, before the <= 1024 px downscale
  width: int
  # rain: magnitude-weighted 18-bin gradient-orientation histogram, and FFT mid/low power ratio
  rain_line: float             # max bin / sum of bins
  # (max bin - mean bin) / mean bin. With 18 bins this is 18 * rain_line - 1, so as specified the
  # two rain numbers carry the same information; both are kept because the authors' thresholds
  # name both (anisotropy >= 0.40 for rain, <= 0.42 for snow).
  rain_anisotropy: float
  rain_fft_ratio: float        # power at 0.15-0.45 r_max / power below 0.15 r_max
  # snow: bright (gray > 0.78) connected blobs of 3-200 px
  snow_blobs: int
  snow_blob_density: float     # blobs per 10^4 px (ours: a size-independent version of the count)
  # noise: residual of a 3x3 mean in flat areas
  noise_mad: float
  noise_chroma: float
  noise_score: float
  # blur
  blur_laplacian_var: float
  blur_fft_ratio: float        # energy at 0.35-0.9 r_max / energy at <= 0.35 r_max
  blur_grad95: float           # 95th percentile gradient magnitude after two 3x3 smoothings
  # haze
  haze_dark: float             # mean dark channel (15x15 patches)
  haze_saturation: float       # mean HSV saturation
  haze_depth: float            # brightness(top 40 % rows) - brightness(bottom 40 % rows)
  haze_score: float
  # low light
  luma_mean: float
  luma_median: float
  luma_p99: float = 1.0   # 99th-percentile luminance: an under-exposed frame has no highlights

  @property
  def detail_ratio(self) -> float:
    """Laplacian variance / grad95^2 (ours): pixel-scale detail per unit of edge strength.

    Low for upsampled images (smooth ramps keep their gradients but lose all curvature), medium
    for blurred ones, high for intact or noisy ones.
    """
    return self.blur_laplacian_var / max(self.blur_grad95, 1e-3) ** 2

  @property
  def rain(self) -> bool:
    return self.rain_line >= RAIN_LINE and self.rain_anisotropy >= RAIN_ANISOTROPY

  @property
  def snow(self) -> bool:
    return self.snow_blobs >= SNOW_BLOBS and self.rain_anisotropy <= SNOW_MAX_ANISOTROPY

  @property
  def noisy(self) -> bool:
    return self.noise_score >= NOISE_SCORE

  @property
  def blurry(self) -> bool:
    return self.blur_grad95 <= BLUR_GRAD95

  @property
  def hazy(self) -> bool:
    return self.haze_score >= HAZE_SCORE and self.haze_depth >= HAZE_DEPTH

  @property
  def under_exposed(self) -> bool:
    return self.luma_mean < LOW_LIGHT_MEAN or self.luma_median < LOW_LIGHT_MEDIAN

  @property
  def low_resolution(self) -> bool:
    return self.height < SR_MAX_SIDE and self.width < SR_MAX_SIDE

  def strong_evidence(self) -> tuple[str, ...]:
    """Tasks whose statistic crosses the authors' conflict threshold, in vocabulary order.

    A planner answer outside this set (when it is not empty) contradicts strong evidence and is
    asked again with this set as the restricted choice list.
    """
    flags = {
        "deraining": self.rain,
        "desnowing": self.snow,
        "dehazing": self.hazy,
        "deblur": self.blurry,
        "denoise": self.noisy,
        "light_enhancement": self.under_exposed,
        "super_resolution": self.low_resolution,
    }
    return tuple(t for t, on in flags.items() if on)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Hints":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

  def lines(self) -> list[str]:
    """The hint lines that go into the planning prompt (one cue per line, thresholds named)."""
    def mark(on):
      return "STRONG" if on else "weak"
    return [
        f"- rain: line score {self.rain_line:.3f} (strong >= {RAIN_LINE}), orientation anisotropy "
        f"{self.rain_anisotropy:.2f} (strong >= {RAIN_ANISOTROPY}), mid/low FFT power "
        f"{self.rain_fft_ratio:.3f} -> {mark(self.rain)}",
        f"- snow: {self.snow_blobs} bright blobs of 3-200 px (strong >= {SNOW_BLOBS} with "
        f"anisotropy <= {SNOW_MAX_ANISOTROPY}) -> {mark(self.snow)}",
        f"- noise: flat-area MAD {self.noise_mad:.4f}, chroma std {self.noise_chroma:.4f}, score "
        f"{self.noise_score:.2f} (strong >= {NOISE_SCORE}) -> {mark(self.noisy)}",
        f"- blur: Laplacian variance {self.blur_laplacian_var:.5f}, outer/inner FFT energy "
        f"{self.blur_fft_ratio:.4f}, 95th-percentile gradient {self.blur_grad95:.3f} "
        f"(strong <= {BLUR_GRAD95}) -> {mark(self.blurry)}",
        f"- haze: dark channel {self.haze_dark:.2f}, saturation {self.haze_saturation:.2f}, depth "
        f"gradient {self.haze_depth:+.3f}, score {self.haze_score:.2f} (strong >= {HAZE_SCORE} "
        f"with depth >= {HAZE_DEPTH}) -> {mark(self.hazy)}",
        f"- low light: mean luminance {self.luma_mean:.2f} (< {LOW_LIGHT_MEAN}), median "
        f"{self.luma_median:.2f} (< {LOW_LIGHT_MEDIAN}) -> "
        f"{'UNDER-EXPOSED' if self.under_exposed else 'normal exposure'}",
        f"- size: {self.width}x{self.height} px -> "
        f"{'low resolution (both sides < %d)' % SR_MAX_SIDE if self.low_resolution else 'normal'}",
    ]


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


def downscale(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
  """Checks a uint8 HxWx3 image and shrinks it (area averaging) so its long side <= max_side."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise FapeError(
        f"Hints need a uint8 RGB image of shape (H, W, 3); got dtype {image.dtype} and shape "
        f"{image.shape}. Convert the image to 8-bit RGB first.")
  if min(image.shape[:2]) < 8:
    raise FapeError(f"Image of shape {image.shape} is too small for hints (need >= 8 px a side).")
  h, w = image.shape[:2]
  if max(h, w) > max_side:
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
  return image


def to_float_rgb(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
  """uint8 HxWx3 -> float32 [0, 1], downscaled so the long side <= max_side."""
  return downscale(image, max_side).astype(np.float32) / 255.0


def _radius(shape: tuple[int, int]) -> np.ndarray:
  """Normalised radial frequency of an (unshifted) 2-D FFT grid: 1.0 at the corner (r_max)."""
  fy = np.fft.fftfreq(shape[0])[:, None]
  fx = np.fft.fftfreq(shape[1])[None, :]
  r = np.hypot(fy, fx)
  return r / r.max()


def _power(gray: np.ndarray) -> np.ndarray:
  # The mean is removed first so the DC term does not swamp the low band.
  return np.abs(np.fft.fft2(gray - gray.mean())) ** 2


def compute_hints(image: np.ndarray) -> Hints:
  """All hints of one uint8 HxWx3 image."""
  h, w = np.asarray(image).shape[:2]
  rgb = to_float_rgb(image)
  gray = color.rgb2gray(rgb).astype(np.float64)
  eps = 1e-12

  # --- rain: magnitude-weighted orientation histogram (orientation modulo 180 degrees) ---
  gy = ndimage.sobel(gray, axis=0) / 8.0
  gx = ndimage.sobel(gray, axis=1) / 8.0
  mag = np.hypot(gx, gy)
  theta = np.mod(np.arctan2(gy, gx), np.pi)
  hist, _ = np.histogram(theta, bins=18, range=(0.0, np.pi), weights=mag)
  rain_line = float(hist.max() / (hist.sum() + eps))
  rain_anisotropy = float((hist.max() - hist.mean()) / (hist.mean() + eps))
  power = _power(gray)
  r = _radius(gray.shape)
  rain_fft_ratio = float(power[(r >= 0.15) & (r < 0.45)].sum() / (power[r < 0.15].sum() + eps))

  # --- snow: bright connected blobs of 3-200 px ---
  labels, n = ndimage.label(gray > 0.78)
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  snow_blobs = int(np.count_nonzero((sizes >= 3) & (sizes <= 200)))
  snow_blob_density = snow_blobs / (gray.size / 1e4)

  # --- noise: 3x3-mean residual in flat areas (gradient below its 25th percentile) ---
  flat = mag <= np.percentile(mag, 25)
  resid = gray - ndimage.uniform_filter(gray, 3, mode="reflect")
  rf = resid[flat]
  noise_mad = float(np.median(np.abs(rf - np.median(rf))))
  # Chroma: std of the Cb/Cr 3x3-mean residuals in flat areas (the residual, not Cb/Cr itself,
  # so flat regions of different colours do not count as noise). Cb/Cr in [0, 1] units.
  ycc = color.rgb2ycbcr(rgb) / 255.0
  chroma = []
  for c in (1, 2):
    res_c = ycc[..., c] - ndimage.uniform_filter(ycc[..., c], 3, mode="reflect")
    chroma.append(res_c[flat].std())
  noise_chroma = float(np.mean(chroma))
  noise_score = (0.6 * _sigmoid(50 * (noise_mad - 0.005))
                 + 0.4 * _sigmoid(50 * (noise_chroma - 0.0095)))

  # --- blur ---
  blur_laplacian_var = float(ndimage.laplace(gray).var())
  blur_fft_ratio = float(power[(r > 0.35) & (r <= 0.9)].sum() / (power[r <= 0.35].sum() + eps))
  smooth = ndimage.uniform_filter(ndimage.uniform_filter(gray, 3), 3)
  sgy, sgx = np.gradient(smooth)
  # Central differences scaled to "intensity change per 2 px", so a clean step edge after the
  # two smoothings reads ~0.5 and a blurred one falls under the 0.17 threshold.
  blur_grad95 = float(np.percentile(2.0 * np.hypot(sgx, sgy), 95))

  # --- haze ---
  dark = ndimage.minimum_filter(rgb.min(axis=-1), size=15, mode="nearest")
  haze_dark = float(dark.mean())
  haze_saturation = float(color.rgb2hsv(rgb)[..., 1].mean())
  rows = gray.shape[0]
  k = max(1, int(round(0.4 * rows)))
  haze_depth = float(gray[:k].mean() - gray[rows - k:].mean())
  haze_score = (0.4 * _sigmoid(7 * (haze_dark - 0.33)) + 0.3 * _sigmoid(7 * (0.30 - haze_saturation))
                + 0.3 * _sigmoid(8 * (haze_depth - 0.03)))

  return Hints(
      height=int(h), width=int(w),
      rain_line=rain_line, rain_anisotropy=rain_anisotropy, rain_fft_ratio=rain_fft_ratio,
      snow_blobs=snow_blobs, snow_blob_density=float(snow_blob_density),
      noise_mad=noise_mad, noise_chroma=noise_chroma, noise_score=float(noise_score),
      blur_laplacian_var=blur_laplacian_var, blur_fft_ratio=blur_fft_ratio,
      blur_grad95=blur_grad95,
      haze_dark=haze_dark, haze_saturation=haze_saturation, haze_depth=haze_depth,
      haze_score=float(haze_score),
      luma_mean=float(gray.mean()), luma_median=float(np.median(gray)),
      luma_p99=float(np.percentile(gray, 99)),
  )
