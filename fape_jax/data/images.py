"""Image files: read as uint8 RGB for the pairs stores, or read and written back at native depth.

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

The restore CLI reads with `read_image` and writes with `write_image`, which keep what `read_rgb`
converts away: 16-bit PNG/TIFF stay 16-bit (16-bit colour PNGs are decoded with imagecodecs, as
Pillow keeps only their high byte), grayscale is written back as grayscale (BT.601 luma of the
RGB), and alpha is kept untouched. Both readers decode files with the same `_decode`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

from fape_jax.errors import FapeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Where each output format can store what (bit depth 16, alpha).
_FORMATS_16BIT = (".png", ".tif", ".tiff")
_FORMATS_ALPHA = (".png", ".tif", ".tiff", ".webp")
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float64)  # BT.601, as Pillow's RGB -> L


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


def _png_bit_depth(path: str) -> int | None:
  """The bit depth in a PNG's IHDR (Pillow hides it: 16-bit colour decodes as 8-bit RGB)."""
  with open(path, "rb") as f:
    head = f.read(25)
  if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
    return head[24]
  return None


def _decode(path: str, *, full_depth: bool = False) -> tuple[np.ndarray, list[str]]:
  """A file's pixels, (H, W) or (H, W, C) as the decoder gives them, and the conversions applied.

  TIFFs go through tifffile (Pillow cannot decode 16-bit colour TIFFs), the rest through Pillow,
  with palette, CMYK, YCbCr, LAB and HSV images converted to RGB(A). `full_depth` is what
  `read_image` needs to write an image back as it came: 16-bit PNGs through imagecodecs, straight
  instead of premultiplied alpha, 1-bit as 8-bit. Without it the pixels are Pillow's, which is what
  `read_rgb` documents (and pairs stores hold), so the two modes must stay apart.
  """
  lower = path.lower()
  if lower.endswith((".tif", ".tiff")):
    import tifffile  # pylint: disable=import-outside-toplevel
    a = tifffile.imread(path)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
      a = np.moveaxis(a, 0, -1)  # planar (C, H, W) storage
    return a, []
  if full_depth and lower.endswith(".png") and _png_bit_depth(path) == 16:
    import imagecodecs  # pylint: disable=import-outside-toplevel
    with open(path, "rb") as f:
      return imagecodecs.png_decode(f.read()), []
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
    elif full_depth and im.mode in ("RGBa", "La"):
      im = im.convert("RGBA" if im.mode == "RGBa" else "LA")
    elif full_depth and im.mode == "1":
      im = im.convert("L")
    return np.asarray(im), notes


def read_rgb(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
  """Reads an image file as (H, W, 3) uint8; returns it and the conversions applied."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FapeError(f"Image file {path} does not exist (or is not a file).")
  try:
    a, notes = _decode(path)
  except FapeError:
    raise
  except Exception as e:  # noqa: BLE001 (PIL/tifffile raise many types for bad data)
    raise FapeError(f"Cannot read image {path}: {type(e).__name__}: {e}. The file is corrupt, "
                    "truncated or not an image; replace it, delete it, or build with "
                    "skip_bad=True to skip such files.") from None
  rgb, more = to_rgb_uint8(a, where=f"Image {path}")
  return rgb, notes + more


@dataclasses.dataclass
class ImageFile:
  """A decoded image: RGB float32 in [0, 1], plus what writing it back needs."""
  rgb: np.ndarray                   # H x W x 3 float32 in [0, 1] (gray repeated)
  alpha: np.ndarray | None          # H x W, in the file's integer type, or None
  gray: bool
  bits: int                         # 8 or 16

  @property
  def rgb8(self) -> np.ndarray:
    """8-bit RGB (what the planner and its hints take)."""
    return np.round(self.rgb * 255.0).astype(np.uint8)


def read_image(path: str | os.PathLike, *, name: str | None = None) -> ImageFile:
  """Reads an image file keeping its bit depth, gray/colour and alpha; FapeError names the file,
  as `name` when given (an upload the demo page saved to a temporary file)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FapeError(f"Image file {path} does not exist (or is not a file).")
  where = name or path
  try:
    a, _ = _decode(path, full_depth=True)
    if a.dtype.kind in "iu" and a.dtype.itemsize > 1:  # Pillow's I / I;16 (16-bit gray)
      if a.min() < 0 or a.max() > 65535:
        raise FapeError("pixel values outside 0..65535 (a 32-bit image)")
      a = a.astype(np.uint16)
  except Exception as e:  # noqa: BLE001 (decoders raise many types for bad data)
    why = str(e).replace(path, where)  # Pillow quotes the path it was given
    raise FapeError(f"Cannot read image {where}: {type(e).__name__}: {why}. The file is corrupt, "
                    "truncated or not an image.") from None
  if a.dtype not in (np.uint8, np.uint16):
    raise FapeError(f"Image {where}: {a.dtype} pixels are not supported; save it as an 8- or "
                    "16-bit PNG, TIFF or JPEG.")
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or 0 in a.shape:
    raise FapeError(f"Image {where}: unsupported shape {a.shape}; expected gray, gray+alpha, RGB "
                    "or RGBA.")
  channels = a.shape[2]
  top = float(np.iinfo(a.dtype).max)
  alpha = a[..., -1].copy() if channels in (2, 4) else None
  color = a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, axis=2)
  return ImageFile(rgb=(color.astype(np.float32) / np.float32(top)), alpha=alpha,
                   gray=channels <= 2, bits=16 if a.dtype == np.uint16 else 8)


def check_writable_as(path: str | os.PathLike, like: ImageFile) -> None:
  """Refuses output formats that would silently drop 16 bits or alpha."""
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if like.bits == 16 and suffix not in _FORMATS_16BIT:
    raise FapeError(f"{path}: the input is a 16-bit image but {suffix} stores 8 bits; write it "
                    f"as {' or '.join(_FORMATS_16BIT)}.")
  if like.alpha is not None and suffix not in _FORMATS_ALPHA:
    raise FapeError(f"{path}: the input has an alpha channel but {suffix} cannot store one; "
                    f"write it as {' or '.join(_FORMATS_ALPHA)}.")


def encode_like(rgb01: np.ndarray, like: ImageFile) -> np.ndarray:
  """Restored RGB in [0, 1] -> pixels in the input's layout (gray, alpha, bit depth)."""
  x = np.clip(np.asarray(rgb01, np.float64), 0.0, 1.0)
  if like.gray:
    x = (x @ _LUMA)[..., None]
  top, dtype = (65535.0, np.uint16) if like.bits == 16 else (255.0, np.uint8)
  out = np.round(x * top).astype(dtype)
  if like.alpha is not None:
    out = np.concatenate([out, like.alpha[..., None].astype(dtype)], axis=2)
  return out[..., 0] if out.shape[2] == 1 else out


def write_image(path: str | os.PathLike, rgb01: np.ndarray, like: ImageFile) -> None:
  """Writes the restored image in the input's layout; atomically (temp file, then rename)."""
  path = os.fspath(path)
  check_writable_as(path, like)
  pixels = encode_like(rgb01, like)
  suffix = os.path.splitext(path)[1].lower()
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".restore-", suffix=suffix, dir=folder)
  os.close(fd)
  try:
    if suffix in (".tif", ".tiff"):
      import tifffile  # pylint: disable=import-outside-toplevel
      tifffile.imwrite(tmp, pixels, photometric="minisblack" if pixels.ndim == 2 or
                       pixels.shape[2] == 2 else "rgb")
    elif pixels.dtype == np.uint16:  # Pillow cannot write 16-bit colour PNGs
      import imagecodecs  # pylint: disable=import-outside-toplevel
      with open(tmp, "wb") as f:
        f.write(imagecodecs.png_encode(pixels))
    else:
      kwargs = {"quality": 95} if suffix in (".jpg", ".jpeg", ".webp") else {}
      Image.fromarray(pixels).save(tmp, **kwargs)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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
