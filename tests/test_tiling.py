"""Tiled restoration: seams, sizes, and agreement with untiled restoration."""
import numpy as np
import pytest
from scipy import ndimage

from fape_jax import tiling
from fape_jax.errors import FapeError


@pytest.mark.parametrize("h,w", [(37, 53), (64, 64), (100, 71), (130, 257)])
def test_pointwise_fn_is_exact_for_any_size(h, w):
  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
  fn = lambda t: np.tanh(2 * t)
  out = tiling.tiled_apply(fn, img, tile=32, overlap=8, multiple=8)
  assert out.shape == img.shape
  np.testing.assert_allclose(out, np.tanh(2 * img), atol=1e-6)


def test_local_filter_tiled_matches_untiled_away_from_padding():
  # A 5x5 mean filter has a 2-px reach: with a 16-px overlap blended by linear ramps, every output
  # pixel comes from tiles whose windows contain its whole neighbourhood except near the tile
  # borders, where the ramp weights are smallest; the residual error stays far below 8-bit.
  rng = np.random.default_rng(1)
  img = ndimage.gaussian_filter(rng.uniform(-1, 1, (96, 120, 3)), (2, 2, 0)).astype(np.float32)
  fn = lambda t: np.stack([ndimage.uniform_filter(x, (5, 5, 1), mode="reflect") for x in t])
  ref = fn(img[None])[0]
  out = tiling.tiled_apply(fn, img, tile=48, overlap=16, multiple=8)
  inner = (slice(3, -3), slice(3, -3))
  assert np.abs(out - ref)[inner].max() < 2e-2
  # Without blending (no overlap) the same filter leaves visible seams.
  hard = tiling.tiled_apply(fn, img, tile=48, overlap=0, multiple=8)
  assert np.abs(hard - ref)[inner].max() > np.abs(out - ref)[inner].max()


def test_tile_starts_cover_and_overlap():
  for size in (33, 64, 65, 200, 257):
    starts = tiling.tile_starts(size, 32, 8)
    assert starts[0] == 0
    assert starts[-1] + 32 == max(size, 32)  # the last tile ends at the border
    assert all(b - a <= 24 for a, b in zip(starts, starts[1:]))


def test_bad_tiling_arguments_are_clear():
  with pytest.raises(FapeError, match="multiple"):
    tiling.tiled_apply(lambda t: t, np.zeros((8, 8, 3)), tile=30, overlap=4, multiple=8)
  with pytest.raises(FapeError, match="overlap"):
    tiling.tiled_apply(lambda t: t, np.zeros((8, 8, 3)), tile=32, overlap=32, multiple=8)
