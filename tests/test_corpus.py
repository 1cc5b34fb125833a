"""The embedded corpus: really bundled, loadable, and split by image with no leak."""

import os

import numpy as np
import pytest
import skimage.transform

from fape_jax.data import corpus
from fape_jax.errors import FapeError


@pytest.fixture(scope="module")
def loaded():
  return {e.name: corpus.load(e) for e in corpus.available()}


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


def test_split_is_by_image_deterministic_and_disjoint():
  train, val = corpus.split("train"), corpus.split("validation")
  assert corpus.split("train") == train and corpus.split("validation") == val
  assert len(val) >= 3 and all(e.colour for e in val)
  assert {e.name for e in val} == set(corpus.VALIDATION)
  assert not {e.name for e in train} & {e.name for e in val}
  assert not {e.path for e in train} & {e.path for e in val}
  assert len(train) + len(val) == len(corpus.available())


def test_no_validation_image_hides_in_training(loaded):
  """No train image equals or closely resembles a validation image (e.g. a stereo twin)."""
  def thumb(img):
    t = skimage.transform.resize(img.mean(axis=2), (32, 32), anti_aliasing=True)
    return (t - t.mean()) / (t.std() + 1e-8)
  val = [thumb(loaded[e.name]) for e in corpus.split("validation")]
  for e in corpus.split("train"):
    t = thumb(loaded[e.name])
    for v in val:
      # Distinct photos here correlate <= 0.55; the motorcycle stereo twins reach 0.82.
      assert float((t * v).mean()) < 0.7, e.name


def test_unknown_split_raises():
  with pytest.raises(FapeError, match="Unknown corpus split"):
    corpus.split("test")
