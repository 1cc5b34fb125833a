"""Run logging: TensorBoard event files and a JSONL log of every logged metric (process 0 only).

tensorboardX writes TensorBoard events without TensorFlow; the JSONL file is what scripts and tests
read (one object per line: {"step": N, "split": "train"|"val", ...metrics}). The JSONL file is
never opened for append: object stores cannot append (gcsfs silently overwrites instead), so it is
rewritten whole (`rewrite`) with the lines kept in memory, on any file system alike.
"""

from __future__ import annotations

import json
import time

import numpy as np
from etils import epath

from fape_jax import distributed


class RunLog:
  """Writes scalars to WORKDIR/metrics.jsonl and WORKDIR/tb/; a no-op on processes other than 0."""

  def __init__(self, workdir: str | epath.Path):
    self.enabled = distributed.is_main_process()
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._text = ""
    if self.enabled:
      self._text = self.path.read_text() if self.path.exists() else ""  # a resumed run's lines
      if self._text and not self._text.endswith("\n"):
        self._text += "\n"  # a line cut by a crash stays a line of its own
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tb"))

  def scalars(self, step: int, values: dict, split: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items() if np.isscalar(v) or np.ndim(v) == 0}
    self._text += json.dumps({"step": int(step), "split": split, "time": time.time(),
                              **clean}) + "\n"
    rewrite(self.path, self._text)
    for k, v in clean.items():
      self._tb.add_scalar(f"{split}/{k}", v, int(step))
    self._tb.flush()

  def image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image_hwc_uint8, int(step), dataformats="HWC")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None  # its gs:// writer uploads once more when collected: now, not at exit


def rewrite(path: str | epath.Path, text: str) -> None:
  """Replaces the whole content of `path`: on an object store one upload (objects are replaced
  whole), elsewhere a temporary file renamed over it (a reader never sees half a file)."""
  path = epath.Path(path)
  if "://" in str(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def read_jsonl(path: str | epath.Path) -> list[dict]:
  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
