"""Pairs store builders: the synthetic store and real benchmark layouts on tiny fake folders."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from fape_jax import tasks as tasks_lib
from fape_jax.data import builders
from fape_jax.data import corpus
from fape_jax.data import degrade as degrade_lib
from fape_jax.data import images
from fape_jax.data import pairs
from fape_jax.errors import FapeError

TINY = dict(variants=1, train_max_side=32, val_size=16, val_variants=2, seed=0)


def _img(seed, h=8, w=12):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(root, rel, arr):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, quality=95) if rel.endswith(".jpg") else Image.fromarray(
      arr).save(path)
  return path


def _write_pairs(root, pairs_list, scale=1):
  for i, (deg, clean) in enumerate(pairs_list):
    c = _img(i, 8 * scale, 12 * scale)
    _write(root, clean, c)
    _write(root, deg, c[::scale, ::scale] // 2 + 10)


def _all(src):
  return [src[i] for i in range(len(src))]


# ----------------------------------------------------------------------------------------------
# The synthetic store
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("pairs")
  pairs.prepare_synthetic(d, builders.synthetic_config(**TINY))
  return d


def test_synthetic_counts_ids_and_shapes(synthetic_dir):
  cfg = builders.synthetic_config(**TINY)
  n_train, n_val = len(corpus.split("train")), len(corpus.split("validation"))
  expect = {"train": n_train * len(tasks_lib.TASKS),
            "validation": n_val * len(tasks_lib.TASKS) * 2,
            "mixes": n_val * len(tasks_lib.MIXES) * 2}
  val_names = {e.name for e in corpus.split("validation")}
  for split, count in expect.items():
    recs = _all(pairs.open_pairs(synthetic_dir, "synthetic", split, cfg))
    assert len(recs) == count
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == count
    for r in recs:
      _, rsplit, image, task, variant = r["id"].split("/")
      params = json.loads(r["params"])
      assert rsplit == split and r["task"] == task and params["image"] == image
      assert (image in val_names) == (split != "train")  # validation images never train
      assert r["source"].startswith("embedded:") and r["source"].endswith("/" + image)
      assert r["degraded"].dtype == np.uint8 and r["degraded"].shape == r["clean"].shape
      assert params["recipe"] == degrade_lib.RECIPE_VERSION
      assert params["evaluation"] == (split != "train")  # validation and mixes are held out
      step = params["steps"][0]
      if split == "train":
        assert max(r["clean"].shape[:2]) <= 32
        if task == "super_resolution":
          assert step["scale"] in degrade_lib.SR_SCALES
      else:
        assert r["clean"].shape == (16, 16, 3)
        if task == "denoise":  # evaluation sigmas cycle over variants
          assert step["sigma"] == degrade_lib.EVAL_SIGMAS[int(variant) % 3]
        if task == "deblur":
          assert step["kind"] in degrade_lib.BLUR_HELD_OUT
        if task == "super_resolution":
          assert (step["scale"], step["downsample"]) == (4, "lanczos")
      assert task in (tasks_lib.TASKS if split != "mixes" else degrade_lib.MIX_NAMES)


def test_synthetic_records_regenerate_from_their_seed(synthetic_dir):
  src = pairs.open_pairs(synthetic_dir, "synthetic", "validation", TINY | {"variants_per_image": 1})
  for r in _all(src)[:10]:
    p = json.loads(r["params"])
    again = degrade_lib.degrade(r["clean"], r["task"], p["seed"], evaluation=p["evaluation"],
                                options={"denoise": {"sigma": degrade_lib.EVAL_SIGMAS[
                                    int(r["id"].rsplit("/", 1)[1]) % 3]}})
    assert again.degraded.tobytes() == r["degraded"].tobytes()


def test_prepare_builds_once_and_open_needs_a_store(synthetic_dir, tmp_path, caplog):
  cfg = builders.synthetic_config(**TINY)
  with caplog.at_level(logging.INFO):
    path = pairs.prepare_synthetic(synthetic_dir, cfg)
  assert os.path.isdir(path) and not any("Building" in m for m in caplog.messages)
  with pytest.raises(FapeError, match="prepare_synthetic"):
    pairs.open_pairs(tmp_path, "synthetic", "train", cfg)
  with pytest.raises(FapeError, match="no split 'test'"):
    pairs.open_pairs(synthetic_dir, "synthetic", "test", cfg)
  with pytest.raises(FapeError, match="Unknown pairs store"):
    pairs.open_pairs(synthetic_dir, "imagenet", "train")
  with pytest.raises(FapeError, match="variants"):
    builders.synthetic_config(variants=0)


def test_store_folder_and_metadata_name_the_recipe(synthetic_dir):
  path = pairs.prepare_synthetic(synthetic_dir, builders.synthetic_config(**TINY))
  assert os.path.basename(path) == f"{degrade_lib.RECIPE_VERSION}.0.0"
  with open(os.path.join(path, "metadata.json")) as f:
    assert json.load(f) == {"recipe_version": degrade_lib.RECIPE_VERSION,
                            "recipe_fingerprint": degrade_lib.recipe_fingerprint()}


def test_a_store_of_another_recipe_is_never_reused(synthetic_dir, tmp_path, monkeypatch,
                                                   caplog):
  cfg = builders.synthetic_config(**TINY)
  built = pairs.prepare_synthetic(synthetic_dir, cfg)
  old = tmp_path / "old"
  shutil.copytree(synthetic_dir, old)
  meta_path = os.path.join(old, os.path.relpath(built, synthetic_dir), "metadata.json")
  # Code with a newer recipe looks in a new folder: the old store is named, never opened, and
  # preparing builds the new recipe's store next to it.
  monkeypatch.setattr(degrade_lib, "RECIPE_VERSION", degrade_lib.RECIPE_VERSION + 1)
  newer = builders.synthetic_config(**TINY)
  assert newer.version != cfg.version
  with pytest.raises(FapeError, match=rf"other synthesis recipes \({cfg.version}\).*not reused"
                                      r".*prepare_synthetic"):
    pairs.open_pairs(old, "synthetic", "train", newer)
  with caplog.at_level(logging.INFO):
    path = pairs.prepare_synthetic(old, newer)
  assert any("Not reusing" in m for m in caplog.messages)
  assert os.path.basename(path) == f"{degrade_lib.RECIPE_VERSION}.0.0"
  rec = pairs.open_pairs(old, "synthetic", "validation", newer)[0]
  assert json.loads(rec["params"])["recipe"] == degrade_lib.RECIPE_VERSION
  monkeypatch.undo()
  # A store in this recipe's folder that recorded another recipe, or none (recipe-1 code wrote
  # no metadata), is refused with what to do.
  for meta in ({"recipe_version": 1}, None):
    if meta is None:
      os.remove(meta_path)
    else:
      with open(meta_path, "w") as f:
        json.dump(meta, f)
    for call in (lambda: pairs.open_pairs(old, "synthetic", "train", cfg),
                 lambda: pairs.prepare_synthetic(old, cfg)):
      with pytest.raises(FapeError, match="not reused. Delete that folder and build it again"):
        call()
  # A same-numbered recipe whose draws changed (a missed bump) is opened, but not silently.
  monkeypatch.setattr(degrade_lib, "recipe_fingerprint", lambda: "something else")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    pairs.open_pairs(synthetic_dir, "synthetic", "train", cfg)
  assert any("bump degrade.RECIPE_VERSION" in m for m in caplog.messages)


# ----------------------------------------------------------------------------------------------
# Real benchmark layouts on fake folders
# ----------------------------------------------------------------------------------------------

# dataset -> (pairs (degraded, clean) to write, SR scale, {split: expected ids})
LAYOUT_CASES = {
    "rain100l": ([("input/1.png", "target/1.png"), ("input/2.png", "target/2.png")], 1,
                 {"test": ["rain100l/test/input/1", "rain100l/test/input/2"]}),
    "rain100h": ([("rain/X2/norain-1x2.png", "norain/norain-1.png"),
                  ("rain/X2/norain-2x2.png", "norain/norain-2.png")], 1,
                 {"test": ["rain100h/test/rain/X2/norain-1x2",
                           "rain100h/test/rain/X2/norain-2x2"]}),
    "snow100k_s": ([("synthetic/beautiful_smile_00003.jpg", "gt/beautiful_smile_00003.jpg")], 1,
                   {"test": ["snow100k_s/test/synthetic/beautiful_smile_00003"]}),
    "snow100k_l": ([("synthetic/a.png", "gt/a.png"), ("synthetic/b.png", "gt/b.png")], 1,
                   {"test": ["snow100k_l/test/synthetic/a", "snow100k_l/test/synthetic/b"]}),
    "sots_outdoor": ([("hazy/0001_0.8_0.2.jpg", "gt/0001.png"),
                      ("hazy/0002_0.9_0.16.jpg", "gt/0002.png")], 1,
                     {"test": ["sots_outdoor/test/hazy/0001_0.8_0.2",
                               "sots_outdoor/test/hazy/0002_0.9_0.16"]}),
    "gopro": ([("test/GOPR0384_11_00/blur/000001.png", "test/GOPR0384_11_00/sharp/000001.png"),
               ("train/GOPR0372_07_00/blur/000047.png", "train/GOPR0372_07_00/sharp/000047.png")],
              1, {"test": ["gopro/test/test/GOPR0384_11_00/blur/000001"],
                  "train": ["gopro/train/train/GOPR0372_07_00/blur/000047"]}),
    "realblur_j": ([("RB/scene230/blur/blur_1.png", "RB/scene230/gt/gt_1.png"),
                    ("RB/scene001/blur/blur_2.png", "RB/scene001/gt/gt_2.png")], 1,
                   {"test": ["realblur_j/test/RB/scene230/blur/blur_1"],
                    "train": ["realblur_j/train/RB/scene001/blur/blur_2"]}),
    "realblur_r": ([("scene7/blur/blur_3.png", "scene7/gt/gt_3.png")], 1,
                   {"unsplit": ["realblur_r/unsplit/scene7/blur/blur_3"]}),
    "lol_v2": ([("Real_captured/Test/Low/low00690.png",
                 "Real_captured/Test/Normal/normal00690.png"),
                ("Synthetic/Test/Low/r0001.png", "Synthetic/Test/Normal/r0001.png"),
                ("Real_captured/Train/Low/low00001.png",
                 "Real_captured/Train/Normal/normal00001.png")], 1,
               {"test": ["lol_v2/test/Real_captured/Test/Low/low00690",
                         "lol_v2/test/Synthetic/Test/Low/r0001"],
                "train": ["lol_v2/train/Real_captured/Train/Low/low00001"]}),
    "realsr": ([("Canon/Test/4/Canon_001_LR4.png", "Canon/Test/4/Canon_001_HR.png")], 4,
               {"test": ["realsr/test/Canon/Test/4/Canon_001_LR4"]}),
    "drealsr": ([("x4/Test_x4/test_LR/DSC_1454_x4.png", "x4/Test_x4/test_HR/DSC_1454_x1.png")], 4,
                {"test": ["drealsr/test/x4/Test_x4/test_LR/DSC_1454_x4"]}),
    "cdd11": ([("CDD-11_test/low_haze_rain/001.png", "CDD-11_test/clear/001.png"),
               ("CDD-11_test/snow/001.png", "CDD-11_test/clear/001.png"),
               ("CDD-11_train/haze/002.png", "CDD-11_train/clear/002.png")], 1,
              {"test": ["cdd11/test/CDD-11_test/low_haze_rain/001",
                        "cdd11/test/CDD-11_test/snow/001"],
               "train": ["cdd11/train/CDD-11_train/haze/002"]}),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_CASES))
def test_paired_layouts(name, tmp_path):
  written, scale, expected = LAYOUT_CASES[name]
  root = tmp_path / "raw"
  _write_pairs(root, written, scale)
  if name == "realblur_j":  # the official split lists, 'gt blur' per line
    (root / "RealBlur_J_test_list.txt").write_text(
        "RB/scene230/gt/gt_1.png RB/scene230/blur/blur_1.png\n")
    (root / "RealBlur_J_train_list.txt").write_text(
        "RB/scene001/gt/gt_2.png RB/scene001/blur/blur_2.png\n")
  pairs.prepare_folder(tmp_path / "data", name, root)
  layout = builders.LAYOUTS[name]
  for split, ids in expected.items():
    recs = {r["id"]: r for r in _all(pairs.open_pairs(tmp_path / "data", name, split))}
    assert sorted(recs) == sorted(ids)
    for rid, r in recs.items():
      assert r["source"] == name
      assert r["clean"].shape == (8 * scale, 12 * scale, 3)
      assert r["degraded"].shape == (8, 12, 3)
      if name == "cdd11":
        folder = rid.split("/")[-2]
        assert r["task"] == builders.CDD11_FOLDERS[folder]
      else:
        assert r["task"] == layout.task
      params = json.loads(r["params"])
      if scale != 1:
        assert params["scale"] == scale
      if name == "sots_outdoor":
        a, b = rid.rsplit("/", 1)[1].split("_")[1:]
        assert params["airlight"] == float(a) and params["beta"] == float(b)


@pytest.mark.parametrize("name,written,expected", [
    ("gopro", [("test/input/1.png", "test/target/1.png")], {"test": ["gopro/test/test/input/1"]}),
    ("realblur_r", [("input/a.png", "target/a.png")], {"test": ["realblur_r/test/input/a"]}),
    ("rain100h", [("rainy/rain-001.png", "norain/norain-001.png")],
     {"test": ["rain100h/test/rainy/rain-001"]}),
    ("realsr", [("test_LR/x.png", "test_HR/x.png"), ("train_LR/y.png", "train_HR/y.png")],
     {"test": ["realsr/test/test_LR/x"], "train": ["realsr/train/train_LR/y"]}),
    ("cdd11", [("haze_snow/9.png", "clear/9.png")], {"test": ["cdd11/test/haze_snow/9"]}),
])
def test_alternative_layouts_are_recognised(name, written, expected, tmp_path):
  _write_pairs(tmp_path, written)
  found = builders.find_pairs(name, tmp_path)
  assert {k: [p.rid for p in v] for k, v in found.items()} == expected
  for specs in found.values():
    for spec in specs:
      assert os.path.isfile(spec.degraded) and os.path.isfile(spec.clean)


@pytest.mark.parametrize("name,clean_rels,ignored", [
    ("bsd68", ["test001.png", "test002.png"], []),
    ("cbsd68", ["original_png/0000.png"], ["noisy15/0000.png"]),
    ("urban100", ["image_SRF_4/img_001_SRF_4_HR.png"], ["image_SRF_4/img_001_SRF_4_LR.png"]),
])
def test_clean_only_sets_get_seeded_noise_with_checksums(name, clean_rels, ignored, tmp_path):
  root = tmp_path / "raw"
  for i, rel in enumerate(clean_rels + ignored):
    img = _img(i, 16, 16)
    _write(root, rel, img[..., 0] if name == "bsd68" else img)  # BSD68 is grayscale
  pairs.prepare_folder(tmp_path / "data", name, root)
  recs = _all(pairs.open_pairs(tmp_path / "data", name, "test"))
  assert len(recs) == len(clean_rels) * 3
  sigmas = {}
  for r in recs:
    p = json.loads(r["params"])
    stem = r["id"].split("/", 2)[2].rsplit("/", 1)[0]
    assert stem + ".png" in clean_rels and r["task"] == "denoise"
    assert p["clean_sha256"] == images.sha256_file(root / (stem + ".png"))
    assert p["degraded_sha256"] == images.sha256_array(r["degraded"])
    sigma = p["steps"][0]["sigma"]
    sigmas.setdefault(stem, set()).add(sigma)
    resid = r["degraded"].astype(float) - r["clean"].astype(float)
    assert resid.std() > 0.3 * sigma
    if name == "bsd68":
      assert p["conversions"] == {"clean": ["gray->rgb"]}
  assert all(s == set(map(float, degrade_lib.EVAL_SIGMAS)) for s in sigmas.values())


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def _rain_folder(root, n=2):
  _write_pairs(root, [(f"input/{i}.png", f"target/{i}.png") for i in range(n)])


def test_corrupt_file_is_named_or_skipped(tmp_path):
  root = tmp_path / "raw"
  _rain_folder(root)
  (root / "input" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  _write(root, "target/9.png", _img(9))
  with pytest.raises(FapeError, match=r"Cannot read image .*input/9\.png"):
    pairs.prepare_folder(tmp_path / "a", "rain100l", root)
  pairs.prepare_folder(tmp_path / "b", "rain100l", root, skip_bad=True)
  ids = [r["id"] for r in _all(pairs.open_pairs(tmp_path / "b", "rain100l", "test"))]
  assert sorted(ids) == ["rain100l/test/input/0", "rain100l/test/input/1"]


def test_truncated_file_is_an_error(tmp_path):
  p = _write(tmp_path, "x.png", _img(0, 64, 64))
  data = open(p, "rb").read()
  open(p, "wb").write(data[:len(data) // 2])
  with pytest.raises(FapeError, match=r"x\.png"):
    images.read_rgb(p)
  with pytest.raises(FapeError, match="does not exist"):
    images.read_rgb(tmp_path / "missing.png")


def test_mismatched_pair_is_named_or_skipped(tmp_path):
  root = tmp_path / "raw"
  _rain_folder(root)
  _write(root, "input/5.png", _img(5, 8, 12))
  _write(root, "target/5.png", _img(5, 9, 12))
  with pytest.raises(FapeError, match=r"size mismatch.*input/5\.png.*target/5\.png"):
    pairs.prepare_folder(tmp_path / "a", "rain100l", root)
  pairs.prepare_folder(tmp_path / "b", "rain100l", root, skip_bad=True)
  assert len(pairs.open_pairs(tmp_path / "b", "rain100l", "test")) == 2
  # A super-resolution pair off by a non-integer factor is an error too.
  lr, hr = _img(1, 8, 8), _img(1, 20, 20)
  with pytest.raises(FapeError, match="integer factor"):
    images.check_pair(lr, hr, "lr.png", "hr.png", allow_scale=True)
  assert images.check_pair(lr, _img(1, 32, 32), "lr.png", "hr.png", allow_scale=True) == 4


def test_a_folder_store_is_never_reused_for_other_files(tmp_path, caplog):
  """The same benchmark name from another folder, or from the same folder after an edit, is
  refused (evaluate with two --data=gopro:... folders and one data_dir silently scored the
  first folder's images twice); the same files, also moved elsewhere, reuse the store."""
  a, b, data = tmp_path / "a", tmp_path / "b", tmp_path / "data"
  _rain_folder(a)
  _write_pairs(b, [(f"input/{i}.png", f"target/{i}.png") for i in range(2)])
  _write(b, "input/1.png", _img(42))  # same names and count, other degraded pixels
  store = pairs.prepare_folder(data, "rain100l", a)
  built = json.loads(open(os.path.join(store, pairs.SOURCE_FILE)).read())
  assert built["pairs"] == {"test": 2} and built["files"] == 4
  before = _all(pairs.open_pairs(data, "rain100l", "test"))
  assert pairs.prepare_folder(data, "rain100l", a) == store  # the same files: reused
  with pytest.raises(FapeError, match=r"built from .*/a \(4 files\), but .*/b holds other files"):
    pairs.prepare_folder(data, "rain100l", b)
  _write(a, "input/2.png", _img(2))
  _write(a, "target/2.png", _img(2))
  with pytest.raises(FapeError, match="Nothing was changed"):
    pairs.prepare_folder(data, "rain100l", a)
  after = _all(pairs.open_pairs(data, "rain100l", "test"))
  assert [r["id"] for r in after] == [r["id"] for r in before]  # the store is untouched
  pairs.prepare_folder(tmp_path / "other", "rain100l", b)  # another data_dir: its own store
  assert len(pairs.open_pairs(tmp_path / "other", "rain100l", "test")) == 2
  # Moved with its modification times kept: the same files.
  shutil.copytree(b, tmp_path / "moved", copy_function=shutil.copy2)
  pairs.prepare_folder(tmp_path / "other", "rain100l", tmp_path / "moved")
  # A store built before sources were recorded is reused with a warning that says how to rebuild.
  os.remove(os.path.join(store, pairs.SOURCE_FILE))
  with caplog.at_level(logging.WARNING):
    assert pairs.prepare_folder(data, "rain100l", a) == store
  assert "predates recorded sources" in caplog.text


def test_missing_partner_empty_and_absent_folders(tmp_path):
  root = tmp_path / "raw"
  _rain_folder(root)
  _write(root, "input/7.png", _img(7))
  with pytest.raises(FapeError, match=r"No clean image for degraded .*input/7\.png"):
    pairs.prepare_folder(tmp_path / "a", "rain100l", root)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FapeError, match="No rain100l images found"):
    pairs.prepare_folder(tmp_path / "a", "rain100l", empty)
  with pytest.raises(FapeError, match="No rain100l images found"):
    pairs.prepare_folder(tmp_path / "a", "rain100l", empty, skip_bad=True)
  with pytest.raises(FapeError, match="does not exist"):
    pairs.prepare_folder(tmp_path / "a", "rain100l", tmp_path / "nowhere")
  with pytest.raises(FapeError, match="Unknown pairs store"):
    pairs.prepare_folder(tmp_path / "a", "rain200", root)


def test_gray_rgba_and_16bit_are_converted_as_documented(tmp_path):
  rgb = _img(3, 8, 12)
  gray16 = np.random.default_rng(0).integers(0, 65536, (8, 12), dtype=np.uint16)
  rgb16 = np.random.default_rng(1).integers(0, 65536, (8, 12, 3), dtype=np.uint16)
  root = tmp_path / "raw"
  _write(root, "input/gray.png", rgb[..., 1])
  _write(root, "target/gray.png", rgb)
  _write(root, "input/rgba.png", np.concatenate([rgb, np.zeros_like(rgb[..., :1])], -1))
  _write(root, "target/rgba.png", rgb)
  Image.fromarray(gray16).save(root / "input" / "g16.png")  # 16-bit grayscale PNG
  _write(root, "target/g16.png", rgb)
  tifffile.imwrite(root / "input" / "c16.tif", rgb16)      # 16-bit colour TIFF
  _write(root, "target/c16.tif", rgb)
  pairs.prepare_folder(tmp_path / "data", "rain100l", root)
  recs = {r["id"].rsplit("/", 1)[1]: r for r in _all(pairs.open_pairs(tmp_path / "data",
                                                                      "rain100l", "test"))}
  conv = lambda k: json.loads(recs[k]["params"])["conversions"]["degraded"]
  np.testing.assert_array_equal(recs["gray"]["degraded"], np.repeat(rgb[..., 1:2], 3, -1))
  assert conv("gray") == ["gray->rgb"]
  np.testing.assert_array_equal(recs["rgba"]["degraded"], rgb)  # alpha dropped, not composited
  assert conv("rgba") == ["drop_alpha"]
  expect16 = np.round(gray16 / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(recs["g16"]["degraded"], np.repeat(expect16[..., None], 3, -1))
  assert conv("g16") == ["gray->rgb", "16bit->8bit"]
  np.testing.assert_array_equal(recs["c16"]["degraded"], np.round(rgb16 / 257.0).astype(np.uint8))
  assert conv("c16") == ["16bit->8bit"]
