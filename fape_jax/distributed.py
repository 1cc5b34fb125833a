"""Multi-process start-up: join the process group, pick the main process, check agreement.

Entry points call `initialize(...)` first thing, before any JAX computation. Where the settings
come from, first match wins:

1. explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`; all three, or
   `--num_processes=1` alone);
2. SLURM (`SLURM_JOB_ID`, `SLURM_NTASKS`, `SLURM_PROCID`, in an `srun` step with more than one
   task); the coordinator is the step's first node, on `JAX_COORDINATOR_PORT` or a port derived from
   the job id (the same rule as jax's own SLURM detector);
3. Kubernetes/torchrun-style variables: `COORDINATOR_ADDRESS` / `JAX_COORDINATOR_ADDRESS` or
   `MASTER_ADDR`+`MASTER_PORT`; `NUM_PROCESSES` / `JAX_NUM_PROCESSES` / `WORLD_SIZE`;
   `PROCESS_ID` / `JAX_PROCESS_ID` / `RANK` (and `LOCAL_RANK`/`LOCAL_WORLD_SIZE` for several
   processes per host);
4. a Cloud TPU VM (libtpu installed and TPU chips present, or TPU pod variables set): jax's own
   detection does the rest (`jax.distributed.initialize()` with no arguments);
5. otherwise a single process: nothing to do.

GPUs per process: one process per GPU works whether or not SLURM binds GPUs to tasks
(`--gpus-per-task=1` shows each process one GPU; jax's own SLURM default would then ask for a
device that is not there), and one process per node drives all the GPUs it sees.
`JAX_LOCAL_DEVICE_IDS` overrides the choice.
"""

from __future__ import annotations

import atexit
import collections.abc
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from fape_jax import errors
from fape_jax.errors import FapeError

# Variables that mark a Cloud TPU pod host even where the PCI scan below cannot see the chips
# (GKE sets the first two, multislice the third).
_TPU_POD_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
_GOOGLE_PCI_VENDOR = "0x1ae0"
# Past this size the values themselves are not exchanged to explain a mismatch (digests still are).
_MAX_EXPLAINED_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Setup:
  """How this process joins the group (all None for a single process or jax's TPU detection)."""
  source: str  # "flags", "slurm", "env", "tpu", "single" or "preinitialized".
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def multi_process(self) -> bool:
    return self.source == "tpu" or (self.num_processes or 1) > 1


_initialized: Setup | None = None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               *,
               initialization_timeout: int = 300,
               shutdown_timeout: int = 300) -> Setup:
  """Joins the process group described by the flags or the environment; safe to call twice.

  Must run before any JAX computation (including `jax.devices()`).

  Args:
    coordinator_address: "host:port" of process 0 (explicit flag).
    num_processes: total number of processes (explicit flag).
    process_id: this process's index in [0, num_processes) (explicit flag).
    local_device_ids: devices this process drives; None lets the environment decide.
    initialization_timeout: seconds to wait for all processes to join.
    shutdown_timeout: seconds a process that is done waits at exit for the others (jax's shutdown
      barrier); longer for jobs whose processes do unequal independent work (the plan cache).

  Returns:
    The `Setup` that was used (the first one, when called again).

  Raises:
    FapeError: inconsistent flags or environment variables, or the group could not be joined.
  """
  global _initialized
  if _initialized is not None:
    logging.info("distributed: already set up (%s); nothing to do.", _initialized)
    return _initialized
  if jax.distributed.is_initialized():  # Someone called jax.distributed.initialize() directly.
    _initialized = Setup("preinitialized", None, jax.process_count(), jax.process_index())
    logging.info("distributed: jax.distributed was already initialized; using it as it is.")
    return _initialized
  setup = detect(coordinator_address, num_processes, process_id, local_device_ids)
  if not setup.multi_process:
    logging.info("distributed: single process (no flags, SLURM job, launcher variables or TPU pod "
                 "found).")
    _initialized = setup
    return setup
  logging.info("distributed: %s", _describe(setup))
  _use_gloo_for_cpu_collectives()
  if setup.source != "tpu" and setup.process_id != 0:
    _wait_for_coordinator(setup, initialization_timeout)
  try:
    if setup.source == "tpu":
      jax.distributed.initialize(initialization_timeout=initialization_timeout,
                                 shutdown_timeout_seconds=shutdown_timeout)
    else:
      # Every value is resolved here, so jax's own detection is switched off: it would otherwise
      # replace local_device_ids=None ("all visible devices") by [SLURM_LOCALID].
      jax.distributed.initialize(
          setup.coordinator_address, setup.num_processes, setup.process_id,
          local_device_ids=(list(setup.local_device_ids)
                            if setup.local_device_ids is not None else None),
          cluster_detection_method="deactivate",
          initialization_timeout=initialization_timeout,
          shutdown_timeout_seconds=shutdown_timeout)
  except Exception as e:  # jax raises RuntimeError, ValueError or its runtime error type here.
    if "before any JAX" in str(e):
      raise FapeError(
          "fape_jax.distributed.initialize() ran after JAX was already used in this process; call "
          "it first thing in the entry point, before any jax.devices() or computation.") from e
    raise FapeError(
        f"could not join the process group ({_describe(setup)}) within {initialization_timeout} s: "
        f"{e}. Check that every process was started with the same coordinator address and number "
        "of processes, that each has its own process id, that process 0 is running and that its "
        "port is reachable from every host.") from e
  logging.info("distributed: joined as process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  _fail_fast()
  _initialized = setup
  return setup


# --- Fail fast: an error on one process ends every process within seconds ---------------------
#
# Left alone, a process that fails waits in jax's shutdown barrier (300 s) for peers that wait in
# their next collective for it, and then all of them abort with a C++ stack dump. Instead, a failing
# process (an `errors.exit_on_user_error` hook) publishes its exit code and message in the
# coordination service's key-value store; a watchdog thread in every process waits on that key and
# ends its process with the message and the same exit code. Process 0 hosts the service, so it
# leaves last: once every process has said it is stopping (or after `_STOP_WAIT_S`); the others
# leave as soon as they have said so (a process whose service disappears aborts with a stack dump).
# A process that dies without a word (killed, segfault) is left to jax's own heartbeats.

_FAILURE_KEY = "fape_jax/failure"
_STOPPING_DIR = "fape_jax/stopping/"
_STOP_WAIT_S = 10.0
_stopping = threading.Lock()  # held by whichever ends this process: its own error or a peer's


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client  # no public accessor (Orbax reads it the same way)


def _exit_now(code: int) -> None:
  """Ends the process without jax's shutdown barrier (whose peers are gone or going)."""
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  logging.flush()
  os._exit(code)  # pylint: disable=protected-access


def _leave(client, code: int) -> None:
  """Says this process is stopping, then exits (process 0 once all others have said so)."""
  try:
    client.key_value_set(f"{_STOPPING_DIR}{jax.process_index()}", str(code))
    if jax.process_index() == 0:
      deadline = time.monotonic() + _STOP_WAIT_S
      while (len(client.key_value_dir_get(_STOPPING_DIR)) < jax.process_count()
             and time.monotonic() < deadline):
        time.sleep(0.05)
      time.sleep(0.2)  # the last of them may still be between its message and its exit
  except Exception as e:  # noqa: BLE001 (the service is gone: nobody left to tell)
    logging.warning("distributed: could not tell the other processes (%s).", e)
  _exit_now(code)


def _stop_group(code: int, message: str, report) -> None:
  """`errors.on_failure` hook: reports, tells the other processes, ends this one with `code`."""
  client = _client()
  if client is None:
    return
  if not _stopping.acquire(blocking=False):
    # A peer failed first and the watchdog is ending this process: this error (a collective that
    # lost its peer) is only a consequence of that one. Let the watchdog finish.
    time.sleep(2 * _STOP_WAIT_S)
    return
  report()
  try:
    client.key_value_set(_FAILURE_KEY, json.dumps({"process": jax.process_index(), "code": code,
                                                   "message": message}))
  except Exception:  # noqa: BLE001 (ALREADY_EXISTS: another process failed first and said so)
    pass
  _leave(client, code)


def _watch(client, pid: int, done: threading.Event) -> None:
  """Watchdog thread: waits for a failure on any process, then ends this one with its message."""
  while not done.is_set():
    try:
      # Short waits: at a normal end `done` stops the thread before the interpreter shuts down (a
      # daemon thread still inside a C++ call then aborts the process).
      failure = json.loads(client.blocking_key_value_get(_FAILURE_KEY, 500))
    except Exception as e:  # noqa: BLE001 (jax raises its runtime error type)
      if "DEADLINE_EXCEEDED" in str(e):
        continue  # nothing failed yet
      return  # the service is gone: jax's heartbeats end this process
    if not _stopping.acquire(blocking=False):
      return  # this process failed too: its own exit path runs
    print(f"error: process {failure['process']} failed: {failure['message']} (process {pid} "
          "stops too)", file=sys.stderr)
    _leave(client, int(failure["code"]))


def _fail_fast() -> None:
  """Starts the watchdog and the failure hook (see above) once this process has joined."""
  client = _client()
  if client is None:
    return
  done = threading.Event()
  watchdog = threading.Thread(target=_watch, args=(client, jax.process_index(), done),
                              daemon=True, name="fape_jax-fail-fast")
  watchdog.start()

  def stop_watching():  # runs before jax's own exit handler (atexit is last in, first out)
    done.set()
    watchdog.join()

  atexit.register(stop_watching)
  errors.on_failure.append(_stop_group)


def is_main_process() -> bool:
  """True on process 0, the one process that writes logs, reports and samples."""
  return jax.process_index() == 0


def progress(iterable=None, *, desc: str, unit: str = "it", total: int | None = None,
             initial: int = 0, leave: bool = True, disable: bool = False):
  """A tqdm bar with ETA on stderr, drawn on process 0 only (tqdm's defaults); `initial`: a
  resumed loop's starting count."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                   dynamic_ncols=True, disable=disable or not is_main_process())


def progress_write():
  """Context to print while bars are drawn: clears them, redraws them after."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm.external_write_mode()


def assert_same_across_processes(name: str, value: str | bytes | Mapping[str, Any], *,
                                 hint: str | None = None) -> None:
  """Raises FapeError on every process unless all processes hold the same `value`.

  Compares sha256 digests of a canonical encoding (sorted-key JSON for mappings and ConfigDicts),
  then, only on a mismatch, exchanges the values themselves to say what differs. Every process must
  call this with the same `name`, in the same order (it is a collective).

  Args:
    name: what the value is, for the message ("config", "pairs store manifest").
    value: text, bytes, or a mapping (an ml_collections ConfigDict works too).
    hint: what the user should do on a mismatch; defaults to launching every process alike.
  """
  data = _canonical_bytes(value)
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  differing = [i for i in range(1, digests.shape[0]) if not np.array_equal(digests[i], digests[0])]
  if not differing:
    return
  # All processes saw the same digests, so all of them take this branch together.
  values = _allgather_bytes(data, _MAX_EXPLAINED_BYTES)
  first = differing[0]
  if values is not None:
    detail = _explain_difference(values[0], values[first], structured=_is_mapping(value))
  else:
    detail = (f"sha256 {digests[first].tobytes().hex()[:12]} vs {digests[0].tobytes().hex()[:12]} "
              f"(values over {_MAX_EXPLAINED_BYTES} bytes are not shown)")
  others = (f" (processes {', '.join(map(str, differing))} differ from process 0)"
            if len(differing) > 1 else "")
  hint = hint or "launch every process with the same config/overrides, flags and files"
  raise FapeError(f"process {first} has a different {name} than process 0{others}: {detail}; "
                  f"{hint}.")


def detect(coordinator_address: str | None = None,
           num_processes: int | None = None,
           process_id: int | None = None,
           local_device_ids: Sequence[int] | None = None,
           environ: Mapping[str, str] | None = None) -> Setup:
  """Works out how this process should join the group, without touching JAX (see module doc)."""
  env = os.environ if environ is None else environ
  explicit_ids = tuple(local_device_ids) if local_device_ids is not None else None
  if (coordinator_address, num_processes, process_id) != (None, None, None):
    return _from_flags(coordinator_address, num_processes, process_id, explicit_ids)
  for from_env in (_from_slurm, _from_launcher_vars):
    setup = from_env(env, explicit_ids)
    if setup is not None:
      return setup
  if _on_cloud_tpu_vm(env, probe_hardware=environ is None):
    return Setup("tpu")
  return Setup("single")


def _from_flags(address, count, pid, ids) -> Setup:
  if count == 1 and pid in (None, 0):
    return Setup("flags", address, 1, 0)
  missing = [f"--{flag}" for flag, v in (("coordinator_address", address),
                                         ("num_processes", count), ("process_id", pid))
             if v is None]
  if missing:
    raise FapeError(f"{', '.join(missing)} missing: multi-process runs need --coordinator_address, "
                    "--num_processes and --process_id together (or none of them, to detect the "
                    "cluster from the environment).")
  _check_group("--num_processes", count, "--process_id", pid)
  return Setup("flags", _check_address("--coordinator_address", address), count, pid, ids)


def _from_slurm(env: Mapping[str, str], ids) -> Setup | None:
  if "SLURM_JOB_ID" not in env:
    return None
  count_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
  count = _int_var(env, count_var) if count_var in env else 1
  if count <= 1:
    return None  # e.g. one task of a plan-cache array job.
  if "SLURM_PROCID" not in env or "SLURM_STEP_NODELIST" not in env:
    # The batch script itself, or a shell from salloc: one process where SLURM expects `count`.
    raise FapeError(f"SLURM job with {count_var}={count} but this process is not an srun task (no "
                    "SLURM_STEP_NODELIST/SLURM_PROCID): start one process per task with srun (see "
                    "launch/slurm_gpu.sbatch), or pass --num_processes=1 for a single process.")
  nodelist_var = "SLURM_STEP_NODELIST"
  pid = _int_var(env, "SLURM_PROCID")
  _check_group(count_var, count, "SLURM_PROCID", pid)
  if "JAX_COORDINATOR_PORT" in env:
    port = _int_var(env, "JAX_COORDINATOR_PORT")
  else:  # The top 4096 ports, keyed by job id: every task computes the same one.
    port = _int_var(env, "SLURM_JOB_ID") % 4096 + 65536 - 4096
  address = _check_address(nodelist_var, f"{_first_slurm_host(env[nodelist_var])}:{port}")
  if ids is None and "JAX_LOCAL_DEVICE_IDS" not in env:
    local_rank = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    ids = _split_visible_gpus(local_rank, _slurm_tasks_on_this_node(env, count), env)
  return Setup("slurm", address, count, pid, ids)


def _from_launcher_vars(env: Mapping[str, str], ids) -> Setup | None:
  """Kubernetes (JobSet, indexed jobs), torchrun and hand-written launchers."""
  address_var = next((v for v in ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS") if env.get(v)),
                     None)
  address = env[address_var] if address_var else None
  if address is None and env.get("MASTER_ADDR"):
    if not env.get("MASTER_PORT"):
      raise FapeError("MASTER_ADDR is set but MASTER_PORT is not: set both (or COORDINATOR_ADDRESS="
                      "host:port).")
    address_var, address = "MASTER_ADDR/MASTER_PORT", f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
  count_var = next((v for v in ("NUM_PROCESSES", "JAX_NUM_PROCESSES", "WORLD_SIZE") if env.get(v)),
                   None)
  pid_var = next((v for v in ("PROCESS_ID", "JAX_PROCESS_ID", "RANK") if env.get(v)), None)
  count = _int_var(env, count_var) if count_var else None
  if count is None and pid_var is None:
    if address is not None:
      logging.warning("distributed: %s is set but no process count is: running as a single "
                      "process.", address_var)
    return None
  if count == 1:
    return None
  missing = [what for what, v in (("COORDINATOR_ADDRESS (or MASTER_ADDR+MASTER_PORT)", address),
                                  ("NUM_PROCESSES (or WORLD_SIZE)", count_var),
                                  ("PROCESS_ID (or RANK)", pid_var)) if v is None]
  if missing:
    present = ", ".join(v for v in (address_var, count_var, pid_var) if v)
    raise FapeError(f"launcher variables incomplete: {present} set but {', '.join(missing)} "
                    "missing; set all three in every process's environment, or pass "
                    "--coordinator_address/--num_processes/--process_id.")
  pid = _int_var(env, pid_var)
  _check_group(count_var, count, pid_var, pid)
  if ids is None and "JAX_LOCAL_DEVICE_IDS" not in env:
    local_rank = _int_var(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else 0
    local_count = _int_var(env, "LOCAL_WORLD_SIZE") if env.get("LOCAL_WORLD_SIZE") else 1
    ids = _split_visible_gpus(local_rank, local_count, env)
  return Setup("env", _check_address(address_var, address), count, pid, ids)


def _split_visible_gpus(local_rank: int, local_count: int,
                        env: Mapping[str, str]) -> tuple[int, ...] | None:
  """The GPUs this process drives when `local_count` processes share a host (None = all it sees).

  Hand-written because jax's default (device number = local rank) fails when the launcher has
  already bound GPUs to tasks, and uses one GPU only when one process drives a whole node.
  """
  visible = env.get("CUDA_VISIBLE_DEVICES", env.get("ROCR_VISIBLE_DEVICES"))
  n_visible = len([d for d in visible.split(",") if d.strip()]) if visible else None
  on_node = env.get("SLURM_GPUS_ON_NODE")
  n_on_node = int(on_node) if on_node and on_node.isdigit() else None
  if local_count <= 1:
    return None
  if n_visible is None:
    n_visible = n_on_node
    if n_visible is None:  # Nothing known: jax's convention, process i drives device i.
      return (local_rank,)
  elif n_on_node is not None and n_visible < n_on_node:
    return None  # The launcher bound GPUs to this task: drive all of them.
  if n_visible == 1:
    return None
  if n_visible % local_count:
    raise FapeError(f"{n_visible} GPUs visible to each of the {local_count} processes on this host "
                    "do not split evenly; launch one process per GPU or per host, or set "
                    "JAX_LOCAL_DEVICE_IDS=i,j,... for each process.")
  per = n_visible // local_count
  return tuple(range(local_rank * per, (local_rank + 1) * per))


def _slurm_tasks_on_this_node(env: Mapping[str, str], count: int) -> int:
  """Parses SLURM_STEP_TASKS_PER_NODE ("8(x2)", "2,1") for this node (SLURM_NODEID)."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if not spec:
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    return max(1, count // max(1, int(nodes)))
  per_node = []
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not m:
      raise FapeError(f"cannot parse SLURM tasks per node {spec!r}.")
    per_node += [int(m.group(1))] * int(m.group(2) or 1)
  node = int(env.get("SLURM_NODEID", "0"))
  return per_node[node] if node < len(per_node) else per_node[-1]


def _first_slurm_host(nodelist: str) -> str:
  """First host of a SLURM node list: "gpu[003-010,12],cpu1" -> "gpu003"."""
  m = re.match(r"([^\[,]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
  if not m or not m.group(1) and not m.group(2):
    raise FapeError(f"cannot read the first host of the SLURM node list {nodelist!r}.")
  prefix, ranges, suffix = m.groups()
  first = re.split(r"[-,]", ranges)[0] if ranges else ""
  return f"{prefix}{first}{suffix}"


def _on_cloud_tpu_vm(env: Mapping[str, str], probe_hardware: bool) -> bool:
  """libtpu installed and Google TPU chips on the PCI bus (jax's test; it has no public API)."""
  if any(env.get(v) for v in _TPU_POD_VARS):
    return True
  if not probe_hardware or importlib.util.find_spec("libtpu") is None:
    return False
  for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_file) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _wait_for_coordinator(setup: Setup, timeout_s: float) -> None:
  """Waits until process 0's coordinator port accepts connections, else raises FapeError.

  Hand-written because jax aborts the whole process (a C++ fatal error, no exception) when the
  coordinator cannot be reached, which would leave the user a stack dump instead of a message.
  """
  host, _, port = setup.coordinator_address.rpartition(":")
  host = host.strip("[]")  # IPv6 literals come as [::1]:port.
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
        return
    except OSError as e:  # Refused, unreachable, or a name that does not resolve (yet).
      if time.monotonic() >= deadline:
        raise FapeError(
            f"process {setup.process_id} could not reach the coordinator at "
            f"{setup.coordinator_address} within {timeout_s:g} s ({e}); start process 0 with the "
            "same coordinator address, and check that its host name resolves and its port is "
            "open from every host.") from None
    time.sleep(0.25)


def _use_gloo_for_cpu_collectives() -> None:
  """CPU processes need a collectives backend (tests, launch/local.sh); GPU/TPU ignore it."""
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # A jax without the option: it picks its own CPU collectives.
    pass


def _int_var(env: Mapping[str, str], var: str) -> int:
  try:
    return int(env[var])
  except ValueError:
    raise FapeError(f"environment variable {var}={env[var]!r} is not an integer.") from None


def _check_group(count_name: str, count: int, pid_name: str, pid: int) -> None:
  if count < 1:
    raise FapeError(f"{count_name}={count}: the number of processes must be at least 1.")
  if not 0 <= pid < count:
    raise FapeError(f"{pid_name}={pid} is outside [0, {count}) given {count_name}={count}: "
                    "process ids run from 0 to the number of processes minus 1.")


def _check_address(name: str, address: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise FapeError(f"{name}={address!r} is not host:port (e.g. 10.0.0.1:1234).")
  return address


def _describe(setup: Setup) -> str:
  if setup.source == "tpu":
    return "Cloud TPU VM (jax detects the pod)"
  devices = ("all visible devices" if setup.local_device_ids is None
             else f"devices {list(setup.local_device_ids)}")
  return (f"{setup.source}: process {setup.process_id} of {setup.num_processes}, coordinator "
          f"{setup.coordinator_address}, {devices}")


def _is_mapping(value) -> bool:
  return isinstance(value, collections.abc.Mapping) or hasattr(value, "to_dict")


def _canonical_bytes(value) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):
    return value.encode("utf-8")
  if _is_mapping(value):
    plain = value.to_dict() if hasattr(value, "to_dict") else value
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_fallback).encode("utf-8")
  raise TypeError(f"assert_same_across_processes takes str, bytes or a mapping, not "
                  f"{type(value).__name__}.")


def _json_fallback(obj) -> Any:
  """Deterministic stand-ins for non-JSON values (no memory addresses, which differ by process)."""
  if isinstance(obj, (np.ndarray, np.generic)):
    return obj.tolist()
  if isinstance(obj, (set, frozenset)):
    return sorted(map(repr, obj))
  if hasattr(obj, "__qualname__"):
    return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
  return str(obj)


def _allgather_bytes(data: bytes, max_bytes: int) -> list[bytes] | None:
  """Every process's `data`, or None (on all processes alike) when one holds over `max_bytes`."""
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))[:, 0]
  if lengths.max() > max_bytes:
    return None
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [rows[i, :n].tobytes() for i, n in enumerate(lengths)]


def _explain_difference(ref: bytes, other: bytes, structured: bool, limit: int = 5) -> str:
  """Names what differs: dotted keys for mappings, the first differing line for text."""
  if structured:
    a, b = flatten_dotted(json.loads(ref)), flatten_dotted(json.loads(other))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, _ABSENT) != b.get(k, _ABSENT))
    parts = [f"{k}={_short(b.get(k, _ABSENT))} (process 0: {_short(a.get(k, _ABSENT))})"
             for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(parts) + more
  try:
    a_lines, b_lines = ref.decode("utf-8").splitlines(), other.decode("utf-8").splitlines()
  except UnicodeDecodeError:
    offset = next((i for i, (x, y) in enumerate(zip(ref, other)) if x != y),
                  min(len(ref), len(other)))
    return f"bytes differ from offset {offset} ({len(other)} bytes vs {len(ref)} in process 0)"
  for i in range(max(len(a_lines), len(b_lines))):
    x = a_lines[i] if i < len(a_lines) else "<end>"
    y = b_lines[i] if i < len(b_lines) else "<end>"
    if x != y:
      return f"line {i + 1} is {_short(y)} (process 0: {_short(x)})"
  return "same lines, different line endings or trailing newline"


class _Absent:
  def __repr__(self) -> str:
    return "<missing>"


_ABSENT = _Absent()


def flatten_dotted(tree, prefix: str = "") -> dict[str, Any]:
  """{'a.b.c': leaf} from nested dicts (a decoded config); an empty dict is a leaf."""
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(flatten_dotted(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix or "<value>": tree}


def _short(value, width: int = 80) -> str:
  text = repr(value) if not isinstance(value, _Absent) else "<missing>"
  return text if len(text) <= width else text[:width - 3] + "..."


def say(msg: str) -> None:
  """Progress a user should see: logged on every process, printed to stdout on process 0 only."""
  logging.info("%s", msg)
  if is_main_process():
    print(msg, flush=True)


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing to do for a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# Entry points' --compilation_cache default: JAX's own variable when set, else a user cache folder.
COMPILATION_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "~/.cache/fape_jax/xla"
COMPILATION_CACHE_HELP = ("JAX's persistent compilation cache folder: single-process runs reuse "
                          "compiled steps across runs; '' = off (always off for several "
                          "processes).")


def enable_compilation_cache(cache_dir: str | None) -> bool:
  """JAX's persistent compilation cache in `cache_dir` for a single-process run; returns if on.

  Compiled programs (the train and eval steps) are then reused by the next run with the same
  shapes: a resumed training, `restore` and `evaluate` skip most of their compile time. "" or
  None: off. Always off for several processes: multi-process CPU runs (gloo collectives) do not
  round-trip through the cache.
  """
  if not cache_dir or jax.process_count() > 1:
    if jax.config.jax_compilation_cache_dir:
      logging.info("distributed: persistent compilation cache off.")
      jax.config.update("jax_compilation_cache_dir", None)
    return False
  path = os.path.expanduser(cache_dir)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("distributed: persistent compilation cache in %s", path)
  return True
