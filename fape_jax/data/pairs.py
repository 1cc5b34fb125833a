"""The pairs store's public API: prepare a store once, open its splits as random-access sources.

  path = pairs.prepare_synthetic(data_dir, config)             # builds only when missing
  path = pairs.prepare_folder(data_dir, "rain100l", manual_dir)
  src = pairs.open_pairs(data_dir, "synthetic", "train", config)
  len(src); src[i] -> {"id": str, "degraded": uint8 HxWx3, "clean": uint8 HxWx3, "task": str,
                       "source": str, "params": str (JSON)}

`config` is either a `builders.SyntheticConfig`, or any object with the training config's data
fields (`variants_per_image`, `train_max_side`, `val_size`, optional `val_variants`, `seed`),
e.g. `config.data` from configs/base.py; None means the defaults.

Stores live in `data_dir/synthetic_pairs/<config name>/<recipe>.0.0` (recipe =
degrade.RECIPE_VERSION) and `data_dir/paired_folders/<name>/1.0.0`. A synthetic store is never
reused across synthesis recipes: a new recipe builds its own folder (an older one is left alone,
with a warning), and a store whose recorded recipe (metadata.json) is not this code's is refused
with a FapeError that says to delete and rebuild it. A folder store records the files it was
built from (`SOURCE_FILE`: names, sizes and modification times of every pair found); preparing it
again from another folder, or from the same folder with files added, removed or changed, is
refused with a FapeError instead of silently reading the old images. Building is not coordinated
across processes:
on several hosts, prepare on process 0 (or before launching) and let the others open the finished
store after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

import tensorflow_datasets as tfds

from fape_jax.data import builders
from fape_jax.data import degrade
from fape_jax.errors import FapeError

SYNTHETIC = "synthetic"
_TEXT_FIELDS = ("id", "task", "source", "params")


def synthetic_config(config: Any = None) -> builders.SyntheticConfig:
  """A SyntheticConfig from None, a SyntheticConfig, or a training data config."""
  if config is None:
    return builders.synthetic_config()
  if isinstance(config, builders.SyntheticConfig):
    return config
  get = lambda k, d: config.get(k, d) if hasattr(config, "get") else getattr(config, k, d)
  return builders.synthetic_config(
      variants=get("variants_per_image", 6), train_max_side=get("train_max_side", 256),
      val_size=get("val_size", 128), val_variants=get("val_variants", 3), seed=get("seed", 0),
      corpus_sets=get("corpus", "embedded"))


class PairsSource:
  """Random-access view of one split; decodes the text fields from bytes to str."""

  def __init__(self, data_source, name: str, split: str, path: str, task_source=None):
    self._ds = data_source
    self._task_source = task_source   # the same split with the images left undecoded
    self.name, self.split, self.path = name, split, path

  def __len__(self) -> int:
    return len(self._ds)

  def _decode(self, rec: dict) -> dict:
    rec = dict(rec)
    for k in _TEXT_FIELDS:
      v = rec[k]
      rec[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return rec

  def __getitem__(self, index: int) -> dict:
    return self._decode(self._ds[int(index)])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(r) for r in self._ds.__getitems__([int(i) for i in indices])]

  def tasks(self) -> list[str]:
    """Every pair's task, without decoding images (for one-task batches)."""
    src = self._task_source if self._task_source is not None else self._ds
    out = []
    for i in range(len(src)):
      t = src[i]["task"]
      out.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
    return out

  def __repr__(self) -> str:
    return f"PairsSource({self.name}/{self.split}, {len(self)} pairs, {self.path})"


def _builder(data_dir: str, name: str, config: Any = None, *, skip_bad: bool = False):
  data_dir = os.fspath(data_dir)
  if name == SYNTHETIC:
    cfg = synthetic_config(config)
    if cfg.name in builders.SyntheticPairs.builder_configs:  # TFDS refuses an equal-named copy
      cfg = cfg.name
    return builders.SyntheticPairs(config=cfg, data_dir=data_dir,
                                   file_format="array_record", skip_bad=skip_bad)
  if name in builders.LAYOUTS:
    return builders.PairedFolders(config=name, data_dir=data_dir, file_format="array_record",
                                  skip_bad=skip_bad)
  raise FapeError(f"Unknown pairs store {name!r}: use {SYNTHETIC!r} or one of "
                  f"{', '.join(builders.LAYOUTS)}.")


def _other_recipes(b) -> list[str]:
  """Versions (= synthesis recipes) of the same synthetic config stored next to `b`'s folder."""
  parent = os.path.dirname(os.fspath(b.data_dir))
  names = os.listdir(parent) if os.path.isdir(parent) else []
  return sorted(n for n in names if re.fullmatch(r"\d+\.\d+\.\d+", n) and n != str(b.version))


def _check_recipe(b) -> None:
  """Refuses a synthetic store that a different synthesis recipe built: never reuse it silently."""
  try:
    with open(os.path.join(os.fspath(b.data_dir), "metadata.json"), encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError):
    meta = {}  # recipe-1 code recorded nothing
  built = meta.get("recipe_version")
  if built != degrade.RECIPE_VERSION:
    by = f"synthesis recipe {built}" if built else "synthesis code that recorded no recipe"
    raise FapeError(f"The synthetic pairs store {b.data_dir} was built by {by}, not by this "
                    f"code's recipe {degrade.RECIPE_VERSION}, so it is not reused. Delete that "
                    "folder and build it again with pairs.prepare_synthetic(data_dir, config).")
  if meta.get("recipe_fingerprint") != degrade.recipe_fingerprint():
    # Same recipe number, different draws: a recipe edit without a version bump, or a library
    # (numpy) whose random streams changed. The data is of the recipe but no longer regenerates.
    logging.warning(
        "The synthetic pairs store %s was built by recipe %s code whose draws differ from this "
        "code's (fingerprint %s, now %s): its records no longer regenerate from their seeds. If "
        "the synthesis changed, bump degrade.RECIPE_VERSION; otherwise delete the folder to "
        "rebuild it.", b.data_dir, built, meta.get("recipe_fingerprint"),
        degrade.recipe_fingerprint())


def prepare_synthetic(data_dir: str | os.PathLike, config: Any = None, *,
                      skip_bad: bool = False) -> str:
  """Builds the synthetic store under data_dir unless it exists; returns its folder."""
  b = _builder(os.fspath(data_dir), SYNTHETIC, config, skip_bad=skip_bad)
  if not b.is_prepared():
    if others := _other_recipes(b):
      logging.warning("Not reusing the synthetic pairs stores of other synthesis recipes (%s) "
                      "next to %s; delete them to free the space.", ", ".join(others), b.data_dir)
    logging.info("Building the synthetic pairs store %s in %s (once; later runs reuse it).",
                 b.builder_config.name, b.data_dir)
    b.download_and_prepare()
  _check_recipe(b)
  return os.fspath(b.data_dir)


SOURCE_FILE = "fape_source.json"  # in a folder store: the files it was built from


def folder_source(name: str, manual_dir: str | os.PathLike, *, skip_bad: bool = False) -> dict:
  """What a folder store of benchmark `name` built from `manual_dir` would hold: the folder, the
  pairs per split and a digest of every pair file's relative path, size and modification time
  (a listing and a stat per file: no image is read)."""
  root = os.fspath(manual_dir)
  found = builders.find_pairs(name, root, skip_bad=skip_bad)  # clear errors for a bad folder
  files = sorted({f for specs in found.values() for spec in specs
                  for f in (spec.degraded, spec.clean) if f})
  digest = hashlib.sha256()
  for f in files:
    st = os.stat(f)
    digest.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return {"folder": os.path.realpath(root), "pairs": {k: len(v) for k, v in found.items()},
          "files": len(files), "sha256": digest.hexdigest()}


def _check_source(b, name: str, source: dict) -> None:
  """Refuses a folder store built from other files than `source` lists (never reused silently)."""
  path = os.path.join(os.fspath(b.data_dir), SOURCE_FILE)
  if not os.path.exists(path):
    logging.warning("The %s pairs store in %s predates recorded sources: it is reused as it is. If "
                    "%s changed since it was built, delete the store to rebuild it.", name,
                    b.data_dir, source["folder"])
    return
  with open(path, encoding="utf-8") as f:
    built = json.load(f)
  if built.get("sha256") != source["sha256"]:
    raise FapeError(
        f"The {name} pairs store in {b.data_dir} was built from {built.get('folder')} "
        f"({built.get('files')} files), but {source['folder']} holds other files ({source['files']}; "
        "another folder, or files added, removed or changed since). Nothing was changed. Point "
        "config.data.data_dir (evaluate: --data_dir) at another folder to build a store for this "
        "one, or delete the store to rebuild it there.")


def prepare_folder(data_dir: str | os.PathLike, name: str, manual_dir: str | os.PathLike, *,
                   skip_bad: bool = False) -> str:
  """Builds the store of benchmark `name` from `manual_dir` unless it exists; returns its folder.

  An existing store is used only if it was built from the same files (`folder_source`).
  """
  b = _builder(os.fspath(data_dir), name, skip_bad=skip_bad)
  source = folder_source(name, manual_dir, skip_bad=skip_bad)
  if b.is_prepared():
    _check_source(b, name, source)
    return os.fspath(b.data_dir)
  logging.info("Building the %s pairs store from %s into %s.", name, manual_dir, b.data_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir)))
  if b.skipped:
    logging.warning("Skipped %d bad file(s) or pair(s) of %s (data.skip_bad=True); the %s "
                    "store in %s holds the others. First: %s", len(b.skipped), manual_dir, name,
                    b.data_dir, b.skipped[0])
  with open(os.path.join(os.fspath(b.data_dir), SOURCE_FILE), "w", encoding="utf-8") as f:
    json.dump(source, f, indent=2)
  return os.fspath(b.data_dir)


def open_pairs(data_dir: str | os.PathLike, name: str, split: str,
               config: Any = None) -> PairsSource:
  """Opens one split of a prepared store as a random-access source."""
  b = _builder(os.fspath(data_dir), name, config)
  synthetic = name == SYNTHETIC
  if not b.is_prepared():
    how = ("pairs.prepare_synthetic(data_dir, config)" if synthetic
           else f"pairs.prepare_folder(data_dir, {name!r}, manual_dir)")
    others = _other_recipes(b) if synthetic else []
    old = (f" Stores of other synthesis recipes ({', '.join(others)}) are next to it but are "
           "not reused: the synthesis changed." if others else "")
    raise FapeError(f"No {name} pairs store in {data_dir} (looked for {b.data_dir}).{old} Build "
                    f"it first with {how}.")
  if synthetic:
    _check_recipe(b)
  splits = list(b.info.splits.keys())
  if split not in splits:
    raise FapeError(f"The {name} pairs store has no split {split!r}; it has {splits}.")
  skip = {k: tfds.decode.SkipDecoding() for k in ("degraded", "clean")}
  return PairsSource(b.as_data_source()[split], name, split, os.fspath(b.data_dir),
                     task_source=b.as_data_source(decoders=skip)[split])
