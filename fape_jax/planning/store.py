"""The plan store: cached plans and plan tokens, keyed by the pairs' ids (ArrayRecord).

Layout of a store folder:

  manifest.json                          planner, model id, encoder, K, D, dtype, config hash, count
  plans-s00000-c00000.array_record       records (msgpack), group_size 1 for random access
  plans-s00000-c00000.ids.json           the ids of that file, in order: the commit marker

Each writing process (shard `s`) writes its own files in chunks of `records_per_file`; a chunk is
committed by renaming its files into place (ids last), so an interrupted job leaves at most one
uncommitted chunk behind, which the next run deletes and redoes. Readers see every committed chunk
of every shard as one store.

Per record: plan text, parsed fields (task, focus, rationale, pipeline), every raw planner answer,
the hints, n_retries, fallback, and the tokens. Only the valid tokens are stored (masks are a prefix
of True values, see encoders.py); `store[id]` pads them back to (K, D) with a (K,) mask, the shape
the Grain pipeline joins by id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import msgpack
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from fape_jax.errors import FapeError
from fape_jax.planning.encoders import store_dtype
from fape_jax.planning.planners import Plan

FORMAT = "fape_jax.plan_store/1"
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1"   # random access by id: one record per compressed chunk
_CHUNK = re.compile(r"plans-s(\d{5})-c(\d{5})\.ids\.json$")
# Manifest keys that describe how the plans were made (everything except the count).
SETTINGS_KEYS = ("format", "planner", "model_id", "encoder", "encoder_model", "K", "D", "dtype",
                 "config_hash", "pairs")
REBUILD = ("Rebuild it with `python -m fape_jax.plan_cache --config=configs/plan_cache.py "
           "--config.store.path=DIR` using the settings you expect, or point to the right store.")


def _chunk_name(shard: int, chunk: int) -> str:
  return f"plans-s{shard:05d}-c{chunk:05d}"


def _committed_chunks(path: Path) -> list[tuple[int, int, Path]]:
  """(shard, chunk, ids file) of every committed chunk, sorted."""
  found = []
  for p in path.iterdir():
    if m := _CHUNK.match(p.name):
      found.append((int(m[1]), int(m[2]), p))
  return sorted(found)


def _read_ids(ids_file: Path) -> list[str]:
  return json.loads(ids_file.read_text())["ids"]


# flock's errors on file systems that cannot lock (Lustre without -o flock, some NFS and FUSE mounts).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


@contextlib.contextmanager
def _locked(path: Path):
  """Serialises the manifest's count updates between writers, where the file system can.

  Without flock the store stays correct: the manifest is created once atomically
  (`_create_json_exclusive`), every update recounts the committed chunks, and readers count the ids
  themselves (a count written by a slower writer may lag; it is informative only).
  """
  with open(path / ".lock", "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
      if e.errno not in _NO_FLOCK:
        raise
      logging.warning("%s: no flock on this file system (%s); writing the plan store without it.",
                      path, e)
      yield
      return
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _create_json_exclusive(path: Path, obj) -> bool:
  """Writes `obj` to `path` unless it exists; atomic (a hard link of a complete temporary file,
  or O_EXCL where links are not supported): False when another writer created it first."""
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links (some FUSE mounts): an exclusive create, then the content
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(tmp.read_text())
    return True
  finally:
    tmp.unlink(missing_ok=True)


def _read_manifest(path: Path, attempts: int = 50) -> dict:
  """The manifest, waiting briefly for one another writer is creating without hard links."""
  for _ in range(attempts - 1):
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError:
      time.sleep(0.1)
  return json.loads(path.read_text())


def _write_json_atomic(path: Path, obj) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _diff(have: Mapping, want: Mapping) -> list[str]:
  return [f"{k}: store has {have.get(k)!r}, expected {v!r}" for k, v in want.items()
          if have.get(k) != v]


def encode_record(plan_id: str, plan: Plan, tokens: np.ndarray, mask: np.ndarray) -> bytes:
  n = int(mask.sum())
  if not mask[:n].all():
    raise ValueError(f"plan {plan_id!r}: the token mask must be a prefix of True values")
  return msgpack.packb({
      "id": plan_id, "text": plan.text, "task": plan.task, "focus": plan.focus,
      "rationale": plan.rationale, "pipeline": list(plan.pipeline), "raw": list(plan.raw),
      "hints": plan.hints.to_dict(), "n_retries": plan.n_retries, "fallback": plan.fallback,
      "n_tokens": n, "tokens": np.ascontiguousarray(tokens[:n]).tobytes(),
  })


class PlanStoreWriter:
  """Writes one shard's records; resumable (skips ids already committed by any shard)."""

  def __init__(self, path: str | os.PathLike, settings: Mapping, *, shard_index: int = 0,
               records_per_file: int = 1024):
    self.path = Path(path)
    self.shard_index = shard_index
    self.records_per_file = max(1, records_per_file)
    self.settings = {"format": FORMAT, **settings}
    self._dtype = store_dtype(self.settings["dtype"])
    self._k, self._d = int(self.settings["K"]), int(self.settings["D"])
    self.path.mkdir(parents=True, exist_ok=True)
    manifest_file = self.path / MANIFEST
    if not _create_json_exclusive(manifest_file, {**self.settings, "count": 0}):
      have = _read_manifest(manifest_file)
      if diff := _diff(have, {k: self.settings.get(k) for k in SETTINGS_KEYS}):
        raise FapeError(
            f"The plan store at {self.path} was built with other settings ("
            f"{'; '.join(diff)}). Delete that folder to rebuild it, or write to another "
            "--config.store.path.")
    self._remove_uncommitted()
    chunks = _committed_chunks(self.path)
    self.done_ids = {i for _, _, f in chunks for i in _read_ids(f)}
    own = [c for s, c, _ in chunks if s == shard_index]
    self._next_chunk = max(own, default=-1) + 1
    self._records: list[bytes] = []
    self._ids: list[str] = []
    self.written = 0

  def _remove_uncommitted(self) -> None:
    prefix = f"plans-s{self.shard_index:05d}-"
    for p in self.path.glob(prefix + "*"):
      committed = p.name.endswith(".ids.json") or (
          p.name.endswith(".array_record")
          and p.with_name(p.name.replace(".array_record", ".ids.json")).exists())
      if not committed:
        p.unlink()

  def add(self, plan_id: str, plan: Plan, tokens: np.ndarray, mask: np.ndarray) -> None:
    if plan_id in self.done_ids:
      raise ValueError(f"plan {plan_id!r} is already in the store at {self.path}")
    if tokens.shape != (self._k, self._d) or tokens.dtype != self._dtype or mask.shape != (self._k,):
      raise ValueError(f"plan {plan_id!r}: tokens {tokens.shape} {tokens.dtype} / mask "
                       f"{mask.shape} do not match the store's K={self._k}, D={self._d}, "
                       f"{self._dtype}")
    self._records.append(encode_record(plan_id, plan, tokens, mask))
    self._ids.append(plan_id)
    self.done_ids.add(plan_id)
    if len(self._records) >= self.records_per_file:
      self.flush()

  def flush(self) -> None:
    """Commits the buffered records as one chunk (atomic: ids file renamed last)."""
    if not self._records:
      return
    name = _chunk_name(self.shard_index, self._next_chunk)
    data = self.path / f"{name}.array_record"
    tmp = self.path / f"{name}.array_record.tmp"
    writer = array_record_module.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    for r in self._records:
      writer.write(r)
    writer.close()
    os.replace(tmp, data)
    _write_json_atomic(self.path / f"{name}.ids.json", {"ids": self._ids})
    self.written += len(self._ids)
    self._next_chunk += 1
    self._records, self._ids = [], []
    with _locked(self.path):
      manifest_file = self.path / MANIFEST
      manifest = _read_manifest(manifest_file)
      manifest["count"] = sum(len(_read_ids(f)) for _, _, f in _committed_chunks(self.path))
      _write_json_atomic(manifest_file, manifest)

  def close(self) -> None:
    self.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    # On an exception the buffered (uncommitted) records are dropped: a resumed run redoes them.
    if exc[0] is None:
      self.close()


class PlanStore:
  """Random access to a plan store by id: `store[id] -> {"tokens": (K, D), "mask": (K,)}`.

  Picklable (readers reopen lazily), so Grain workers can hold it.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    manifest_file = self.path / MANIFEST
    if not manifest_file.exists():
      raise FapeError(f"No plan store at {self.path} (no {MANIFEST}). {REBUILD}")
    self.manifest = json.loads(manifest_file.read_text())
    self.k, self.d = int(self.manifest["K"]), int(self.manifest["D"])
    self.dtype = store_dtype(self.manifest["dtype"])
    files, ids = [], []
    for _, _, ids_file in _committed_chunks(self.path):
      chunk_ids = _read_ids(ids_file)
      data = ids_file.with_name(ids_file.name.replace(".ids.json", ".array_record"))
      files.append(f"{data}[0:{len(chunk_ids)}]")   # counts known: no file is opened here
      ids.extend(chunk_ids)
    self.ids: list[str] = ids
    self._index = {i: n for n, i in enumerate(ids)}
    if len(self._index) != len(ids):
      seen, dup = set(), []
      for i in ids:
        if i in seen:
          dup.append(i)
        seen.add(i)
      raise FapeError(f"The plan store at {self.path} holds {len(dup)} duplicate id(s) (first: "
                      f"{dup[:5]}), e.g. from two jobs writing it at once. {REBUILD}")
    self.manifest["count"] = len(ids)
    self._source = array_record_data_source.ArrayRecordDataSource(files) if files else None

  def __len__(self) -> int:
    return len(self.ids)

  def __contains__(self, plan_id: str) -> bool:
    return plan_id in self._index

  def missing(self, ids: Iterable[str]) -> list[str]:
    return [i for i in ids if i not in self._index]

  def require(self, ids: Iterable[str]) -> None:
    """Raises FapeError naming the ids (first few + count) that the store has no plan for."""
    if missing := self.missing(ids):
      raise FapeError(f"The plan store at {self.path} has no plan for {len(missing)} id(s), e.g. "
                      f"{missing[:5]}. {REBUILD} (plan_cache resumes: it plans only the missing "
                      "ids when the settings match).")

  def _raw(self, plan_id: str) -> dict:
    if plan_id not in self._index:
      self.require([plan_id])
    return msgpack.unpackb(self._source[self._index[plan_id]])

  def _tokens(self, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    n = rec["n_tokens"]
    tokens = np.zeros((self.k, self.d), self.dtype)
    tokens[:n] = np.frombuffer(rec["tokens"], self.dtype).reshape(n, self.d)
    return tokens, np.arange(self.k) < n

  def __getitem__(self, plan_id: str) -> dict[str, np.ndarray]:
    tokens, mask = self._tokens(self._raw(plan_id))
    return {"tokens": tokens, "mask": mask}

  def record(self, plan_id: str) -> dict:
    """Everything stored for one id: text, parsed fields, raw answers, hints, tokens, mask."""
    rec = self._raw(plan_id)
    rec["tokens"], rec["mask"] = self._tokens(rec)
    rec["pipeline"], rec["raw"] = tuple(rec["pipeline"]), tuple(rec["raw"])
    return rec

  def record_bytes(self, plan_id: str) -> int:
    """Size of one serialized record (before ArrayRecord's compression)."""
    return len(self._source[self._index[plan_id]]) if plan_id in self._index else 0

  def disk_bytes(self) -> int:
    return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def open_plan_store(path: str | os.PathLike, expect: Mapping | None = None,
                    require_ids: Sequence[str] | None = None) -> PlanStore:
  """Opens a store; refuses one whose manifest differs from `expect` or that lacks `require_ids`."""
  store = PlanStore(path)
  if expect and (diff := _diff(store.manifest, expect)):
    raise FapeError(f"The plan store at {store.path} does not match this run ({'; '.join(diff)}). "
                    f"{REBUILD}")
  if require_ids is not None:
    store.require(require_ids)
  return store
