"""Checks before the first step: batch sizes against the data-parallel size, the device count, and
one shared workdir; the cluster configs whose batches follow the device count."""
import argparse
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from configs import base
from fape_jax import backend
from fape_jax import preflight
from fape_jax import run_dir
from fape_jax.errors import FapeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_per_shard_batches_follow_the_data_parallel_size():
  c = base.get_config("cluster-smoke")
  assert c.variant == "cluster_smoke" and c.max_wall_minutes == 0
  assert preflight.data_parallel_size(c) == 8  # conftest's 8 fake devices, mesh (-1, 1)
  r = preflight.resolve_batches(c)
  assert (r.data.batch_size, r.data.eval_batch_size) == (16, 8)
  assert c.data.batch_size == 4  # the config given is not changed
  r16 = preflight.resolve_batches(base.get_config("sd21"), dp=16)  # a v5e-16, or 2 x 8 GPUs
  assert (r16.data.batch_size, r16.data.eval_batch_size) == (16, 16)
  preflight.check_batches(r16, dp=16, process_count=4)
  assert preflight.resolve_batches(base.get_config("base")).data.batch_size == 8  # global sizes
  assert preflight.data_parallel_size(base.get_config("sd21"), n_devices=16) == 16


@pytest.mark.parametrize("field, size, dp, pc, message", [
    ("batch_size", 8, 16, 4, "config.data.batch_size=8: the global train batch must be a positive "
     "multiple of 16, since the data-parallel size is 16 (mesh ('data', 'fsdp') = (-1, 1), data "
     "axes ('data', 'fsdp')) over 4 processes; set --config.data.batch_size to a multiple of 16 "
     "(e.g. 16), or --config.data.batch_size_per_shard=N to give N rows to every shard."),
    ("eval_batch_size", 8, 16, 16, "config.data.eval_batch_size=8: the global eval batch (each "
     "process takes an equal share of >= 1 row) must be a positive multiple of 16"),
    ("eval_batch_size", 2, 2, 4, "must be a positive multiple of 4, since the data-parallel size "
     "is 2"),
])
def test_batches_that_do_not_split_are_refused_with_the_fix(field, size, dp, pc, message):
  c = base.get_config("base")
  c.data.batch_size, c.data.eval_batch_size = 64, 64
  c.data[field] = size
  with pytest.raises(FapeError) as e:
    preflight.check_batches(c, dp=dp, process_count=pc)
  assert message in str(e.value)


def test_train_refuses_a_batch_that_does_not_split_before_writing_anything(tmp_path):
  from fape_jax import train_lib  # pylint: disable=g-import-not-at-top (not in the workers)
  c = base.get_config("tiny")  # a global batch of 4 over conftest's 8 devices
  with pytest.raises(FapeError, match=r"config.data.batch_size=4: .* multiple of 8"):
    train_lib.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


def test_the_device_count_is_checked_against_the_launcher():
  assert backend.check_devices(0) is None
  assert backend.check_devices(8) == 8
  with pytest.raises(FapeError) as e:
    backend.check_devices(16)
  assert str(e.value).startswith("--expect_devices=16, but JAX sees 8 cpu devices (1 processes, "
                                 "8 on this one, process 0): check that every host joined")


def test_a_resume_on_another_device_count_may_change_per_shard_batches(tmp_path):
  c = base.get_config("cluster_smoke")
  run_dir.record_config(tmp_path, preflight.resolve_batches(c, dp=4), {}, step=0)
  changes = run_dir.check_resume(tmp_path, preflight.resolve_batches(c, dp=2))
  assert changes == {"data.batch_size": (8, 4), "data.eval_batch_size": (4, 2)}
  c.data.batch_size_per_shard = 0  # global sizes given: a changed batch is a changed run
  c.data.batch_size = 4
  with pytest.raises(FapeError, match=r"data.batch_size \(8 -> 4\)"):
    run_dir.check_resume(tmp_path, c)


def test_a_single_process_writes_no_sentinel_and_a_missing_one_is_described(tmp_path):
  preflight.check_shared_dir(tmp_path, "--workdir")
  assert not (tmp_path / preflight.SENTINEL).exists()
  assert preflight.read_sentinel(tmp_path).startswith(f"no {preflight.SENTINEL} (host ")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_a_host_that_sees_another_workdir_stops_every_process(tmp_path):
  """2 processes x 1 CPU device, the second given another folder under the 'same' path (a local
  disk per host): both stop with the message naming process 1, before anything else is written."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = _free_port()
  shared, other = tmp_path / "shared", tmp_path / "host1"
  dirs = {0: shared, 1: other}
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f"--coordinator_address=127.0.0.1:{port}",
       f"--process_id={i}", f"--dir={dirs[i]}"], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outs
  for out, err in outs:
    # Its own error, or the other's through the fail-fast ("process 0 failed: ..."): both raise.
    assert "process 1 has a different view of --workdir" in err, err
    assert "its .fape_shared_check, written by process 0 just now" in err
    assert "--workdir must be one directory shared by every host" in err
  assert (shared / preflight.SENTINEL).exists() and not other.exists()
  # Both given the same folder: they agree and go on.
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f"--coordinator_address=127.0.0.1:{port}",
       f"--process_id={i}", f"--dir={shared}"], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert all(json.loads(out.splitlines()[-1]) == {"agreed": True} for out, _ in outs)


def _worker(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address")
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--dir")
  a = parser.parse_args(argv)
  from fape_jax import distributed  # pylint: disable=g-import-not-at-top
  from fape_jax import errors  # pylint: disable=g-import-not-at-top
  with errors.exit_on_user_error():
    distributed.initialize(a.coordinator_address, 2, a.process_id, initialization_timeout=60)
    preflight.check_shared_dir(a.dir, "--workdir")
    print(json.dumps({"agreed": True}), flush=True)
    jax.effects_barrier()


if __name__ == "__main__":
  _worker(sys.argv[1:])


def test_urls_need_their_file_system_package_and_stores_need_a_mount(monkeypatch):
  preflight.check_url("/local/run", "--workdir")  # local paths always pass
  with pytest.raises(FapeError, match=r"^config.data.data_dir=gs://b/data: the pairs and plan "
                     r"stores are ArrayRecord files read by local path"):
    preflight.check_url("gs://b/data", "config.data.data_dir", stores=True)
  monkeypatch.setattr(preflight, "_importable", lambda module: module != "gcsfs")
  with pytest.raises(FapeError) as e:
    preflight.check_url("gs://b/run", "--workdir")
  assert str(e.value) == ("--workdir=gs://b/run needs gcsfs, not installed for this Python: pip "
                          "install 'fape_jax[cloud]' on every host (the TPU launcher's venv too).")
