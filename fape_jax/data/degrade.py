"""Seeded synthesis of the seven degradations and their CDD-11-style mixes.

`degrade(clean_uint8, task, seed)` returns a `Sample` with the degraded uint8 image (same size as
the input) and a JSON-able dict of everything that was drawn. The same seed gives the same bytes:
every random number comes from one `np.random.Generator` built from the seed, and the library calls
(scipy FFT convolution, Pillow resize/JPEG) are deterministic. Work happens in float32 [0, 1];
each step clips to [0, 1] and the result is rounded to 8 bit once at the end (JPEG steps inside the
super-resolution recipe quantise too, as a real encoder does).

Recipes (parameters from the field, see /work/shared/DEGRADATIONS.md; all in pixels of the image
being degraded, which for the synthetic store is <= 256 px on the long side):

  denoise            clip(x + sigma * N(0, 1)), sigma in 8-bit units: evaluation takes sigma from
                     {15, 25, 50} (`EVAL_SIGMAS`, cycled over variants by the builder); training
                     draws sigma ~ U[5, 50] (the blind U[0, 50] without its near-clean end, which
                     teaches only the identity and gives an infinite degraded PSNR).
  deraining          1-3 streak layers sharing a direction within +-30 deg of vertical (+-5 deg per
                     layer): sparse seeds (density 0.1-0.8 % of pixels) convolved with a rotated
                     line kernel (length 20-40 px, width 1-3 px), normalised and added with
                     intensity 0.25-0.7 (additive composite as in OneRestore / MiOIR; from light
                     to Rain100H-heavy).
  desnowing          three particle layers (radius ~0.7, ~1.6 and ~3 px; many small, few large),
                     Gaussian blobs motion-blurred along a common fall direction (line length
                     2-4x the radius), composited as lq * (1 - m) + m * c with c in [0.85, 1]
                     (Snow100K / CSD style occlusion).
  dehazing           I = J t + A (1 - t), t = exp(-beta d), beta ~ U(0.6, 1.8), A ~ U(0.7, 1.0)
                     with a +-0.04 per-channel tint (MiOIR's ranges, depth normalised to [0, 1]).
                     The depth `d` is a proxy unless a real depth map is passed
                     (`degrade(..., depth=array)` or `options={"dehazing": {"depth": array}}`):
                     0.5 * a vertical ramp (top of the frame far) + 0.5 * the heavily smoothed dark
                     channel (bright, colourless regions such as sky read as far: the dark-channel
                     prior run backwards), normalised to [0, 1].
  deblur             one of: a random motion trajectory (p 0.5; a momentum random walk rasterised
                     with bilinear splats, extent 7-21 px), a defocus disk (p 0.25; anti-aliased,
                     radius 1.5-4.5 px), or an anisotropic Gaussian (p 0.25; sigmas 0.8-3 px,
                     random angle).
  light_enhancement  y = e * x^g per channel gains (colour shift exp(N(0, 0.08)), mean 1), exposure
                     e ~ U(0.15, 0.45), gamma g ~ U(1.3, 2.2), then Poisson-Gaussian sensor noise:
                     Poisson(y * peak) / peak with peak ~ logU(80, 800) photons at white, plus read
                     noise sigma ~ U(0.002, 0.01).
  super_resolution   Real-ESRGAN's second-order pipeline with its published options (kernel 7-21 px:
                     iso/aniso/generalised/plateau Gaussians or sinc; resize up/down/keep with
                     area/bilinear/bicubic; Gaussian or Poisson noise, gray with p 0.4; JPEG
                     q 30-95; twice, the second round with milder ranges and blur p 0.8; final
                     resize to 1/4 with a sinc filter p 0.8 and JPEG in random order), x4 down, then
                     bicubic back up to the input size (what the executor is fed). Resizes use
                     Pillow, which anti-aliases when shrinking (the reference uses torch's
                     interpolate); Poisson noise uses 256 levels (the reference counts the image's
                     unique values, which is <= 256 for 8-bit input).
  mixes              `fape_jax.tasks.MIXES`, parts applied in order (low light, then rain or snow,
                     then haze, as CDD-11); the params list every step.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage, signal, special

from fape_jax import tasks as tasks_lib
from fape_jax.errors import FapeError

EVAL_SIGMAS = (15, 25, 50)
TRAIN_SIGMA_RANGE = (5.0, 50.0)


@dataclasses.dataclass(frozen=True)
class Sample:
  """A degraded image (uint8, HxWx3, same size as the clean input) and what made it."""
  degraded: np.ndarray
  params: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def _filter2d(x: np.ndarray, k: np.ndarray) -> np.ndarray:
  """Convolves an (H, W[, C]) image with a 2-D kernel, reflect-padded like Real-ESRGAN's."""
  ph, pw = k.shape[0] // 2, k.shape[1] // 2
  pad = [(ph, k.shape[0] - 1 - ph), (pw, k.shape[1] - 1 - pw)] + [(0, 0)] * (x.ndim - 2)
  xp = np.pad(x, pad, mode="reflect" if min(x.shape[:2]) > 1 else "edge")
  kk = k[..., None] if x.ndim == 3 else k
  return signal.fftconvolve(xp, kk.astype(np.float32), mode="valid", axes=(0, 1)).astype(
      np.float32)


def _resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
  """Resizes float (H, W, C) to (h, w) with Pillow, channel by channel in 32-bit float mode."""
  h, w = max(1, int(size[0])), max(1, int(size[1]))
  resample = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}[mode]
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F").resize(
      (w, h), resample)) for c in range(x.shape[2])]
  return np.stack(chans, axis=-1).astype(np.float32)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
  """Round-trips through Pillow's JPEG codec (4:2:0 chroma, as real encoders default to)."""
  buf = io.BytesIO()
  Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=int(quality))
  buf.seek(0)
  with Image.open(buf) as im:
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _luminance(x: np.ndarray) -> np.ndarray:
  return x @ np.asarray([0.299, 0.587, 0.114], np.float32)


def line_kernel(length: float, angle_deg: float, width: float = 1.0) -> np.ndarray:
  """Normalised line kernel; angle 0 = vertical, positive tilts the top end to the left."""
  size = int(math.ceil(length)) | 1
  k = np.zeros((size, size), np.float32)
  c = size // 2
  half_w = max(width, 1.0) / 2.0
  lo, hi = int(math.floor(c - half_w + 0.5)), int(math.floor(c + half_w + 0.5))
  k[:, lo:max(hi, lo + 1)] = 1.0
  # Shorten to the requested length along the line (rows), then rotate (bilinear).
  cut = (size - length) / 2.0
  rows = np.arange(size) + 0.5
  k *= np.clip(np.minimum(rows - cut, size - cut - rows + 1.0), 0.0, 1.0)[:, None]
  k = ndimage.rotate(k, angle_deg, reshape=False, order=1, mode="constant")
  k = np.clip(k, 0.0, None)
  return k / max(float(k.sum()), 1e-8)


def _disk_kernel(radius: float) -> np.ndarray:
  """Anti-aliased disk (4x4 supersampled coverage), normalised."""
  size = 2 * int(math.ceil(radius)) + 1
  c = size // 2
  sub = (np.arange(size * 4) + 0.5) / 4.0 - 0.5 - c
  yy, xx = np.meshgrid(sub, sub, indexing="ij")
  cover = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float32)
  k = cover.reshape(size, 4, size, 4).mean(axis=(1, 3))
  return k / k.sum()


def _cov(sig_x: float, sig_y: float, theta: float) -> np.ndarray:
  rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  return rot @ np.diag([sig_x ** 2, sig_y ** 2]) @ rot.T


def _grid(size: int) -> np.ndarray:
  ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
  xx, yy = np.meshgrid(ax, ax)
  return np.stack([xx, yy], axis=-1)


def gaussian_kernel(size: int, sig_x: float, sig_y: float, theta: float,
                    beta: float = 1.0, kind: str = "gaussian") -> np.ndarray:
  """Real-ESRGAN's bivariate kernels: 'gaussian', 'generalized' (exp(-0.5 q^beta)), 'plateau'.

  Hand-written because no maintained library in our dependencies ships them (basicsr is the
  reference, but it pulls in a CUDA/OpenCV stack for three formulas).
  """
  g = _grid(size)
  q = np.sum((g @ np.linalg.inv(_cov(sig_x, sig_y, theta))) * g, axis=-1)
  if kind == "gaussian":
    k = np.exp(-0.5 * q)
  elif kind == "generalized":
    k = np.exp(-0.5 * np.power(q, beta))
  elif kind == "plateau":
    k = 1.0 / (np.power(q, beta) + 1.0)
  else:
    raise ValueError(kind)
  return (k / k.sum()).astype(np.float32)


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
  """Circular low-pass (2-D sinc, first-order Bessel) kernel, as Real-ESRGAN's."""
  g = _grid(size)
  r = np.sqrt(np.sum(g ** 2, axis=-1))
  with np.errstate(divide="ignore", invalid="ignore"):
    k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
  k[size // 2, size // 2] = cutoff ** 2 / (4 * np.pi)
  return (k / k.sum()).astype(np.float32)


def _clip(x: np.ndarray) -> np.ndarray:
  return np.clip(x, 0.0, 1.0, out=x)


# ----------------------------------------------------------------------------------------------
# The seven degradations: (x float32 HxWx3 in [0, 1], rng, **options) -> (y, params)
# ----------------------------------------------------------------------------------------------

def add_noise(x, rng, *, sigma: float | None = None, evaluation: bool = False):
  if sigma is None:
    sigma = (float(rng.choice(EVAL_SIGMAS)) if evaluation else float(rng.uniform(
        *TRAIN_SIGMA_RANGE)))
  y = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(sigma / 255.0)
  return _clip(y), {"sigma": float(sigma)}


def add_rain(x, rng, *, angle: float | None = None, layers: int | None = None, **_):
  h, w = x.shape[:2]
  base = float(rng.uniform(-30.0, 30.0)) if angle is None else float(angle)
  n = int(rng.integers(1, 4)) if layers is None else int(layers)
  rain = np.zeros((h, w), np.float32)
  plist = []
  for _ in range(n):
    p = {"density": float(rng.uniform(0.001, 0.008)), "length": float(rng.uniform(20.0, 40.0)),
         "width": float(rng.uniform(1.0, 3.0)),
         "angle": float(np.clip(base + rng.uniform(-5.0, 5.0), -35.0, 35.0)),
         "intensity": float(rng.uniform(0.25, 0.7))}
    seeds = (rng.random((h, w), dtype=np.float32) < p["density"]).astype(np.float32)
    seeds *= rng.uniform(0.5, 1.0, (h, w)).astype(np.float32)
    layer = _filter2d(seeds, line_kernel(p["length"], p["angle"], p["width"]))
    peak = float(np.percentile(layer, 99.9)) if layer.any() else 1.0
    layer = np.clip(layer / max(peak, 1e-6), 0.0, 1.0) * p["intensity"]
    rain = np.maximum(rain, layer)
    plist.append(p)
  return _clip(x + rain[..., None]), {"angle": base, "layers": plist}


_SNOW_LAYERS = (  # (blob radius range px, particles per 10k px range)
    ((0.5, 0.9), (20.0, 60.0)),
    ((1.2, 2.0), (4.0, 12.0)),
    ((2.4, 3.6), (0.5, 2.5)),
)


def add_snow(x, rng, *, angle: float | None = None, **_):
  h, w = x.shape[:2]
  fall = float(rng.uniform(-45.0, 45.0)) if angle is None else float(angle)
  colour = float(rng.uniform(0.85, 1.0))
  mask = np.zeros((h, w), np.float32)
  plist = []
  for (r_lo, r_hi), (d_lo, d_hi) in _SNOW_LAYERS:
    radius = float(rng.uniform(r_lo, r_hi))
    density = float(rng.uniform(d_lo, d_hi))
    count = max(1, int(round(density * h * w / 1e4)))
    blur_len = float(radius * rng.uniform(2.0, 4.0))
    seeds = np.zeros((h, w), np.float32)
    ys, xs = rng.integers(0, h, count), rng.integers(0, w, count)
    np.add.at(seeds, (ys, xs), rng.uniform(0.6, 1.0, count).astype(np.float32))
    # Scale the Gaussian so an isolated particle peaks near its drawn opacity (x1.5 saturates
    # the core: snowflakes are opaque in the middle).
    blobs = ndimage.gaussian_filter(seeds, radius, mode="wrap") * (2 * np.pi * radius ** 2) * 1.5
    streak = _filter2d(blobs, line_kernel(max(blur_len, 1.0), fall, 1.0))
    streak *= float(max(blur_len, 1.0)) ** 0.5  # keep motion-blurred flakes visible
    mask = np.maximum(mask, np.clip(streak, 0.0, 1.0))
    plist.append({"radius": radius, "count": count, "motion_length": blur_len})
  y = x * (1.0 - mask[..., None]) + mask[..., None] * colour
  return _clip(y), {"angle": fall, "colour": colour, "layers": plist,
                    "coverage": float(mask.mean())}


def depth_proxy(x: np.ndarray) -> np.ndarray:
  """Relative depth in [0, 1] (1 = far) from a vertical ramp and the smoothed dark channel."""
  h, w = x.shape[:2]
  ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
  dark = ndimage.minimum_filter(x.min(axis=2), size=max(3, min(h, w) // 32))
  dark = ndimage.gaussian_filter(dark, max(h, w) / 24.0, mode="nearest")
  d = 0.5 * ramp + 0.5 * dark
  return ((d - d.min()) / max(float(d.max() - d.min()), 1e-6)).astype(np.float32)


def add_haze(x, rng, *, depth: np.ndarray | None = None, beta: float | None = None,
             airlight: float | None = None, **_):
  h, w = x.shape[:2]
  if depth is None:
    d, source = depth_proxy(x), "proxy"
  else:
    d = np.asarray(depth, np.float32)
    if d.shape[:2] != (h, w):
      raise FapeError(f"Depth map of shape {d.shape} does not match the image {h}x{w}; store a "
                      "depth map of the clean image's size.")
    d = d.reshape(h, w)
    d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
    source = "given"
  beta = float(rng.uniform(0.6, 1.8)) if beta is None else float(beta)
  a = float(rng.uniform(0.7, 1.0)) if airlight is None else float(airlight)
  tint = rng.uniform(-0.04, 0.04, 3).astype(np.float32)
  a_rgb = np.clip(a + tint, 0.0, 1.0)
  t = np.exp(-beta * d)[..., None]
  y = x * t + a_rgb * (1.0 - t)
  return _clip(y.astype(np.float32)), {"beta": beta, "airlight": [float(v) for v in a_rgb],
                                        "depth": source, "t_min": float(t.min())}


def motion_kernel(rng, extent: float) -> tuple[np.ndarray, dict]:
  """A random camera-shake trajectory (momentum random walk), rasterised with bilinear splats."""
  n = 64
  pos = np.zeros((n, 2))
  heading = rng.uniform(0, 2 * np.pi)
  v = np.array([math.cos(heading), math.sin(heading)])
  for i in range(1, n):
    v = 0.85 * v + 0.5 * rng.standard_normal(2) / math.sqrt(n)
    v += 0.15 * np.array([math.cos(heading), math.sin(heading)])
    pos[i] = pos[i - 1] + v
  pos -= pos.mean(axis=0)
  span = max(float(np.abs(pos).max()), 1e-6)
  pos *= (extent / 2.0) / span
  size = int(math.ceil(extent)) | 1
  size += 2
  k = np.zeros((size, size), np.float64)
  c = size // 2
  for py, px in pos:
    y0, x0 = math.floor(py + c), math.floor(px + c)
    fy, fx = py + c - y0, px + c - x0
    for dy, wy in ((0, 1 - fy), (1, fy)):
      for dx, wx in ((0, 1 - fx), (1, fx)):
        if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
          k[y0 + dy, x0 + dx] += wy * wx
  return (k / k.sum()).astype(np.float32), {"kind": "motion", "extent": float(extent),
                                            "heading_deg": float(np.degrees(heading))}


def add_blur(x, rng, *, kind: str | None = None, **_):
  kind = kind or str(rng.choice(["motion", "defocus", "gaussian"], p=[0.5, 0.25, 0.25]))
  if kind == "motion":
    k, p = motion_kernel(rng, float(rng.uniform(7.0, 21.0)))
  elif kind == "defocus":
    r = float(rng.uniform(1.5, 4.5))
    k, p = _disk_kernel(r), {"kind": "defocus", "radius": r}
  elif kind == "gaussian":
    sx, sy = float(rng.uniform(0.8, 3.0)), float(rng.uniform(0.8, 3.0))
    th = float(rng.uniform(0, np.pi))
    size = 2 * int(math.ceil(3 * max(sx, sy))) + 1
    k = gaussian_kernel(size, sx, sy, th)
    p = {"kind": "gaussian", "sigma_x": sx, "sigma_y": sy, "theta": th}
  else:
    raise FapeError(f"Unknown blur kind {kind!r}; use motion, defocus or gaussian.")
  p["kernel_size"] = int(k.shape[0])
  return _clip(_filter2d(x, k)), p


def add_low_light(x, rng, *, exposure: float | None = None, gamma: float | None = None, **_):
  e = float(rng.uniform(0.15, 0.45)) if exposure is None else float(exposure)
  g = float(rng.uniform(1.3, 2.2)) if gamma is None else float(gamma)
  gains = np.exp(rng.normal(0.0, 0.08, 3))
  gains = (gains / gains.mean()).astype(np.float32)
  y = e * np.power(x, g) * gains
  peak = float(math.exp(rng.uniform(math.log(80.0), math.log(800.0))))
  read = float(rng.uniform(0.002, 0.01))
  y = rng.poisson(np.clip(y, 0, 1).astype(np.float64) * peak).astype(np.float32) / peak
  y += rng.standard_normal(y.shape, dtype=np.float32) * np.float32(read)
  return _clip(y), {"exposure": e, "gamma": g, "gains": [float(v) for v in gains],
                    "peak": peak, "read_sigma": read}


# --- Real-ESRGAN second-order pipeline (options as in its train_realesrgan_x4plus.yml) ---
_ESR_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                "plateau_aniso")
_ESR_KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
_ESR = {
    1: dict(sinc_prob=0.1, sigma=(0.2, 3.0), resize_prob=(0.2, 0.7, 0.1), resize=(0.15, 1.5),
            gauss_prob=0.5, noise=(1.0, 30.0), poisson=(0.05, 3.0), gray_prob=0.4, jpeg=(30, 95),
            blur_prob=1.0),
    2: dict(sinc_prob=0.1, sigma=(0.2, 1.5), resize_prob=(0.3, 0.4, 0.3), resize=(0.3, 1.2),
            gauss_prob=0.5, noise=(1.0, 25.0), poisson=(0.05, 2.5), gray_prob=0.4, jpeg=(30, 95),
            blur_prob=0.8),
}
_BETA_G, _BETA_P = (0.5, 4.0), (1.0, 2.0)
SR_SCALE = 4


def _esr_kernel(rng, sigma_range, sinc_prob) -> tuple[np.ndarray, dict]:
  size = int(rng.choice(np.arange(7, 22, 2)))
  if rng.random() < sinc_prob:
    cutoff = float(rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi))
    k, p = sinc_kernel(size, cutoff), {"kind": "sinc", "cutoff": cutoff}
  else:
    kind = str(rng.choice(_ESR_KERNELS, p=_ESR_KERNEL_PROB))
    sx = float(rng.uniform(*sigma_range))
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sy = sx if iso else float(rng.uniform(*sigma_range))
    th = 0.0 if iso else float(rng.uniform(-np.pi, np.pi))
    beta_range = _BETA_G if kind.startswith("generalized") else _BETA_P
    beta = float(rng.uniform(beta_range[0], 1.0) if rng.random() < 0.5
                 else rng.uniform(1.0, beta_range[1]))
    family = kind.split("_")[0] if "_" in kind else "gaussian"
    k = gaussian_kernel(size, sx, sy, th, beta, family)
    p = {"kind": kind, "sigma_x": sx, "sigma_y": sy, "theta": th}
    if family != "gaussian":
      p["beta"] = beta
  p["size"] = size
  return k, p


def _esr_noise(x, rng, o) -> tuple[np.ndarray, dict]:
  gray = bool(rng.random() < o["gray_prob"])
  if rng.random() < o["gauss_prob"]:
    sigma = float(rng.uniform(*o["noise"]))
    shape = x.shape[:2] + (1,) if gray else x.shape
    y = x + rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
    p = {"noise": "gaussian", "sigma": sigma, "gray": gray}
  else:
    scale = float(rng.uniform(*o["poisson"]))
    src = _luminance(x)[..., None] if gray else x
    lvl = 256.0
    noise = rng.poisson(np.clip(src, 0, 1).astype(np.float64) * lvl).astype(np.float32) / lvl - src
    y = x + noise * np.float32(scale)
    p = {"noise": "poisson", "scale": scale, "gray": gray}
  return _clip(y), p


def _esr_round(x, rng, stage: int, out_h: int, out_w: int):
  o = _ESR[stage]
  p: dict[str, Any] = {}
  if rng.random() < o["blur_prob"]:
    k, p["blur"] = _esr_kernel(rng, o["sigma"], o["sinc_prob"])
    x = _clip(_filter2d(x, k))
  kind = str(rng.choice(["up", "down", "keep"], p=o["resize_prob"]))
  scale = {"up": lambda: rng.uniform(1.0, o["resize"][1]),
           "down": lambda: rng.uniform(o["resize"][0], 1.0), "keep": lambda: 1.0}[kind]()
  mode = str(rng.choice(["area", "bilinear", "bicubic"]))
  # Round 1 resizes relative to the input, round 2 relative to the final LR size (as the ref.).
  base_h, base_w = (x.shape[0], x.shape[1]) if stage == 1 else (out_h, out_w)
  x = _clip(_resize(x, (round(base_h * scale), round(base_w * scale)), mode))
  p["resize"] = {"kind": kind, "scale": float(scale), "mode": mode}
  x, p["noise"] = _esr_noise(x, rng, o)
  q = int(rng.integers(o["jpeg"][0], o["jpeg"][1] + 1))
  x = _jpeg(x, q)
  p["jpeg"] = q
  return x, p


def add_sr(x, rng, *, scale: int = SR_SCALE, **_):
  h, w = x.shape[:2]
  lh, lw = max(1, h // scale), max(1, w // scale)
  y, p1 = _esr_round(x, rng, 1, lh, lw)
  y, p2 = _esr_round(y, rng, 2, lh, lw)
  mode = str(rng.choice(["area", "bilinear", "bicubic"]))
  final_sinc = bool(rng.random() < 0.8)
  if final_sinc:
    size = int(rng.choice(np.arange(7, 22, 2)))
    cutoff = float(rng.uniform(np.pi / 3, np.pi))
    sk = sinc_kernel(size, cutoff)
  else:
    size, cutoff, sk = 1, None, np.ones((1, 1), np.float32)
  q = int(rng.integers(30, 96))
  jpeg_first = bool(rng.random() < 0.5)
  if jpeg_first:
    y = _jpeg(y, q)
    y = _clip(_filter2d(_resize(y, (lh, lw), mode), sk))
  else:
    y = _clip(_filter2d(_resize(y, (lh, lw), mode), sk))
    y = _jpeg(y, q)
  lr = np.round(y * 255.0) / 255.0
  up = _clip(_resize(lr.astype(np.float32), (h, w), "bicubic"))
  return up, {"scale": scale, "lr_size": [lh, lw], "round1": p1, "round2": p2,
              "final": {"resize_mode": mode, "sinc": final_sinc, "sinc_cutoff": cutoff,
                        "sinc_size": size, "jpeg": q, "jpeg_first": jpeg_first},
              "upsample": "bicubic"}


SYNTHESIZERS = {
    "denoise": add_noise,
    "deraining": add_rain,
    "desnowing": add_snow,
    "dehazing": add_haze,
    "deblur": add_blur,
    "light_enhancement": add_low_light,
    "super_resolution": add_sr,
}
assert set(SYNTHESIZERS) == set(tasks_lib.TASKS)
MIX_NAMES = tuple(tasks_lib.mix_name(m) for m in tasks_lib.MIXES)


def parse_task(task: str | Sequence[str]) -> tuple[str, ...]:
  """'a+b' or ('a', 'b') or 'a' -> tuple of known task names, in application order."""
  parts = tuple(task.split("+")) if isinstance(task, str) else tuple(task)
  unknown = [p for p in parts if p not in SYNTHESIZERS]
  if not parts or unknown:
    raise FapeError(f"Unknown degradation {task!r}: each part must be one of "
                    f"{', '.join(tasks_lib.TASKS)} (mixes join parts with '+').")
  return parts


def degrade(clean: np.ndarray, task: str | Sequence[str], seed: int | Sequence[int], *,
            evaluation: bool = False, depth: np.ndarray | None = None,
            options: Mapping[str, Mapping[str, Any]] | None = None) -> Sample:
  """Degrades `clean` (uint8 HxWx3) with one task or a mix, deterministically from `seed`.

  Args:
    clean: the clean image, uint8 (H, W, 3).
    task: a task name, a mix name ('light_enhancement+dehazing') or a tuple of task names.
    seed: an int or a sequence of ints (e.g. (base_seed, image, task, variant)).
    evaluation: denoise draws sigma from EVAL_SIGMAS instead of the training range.
    depth: optional real depth map (H, W) for dehazing (any units; normalised to [0, 1]).
    options: per-task keyword overrides, e.g. {"denoise": {"sigma": 25}}.

  Returns:
    Sample(degraded uint8 HxWx3, params) where params = {"task", "seed", "steps": [...]}.
  """
  clean = np.asarray(clean)
  if clean.dtype != np.uint8 or clean.ndim != 3 or clean.shape[2] != 3 or 0 in clean.shape:
    raise FapeError(f"degrade() needs a uint8 (H, W, 3) image, got {clean.dtype} {clean.shape}; "
                    "read files with fape_jax.data.images.read_rgb.")
  parts = parse_task(task)
  seed_list = [int(s) for s in (seed if isinstance(seed, (list, tuple)) else [seed])]
  rng = np.random.default_rng(seed_list)
  x = clean.astype(np.float32) / 255.0
  steps = []
  for part in parts:
    kw = dict((options or {}).get(part, {}))
    if part == "denoise":
      kw.setdefault("evaluation", evaluation)
    if part == "dehazing" and depth is not None:
      kw.setdefault("depth", depth)
    x, p = SYNTHESIZERS[part](x, rng, **kw)
    steps.append({"task": part, **p})
  return Sample(_to_uint8(x), {"task": tasks_lib.mix_name(parts), "seed": seed_list,
                               "steps": steps})
