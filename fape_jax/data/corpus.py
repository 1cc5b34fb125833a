"""The embedded corpus: natural photos that ship inside installed Python packages.

No downloads: every file below was checked to be inside the installed wheel (scikit-image 0.26
bundles only a subset of its gallery; the rest would need `pooch` and a network, so they are not
used). Sizes are width x height as stored.

Colour photos (used as they are):
  name          file (inside the package)                 size     licence
  astronaut     skimage: data/astronaut.png               512x512  public domain (NASA)
  chelsea       skimage: data/chelsea.png                 451x300  CC0 (Stefan van der Walt)
  coffee        skimage: data/coffee.png                  600x400  CC0 (Rachel Michetti)
  rocket        skimage: data/rocket.jpg                  640x427  public domain (SpaceX)
  motorcycle    skimage: data/motorcycle_left.png         741x500  Middlebury 2014 stereo benchmark
                                                                   (Scharstein et al.), as
                                                                   redistributed by scikit-image
  china         sklearn.datasets: images/china.jpg        640x427  CC BY 2.0 (danielbuechele)
  flower        sklearn.datasets: images/flower.jpg       640x427  CC BY 2.0 (vultilion)
  grace_hopper  matplotlib: mpl-data/sample_data/         512x600  public domain (US Navy)
                grace_hopper.jpg

Grayscale photos, converted to RGB by repeating the channel (they teach structure, not colour):
  camera        skimage: data/camera.png                  512x512  CC0 (Lav Varshney)
  ascent        pywt: data/ascent.npz ('data')            512x512  public domain
                                                                   (public-domain-image.com)
  coins         skimage: data/coins.png                   384x303  no known copyright restrictions
                                                                   (Brooklyn Museum)

Left out on purpose: motorcycle_right (a near-duplicate of the left view: it would leak across the
split), PyWavelets' camera (identical to scikit-image's), aero (no stated licence), Hubble deep
field, retina, ihc, cell, microaneurysms (astronomy/medical/microscopy, not natural scenes),
synthetic charts (chessboard, color, logo, phantom, text, page) and textures cropped to gray tiles.

Split by *image*, fixed and deterministic: `VALIDATION` (three colour photos with different content:
a cat, a still life, a flower) is never cropped or degraded for training; every other available
image is training data. A missing file (an older package version) is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
import os

import numpy as np

from fape_jax.data import images
from fape_jax.errors import FapeError


@dataclasses.dataclass(frozen=True)
class CorpusImage:
  name: str
  package: str       # the importable package the file ships in
  relpath: str       # path inside that package
  licence: str
  colour: bool       # False: a grayscale photo converted to RGB
  npz_key: str = ""  # arrays stored in .npz files

  @property
  def path(self) -> str:
    return os.fspath(importlib.resources.files(self.package).joinpath(self.relpath))


CATALOGUE = (
    CorpusImage("astronaut", "skimage", "data/astronaut.png", "public domain (NASA)", True),
    CorpusImage("chelsea", "skimage", "data/chelsea.png", "CC0 (Stefan van der Walt)", True),
    CorpusImage("coffee", "skimage", "data/coffee.png", "CC0 (Rachel Michetti)", True),
    CorpusImage("rocket", "skimage", "data/rocket.jpg", "public domain (SpaceX)", True),
    CorpusImage("motorcycle", "skimage", "data/motorcycle_left.png",
                "Middlebury 2014 stereo benchmark (Scharstein et al.)", True),
    CorpusImage("china", "sklearn.datasets", "images/china.jpg", "CC BY 2.0 (danielbuechele)",
                True),
    CorpusImage("flower", "sklearn.datasets", "images/flower.jpg", "CC BY 2.0 (vultilion)", True),
    CorpusImage("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
                "public domain (US Navy)", True),
    CorpusImage("camera", "skimage", "data/camera.png", "CC0 (Lav Varshney)", False),
    CorpusImage("ascent", "pywt", "data/ascent.npz", "public domain", False, npz_key="data"),
    CorpusImage("coins", "skimage", "data/coins.png", "no known copyright restrictions", False),
)
VALIDATION = ("chelsea", "coffee", "flower")
SPLITS = ("train", "validation")


@functools.cache
def available() -> tuple[CorpusImage, ...]:
  """Catalogue entries whose files are really installed here."""
  out = []
  for entry in CATALOGUE:
    try:
      present = os.path.isfile(entry.path)
    except (ModuleNotFoundError, TypeError):
      present = False
    if present:
      out.append(entry)
    else:
      logging.warning("Embedded corpus: %s (%s/%s) is not installed; skipping it.", entry.name,
                      entry.package, entry.relpath)
  return tuple(out)


def split(name: str) -> tuple[CorpusImage, ...]:
  """The images of split `name` ('train' or 'validation'), in catalogue order."""
  if name not in SPLITS:
    raise FapeError(f"Unknown corpus split {name!r}; use one of {SPLITS}.")
  is_val = name == "validation"
  out = tuple(e for e in available() if (e.name in VALIDATION) == is_val)
  if not out:
    raise FapeError(f"The embedded corpus has no {name} images installed; reinstall "
                    "scikit-image, scikit-learn, matplotlib and PyWavelets.")
  return out


def load(entry: CorpusImage) -> np.ndarray:
  """The image as (H, W, 3) uint8 (grayscale photos repeated to three channels)."""
  if entry.npz_key:
    with np.load(entry.path) as z:
      return images.to_rgb_uint8(z[entry.npz_key], where=entry.path)[0]
  return images.read_rgb(entry.path)[0]
