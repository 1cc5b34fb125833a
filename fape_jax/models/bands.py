"""The band split of the frequency LoRA-MoE (METHOD.md section 4): the fixed low-pass L on a
layer's token grid (H = I - L), each layer's band-leakage term of the frequency loss, and the
token grid a layer's tokens lie on.

  * 'fft2d': Gaussian low-pass on the H x W token grid, transfer 2^(-(f/cutoff)^2) (half
    gain at `cutoff` cycles per token step) applied with `jnp.fft.rfft2`, i.e. circular.
  * 'grid2d' (default): the same circular filter as two dense matmuls over the grid's rows and columns (the
    transfer is separable); equal to 'fft2d' up to float rounding, faster where FFTs are slow.
  * 'fir1d': the authors' 9-tap Gaussian FIR (sigma 2) along the flattened token axis, zero 'same'
    padding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fape_jax.errors import FapeError


def gaussian_transfer(h: int, w: int, cutoff: float) -> np.ndarray:
  """rfft2-shaped (h, w // 2 + 1) Gaussian transfer function, 0.5 at `cutoff` cycles per step."""
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.rfftfreq(w)[None, :]
  return np.exp2(-(fy ** 2 + fx ** 2) / cutoff ** 2).astype(np.float32)


def circulant_lowpass(n: int, cutoff: float) -> np.ndarray:
  """(n, n) real matrix of the 1-D circular Gaussian low-pass: `gaussian_transfer` is separable
  (2^(-(fy^2 + fx^2) / c^2) = 2^(-fy^2 / c^2) 2^(-fx^2 / c^2)), so the FFT filter equals
  C_h X C_w^T with these circulants. Built in float64 from the same transfer (exact to rounding)."""
  g = np.exp2(-np.fft.fftfreq(n) ** 2 / cutoff ** 2)
  kernel = np.real(np.fft.ifft(g))                     # the circular impulse response
  idx = (np.arange(n)[:, None] - np.arange(n)[None, :]) % n
  return kernel[idx].astype(np.float32)


def fir_taps(taps: int, sigma: float) -> np.ndarray:
  """The normalised Gaussian FIR of the authors' code (9 taps, sigma 2 by default)."""
  n = np.arange(taps) - taps // 2
  k = np.exp(-n ** 2 / (2.0 * sigma ** 2))
  return (k / k.sum()).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BandFilter:
  """The fixed low-pass L of the band split (and of the frequency loss); H = I - L.

  `lowpass` takes tokens (B, L, C) laid out row-major on a grid (h, w), h * w == L, and returns
  float32. Frozen (hashable), so it can sit in a module's static attributes.
  """
  mode: str = "grid2d"
  cutoff: float = 0.094
  taps: int = 9
  sigma: float = 2.0

  @classmethod
  def from_config(cls, config) -> "BandFilter":
    return cls(config.band_mode, float(config.cutoff), int(config.fir_taps),
               float(config.fir_sigma))

  def lowpass(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    x = tokens.astype(jnp.float32)
    b, n, c = x.shape
    h, w = grid
    if h * w != n:
      raise FapeError(f"band split: {n} tokens do not fill a {h} x {w} grid.")
    if self.mode == "grid2d":
      # The fft2d filter as two small dense matmuls over the grid's rows and columns: the same
      # numbers without complex FFTs (which XLA's CPU backend runs slowly at these sizes, and
      # whose transposes dominate the band split's backward pass).
      ch = jnp.asarray(circulant_lowpass(h, self.cutoff))
      cw = jnp.asarray(circulant_lowpass(w, self.cutoff))
      return jnp.einsum("ij,bjkc,lk->bilc", ch, x.reshape(b, h, w, c), cw,
                        precision=jax.lax.Precision.HIGHEST).reshape(b, n, c)
    if self.mode == "fft2d":
      spec = jnp.fft.rfft2(x.reshape(b, h, w, c), axes=(1, 2))
      spec = spec * gaussian_transfer(h, w, self.cutoff)[None, :, :, None]
      return jnp.fft.irfft2(spec, s=(h, w), axes=(1, 2)).reshape(b, n, c)
    # 'fir1d': depthwise 'same' convolution along the token axis.
    kernel = jnp.broadcast_to(fir_taps(self.taps, self.sigma)[:, None, None], (self.taps, 1, c))
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding="SAME", feature_group_count=c,
        dimension_numbers=("NWC", "WIO", "NWC"))

  def split(self, tokens: jax.Array, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """(x_low, x_high) in float32 with x_low + x_high == x."""
    low = self.lowpass(tokens, grid)
    return low, tokens.astype(jnp.float32) - low


def band_leakage(y_low: jax.Array, y_high: jax.Array,
                 lowpass: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """mean(|H(y_low)|^2 + |L(y_high)|^2) of one layer; `lowpass` is that layer's L (float32 out).

  Each MoE wrapper's frequency-loss term (`losses.frequency_loss` averages them), reduced in the
  wrapper so the experts' outputs need not stay alive until the loss.
  """
  y_low = y_low.astype(jnp.float32)
  y_high = y_high.astype(jnp.float32)
  leak_low = y_low - lowpass(y_low)  # H(y_low): what the low expert puts above the cutoff
  leak_high = lowpass(y_high)  # L(y_high): what the high expert puts below it
  return jnp.mean(jnp.square(leak_low)) + jnp.mean(jnp.square(leak_high))


def token_grid(num_tokens: int, input_hw: Sequence[int]) -> tuple[int, int]:
  """The (h, w) grid of `num_tokens` tokens at some UNet depth k: (ceil(H / 2^k), ceil(W / 2^k))."""
  h, w = int(input_hw[0]), int(input_hw[1])
  k = 0
  while True:
    hk, wk = -(-h // 2 ** k), -(-w // 2 ** k)
    if hk * wk == num_tokens:
      return hk, wk
    if hk * wk < num_tokens or (hk == 1 and wk == 1):
      raise FapeError(f"An adapted layer got {num_tokens} tokens, which is no downsampled grid of "
                      f"the {h} x {w} UNet input (ceil(H / 2^k) x ceil(W / 2^k)). Is this layer's "
                      "input the plan context? Then add its path to lora config.context_patterns.")
    k += 1
