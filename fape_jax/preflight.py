"""Checks before the first step, on every process: what would otherwise fail hours in, or never.

A cluster run that passes these starts training with batches every process and device can take
and a run directory (and data directory) that every host reads and writes as one:

- `resolve_batches`: batch sizes given per data-parallel shard (`config.data.batch_size_per_shard`,
  `eval_batch_size_per_shard`; 0 = use the global sizes as given) become global sizes for the
  devices this run has, so one config serves 8 CPU devices, a v5e-16 pod and 2 x 8 GPUs.
- `check_batches`: the global train batch must split evenly over the data-parallel devices and the
  processes; the eval batch too, with at least one row per process (else the first validation,
  hours in, fails or reads no rows).
- `check_url`: a `gs://` (or other fsspec URL) workdir needs its file-system package on every
  process (the `cloud` extra), and the stores need a mounted file system.
- `check_shared_dir`: process 0 writes a sentinel holding a fresh token into the directory, every
  process reads it back after a barrier; a host that sees another (or no) directory under the same
  path is named, before anything else is written there.
"""

from __future__ import annotations

import importlib.util
import math
import socket
import uuid

import jax
import ml_collections
from etils import epath

from fape_jax import distributed
from fape_jax import sharding as shard_lib
from fape_jax.errors import FapeError

SENTINEL = ".fape_shared_check"


def data_parallel_size(config, n_devices: int | None = None) -> int:
  """Devices the batch splits over (the product of the data axes of the config's mesh)."""
  n = jax.device_count() if n_devices is None else n_devices
  shape = shard_lib.fill_mesh_shape(config.mesh.axes, config.mesh.shape, n)
  sizes = dict(zip(config.mesh.axes, shape))
  return math.prod(sizes[a] for a in config.data_axes if a in sizes)


def resolve_batches(config, dp: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` whose global batch sizes are per-shard sizes x `dp` where those are set.

  The copy is what the run uses and records (`config.json`); the per-shard fields stay in it, so a
  resume on another number of devices resolves them again (run_dir allows that change).
  """
  d = config.data
  per_train, per_eval = d.get("batch_size_per_shard", 0), d.get("eval_batch_size_per_shard", 0)
  if not per_train and not per_eval:
    return config
  for name, v in (("batch_size_per_shard", per_train), ("eval_batch_size_per_shard", per_eval)):
    if v < 0:
      raise FapeError(f"config.data.{name}={v}: give a positive number of rows per "
                      "data-parallel shard, or 0 to use the global size as given.")
  dp = data_parallel_size(config) if dp is None else dp
  out = config.copy_and_resolve_references()
  if per_train:
    out.data.batch_size = per_train * dp
  if per_eval:
    out.data.eval_batch_size = per_eval * dp
  return out


def check_batches(config, dp: int, process_count: int | None = None) -> None:
  """FapeError unless the train and eval batches split over `dp` devices and the processes."""
  pc = jax.process_count() if process_count is None else process_count
  d = config.data
  where = (f"the data-parallel size is {dp} (mesh {tuple(config.mesh.axes)} = "
           f"{tuple(config.mesh.shape)}, data axes {tuple(config.data_axes)}) over {pc} "
           f"process{'es' if pc > 1 else ''}")
  need = math.lcm(dp, pc)
  for field, per_shard in (("batch_size", "batch_size_per_shard"),
                           ("eval_batch_size", "eval_batch_size_per_shard")):
    size = d[field]
    if size >= need and size % need == 0:
      continue
    fix = (f"set --config.data.{field} to a multiple of {need} (e.g. {need * max(1, size // need)}"
           f"), or --config.data.{per_shard}=N to give N rows to every shard")
    what = "global train batch" if field == "batch_size" else \
        "global eval batch (each process takes an equal share of >= 1 row)"
    raise FapeError(f"config.data.{field}={size}: the {what} must be a positive multiple of "
                    f"{need}, since {where}; {fix}.")


# What a URL scheme needs (fsspec implementations; tensorboardX writes gs:// with google-cloud-storage).
_URL_PACKAGES = {"gs": ("gcsfs", "google.cloud.storage"), "gcs": ("gcsfs", "google.cloud.storage"),
                 "s3": ("s3fs",)}


def check_url(path, what: str, *, stores: bool = False) -> None:
  """FapeError unless this process can use `path` (a local path always passes).

  `stores`: the pairs and plan stores (ArrayRecord files, opened by local path), which need a
  mounted file system rather than a URL.
  """
  path = str(path)
  scheme, sep, _ = path.partition("://")
  if not sep:
    return
  if stores:
    raise FapeError(f"{what}={path}: the pairs and plan stores are ArrayRecord files read by "
                    "local path; put them on a file system every host mounts (a shared disk, "
                    "Filestore/NFS, or the bucket through GCS FUSE at the same path on every "
                    "host).")
  missing = [m for m in _URL_PACKAGES.get(scheme, ()) if not _importable(m)]
  if missing:
    raise FapeError(f"{what}={path} needs {', '.join(missing)}, not installed for this Python: "
                    "pip install 'fape_jax[cloud]' on every host (the TPU launcher's venv "
                    "too).")


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a missing parent package (google.cloud)
    return False


def sentinel_text(token: str) -> str:
  return f"{token} written by process 0 on host {socket.gethostname()}\n"


def read_sentinel(path: str | epath.Path) -> str:
  """What this process sees of the sentinel in `path` (a description when it sees none)."""
  f = epath.Path(path) / SENTINEL
  try:
    return f.read_text()
  except FileNotFoundError:
    return f"no {SENTINEL} (host {socket.gethostname()} sees another folder, or none)\n"
  except OSError as e:
    return f"cannot read {f} on host {socket.gethostname()}: {e}\n"


def check_shared_dir(path: str | epath.Path, what: str) -> None:
  """FapeError on every process unless all see the same `path` (multi-process runs only).

  Every process must call it at the same point (a barrier and an all-gather). Process 0 creates
  `path` and writes a sentinel with a fresh token; the others must read back the same text.
  """
  if jax.process_count() == 1:
    return
  path = epath.Path(path)
  if distributed.is_main_process():
    try:
      path.mkdir(parents=True, exist_ok=True)
      tmp = path / f"{SENTINEL}.tmp"
      tmp.write_text(sentinel_text(uuid.uuid4().hex))
      tmp.replace(path / SENTINEL)  # a reader sees the old token or the new one, never half
    except OSError as e:
      raise FapeError(f"process 0 cannot write {what} {path}: {e}; give a directory every "
                      "process can write.") from None
  distributed.barrier(f"shared_check_{what}")
  distributed.assert_same_across_processes(
      f"view of {what} {path} (its {SENTINEL}, written by process 0 just now)",
      read_sentinel(path),
      hint=(f"{what} must be one directory shared by every host: a gs:// path, or a shared file "
            "system (NFS, Lustre, GCS FUSE) mounted at the same path on every host; a local path "
            "on each host gives every host its own run"))
