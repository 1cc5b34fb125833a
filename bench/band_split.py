"""Band-split micro-benchmark: the LoRA-MoE low-pass, forward + backward under jit, per mode.

  .venv/bin/python bench/band_split.py

Times `bands.BandFilter(mode).lowpass` for 'fft2d' and 'grid2d' (the same filter as two dense
circulant matmuls) at the token grids of the base config (12x12 at a 48^2 crop), a 128^2
validation image (32x32) and SD-2.1's first level (64x64, 320 channels); medians of 7 rounds of
20 calls, modes alternating within a round. Prints one line per shape (ms and the ratio).
"""

import time

import measure  # noqa: F401  (puts the repo root on sys.path; import first)

import jax
import jax.numpy as jnp
import numpy as np

from fape_jax.models import bands

SHAPES = (((12, 12), 64, 8), ((32, 32), 64, 1), ((64, 64), 320, 1))  # grid, channels, batch
MODES = ("fft2d", "grid2d")


def main():
  for grid, c, b in SHAPES:
    x = jax.random.normal(jax.random.key(0), (b, grid[0] * grid[1], c))
    fns = {}
    for mode in MODES:
      band = bands.BandFilter(mode)
      fns[mode] = jax.jit(jax.grad(lambda t, band=band: jnp.sum(jnp.sin(band.lowpass(t, grid)))))
      fns[mode](x).block_until_ready()
    times = {m: [] for m in MODES}
    for r in range(7):
      for mode in (MODES if r % 2 == 0 else MODES[::-1]):
        t0 = time.perf_counter()
        for _ in range(20):
          y = fns[mode](x)
        y.block_until_ready()
        times[mode].append((time.perf_counter() - t0) / 20 * 1e3)
    ms = {m: float(np.median(v)) for m, v in times.items()}
    print(f"grid {grid[0]}x{grid[1]}, {c} ch, batch {b}: fft2d {ms['fft2d']:.3f} ms, grid2d "
          f"{ms['grid2d']:.3f} ms, fft2d / grid2d {ms['fft2d'] / ms['grid2d']:.2f}")


if __name__ == "__main__":
  main()
