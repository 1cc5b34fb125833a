"""Restore images of any size: pad to the model's multiple, or cut into overlapping tiles.

Tiles overlap by `overlap` pixels and are blended with a separable weight that ramps linearly
across each overlap (and is flat elsewhere), so seams vanish: inside an overlap the two tiles'
weights sum to one and move smoothly from one tile to the other. Hand-written because no library
we depend on does overlap-blended tiling of a JAX model.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from fape_jax.errors import FapeError


def pad_to_multiple(image: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
  """Reflect-pads HxWxC up to multiples of `multiple`; returns the padded image and (H, W)."""
  h, w = image.shape[:2]
  ph, pw = (-h) % multiple, (-w) % multiple
  mode = "reflect" if ph < h and pw < w else "edge"  # reflect needs pad < size
  return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode), (h, w)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets covering [0, size) with tiles of `tile` px overlapping by >= `overlap` px."""
  if size <= tile:
    return [0]
  stride = tile - overlap
  n = math.ceil((size - tile) / stride) + 1
  # Spread the tiles evenly so every overlap is at least `overlap` wide.
  return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, tile: int, lead: int, trail: int) -> np.ndarray:
  """1-D weight over a tile: linear ramps of `lead`/`trail` px at its ends, 1 inside."""
  w = np.ones(tile, np.float32)
  if lead:
    w[:lead] = (np.arange(lead, dtype=np.float32) + 0.5) / lead
  if trail:
    w[tile - trail:] = np.minimum(w[tile - trail:],
                                  (np.arange(trail, 0, -1, dtype=np.float32) - 0.5) / trail)
  return w[:length]


def tiled_apply(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *, tile: int,
                overlap: int, multiple: int, batch: int = 4) -> np.ndarray:
  """Applies `fn` (N x t x t x C -> N x t x t x C') over an HxWxC image of any size.

  Images that fit in one tile are only padded to `multiple`. Larger ones are padded to
  `multiple`, cut into tile x tile windows overlapping by `overlap`, restored `batch` tiles at a
  time, and blended. The result is cropped back to H x W.
  """
  if tile % multiple:
    raise FapeError(f"tile size {tile} must be a multiple of the model's size multiple {multiple}.")
  if not 0 <= overlap < tile:
    raise FapeError(f"tile overlap {overlap} must be in [0, tile={tile}).")
  padded, (h, w) = pad_to_multiple(image, multiple)
  ph, pw = padded.shape[:2]
  if ph <= tile and pw <= tile:
    return np.asarray(fn(padded[None]))[0][:h, :w]
  if ph < tile or pw < tile:  # one side fits, the other does not: pad the short side up to tile
    padded = np.pad(padded, ((0, max(0, tile - ph)), (0, max(0, tile - pw)), (0, 0)), mode="edge")
    ph, pw = padded.shape[:2]
  ys, xs = tile_starts(ph, tile, overlap), tile_starts(pw, tile, overlap)
  boxes = [(y, x) for y in ys for x in xs]
  out, weight = None, np.zeros((ph, pw, 1), np.float32)
  for i in range(0, len(boxes), batch):
    chunk = boxes[i:i + batch]
    tiles = np.stack([padded[y:y + tile, x:x + tile] for y, x in chunk])
    # Pad the last call to a full batch so `fn` sees one shape (one compilation).
    tiles = np.concatenate([tiles, np.repeat(tiles[-1:], batch - len(chunk), 0)])
    restored = np.asarray(fn(tiles))[:len(chunk)]
    if out is None:
      out = np.zeros((ph, pw, restored.shape[-1]), np.float32)
    for (y, x), r in zip(chunk, restored):
      wy = _ramp(tile, tile, _overlap_before(ys, y, tile), _overlap_after(ys, y, tile))
      wx = _ramp(tile, tile, _overlap_before(xs, x, tile), _overlap_after(xs, x, tile))
      wt = (wy[:, None] * wx[None, :])[..., None]
      out[y:y + tile, x:x + tile] += r * wt
      weight[y:y + tile, x:x + tile] += wt
  return (out / weight)[:h, :w]


def _overlap_before(starts: list[int], s: int, tile: int) -> int:
  i = starts.index(s)
  return 0 if i == 0 else starts[i - 1] + tile - s


def _overlap_after(starts: list[int], s: int, tile: int) -> int:
  i = starts.index(s)
  return 0 if i == len(starts) - 1 else s + tile - starts[i + 1]
