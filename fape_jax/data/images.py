"""Reading image files into uint8 RGB arrays, with documented conversions and clear errors.

Every image that enters a pairs store goes through `read_rgb`, which returns `(H, W, 3) uint8` and
the list of conversions it applied:

  * grayscale (`L`, `I;16`, `I`, `1`) -> RGB by repeating the channel ("gray->rgb");
  * RGBA / LA -> RGB by dropping alpha, *not* compositing over a background, so colours under a
    transparent pixel stay as stored ("drop_alpha");
  * palette (`P`) and CMYK/YCbCr -> RGB through Pillow's own conversion ("palette->rgb", ...);
  * 16-bit -> 8-bit ("16bit->8bit"): single-channel 16-bit PNGs and 16-bit TIFFs are scaled with
    round(x / 257) (65535 -> 255 exactly). Pillow itself reads 16-bit *colour* PNGs as 8-bit by
    keeping the high byte (x >> 8), which differs from x / 257 by at most one level; it cannot be
    told apart from a native 8-bit file after decoding, so it is not listed.

Corrupt, truncated or unreadable files, empty arrays and pairs whose sizes do not match raise
`FapeError` naming the file; the builders turn that into a log line instead when `skip_bad` is set.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np
from PIL import Image

from fape_jax.errors import FapeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _to_uint8(a: np.ndarray) -> tuple[np.ndarray, list[str]]:
  if a.dtype == np.uint8:
    return a, []
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * 255, ["bool->8bit"]
  if a.dtype in (np.uint16, np.int32, np.int64, np.uint32) or a.dtype.kind in "ui":
    # Pillow returns 16-bit grayscale PNGs as I;16 (uint16) or I (int32 holding 0..65535).
    return np.clip(np.round(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8), ["16bit->8bit"]
  if a.dtype.kind == "f":
    hi = 1.0 if float(np.nanmax(a)) <= 1.0 else 255.0
    return (np.clip(np.nan_to_num(a) / hi, 0, 1) * 255 + 0.5).astype(np.uint8), ["float->8bit"]
  raise FapeError(f"unsupported pixel type {a.dtype}")


def to_rgb_uint8(a: np.ndarray, where: str = "array") -> tuple[np.ndarray, list[str]]:
  """Converts an (H, W), (H, W, 1|2|3|4) array of any bit depth to (H, W, 3) uint8."""
  a = np.asarray(a)
  notes: list[str] = []
  if a.ndim == 3 and a.shape[2] in (2, 4):
    a = a[..., :-1]
    notes.append("drop_alpha")
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=2)
    notes.append("gray->rgb")
  if a.ndim != 3 or a.shape[2] != 3:
    raise FapeError(f"{where}: expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got "
                    f"{a.shape}.")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise FapeError(f"{where}: the image is empty (shape {a.shape}).")
  try:
    a, more = _to_uint8(a)
  except FapeError as e:
    raise FapeError(f"{where}: {e}; save it as 8- or 16-bit PNG/JPEG.") from None
  return np.ascontiguousarray(a), notes + more


def read_rgb(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
  """Reads an image file as (H, W, 3) uint8; returns it and the conversions applied."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FapeError(f"Image file {path} does not exist (or is not a file).")
  try:
    if path.lower().endswith((".tif", ".tiff")):
      # Pillow cannot decode 16-bit colour TIFFs; tifffile (a scikit-image dependency) can.
      import tifffile  # pylint: disable=import-outside-toplevel
      a = tifffile.imread(path)
      if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) storage
      notes: list[str] = []
    else:
      with Image.open(path) as im:
        im.load()  # decode now: truncated or corrupt data fails here, not later
        notes = []
        if im.mode == "P":
          im = im.convert("RGBA" if "transparency" in im.info else "RGB")
          notes.append("palette->rgb")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
          notes.append(f"{im.mode.lower()}->rgb")
          im = im.convert("RGB")
        elif im.mode == "PA":
          im = im.convert("RGBA")
          notes.append("palette->rgb")
        a = np.asarray(im)
  except FapeError:
    raise
  except Exception as e:  # noqa: BLE001 (PIL/tifffile raise many types for bad data)
    raise FapeError(f"Cannot read image {path}: {type(e).__name__}: {e}. The file is corrupt, "
                    "truncated or not an image; replace it, delete it, or build with "
                    "skip_bad=True to skip such files.") from None
  rgb, more = to_rgb_uint8(a, where=f"Image {path}")
  return rgb, notes + more


def check_pair(degraded: np.ndarray, clean: np.ndarray, degraded_path: str, clean_path: str,
               *, allow_scale: bool = False) -> int:
  """Checks that a pair lines up; returns the integer scale factor (1 unless `allow_scale`).

  With `allow_scale` (super-resolution sets) the degraded image may be smaller than the clean one
  by the same integer factor along both axes.
  """
  (hd, wd), (hc, wc) = degraded.shape[:2], clean.shape[:2]
  if (hd, wd) == (hc, wc):
    return 1
  if allow_scale and hd and wd and hc % hd == 0 and wc % wd == 0 and hc // hd == wc // wd:
    return hc // hd
  what = "the same size" + (" or smaller by one integer factor" if allow_scale else "")
  raise FapeError(f"Pair size mismatch: degraded {degraded_path} is {wd}x{hd} but clean "
                  f"{clean_path} is {wc}x{hc}; they must be {what}. Fix or remove the pair, or "
                  "build with skip_bad=True to skip it.")


def list_images(folder: str | os.PathLike, patterns: Sequence[str] = ("*",)) -> list[str]:
  """Sorted image files under `folder` matching any glob pattern (relative, may contain **)."""
  import glob  # pylint: disable=import-outside-toplevel
  out = set()
  for pattern in patterns:
    for p in glob.glob(os.path.join(os.fspath(folder), pattern), recursive=True):
      if os.path.isfile(p) and p.lower().endswith(IMAGE_SUFFIXES):
        out.add(os.path.normpath(p))
  return sorted(out)


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def sha256_array(a: np.ndarray) -> str:
  """Checksum of an array's shape, dtype and bytes (independent of any file encoding)."""
  a = np.ascontiguousarray(a)
  h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
  h.update(a.tobytes())
  return h.hexdigest()
