"""LPIPS v0.1 'vgg' (Zhang et al. 2018) in Flax NNX, and the VGG16 feature extractor under it.

Numerically the `lpips` package's `LPIPS(net="vgg", version="0.1")`: inputs in [-1, 1] (NHWC here),
its scaling layer, torchvision's VGG16 `features` up to relu5_3 with five taps (relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3), each tap unit-normalised over channels, squared difference, a 1x1 `lin`
layer without bias, spatial mean, sum over taps. Weights come only from local checkpoints:
torchvision's `vgg16-397923af.pth` state dict (keys `features.N.weight/bias`) and lpips' `vgg.pth`
(keys `lin0.model.1.weight` ... `lin4.model.1.weight`), as .pth (torch is used only to read the
file), .safetensors or .npz.

`VGG16Features` stands on its own: the discriminator uses it as its frozen pretrained backbone.
All weights here are `PretrainedWeight` variables, not `nnx.Param`, so an optimiser built on
`nnx.Param` never sees them and "trainable" stays a filter.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fape_jax.errors import FapeError
from fape_jax.models.convert import to_flax_layout


class PretrainedWeight(nnx.Variable):
  """A weight loaded from a pretrained checkpoint and kept frozen (not an `nnx.Param`)."""


# torchvision VGG16 `features`: (index of the Conv2d in the Sequential, in channels, out channels).
# ReLU follows every conv; a MaxPool2d(2, 2) (indices 4, 9, 16, 23) precedes convs 5, 10, 17, 24.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
               (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512))
_POOL_BEFORE = frozenset((5, 10, 17, 24))
# The lpips taps: the ReLU after these convs (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_TAP_AFTER = (2, 7, 14, 21, 28)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = (64, 128, 256, 512, 512)
# Fraction of the 13 convs run at each tap: lets a caller pick taps "at 25 % depth".
TAP_DEPTHS = tuple((i + 1) / len(VGG16_CONVS) for i, (idx, _, _) in enumerate(VGG16_CONVS)
                   if idx in _TAP_AFTER)

# lpips' ScalingLayer: ImageNet mean/std expressed for [-1, 1] inputs ((2 * mean - 1), 2 * std).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Name -> float32 array from a .pth/.pt (torch state dict), .safetensors or .npz file."""
  if not path or not os.path.isfile(path):
    raise FapeError(f"Checkpoint file {path!r} does not exist; point the config at a local file "
                    "(nothing is downloaded).")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt", ".bin"):
    import torch  # pylint: disable=g-import-not-at-top  (only needed to read .pth files)
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
      raise FapeError(f"Could not read {path!r} as a torch state dict ({type(e).__name__}: {e}); "
                      "re-download or convert it to .safetensors.") from e
    if not isinstance(sd, Mapping):
      raise FapeError(f"{path!r} holds a {type(sd).__name__}, not a state dict; save "
                      "`model.state_dict()` instead of the model.")
    return {k: v.detach().float().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  if suffix == ".npz":
    with np.load(path) as f:
      return {k: np.asarray(f[k], np.float32) for k in f.files}
  raise FapeError(f"Checkpoint {path!r}: unsupported file type {suffix!r}; use .pth, "
                  ".safetensors or .npz.")


def _take(sd: Mapping[str, np.ndarray], key: str, shape: Sequence[int], where: str) -> np.ndarray:
  if key not in sd:
    raise FapeError(f"{where}: key {key!r} is missing; is this the right checkpoint? "
                    f"(found e.g. {sorted(sd)[:4]})")
  value = np.asarray(sd[key], np.float32)
  if value.shape != tuple(shape):
    raise FapeError(f"{where}: {key!r} has shape {value.shape}, expected {tuple(shape)}.")
  return value


class VGG16Features(nnx.Module):
  """torchvision VGG16 `features` to relu5_3, NHWC, inputs in [-1, 1]; returns the five taps.

  The lpips scaling layer is applied first (it is ImageNet normalisation in [-1, 1] units), so the
  taps are exactly those lpips and a torchvision VGG16 on ImageNet-normalised input compute.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], where: str = "VGG16 weights"):
    kernels, biases = [], []
    for idx, cin, cout in VGG16_CONVS:
      w = _take(state_dict, f"features.{idx}.weight", (cout, cin, 3, 3), where)
      b = _take(state_dict, f"features.{idx}.bias", (cout,), where)
      kernels.append(PretrainedWeight(jnp.asarray(to_flax_layout(w))))  # OIHW -> HWIO
      biases.append(PretrainedWeight(jnp.asarray(b)))
    self.kernels = nnx.List(kernels)
    self.biases = nnx.List(biases)
    self.channels = TAP_CHANNELS

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise FapeError(f"VGG16 features: expected NHWC RGB images, got shape {x.shape}.")
    if min(x.shape[1:3]) < 16:  # four 2x2 max-pools before relu5_3
      raise FapeError(f"VGG16 features: images of {x.shape[1]}x{x.shape[2]} px are too small; "
                      "LPIPS and the VGG16 backbone need at least 16x16.")
    x = (x - jnp.asarray(_SHIFT, x.dtype)) / jnp.asarray(_SCALE, x.dtype)
    taps = []
    for (idx, _, _), kernel, bias in zip(VGG16_CONVS, self.kernels, self.biases):
      if idx in _POOL_BEFORE:  # torch MaxPool2d(2, 2): floor mode, i.e. VALID
        x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      x = jax.lax.conv_general_dilated(x, kernel[...].astype(x.dtype), (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jax.nn.relu(x + bias[...].astype(x.dtype))
      if idx in _TAP_AFTER:
        taps.append(x)
    return taps


def _unit_normalise(f: jax.Array) -> jax.Array:
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)


class LPIPS(nnx.Module):
  """LPIPS v0.1 'vgg' distance between two batches of NHWC images in [-1, 1]; returns (B,)."""

  def __init__(self, vgg_state_dict: Mapping[str, np.ndarray],
               lin_state_dict: Mapping[str, np.ndarray], *, vgg_where: str = "VGG16 weights",
               lin_where: str = "LPIPS linear weights"):
    self.features = VGG16Features(vgg_state_dict, vgg_where)
    # lpips' NetLinLayer is Sequential(Dropout, Conv2d(c, 1, 1, bias=False)), hence "model.1".
    self.lins = nnx.List([
        PretrainedWeight(jnp.asarray(_take(lin_state_dict, f"lin{k}.model.1.weight", (1, c, 1, 1),
                                           lin_where).reshape(c)))
        for k, c in enumerate(TAP_CHANNELS)])

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
      raise FapeError(f"LPIPS: the two image batches differ in shape, {x.shape} vs {y.shape}.")
    n = x.shape[0]
    taps = self.features(jnp.concatenate([x, y], axis=0))  # one pass over both batches
    total = jnp.zeros((n,), jnp.float32)
    for f, lin in zip(taps, self.lins):
      d = (_unit_normalise(f[:n]) - _unit_normalise(f[n:])) ** 2
      total = total + jnp.mean(d @ lin[...].astype(d.dtype), axis=(1, 2)).astype(jnp.float32)
    return total


def load_vgg16_features(vgg_path: str) -> VGG16Features:
  """The frozen VGG16 feature extractor from a local torchvision checkpoint."""
  return VGG16Features(read_state_dict(vgg_path), where=vgg_path)


def load_lpips(vgg_path: str, lin_path: str) -> LPIPS:
  """LPIPS from a torchvision VGG16 checkpoint and lpips' `vgg.pth` linear layers (local files)."""
  return LPIPS(read_state_dict(vgg_path), read_state_dict(lin_path), vgg_where=vgg_path,
               lin_where=lin_path)


def maybe_load_lpips(vgg_path: str | None, lin_path: str | None) -> LPIPS | None:
  """`load_lpips`, or None with a logged warning when either path is not configured.

  Never random weights: a LPIPS term on an untrained VGG would be a silently wrong loss. A path
  that is set but names no file is a user mistake and raises `FapeError` (from `read_state_dict`).
  """
  if not vgg_path or not lin_path:
    logging.warning("LPIPS weights not configured (vgg16_path=%r, lin_path=%r): the LPIPS "
                    "term is switched off", vgg_path or "", lin_path or "")
    return None
  return load_lpips(vgg_path, lin_path)
