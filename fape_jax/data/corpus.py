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

The 'wallpapers' set: 36 more colour photos (nature, landscapes, macro, still life, 1-5 MP) from
three Debian desktop-wallpaper packages, installed by `make corpus` (part of `make train`) with
apt-get; nothing is downloaded at run time. Artwork and renders in those packages are left out.
  package                        photos  licence
  mate-backgrounds               12      GPL-2+ (nature/)
  lomiri-wallpapers-16.04        13      CC BY 4.0 / CC BY-SA 4.0, author in each file name
  plasma-workspace-wallpapers    11      GPL-2+ (KDE Visual Design Group)
Training on 8 photos teaches their textures; five times as many scenes is the cheapest
generalisation there is (README "Training data").

Split by *image*, fixed and deterministic: `VALIDATION` (colour photos with different content: a
cat, a still life, a flower, and with the wallpapers a meadow, a mountain path, a jetty in fog, a
dandelion field and a lake at dusk) is never cropped or degraded for training; every other available
image is training data. A missing file (an older package version) is skipped with a warning; a set
none of whose files is installed is an error that says how to install it.
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
  system: bool = False  # `package` is a Debian package and `relpath` an absolute path

  @property
  def path(self) -> str:
    if self.system:
      return self.relpath
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


def _wallpapers() -> tuple[CorpusImage, ...]:
  mate = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird",
          "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower")
  lomiri = (("bridge", "Bridge_by_Sander_Klootwijk", "CC BY-SA 4.0"),
            ("dragonfly", "Dragonfly_by_Bolly", "CC BY-SA 4.0"),
            ("fig", "Picture_0B_by_freespace", "CC BY-SA 4.0"),
            ("brushes", "Picture_1A_by_freespace", "CC BY-SA 4.0"),
            ("wine", "Wine_by_Jakkub_Mede", "CC BY-SA 4.0"),
            ("aitzgorri", "aitzgorri_by_Aitzol_Berasategi", "CC BY 4.0"),
            ("lamp", "free_by_Peter_Nerlich", "CC BY-SA 4.0"),
            ("friends", "friends_by_Aitzol_Berasategi", "CC BY 4.0"),
            ("clock", "greentock_by_Peter_Nerlich", "CC BY-SA 4.0"),
            ("stream", "life_by_Aitzol_Berasategi", "CC BY 4.0"),
            ("picos", "picosdeeuropa_by_Aitzol_Berasategi", "CC BY 4.0"),
            ("dandelions", "seeding_by_Clements_Engelhardt", "CC BY-SA 4.0"),
            ("sunset", "sunset_by_Aitzol_Berasategi", "CC BY 4.0"))
  plasma = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
            "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am")
  return (
      *(CorpusImage(f"mate_{n.lower()}", "mate-backgrounds",
                    f"/usr/share/backgrounds/mate/nature/{n}.jpg", "GPL-2+", True, system=True)
        for n in mate),
      *(CorpusImage(f"lomiri_{n}", "lomiri-wallpapers-16.04", f"/usr/share/backgrounds/{f}.jpg",
                    lic, True, system=True) for n, f, lic in lomiri),
      *(CorpusImage(f"plasma_{n.lower()}", "plasma-workspace-wallpapers",
                    f"/usr/share/wallpapers/{n}/contents/images/2560x1600.jpg",
                    "GPL-2+ (KDE Visual Design Group)", True, system=True) for n in plasma),
  )


SETS = {"embedded": CATALOGUE, "wallpapers": _wallpapers()}
DEBIAN_PACKAGES = tuple(sorted({e.package for e in SETS["wallpapers"]}))
VALIDATION = ("chelsea", "coffee", "flower", "mate_greenmeadow", "mate_ladybird", "lomiri_stream",
              "plasma_path", "plasma_bythewater")
SPLITS = ("train", "validation")


def parse_sets(spec: str) -> tuple[str, ...]:
  """'embedded+wallpapers' -> ('embedded', 'wallpapers'), checked."""
  names = tuple(n for n in str(spec).split("+") if n)
  bad = [n for n in names if n not in SETS]
  if not names or bad:
    raise FapeError(f"--config.data.corpus={spec!r}: join set names from {sorted(SETS)} with '+' "
                    "(e.g. embedded+wallpapers).")
  return names


@functools.cache
def available(spec: str = "embedded") -> tuple[CorpusImage, ...]:
  """Entries of the corpus sets in `spec` whose files are really installed here."""
  out = []
  for name in parse_sets(spec):
    present = [e for e in SETS[name] if _installed(e)]
    if not present and SETS[name][0].system:
      raise FapeError(
          f"Corpus set {name!r} is not installed (its photos come from the Debian packages "
          f"{', '.join(DEBIAN_PACKAGES)}). Run `make corpus` (sudo apt-get install "
          f"--no-install-recommends {' '.join(DEBIAN_PACKAGES)}), or train on the photos bundled "
          "with Python packages: --config.data.corpus=embedded.")
    out.extend(present)
  return tuple(out)


def _installed(entry: CorpusImage) -> bool:
  try:
    present = os.path.isfile(entry.path)
  except (ModuleNotFoundError, TypeError):
    present = False
  if not present:
    logging.warning("Corpus: %s (%s: %s) is not installed; skipping it.", entry.name,
                    entry.package, entry.relpath)
  return present


def split(name: str, spec: str = "embedded") -> tuple[CorpusImage, ...]:
  """The images of split `name` ('train' or 'validation') of the corpus sets `spec`, in order."""
  if name not in SPLITS:
    raise FapeError(f"Unknown corpus split {name!r}; use one of {SPLITS}.")
  is_val = name == "validation"
  out = tuple(e for e in available(spec) if (e.name in VALIDATION) == is_val)
  if not out:
    raise FapeError(f"The embedded corpus has no {name} images installed; reinstall "
                    "scikit-image, scikit-learn, matplotlib and PyWavelets.")
  return out


def load(entry: CorpusImage, max_side: int = 0) -> np.ndarray:
  """The image as (H, W, 3) uint8 (grayscale photos repeated to three channels).

  `max_side` > 0: a wallpaper JPEG may be decoded at a 1/2^k scale (Pillow's `draft`, the DCT
  scaling of libjpeg) that keeps both sides >= max_side: a 16 MP photo that will be resized to
  256 px decodes ~10x faster, and the builder's anti-aliased resize does the rest.
  """
  if entry.npz_key:
    with np.load(entry.path) as z:
      return images.to_rgb_uint8(z[entry.npz_key], where=entry.path)[0]
  if max_side and entry.system and entry.path.lower().endswith(".jpg"):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(entry.path) as im:
      im.draft("RGB", (max_side, max_side))
      return np.asarray(im.convert("RGB"))
  return images.read_rgb(entry.path)[0]
