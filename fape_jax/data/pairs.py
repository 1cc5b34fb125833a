"""The pairs store's public API: prepare a store once, open its splits as random-access sources.

  path = pairs.prepare_synthetic(data_dir, config)             # builds only when missing
  path = pairs.prepare_folder(data_dir, "rain100l", manual_dir)
  src = pairs.open_pairs(data_dir, "synthetic", "train", config)
  len(src); src[i] -> {"id": str, "degraded": uint8 HxWx3, "clean": uint8 HxWx3, "task": str,
                       "source": str, "params": str (JSON)}

`config` is either a `builders.SyntheticConfig`, or any object with the training config's data
fields (`variants_per_image`, `train_max_side`, `val_size`, optional `val_variants`, `seed`),
e.g. `config.data` from configs/base.py; None means the defaults.

Stores live in `data_dir/synthetic_pairs/<config name>/1.0.0` and `data_dir/paired_folders/<name>/
1.0.0`. Building is not coordinated across processes: on several hosts, prepare on process 0 (or
before launching) and let the others open the finished store after a barrier.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import tensorflow_datasets as tfds

from fape_jax.data import builders
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
      val_size=get("val_size", 128), val_variants=get("val_variants", 3), seed=get("seed", 0))


class PairsSource:
  """Random-access view of one split; decodes the text fields from bytes to str."""

  def __init__(self, data_source, name: str, split: str, path: str):
    self._ds = data_source
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


def prepare_synthetic(data_dir: str | os.PathLike, config: Any = None, *,
                      skip_bad: bool = False) -> str:
  """Builds the synthetic store under data_dir unless it exists; returns its folder."""
  b = _builder(os.fspath(data_dir), SYNTHETIC, config, skip_bad=skip_bad)
  if not b.is_prepared():
    logging.info("Building the synthetic pairs store %s in %s (once; later runs reuse it).",
                 b.builder_config.name, b.data_dir)
    b.download_and_prepare()
  return os.fspath(b.data_dir)


def prepare_folder(data_dir: str | os.PathLike, name: str, manual_dir: str | os.PathLike, *,
                   skip_bad: bool = False) -> str:
  """Builds the store of benchmark `name` from `manual_dir` unless it exists; returns its folder."""
  b = _builder(os.fspath(data_dir), name, skip_bad=skip_bad)
  if not b.is_prepared():
    builders.find_pairs(name, os.fspath(manual_dir), skip_bad=skip_bad)  # clear errors first
    logging.info("Building the %s pairs store from %s into %s.", name, manual_dir, b.data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir)))
  return os.fspath(b.data_dir)


def open_pairs(data_dir: str | os.PathLike, name: str, split: str,
               config: Any = None) -> PairsSource:
  """Opens one split of a prepared store as a random-access source."""
  b = _builder(os.fspath(data_dir), name, config)
  if not b.is_prepared():
    how = ("pairs.prepare_synthetic(data_dir, config)" if name == SYNTHETIC
           else f"pairs.prepare_folder(data_dir, {name!r}, manual_dir)")
    raise FapeError(f"No {name} pairs store in {data_dir} (looked for {b.data_dir}); build it "
                    f"first with {how}.")
  splits = list(b.info.splits.keys())
  if split not in splits:
    raise FapeError(f"The {name} pairs store has no split {split!r}; it has {splits}.")
  return PairsSource(b.as_data_source()[split], name, split, os.fspath(b.data_dir))
