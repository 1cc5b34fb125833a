"""TFDS builders for the pairs store (ArrayRecord files, no TensorFlow, no downloads).

Every record holds:
  id        unique, stable string ("synthetic/train/astronaut/deraining/3", "rain100l/test/input/1")
  degraded  uint8 (H, W, 3)  (super-resolution sets may store it smaller by an integer factor)
  clean     uint8 (H, W, 3)
  task      a task name from fape_jax.tasks.TASKS or a mix name ('light_enhancement+dehazing')
  source    where the clean image came from ("embedded:skimage/astronaut", "rain100l")
  params    JSON string: degradation parameters, conversions applied on reading, checksums

Images are `tfds.features.Tensor(..., encoding="zlib")` and strings `tfds.features.Text()`: both
encode and decode without TensorFlow (strings come back as bytes; `pairs.PairsSource` decodes them).

Two builders:
  * `SyntheticPairs`: the embedded corpus (corpus.py) degraded by degrade.py with fixed seeds.
    Splits: `train` (train images x 7 tasks x `variants`, degrade's wide training draws),
    `validation` (validation images x 7 tasks x `val_variants`) and `mixes` (validation images x
    the 7 CDD-11 mixes x `val_variants`; zero-shot evaluation only); both of these use degrade's
    held-out draws (`evaluation=True`: kernel families, recipe variants and ranges the training
    draw never produces). The store's version is the synthesis recipe's (`synthetic_version`,
    from degrade.RECIPE_VERSION), so a changed recipe builds a new folder; the recipe version and
    fingerprint are also stored in the store's metadata.json, which pairs.py checks on opening.
    Knobs (the config name spells them, so each setting has its own folder):
      variants        K degraded variants per train image per task (different seeds);
      train_max_side  train images are resized (anti-aliased) so their long side is <= this before
                      degrading (0 = keep the original size); crops are cut later by the pipeline;
      val_size        validation images are centre-cropped to a square and resized (anti-aliased)
                      to val_size x val_size before degrading, so a validation pass runs in one
                      compiled shape;
      val_variants    variants per validation image per task; denoise variant v uses sigma
                      EVAL_SIGMAS[v % 3] (15, 25, 50), so 3 covers the standard sigmas;
      seed            base of every sample's seed [seed, split, crc32(image), crc32(task), variant].
  * `PairedFolders`: real benchmarks read from their usual folder layouts under `manual_dir`, one
    builder config per dataset, driven by the `LAYOUTS` table (globs of degraded files plus regex
    rules that map each to its clean file). Clean-only denoising sets (BSD68, CBSD68, Urban100) get
    Gaussian noise at sigma 15/25/50 with fixed seeds; the params record the seed, the sha256 of the
    clean file and of the noisy array, so a rebuilt store can be checked bit for bit.

Bad input: an unreadable/corrupt file, a degraded file without its clean partner, a pair with
mismatched sizes, or a folder with nothing matching the layout raise `FapeError` naming the file;
with `skip_bad=True` a bad file or pair is logged and skipped instead (an empty folder still
raises), and the builder's `skipped` lists them (pairs.prepare_folder logs the count).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import zlib
from typing import Any, Iterator, Mapping

import numpy as np
import skimage.transform
import tensorflow_datasets as tfds
from etils import epath

from fape_jax import tasks as tasks_lib
from fape_jax.data import corpus
from fape_jax.data import degrade as degrade_lib
from fape_jax.data import images
from fape_jax.errors import FapeError

VERSION = tfds.core.Version("1.0.0")  # the benchmark stores (their synthesised noise is frozen)
SPLIT_CODE = {"train": 0, "validation": 1, "mixes": 2, "test": 3}


def features() -> tfds.features.FeaturesDict:
  image = lambda: tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib")
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "degraded": image(),
      "clean": image(),
      "task": tfds.features.Text(),
      "source": tfds.features.Text(),
      "params": tfds.features.Text(),
  })


def _crc(s: str) -> int:
  return zlib.crc32(s.encode("utf-8"))


def _record(rid: str, degraded: np.ndarray, clean: np.ndarray, task: str, source: str,
            params: Mapping[str, Any]) -> dict[str, Any]:
  return {"id": rid, "degraded": degraded, "clean": clean, "task": task, "source": source,
          "params": json.dumps(params, sort_keys=True)}


class _CodePathFromFile:
  """Tells TFDS where the builder's code lives without probing `importlib_resources`.

  TFDS's default `code_path` checks `isinstance(path, importlib_resources.abc.Traversable)`, an
  optional etils extra that a plain install lacks (ModuleNotFoundError); the file path is all it
  needs (to look for a checksums file next to the code, which we do not have).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


# ----------------------------------------------------------------------------------------------
# Synthetic pairs from the embedded corpus
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Knobs of the synthetic store (see the module docstring); build with `synthetic_config`."""
  variants: int = 6
  train_max_side: int = 256
  val_size: int = 128
  val_variants: int = 3
  seed: int = 0
  corpus: str = "embedded"   # corpus sets joined by '+' (corpus.SETS)


def synthetic_version() -> tfds.core.Version:
  """The synthetic store's version, `<degrade.RECIPE_VERSION>.0.0`: stores live in a folder named
  by it, so code with a new synthesis recipe builds a new store instead of reusing an old one."""
  return tfds.core.Version(f"{degrade_lib.RECIPE_VERSION}.0.0")


def synthetic_config(variants: int = 6, train_max_side: int = 256, val_size: int = 128,
                     val_variants: int = 3, seed: int = 0,
                     corpus_sets: str = "embedded") -> SyntheticConfig:
  for key, value, lo in (("variants", variants, 1), ("train_max_side", train_max_side, 0),
                         ("val_size", val_size, 8), ("val_variants", val_variants, 1),
                         ("seed", seed, 0)):
    if not isinstance(value, (int, np.integer)) or value < lo:
      raise FapeError(f"Synthetic pairs config: {key}={value!r} must be an integer >= {lo}.")
  if 0 < train_max_side < 16:
    raise FapeError(f"Synthetic pairs config: train_max_side={train_max_side} is too small "
                    "(use 0 for no resizing, or >= 16).")
  sets = corpus.parse_sets(corpus_sets)
  # The images actually installed are part of the name: a store built from a partly installed
  # set is never reused once more photos are present (or the other way round).
  names = ",".join(e.name for e in corpus.available("+".join(sets)))
  tag = "" if sets == ("embedded",) else f"_{'+'.join(sets)}{_crc(names) % 10**6:06d}"
  name = f"k{variants}_s{train_max_side}_v{val_size}_e{val_variants}_seed{seed}{tag}"
  return SyntheticConfig(name=name, version=synthetic_version(), variants=int(variants),
                         train_max_side=int(train_max_side), val_size=int(val_size),
                         val_variants=int(val_variants), seed=int(seed),
                         corpus="+".join(sets), description=f"corpus {'+'.join(sets)}, {name}")


def _resize_u8(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  out = skimage.transform.resize(img, shape, order=1, anti_aliasing=True, preserve_range=True)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def prepare_train_image(img: np.ndarray, max_side: int) -> tuple[np.ndarray, dict]:
  h, w = img.shape[:2]
  if not max_side or max(h, w) <= max_side:
    return img, {"prep": "original size"}
  s = max_side / max(h, w)
  shape = (max(1, round(h * s)), max(1, round(w * s)))
  return _resize_u8(img, shape), {"prep": f"resized {w}x{h} -> {shape[1]}x{shape[0]} "
                                          "(anti-aliased, long side <= train_max_side)"}


def prepare_val_image(img: np.ndarray, size: int) -> tuple[np.ndarray, dict]:
  h, w = img.shape[:2]
  s = min(h, w)
  y0, x0 = (h - s) // 2, (w - s) // 2
  sq = img[y0:y0 + s, x0:x0 + s]
  out = sq if s == size else _resize_u8(sq, (size, size))
  return out, {"prep": f"centre crop {s}x{s} at ({x0}, {y0}) -> {size}x{size} (anti-aliased)"}


class SyntheticPairs(_CodePathFromFile, tfds.core.GeneratorBasedBuilder):
  """The embedded corpus degraded seven ways (and mixed), with fixed seeds."""

  VERSION = synthetic_version()
  RELEASE_NOTES = {
      "1.0.0": "Recipe 1: one narrow draw per task; validation differed only in noise sigmas.",
      "2.0.0": "Recipe 2: wide training draws (noise kinds, SR scales 2-4 and a classical "
               "pipeline, ...); validation and mixes use held-out variants.",
      "3.0.0": "Recipe 3: continuous strengths held out as gaps inside wider training ranges "
               "(haze, low-light gamma, rain angle).",
  }
  BUILDER_CONFIGS = [synthetic_config()]

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    self._skip_bad = skip_bad  # the corpus is checked at import time; kept for a uniform API
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # pairs.py reads this back (metadata.json) and refuses a store of another recipe.
    recipe = tfds.core.MetadataDict(recipe_version=degrade_lib.RECIPE_VERSION,
                                    recipe_fingerprint=degrade_lib.recipe_fingerprint())
    return tfds.core.DatasetInfo(
        builder=self, features=features(), metadata=recipe,
        description="Images bundled with installed Python packages, degraded by "
                    "fape_jax.data.degrade (seven tasks, CDD-11 mixes), fixed seeds.")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {s: self._generate_examples(s) for s in ("train", "validation", "mixes")}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    cfg: SyntheticConfig = self.builder_config
    train = split == "train"
    tasks = degrade_lib.MIX_NAMES if split == "mixes" else tasks_lib.TASKS
    n_var = cfg.variants if train else cfg.val_variants
    for entry in corpus.split("train" if train else "validation", cfg.corpus):
      # Big wallpapers decode at a reduced JPEG scale, >= 2x the size they are resized to.
      raw = corpus.load(entry, max_side=2 * (cfg.train_max_side if train else cfg.val_size))
      clean, prep = (prepare_train_image(raw, cfg.train_max_side) if train
                     else prepare_val_image(raw, cfg.val_size))
      for task in tasks:
        for v in range(n_var):
          seed = [cfg.seed, SPLIT_CODE[split], _crc(entry.name), _crc(task), v]
          opts = None if train else {"denoise": {"sigma": degrade_lib.EVAL_SIGMAS[v % 3]}}
          sample = degrade_lib.degrade(clean, task, seed, evaluation=not train, options=opts)
          rid = f"synthetic/{split}/{entry.name}/{task}/{v}"
          params = dict(sample.params, image=entry.name, licence=entry.licence,
                        colour=entry.colour, **prep)
          yield rid, _record(rid, sample.degraded, clean, task,
                             f"embedded:{entry.package}/{entry.name}", params)


# ----------------------------------------------------------------------------------------------
# Real benchmarks from folders
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """How to find pairs: degraded files (or a list file), and regexes to their clean partners.

  glob:   files relative to manual_dir (may use **); for `listing` rules, the list file.
  clean:  (regex, replacement) candidates on the degraded file's relative path ('/' separated);
          the first candidate whose regex matches and whose result exists is the clean file.
  task:   overrides the layout's task (CDD-11's per-folder mixes).
  params: a regex with named groups parsed from the degraded file's relative path into params.
  listing: `glob` names text files whose lines hold two paths (clean and degraded, any order; the
          clean one lies under a folder named gt/, GT/, target/ or sharp/).
  """
  glob: str
  clean: tuple[tuple[str, str], ...] = ()
  task: str = ""
  params: str = ""
  listing: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
  task: str
  # split -> alternatives; an alternative is a tuple of rules; the first alternative that finds
  # any file wins (so a folder in either of two common layouts works, without mixing them).
  splits: Mapping[str, tuple[tuple[Rule, ...], ...]]
  description: str
  allow_scale: bool = False            # super-resolution: degraded may be smaller by a factor
  noise_sigmas: tuple[int, ...] = ()   # clean-only denoising sets: noise synthesised here


def _same_name(src: str, dst: str) -> tuple[str, str]:
  return (rf"^(.*?){src}/([^/]+)$", rf"\1{dst}/\2")


_RAIN = Layout("deraining", {"test": (
    (Rule("input/*", (_same_name("input", "target"),)),),
    (Rule("rainy/*", ((r"^rainy/rain-(.+)$", r"norain/norain-\1"), _same_name("rainy", "gt"),
                      _same_name("rainy", "norain"))),),
    (Rule("rain/X2/*", ((r"^rain/X2/norain-(\d+)x2(\.\w+)$", r"norain/norain-\1\2"),)),),
    (Rule("rain/*", (_same_name("rain", "norain"),)),),
)}, "Restormer/PromptIR layout input/ + target/ (same names); or rainy/rain-N + norain/norain-N; "
    "or the JORDER release rain/X2/norain-NxN.png + norain/norain-N.png")

_SNOW = Layout("desnowing", {"test": (
    (Rule("synthetic/*", (_same_name("synthetic", "gt"),)),),
    (Rule("input/*", (_same_name("input", "target"),)),),
)}, "Snow100K test set: synthetic/ + gt/ (+ mask/, unused), same names")

_SOTS_PARAMS = r"(?P<image>\d+)_(?P<airlight>[\d.]+)_(?P<beta>[\d.]+)\.\w+$"
_SOTS = Layout("dehazing", {"test": (
    (Rule("hazy/*", ((r"^hazy/(\d+)_[^/]*$", r"gt/\1.png"), (r"^hazy/(\d+)_[^/]*$", r"gt/\1.jpg"),
                     (r"^hazy/(\d+)_[^/]*$", r"clear/\1.png"),
                     (r"^hazy/(\d+)_[^/]*$", r"clear/\1.jpg"), _same_name("hazy", "gt")),
          params=_SOTS_PARAMS),),
    (Rule("outdoor/hazy/*", ((r"^outdoor/hazy/(\d+)_[^/]*$", r"outdoor/gt/\1.png"),
                             (r"^outdoor/hazy/(\d+)_[^/]*$", r"outdoor/clear/\1.png")),
          params=_SOTS_PARAMS),),
)}, "SOTS outdoor: hazy/ID_A_beta.jpg + gt/ID.png (or clear/); A and beta are parsed from names")


_GOPRO = Layout("deblur", {
    split: (
        (Rule(f"{split}/*/blur/*", ((r"^(.*)/blur/([^/]+)$", r"\1/sharp/\2"),)),),
        (Rule(f"{split}/input/*", (_same_name("input", "target"),)),),
    ) + (((Rule("input/*", (_same_name("input", "target"),)),),) if split == "test" else ())
    for split in ("test", "train")},
    "GoPro (GOPRO_Large): test|train/<sequence>/blur/N.png + sharp/N.png; or [test/]input/ + "
    "[test/]target/ (Restormer / mmagic layouts)")


def _realblur(letter: str) -> Layout:
  return Layout("deblur", {
      split: (
          (Rule(f"RealBlur_{letter}_{split}_list.txt", listing=True),),
          (Rule(f"{split}/input/*", (_same_name("input", "target"),)),),
      ) + (((Rule("input/*", (_same_name("input", "target"),)),),) if split == "test" else ())
      for split in ("test", "train")} | {"unsplit": (
          (Rule("**/blur/blur_*", ((r"^(.*)/blur/blur_([^/]+)$", r"\1/gt/gt_\2"),)),),)},
      f"RealBlur-{letter}: RealBlur_{letter}_test|train_list.txt (lines 'gt_path blur_path', "
      "paths relative to the folder) over <scene>/blur/blur_N.png + <scene>/gt/gt_N.png; or "
      "[test/]input/ + [test/]target/; without lists or split folders, every scene goes to split "
      "'unsplit'")


_LOL = Layout("light_enhancement", {
    split: (
        (Rule(f"**/{folder}/Low/*", ((r"^(.*)/Low/low([^/]+)$", r"\1/Normal/normal\2"),
                                     _same_name("Low", "Normal"))),),
    ) for split, folder in (("test", "Test"), ("train", "Train"))},
    "LOL-v2: [Real_captured|Synthetic/]Test|Train/Low/lowN.png + Normal/normalN.png (Real) or the "
    "same names (Synthetic)")


def _clean_only(globs: tuple[str, ...], description: str) -> Layout:
  return Layout("denoise", {"test": tuple((Rule(g),) for g in globs)}, description,
                noise_sigmas=degrade_lib.EVAL_SIGMAS)


_REALSR = Layout("super_resolution", {
    split: (
        (Rule(f"**/{folder}/4/*_LR4.*", ((r"^(.*)_LR4(\.\w+)$", r"\1_HR\2"),)),),
        (Rule(f"{split}_LR/*", (_same_name(f"{split}_LR", f"{split}_HR"),)),),
    ) + (((Rule("LR/*", (_same_name("LR", "HR"),)),),) if split == "test" else ())
    for split, folder in (("test", "Test"), ("train", "Train"))},
    "RealSR (V3) x4: <camera>/Test|Train/4/NAME_LR4.png + NAME_HR.png; or test_LR/ + test_HR/; or "
    "LR/ + HR/ (same names)", allow_scale=True)

_DREALSR = Layout("super_resolution", {
    split: (
        (Rule(f"**/{split}_LR/*", ((r"^(.*)_LR/(.+)_x4(\.\w+)$", r"\1_HR/\2_x1\3"),
                                   _same_name(f"{split}_LR", f"{split}_HR"))),),
    ) + (((Rule("LR/*", (_same_name("LR", "HR"),)),),) if split == "test" else ())
    for split in ("test", "train")},
    "DRealSR x4: [x4/Test_x4/]test_LR/NAME_x4.png + test_HR/NAME_x1.png (or the same names); or "
    "LR/ + HR/", allow_scale=True)

CDD11_FOLDERS = {
    "low": "light_enhancement", "haze": "dehazing", "rain": "deraining", "snow": "desnowing",
    "low_haze": "light_enhancement+dehazing", "low_rain": "light_enhancement+deraining",
    "low_snow": "light_enhancement+desnowing", "haze_rain": "deraining+dehazing",
    "haze_snow": "desnowing+dehazing", "low_haze_rain": "light_enhancement+deraining+dehazing",
    "low_haze_snow": "light_enhancement+desnowing+dehazing",
}
_CDD11 = Layout("", {
    split: tuple(
        tuple(Rule(f"{prefix}{f}/*", ((rf"^(.*?){f}/([^/]+)$", r"\1clear/\2"),), task=t)
              for f, t in CDD11_FOLDERS.items())
        for prefix in ((f"CDD-11_{split}/", f"{split}/") + (("",) if split == "test" else ())))
    for split in ("test", "train")},
    "CDD-11: [CDD-11_test|CDD-11_train/]<class>/N.png + clear/N.png for the 11 classes (low, haze, "
    "rain, snow, low_haze, ..., low_haze_snow); a folder holding the classes directly is 'test'")

LAYOUTS: dict[str, Layout] = {
    "rain100l": _RAIN,
    "rain100h": _RAIN,
    "snow100k_s": _SNOW,
    "snow100k_l": _SNOW,
    "sots_outdoor": _SOTS,
    "gopro": _GOPRO,
    "realblur_j": _realblur("J"),
    "realblur_r": _realblur("R"),
    "lol_v2": _LOL,
    "bsd68": _clean_only(("original_png/*", "original/*", "*"),
                         "BSD68 (grayscale, converted to RGB): NAME.png at the top or in "
                         "original/"),
    "cbsd68": _clean_only(("original_png/*", "CBSD68/*", "*"),
                          "CBSD68: original_png/NAME.png (the noisyNN/ folders are ignored: noise "
                          "is synthesised with fixed seeds)"),
    "urban100": _clean_only(("HR/*", "**/*_HR.*", "*"),
                            "Urban100: HR/img_NNN.png, image_SRF_4/img_NNN_SRF_4_HR.png or "
                            "img_NNN.png at the top"),
    "realsr": _REALSR,
    "drealsr": _DREALSR,
    "cdd11": _CDD11,
}


@dataclasses.dataclass(frozen=True)
class PairSpec:
  rid: str
  degraded: str | None  # None: synthesise (clean-only denoising sets)
  clean: str
  task: str
  params: dict


def _rel(path: str, root: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, "/")


def _bad(msg: str, skip_bad: bool, skipped: list[str] | None = None) -> None:
  if not skip_bad:
    raise FapeError(msg)
  logging.warning("Skipping: %s", msg)
  if skipped is not None:
    skipped.append(msg)


def _strip_ext(rel: str) -> str:
  return os.path.splitext(rel)[0]


def _pairs_from_rule(name: str, split: str, layout: Layout, rule: Rule, root: str,
                     skip_bad: bool, skipped: list[str] | None) -> list[PairSpec]:
  task = rule.task or layout.task
  out = []
  if rule.listing:
    lst = os.path.join(root, rule.glob)
    if os.path.isfile(lst):
      with open(lst, encoding="utf-8") as f:
        lines = f.read().splitlines()
      for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
          continue
        if len(fields) != 2:
          _bad(f"{lst}:{lineno}: expected two paths (clean and degraded), got {line.strip()!r}",
               skip_bad, skipped)
          continue
        is_clean = [bool(re.search(r"(^|/)(gt|GT|target|sharp)/", p)) for p in fields]
        if sum(is_clean) != 1:
          _bad(f"{lst}:{lineno}: cannot tell which path is the clean one (it should lie in a "
               f"gt/ folder): {line.strip()!r}", skip_bad, skipped)
          continue
        clean, deg = (fields[0], fields[1]) if is_clean[0] else (fields[1], fields[0])
        out.append(PairSpec(f"{name}/{split}/{_strip_ext(deg)}", os.path.join(root, deg),
                            os.path.join(root, clean), task, {}))
    return out
  files = images.list_images(root, (rule.glob,))
  for path in files:
    rel = _rel(path, root)
    params: dict[str, Any] = {}
    if rule.params:
      m = re.search(rule.params, rel)
      if m:
        params = {k: (float(v) if re.fullmatch(r"[\d.]+", v) and k != "image" else v)
                  for k, v in m.groupdict().items()}
    if layout.noise_sigmas:
      out.append(PairSpec(f"{name}/{split}/{_strip_ext(rel)}", None, path, task, params))
      continue
    tried = []
    clean = None
    for pattern, repl in rule.clean:
      if re.search(pattern, rel):
        cand = os.path.join(root, re.sub(pattern, repl, rel))
        tried.append(cand)
        if os.path.isfile(cand):
          clean = cand
          break
    if clean is None:
      _bad(f"No clean image for degraded {path}: looked for {', '.join(tried) or '(no rule)'}. "
           f"Expected layout for {name}: {layout.description}.", skip_bad, skipped)
      continue
    out.append(PairSpec(f"{name}/{split}/{_strip_ext(rel)}", path, clean, task, params))
  return out


def find_pairs(name: str, root: str, *, skip_bad: bool = False,
               skipped: list[str] | None = None) -> dict[str, list[PairSpec]]:
  """Split -> pairs found under `root` in dataset `name`'s layout (raises if none at all).

  With `skip_bad`, what is skipped is logged and appended to `skipped`.
  """
  if name not in LAYOUTS:
    raise FapeError(f"Unknown paired dataset {name!r}; known: {', '.join(LAYOUTS)}.")
  layout = LAYOUTS[name]
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FapeError(f"Dataset folder {root} for {name} does not exist. Expected layout: "
                    f"{layout.description}.")
  found: dict[str, list[PairSpec]] = {}
  for split, alternatives in layout.splits.items():
    for alt in alternatives:
      pairs = [p for rule in alt for p in _pairs_from_rule(name, split, layout, rule, root,
                                                           skip_bad, skipped)]
      if pairs:
        found[split] = sorted(pairs, key=lambda p: p.rid)
        break
  if "unsplit" in found and len(found) > 1:
    del found["unsplit"]  # split lists or folders exist: they define the splits
  if not found:
    raise FapeError(f"No {name} images found under {root} (the folder is empty or not in the "
                    f"expected layout). Expected: {layout.description}.")
  return found


def _load_pair(spec: PairSpec, layout: Layout, name: str, skip_bad: bool,
               skipped: list[str] | None = None) -> dict[str, Any] | None:
  try:
    clean, clean_notes = images.read_rgb(spec.clean)
    params = dict(spec.params)
    if spec.degraded is None:
      return _noisy_records(spec, clean, clean_notes, name)
    degraded, deg_notes = images.read_rgb(spec.degraded)
    scale = images.check_pair(degraded, clean, spec.degraded, spec.clean,
                              allow_scale=layout.allow_scale)
  except FapeError as e:
    _bad(str(e), skip_bad, skipped)
    return None
  if scale != 1:
    params["scale"] = scale
  if clean_notes or deg_notes:
    params["conversions"] = {"clean": clean_notes, "degraded": deg_notes}
  params["files"] = {"degraded": os.path.basename(spec.degraded),
                     "clean": os.path.basename(spec.clean)}
  return {spec.rid: _record(spec.rid, degraded, clean, spec.task, name, params)}


def _noisy_records(spec: PairSpec, clean: np.ndarray, notes: list[str], name: str) -> dict:
  out = {}
  clean_sha = images.sha256_file(spec.clean)
  for sigma in LAYOUTS[name].noise_sigmas:
    seed = [_crc(name), _crc(spec.rid), int(sigma)]
    sample = degrade_lib.degrade(clean, "denoise", seed, evaluation=True,
                                 options={"denoise": {"sigma": sigma}})
    rid = f"{spec.rid}/sigma{sigma}"
    params = dict(sample.params, clean_sha256=clean_sha,
                  degraded_sha256=images.sha256_array(sample.degraded),
                  files={"clean": os.path.basename(spec.clean)})
    if notes:
      params["conversions"] = {"clean": notes}
    out[rid] = _record(rid, sample.degraded, clean, "denoise", name, params)
  return out


class PairedFolders(_CodePathFromFile, tfds.core.GeneratorBasedBuilder):
  """Real restoration benchmarks from their usual folder layouts (see LAYOUTS)."""

  VERSION = VERSION
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, version=VERSION, description=l.description)
                     for n, l in LAYOUTS.items()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the benchmark yourself and point manual_dir at its folder. Layouts:\n" +
      "\n".join(f"  {n}: {l.description}" for n, l in LAYOUTS.items()))

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    self._skip_bad = skip_bad
    self.skipped: list[str] = []  # what a skip_bad build left out, one message each
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=features(),
                                 description=LAYOUTS[self.builder_config.name].description)

  def _split_generators(self, dl_manager):
    name = self.builder_config.name
    try:
      root = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:
      raise FapeError(f"{name}: {str(e).splitlines()[0]}") from None
    found = find_pairs(name, root, skip_bad=self._skip_bad, skipped=self.skipped)
    return {split: self._generate_examples(pairs) for split, pairs in found.items()}

  def _generate_examples(self, pairs: list[PairSpec]) -> Iterator[tuple[str, dict]]:
    name = self.builder_config.name
    layout = LAYOUTS[name]
    for spec in pairs:
      recs = _load_pair(spec, layout, name, self._skip_bad, self.skipped)
      for rid, rec in (recs or {}).items():
        yield rid, rec
