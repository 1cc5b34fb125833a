"""fape_jax.distributed: where the process group comes from, and a real 2-process group.

The multi-process tests start this file as the worker module through launch/local.sh (2 processes x
2 fake CPU devices on 127.0.0.1), outside pytest: conftest's 8 devices are for this process only.
"""

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

from fape_jax import distributed
from fape_jax.errors import FapeError

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"

# --- detect(): flags and environments, no JAX involved -----------------------------------------


def test_explicit_flags_win_over_the_environment():
  slurm = _slurm_env(ntasks=16, procid=3, localid=3, tasks_per_node="8(x2)", visible="3")
  setup = distributed.detect("10.0.0.1:1234", 4, 2, environ=slurm)
  assert setup == distributed.Setup("flags", "10.0.0.1:1234", 4, 2, None)
  assert distributed.detect(num_processes=1, environ=slurm).multi_process is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="h:1"), "--num_processes, --process_id missing"),
    (dict(num_processes=2, process_id=0), "--coordinator_address missing"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2 is outside"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "is not host:port"),
    (dict(coordinator_address="h:99999", num_processes=2, process_id=0), "is not host:port"),
])
def test_bad_flags_raise_fape_error(kwargs, message):
  with pytest.raises(FapeError, match=re.escape(message)):
    distributed.detect(environ={}, **kwargs)


def test_nothing_detected_is_a_single_process():
  assert distributed.detect(environ={}) == distributed.Setup("single")
  # One SLURM task (a plan-cache array task) and WORLD_SIZE=1 are single processes too.
  assert distributed.detect(environ=_slurm_env(ntasks=1, procid=0, localid=0)).source == "single"
  assert distributed.detect(environ={"WORLD_SIZE": "1", "RANK": "0"}).source == "single"


def test_tpu_pod_variables_hand_over_to_jax_detection():
  setup = distributed.detect(environ={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
  assert setup.source == "tpu" and setup.multi_process


@pytest.mark.parametrize("ntasks, tasks_per_node, localid, visible, on_node, expected", [
    (16, "8(x2)", 3, "3", "8", None),  # --gpus-per-task=1: SLURM bound one GPU to the task.
    (16, "8(x2)", 5, "0,1,2,3,4,5,6,7", "8", (5,)),  # one per GPU, all visible: GPU = local id.
    (2, "1(x2)", 0, "0,1,2,3,4,5,6,7", "8", None),  # one per node: drive every visible GPU.
    (4, "2(x2)", 1, "0,1,2,3,4,5,6,7", "8", (4, 5, 6, 7)),  # two per node: half each.
    (16, "8,8", 6, None, None, (6,)),  # nothing known: jax's convention, process i drives GPU i.
])
def test_slurm_gpu_layouts(ntasks, tasks_per_node, localid, visible, on_node, expected):
  procid = ntasks // 2 + localid  # on the second node
  env = _slurm_env(ntasks=ntasks, procid=procid, localid=localid, tasks_per_node=tasks_per_node,
                   visible=visible, gpus_on_node=on_node, nodeid=1)
  assert distributed.detect(environ=env) == distributed.Setup(
      "slurm", "node001:62217", ntasks, procid, expected)


def test_uneven_gpu_split_asks_for_explicit_devices():
  env = _slurm_env(ntasks=6, procid=0, localid=0, tasks_per_node="3(x2)", visible="0,1,2,3")
  with pytest.raises(FapeError, match="do not split evenly.*JAX_LOCAL_DEVICE_IDS"):
    distributed.detect(environ=env)
  env["JAX_LOCAL_DEVICE_IDS"] = "0"  # jax itself reads it; detect leaves the choice to it.
  assert distributed.detect(environ=env).local_device_ids is None


def test_slurm_coordinator_is_the_first_node_on_a_job_derived_port():
  env = _slurm_env(ntasks=16, procid=0, localid=0, nodelist="gpu-[003-010,12],cpu1", job_id=12345)
  assert distributed.detect(environ=env).coordinator_address == "gpu-003:61497"
  env.update(SLURM_STEP_NODELIST="node[1,3]-ib", JAX_COORDINATOR_PORT="4321")
  assert distributed.detect(environ=env).coordinator_address == "node1-ib:4321"
  env.update(SLURM_STEP_NODELIST="single-host")
  assert distributed.detect(environ=env).coordinator_address == "single-host:4321"


def test_slurm_batch_shell_with_many_tasks_asks_for_srun():
  env = _slurm_env(ntasks=16, procid=0, localid=0)
  del env["SLURM_STEP_NODELIST"]
  with pytest.raises(FapeError, match="start one process per task with srun"):
    distributed.detect(environ=env)


def test_torchrun_style_variables():
  env = {"MASTER_ADDR": "trainer-0.svc", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "RANK": "6",
         "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  assert distributed.detect(environ=env) == distributed.Setup("env", "trainer-0.svc:29500", 8, 6,
                                                              (2,))
  k8s = {"COORDINATOR_ADDRESS": "job-0.job:1234", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}
  assert distributed.detect(environ=k8s) == distributed.Setup("env", "job-0.job:1234", 2, 1, None)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "4"}, "COORDINATOR_ADDRESS (or MASTER_ADDR+MASTER_PORT), PROCESS_ID (or RANK) "
                          "missing"),
    ({"COORDINATOR_ADDRESS": "h:1", "RANK": "0"}, "NUM_PROCESSES (or WORLD_SIZE) missing"),
    ({"MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "0"}, "MASTER_PORT is not"),
    ({"COORDINATOR_ADDRESS": "h:1", "WORLD_SIZE": "four", "RANK": "0"}, "WORLD_SIZE='four' is not "
                                                                         "an integer"),
    ({"COORDINATOR_ADDRESS": "h:1", "WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside [0, 2)"),
])
def test_incomplete_launcher_variables_raise_fape_error(env, message):
  with pytest.raises(FapeError, match=re.escape(message)):
    distributed.detect(environ=env)


def test_canonical_encoding_ignores_key_order_but_not_values():
  encode = distributed._canonical_bytes  # pylint: disable=protected-access
  assert encode({"a": 1, "b": {"c": 2, "d": 3}}) == encode({"b": {"d": 3, "c": 2}, "a": 1})
  assert encode({"a": 1}) != encode({"a": 2})
  with pytest.raises(TypeError):
    encode([1, 2])


# --- a real process group: 2 processes x 2 fake CPU devices via launch/local.sh -----------------


def _run_local(*args, timeout=120):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices.
  env.update(NUM_PROCESSES="2", DEVICES_PER_PROCESS="2", MODULE="test_distributed",
             PYTHONPATH=str(REPO / "tests"), PYTHON=sys.executable, KILL_GRACE_S="5")
  start = time.monotonic()
  proc = subprocess.run(["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  return proc, time.monotonic() - start


@pytest.mark.slow
def test_two_processes_join_reduce_and_compare():
  proc, _ = _run_local("--mode=check")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = {}
  for line in proc.stdout.splitlines():
    m = re.fullmatch(r"\[(\d)\] RESULT (.*)", line)
    if m:
      results[int(m.group(1))] = json.loads(m.group(2))
  assert sorted(results) == [0, 1], proc.stdout[-3000:]
  for pid, r in results.items():
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)
    assert r["process_index"] == pid and r["is_main"] == (pid == 0)
    assert r["setup"] == ["flags", 2, pid]
    assert r["psum"] == [22.0] and r["jit_sum"] == 22.0  # (0 + 1) + (10 + 11) over 4 devices.
    assert r["allgather"] == [0, 1]
    assert r["equal_values_pass"] is True
    assert r["config_mismatch"] == (
        "process 1 has a different config than process 0: model.rank=16 (process 0: 8); "
        "launch every process with the same config/overrides, flags and files.")
    assert r["large_mismatch"].startswith("process 1 has a different blob than process 0: sha256 ")
    assert "(values over 1048576 bytes are not shown)" in r["large_mismatch"]
    assert r["manifest_mismatch"].startswith(
        "process 1 has a different pairs store manifest than process 0: line 2 is "
        "'shard-1 sha=bbb' (process 0: 'shard-1 sha=aaa'); rebuild the store")


@pytest.mark.slow
def test_one_failing_process_stops_the_others_and_the_launcher_fails():
  proc, wall = _run_local("--mode=fail_one", timeout=90)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "[1] worker 1 fails on purpose" in proc.stderr
  assert "local.sh: process 1 exited with status 3; stopping the others." in proc.stderr
  # Process 0 waits in initialize() for a peer that never comes (timeout 60 s): it was killed.
  assert wall < 45, wall


@pytest.mark.slow
def test_unreachable_coordinator_is_a_fape_error_not_an_abort():
  with socket.socket() as s:  # A port that nothing listens on once closed.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, str(pathlib.Path(__file__)), "--mode=lonely",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1"],
      env=env, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 4, proc.stderr[-2000:]
  assert (f"FAPE_ERROR process 1 could not reach the coordinator at 127.0.0.1:{port} within 2 s"
          in proc.stdout)


def test_initialize_after_jax_was_used_says_to_call_it_first(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # The pytest process has used JAX already; initialize must refuse, clearly.
  monkeypatch.setattr(distributed, "_initialized", None)
  monkeypatch.setattr(distributed, "_wait_for_coordinator", lambda *_: None)
  with pytest.raises(FapeError, match="ran after JAX was already used"):
    distributed.initialize("127.0.0.1:1234", 2, 1)
  assert not jax.distributed.is_initialized()


def _slurm_env(ntasks, procid, localid, tasks_per_node=None, visible=None, gpus_on_node=None,
               nodeid=0, nodelist="node[001-002]", job_id=777):
  env = {"SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
         "SLURM_LOCALID": str(localid), "SLURM_STEP_NODELIST": nodelist,
         "SLURM_NODEID": str(nodeid)}
  for key, value in (("SLURM_STEP_TASKS_PER_NODE", tasks_per_node),
                     ("CUDA_VISIBLE_DEVICES", visible), ("SLURM_GPUS_ON_NODE", gpus_on_node)):
    if value is not None:
      env[key] = value
  return env


def _worker(argv):
  """One process of the group (run by launch/local.sh, not by pytest)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--mode", choices=("check", "fail_one", "lonely"))
  a = parser.parse_args(argv)
  if a.mode == "fail_one" and a.process_id == 1:
    print("worker 1 fails on purpose", file=sys.stderr)
    sys.exit(3)
  if a.mode == "lonely":  # Nobody listens at the coordinator address.
    try:
      distributed.initialize(a.coordinator_address, a.num_processes, a.process_id,
                             initialization_timeout=2)
    except FapeError as e:
      print(f"FAPE_ERROR {e}")
      sys.exit(4)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  setup = distributed.initialize(a.coordinator_address, a.num_processes, a.process_id,
                                 initialization_timeout=60)
  assert distributed.initialize() is setup  # A second call is a no-op.
  distributed._initialized = None  # pylint: disable=protected-access
  assert distributed.initialize() == distributed.Setup("preinitialized", None, 2, a.process_id)
  pid = jax.process_index()
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  local = np.asarray([10.0 * pid + d for d in range(jax.local_device_count())], np.float32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
  psum = jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh, in_specs=P("data"),
                       out_specs=P())(x)
  jit_sum = jax.jit(jnp_sum, out_shardings=NamedSharding(mesh, P()))(x)
  result = {
      "setup": [setup.source, setup.num_processes, setup.process_id],
      "process_count": jax.process_count(), "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(), "process_index": pid,
      "is_main": distributed.is_main_process(),
      "psum": np.asarray(psum).tolist(), "jit_sum": float(jit_sum),
      "allgather": np.asarray(multihost_utils.process_allgather(np.int32(pid))).tolist(),
  }
  distributed.assert_same_across_processes("config", {"model": {"rank": 8}, "seed": [1, 2]})
  result["equal_values_pass"] = True
  for key, name, value, hint in (
      ("config_mismatch", "config", {"seed": 0, "model": {"rank": 8 if pid == 0 else 16}}, None),
      ("manifest_mismatch", "pairs store manifest",
       f"shard-0 sha=000\nshard-1 sha={'aaa' if pid == 0 else 'bbb'}\n", "rebuild the store"),
      # Only process 1 holds a value too large to exchange: both must still agree on what to do.
      ("large_mismatch", "blob", b"x" * (2 << 20) if pid == 1 else b"y", None)):
    try:
      distributed.assert_same_across_processes(name, value, hint=hint)
      result[key] = None
    except FapeError as e:
      result[key] = str(e)
  print("RESULT " + json.dumps(result), flush=True)


def jnp_sum(v):
  return v.sum()


if __name__ == "__main__":
  _worker(sys.argv[1:])
