"""The corpus: really installed, loadable, and split by image with no leak (the photos bundled with
Python packages always; the Debian wallpaper set where `make corpus` installed it)."""

import os

import numpy as np
import pytest
import skimage.transform
from PIL import Image

from fape_jax.data import corpus
from fape_jax.errors import FapeError


FULL = "embedded+wallpapers"
WALLPAPERS_INSTALLED = all(os.path.isfile(e.path) for e in corpus.SETS["wallpapers"])
SPECS = ["embedded", pytest.param(FULL, marks=pytest.mark.skipif(
    not WALLPAPERS_INSTALLED, reason="the wallpaper packages are not installed (make corpus)"))]


@pytest.fixture(scope="module")
def loaded():
  spec = FULL if WALLPAPERS_INSTALLED else "embedded"
  return {e.name: corpus.load(e, max_side=256) for e in corpus.available(spec)}


def test_catalogue_files_are_installed_and_load_as_rgb(loaded):
  # Every catalogue entry ships in this environment (no pooch download involved).
  assert [e.name for e in corpus.available()] == [e.name for e in corpus.CATALOGUE]
  for e in corpus.available():
    assert os.path.isfile(e.path) and e.licence
    img = loaded[e.name]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 256, e.name
    gray = np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert gray == (not e.colour), e.name  # documented: grayscale photos repeated to RGB


@pytest.mark.skipif(not WALLPAPERS_INSTALLED, reason="make corpus installs the wallpapers")
def test_wallpapers_decode_at_a_reduced_scale_never_below_the_asked_size(loaded):
  for e in corpus.SETS["wallpapers"]:
    img, (w, h) = loaded[e.name], Image.open(e.path).size
    assert e.licence and img.dtype == np.uint8 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 256 and abs(img.shape[0] / img.shape[1] - h / w) < 0.01  # aspect
    assert img.shape[0] <= h // 2  # all are >= 1024 px: at least a 1/2 DCT scale


@pytest.mark.parametrize("spec", SPECS)
def test_split_is_by_image_deterministic_and_disjoint(spec):
  train, val = corpus.split("train", spec), corpus.split("validation", spec)
  assert corpus.split("train", spec) == train and corpus.split("validation", spec) == val
  assert len(val) >= 3 and all(e.colour for e in val)
  assert {e.name for e in val} == set(corpus.VALIDATION) & {e.name for e in corpus.available(spec)}
  assert not {e.name for e in train} & {e.name for e in val}
  assert not {e.path for e in train} & {e.path for e in val}
  assert len(train) + len(val) == len(corpus.available(spec))
  if spec == FULL:  # the wallpapers make the corpus several times bigger, on both sides
    assert len(train) >= 35 and len(val) >= 8


def test_no_validation_image_hides_in_training(loaded):
  """No train image equals or closely resembles a validation image (e.g. a stereo twin)."""
  def thumb(img):
    t = skimage.transform.resize(img.mean(axis=2), (32, 32), anti_aliasing=True)
    return (t - t.mean()) / (t.std() + 1e-8)
  spec = FULL if WALLPAPERS_INSTALLED else "embedded"
  val = [thumb(loaded[e.name]) for e in corpus.split("validation", spec)]
  for e in corpus.split("train", spec):
    t = thumb(loaded[e.name])
    for v in val:
      # Distinct photos here correlate <= 0.55; the motorcycle stereo twins reach 0.82.
      assert float((t * v).mean()) < 0.7, e.name


def test_unknown_split_raises():
  with pytest.raises(FapeError, match="Unknown corpus split"):
    corpus.split("test")


def test_missing_system_set_says_how_to_install_it(monkeypatch):
  missing = tuple(corpus.dataclasses.replace(e, relpath="/nonexistent/" + e.name + ".jpg")
                  for e in corpus.SETS["wallpapers"])
  monkeypatch.setitem(corpus.SETS, "wallpapers", missing)
  corpus.available.cache_clear()
  try:
    with pytest.raises(FapeError, match="make corpus.*--config.data.corpus=embedded"):
      corpus.available(FULL)
    with pytest.raises(FapeError, match="join set names"):
      corpus.available("embedded+kodak")
  finally:
    corpus.available.cache_clear()
