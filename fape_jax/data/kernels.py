"""Blur kernels and image operations of the degradation synthesis (`degrade.py`).

Float32 images in [0, 1]; every function is deterministic (a kernel drawn at random takes the
caller's `np.random.Generator`), so the recipes built on them stay reproducible under a seed.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage, signal, special

def filter2d(x: np.ndarray, k: np.ndarray) -> np.ndarray:
  """Convolves an (H, W[, C]) image with a 2-D kernel, reflect-padded like Real-ESRGAN's."""
  ph, pw = k.shape[0] // 2, k.shape[1] // 2
  pad = [(ph, k.shape[0] - 1 - ph), (pw, k.shape[1] - 1 - pw)] + [(0, 0)] * (x.ndim - 2)
  xp = np.pad(x, pad, mode="reflect" if min(x.shape[:2]) > 1 else "edge")
  kk = k[..., None] if x.ndim == 3 else k
  return signal.fftconvolve(xp, kk.astype(np.float32), mode="valid", axes=(0, 1)).astype(
      np.float32)


RESAMPLE = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
  """Resizes float (H, W, C) to (h, w) with Pillow, channel by channel in 32-bit float mode."""
  h, w = max(1, int(size[0])), max(1, int(size[1]))
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F").resize(
      (w, h), RESAMPLE[mode])) for c in range(x.shape[2])]
  return np.stack(chans, axis=-1).astype(np.float32)


def jpeg(x: np.ndarray, quality: int) -> np.ndarray:
  """Round-trips through Pillow's JPEG codec (4:2:0 chroma, as real encoders default to)."""
  buf = io.BytesIO()
  Image.fromarray(to_uint8(x)).save(buf, format="JPEG", quality=int(quality))
  buf.seek(0)
  with Image.open(buf) as im:
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def to_uint8(x: np.ndarray) -> np.ndarray:
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def luminance(x: np.ndarray) -> np.ndarray:
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


def aperture_kernel(radius: float, blades: int = 0, rotation: float = 0.0) -> np.ndarray:
  """Anti-aliased (4x4 supersampled) disk, or regular polygon with `blades` sides, normalised."""
  size = 2 * int(math.ceil(radius)) + 1
  c = size // 2
  sub = (np.arange(size * 4) + 0.5) / 4.0 - 0.5 - c
  yy, xx = np.meshgrid(sub, sub, indexing="ij")
  edge = radius
  if blades:  # the polygon's boundary radius at each point's polar angle
    seg = 2 * np.pi / blades
    phi = np.mod(np.arctan2(yy, xx) - rotation, seg) - seg / 2
    edge = radius * math.cos(seg / 2) / np.cos(phi)
  cover = (np.hypot(yy, xx) <= edge).astype(np.float32)
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


def clip(x: np.ndarray) -> np.ndarray:
  return np.clip(x, 0.0, 1.0, out=x)


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
