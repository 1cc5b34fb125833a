"""The multi-process scenario: a 2-process job on a gs:// workdir loses a process, resumes on
2 processes, and its checkpoint resumes elastically on 1 process; all on this machine.

- Object store: gcp-storage-emulator on 127.0.0.1 (tests/test_object_store.py, `start_emulator`),
  reached by the same client code as a real bucket: gcsfs (epath: logs, config, samples, Orbax's
  metadata), the GCS client (TensorBoard events) and TensorStore's GCS driver (Orbax's arrays).
- Stores: the pairs and plan stores are built once before the job (the `data_dir` fixture) in a
  local folder every process reads (stores need a file system: preflight refuses URLs); the test
  checks that no run rebuilt or changed them.
- Job: launch/local.sh, 2 processes x 2 fake CPU devices (jax.distributed over gloo on 127.0.0.1),
  the `cluster_smoke` config (the tiny model; 2 rows per data-parallel shard, so a global batch
  of 8 on both layouts), a checkpoint every CKPT steps. Process 1 is killed (SIGKILL) once
  process 0 has logged step CKPT + 2 (after the step-CKPT checkpoint, seconds before the next):
  the launcher must exit with process 1's status within seconds, having stopped process 0 (which
  either fails in its next collective or is killed after the launcher's grace, KILL_GRACE_S).
  Both processes log the same metrics at every step (replicated arrays).
- The bucket's run is then copied to a local folder (the state at the kill: the step-CKPT
  checkpoint and the logs).
- Resume, same layout: the same 2-process command on the bucket resumes at CKPT on both processes
  (Grain's per-process state restored), trains to CKPT + 2 with the losses the killed job logged
  for those steps, checkpoints (one data-state file per process) and validates over 2 processes.
- Resume, elastic: 1 process x 4 devices on the local copy (arrays resharded, the data stream
  rebuilt from the saved global example position) trains the same steps: the same losses and
  data order, and the same validation table (each process's own images, sums gathered), so one
  process computes what two do.

These were two files until 2026-12-07 (test_multiprocess.py: stop, resume on 2, resume on 1;
this one: kill, resume on 1). One scenario checks both with two launches fewer (a 2-process
and a 1-process one, ~15 minutes of `make test` worker time on a 2-core VM).

Every run compiles from scratch (JAX_COMPILATION_CACHE_DIR is dropped): on CPU, process 1's cache
keys differ from process 0's and only process 0 writes entries, so a resumed 2-process run with a
cache loads on process 0 and compiles on process 1, and process 0 gives up at the first collective
after Gloo's 30 s rendezvous timeout.

A timeline (seconds per phase) is printed; run with -s to see it.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_launch import alive
from test_object_store import start_emulator

from etils import epath  # noqa: E402  (after the skips in test_object_store)

from fape_jax import preflight  # noqa: E402
from fape_jax import run_log  # noqa: E402

pytestmark = pytest.mark.slow  # subprocess runs: `make test`, not `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "fape-rehearsal"
WORKDIR = f"gs://{BUCKET}/run"
LAUNCHER = os.path.join(REPO, "launch", "local.sh")
BATCH = 8  # cluster_smoke: 2 rows per data-parallel shard, 4 devices in both layouts
CKPT = 4  # the checkpoint the resumes start from; process 1 is killed after step CKPT + 2
END = CKPT + 2
# The 2-process job is given far more steps than it runs (it never ends on its own); the resumes
# set the end. Constant learning rates: the schedule then does not depend on total_steps, so the
# resumed steps must equal those the 2-process job logged before the kill. No validation before
# the end, one sample image, few eval images.
ARGS = ["--config.total_steps=1000", "--config.log_every=1", f"--config.ckpt_every={CKPT}",
        "--config.eval_every=1000", "--config.num_eval_images=4", "--config.num_sample_images=1",
        "--config.optim.g.schedule=constant", "--config.optim.d.schedule=constant"]
STOP_WITHIN_S = 15  # the launcher's grace for the survivors (KILL_GRACE_S, 10 s by default) + 5
# 1 vs 2 processes (and a resumed vs an uninterrupted 2-process step): the same program, but the
# cross-device reductions (gloo across processes vs in-process) may add in another order, so the
# values may differ in the last float32 bits.
RTOL = 1e-5
METRICS_LINE = re.compile(r"process (\d+) step (\d+) metrics (\{[^}]*\})")
# Launcher and cluster variables that would make a child join a process group it was not meant to.
_GROUP_VARS = ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "MASTER_ADDR", "MASTER_PORT",
               "NUM_PROCESSES", "JAX_NUM_PROCESSES", "WORLD_SIZE", "PROCESS_ID", "JAX_PROCESS_ID",
               "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "JAX_LOCAL_DEVICE_IDS",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def _child_env() -> dict:
  """This environment without pytest's 8-device XLA flag or any process-group variables."""
  env = {k: v for k, v in os.environ.items() if k not in _GROUP_VARS
         and not k.startswith("SLURM_") and k != "JAX_COMPILATION_CACHE_DIR"}
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                 env.get("XLA_FLAGS", "")).split()
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.update(PYTHONPATH=REPO, PYTHON=sys.executable, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             JAX_ENABLE_COMPILATION_CACHE="false")
  return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The pairs and plan stores, built once here so that the runs below only read them."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from fape_jax import train_data  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("data")
  c = base.get_config("cluster_smoke")
  c.data.data_dir = str(d)
  train_data.prepare_data(c)
  return str(d)


@pytest.fixture(scope="module")
def bucket_env():
  """The emulator, and the environment that points this process and the children at it."""
  server, env = start_emulator(BUCKET)
  mp = pytest.MonkeyPatch()
  for k, v in env.items():
    mp.setenv(k, v)
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()
  yield env
  mp.undo()
  server.stop()


def _committed_steps() -> list[int]:
  """Checkpoint steps in the bucket that Orbax finalized (on GCS: a commit_success.txt)."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  fs = gcsfs.GCSFileSystem()
  fs.invalidate_cache()
  found = fs.glob(f"{BUCKET}/run/checkpoints/*/commit_success.txt")
  return sorted(int(p.split("/")[-2]) for p in found)


def _read_jsonl_fresh(path: str) -> list[dict]:
  """run_log.read_jsonl, past gcsfs's listing cache (the object is rewritten at every step)."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem().invalidate_cache()
  return run_log.read_jsonl(path)


def _child_pid(parent: int, marker: str) -> int | None:
  """The process started by `parent` whose command line holds `marker`."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
      continue
    if ppid == parent and marker in cmdline:
      return int(entry)
  return None


def _store_files(data_dir_: str) -> dict:
  """{path: (size, mtime)} of the stores (not the shared-dir sentinel the job writes there)."""
  out = {}
  for root, _, files in os.walk(data_dir_):
    for name in files:
      if not name.startswith(preflight.SENTINEL):
        p = os.path.join(root, name)
        out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


def _fail(what: str, log_path, out: str):
  errors = "\n".join(line for line in out.splitlines()
                     if re.search(r"Error|error:|Traceback|^\S* ?F\d{4} ", line))
  pytest.fail(f"{what}; full output in {log_path}.\nError lines:\n{errors[-4000:]}\n"
              f"Last output:\n{out[-4000:]}")


def _run(cmd, env, log_path) -> str:
  """Runs `cmd` to its end; returns stdout + stderr, also kept in `log_path`."""
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  out = proc.stdout + proc.stderr
  log_path.write_text(out)
  if proc.returncode != 0:
    _fail(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode})", log_path, out)
  return out


def _per_process_metrics(out: str) -> dict:
  """{step: {process: metrics}} from the "process N step S metrics {...}" log lines."""
  seen = {}
  for pid, step, blob in METRICS_LINE.findall(out):
    seen.setdefault(int(step), {})[int(pid)] = json.loads(blob)
  return seen


def _train_rows(metrics: str) -> dict:
  """{step: row} of a run's train rows; the last line of a step wins (a resumed run's)."""
  rows = {}
  for r in _read_jsonl_fresh(metrics):
    if r["split"] == "train":
      rows[r["step"]] = r
  return rows


def _checkpoint_mesh(workdir: str, step: int) -> list:
  """Mesh shape of the state checkpointed at `step` (from Orbax's sharding metadata)."""
  blob = (epath.Path(workdir) / "checkpoints" / str(step) / "state" / "_sharding").read_text()
  shapes = {json.dumps(json.loads(v)["shape"]) for v in json.loads(blob).values()}
  assert len(shapes) == 1, shapes
  return json.loads(shapes.pop())


def test_kill_then_resume_on_two_processes_and_elastically_on_one(data_dir, bucket_env, tmp_path):
  timeline, t_phase = [], [time.monotonic()]

  def phase(name):
    now = time.monotonic()
    timeline.append((name, now - t_phase[0]))
    t_phase[0] = now

  try:
    _rehearse(data_dir, bucket_env, tmp_path, phase)
  finally:
    phase("checks" if len(timeline) == 4 else "(failed here)")
    print("\n".join(["cluster rehearsal timeline (s):"]
                    + [f"  {s:6.1f}  {name}" for name, s in timeline]
                    + [f"  {sum(s for _, s in timeline):6.1f}  total"]))


def _rehearse(data_dir_, bucket_env_, tmp_path, phase):
  stores = _store_files(data_dir_)
  assert stores, data_dir_
  env = dict(_child_env(), **bucket_env_, MODULE="fape_jax.train", WORKDIR=WORKDIR,
             CONFIG="configs/base.py:cluster_smoke")
  two_procs = dict(env, NUM_PROCESSES="2", DEVICES_PER_PROCESS="2")
  common = [f"--config.data.data_dir={data_dir_}", *ARGS]
  metrics = f"{WORKDIR}/metrics.jsonl"

  # --- 2 processes x 2 devices; process 1 killed after step CKPT + 2 --------------------------
  log1 = tmp_path / "two_processes.log"
  with open(log1, "w") as f:
    job = subprocess.Popen([LAUNCHER, *common], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env=two_procs)
  try:
    deadline = time.monotonic() + 900  # a guard: ~260 s alone, ~400 s within make test
    # Process 0 logs step CKPT + 2 after the step-CKPT checkpoint (saves block the loop) and
    # seconds before the next one (two steps and a save): kill then, and the resume is at CKPT.
    while not any(r["step"] >= END for r in _read_jsonl_fresh(metrics)):
      if job.poll() is not None:
        _fail(f"the 2-process job ended (exit {job.returncode}) before step {END}", log1,
              log1.read_text())
      if time.monotonic() > deadline:
        _fail(f"no step {END} in {metrics} after 900 s", log1, log1.read_text())
      time.sleep(0.2)
    victim, survivor = (_child_pid(job.pid, f"--process_id={i}") for i in (1, 0))
    assert victim and survivor, (victim, survivor)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    phase(f"2 x 2 devices: start, compile, train {END} steps (checkpoint at {CKPT})")
    try:
      rc = job.wait(timeout=120)
    except subprocess.TimeoutExpired:
      _fail("the launcher still runs 120 s after process 1 was killed", log1, log1.read_text())
    stopped_s = time.monotonic() - t_kill
    phase("process 1 SIGKILLed -> the launcher has stopped the job")
  finally:
    if job.poll() is None:
      job.kill()
  out1 = log1.read_text()
  assert "local.sh: 2 x 2 CPU devices" in out1
  assert "joined as process 1 of 2, 2 local / 4 global devices" in out1
  assert rc == 128 + signal.SIGKILL, (rc, out1[-3000:])
  assert (f"local.sh: process 1 exited with status {128 + signal.SIGKILL}; stopping the others."
          in out1), out1[-3000:]
  assert stopped_s < STOP_WITHIN_S, (stopped_s, out1[-3000:])
  assert not alive(survivor), f"process 0 ({survivor}) outlived the launcher"
  steps = _committed_steps()
  assert steps == [CKPT], (f"committed checkpoints {steps}: the kill came after the next "
                           "checkpoint (a very loaded machine?)")
  before = {}  # the 2-process job's rows, first line of each step
  for r in run_log.read_jsonl(metrics):
    before.setdefault(r["step"], r)
  assert max(before) >= END, sorted(before)
  # The state at the kill, for the elastic resume below (the 2-process resume changes the bucket).
  import gcsfs  # pylint: disable=g-import-not-at-top
  elastic = tmp_path / "elastic"
  gcsfs.GCSFileSystem().get(f"{BUCKET}/run/", str(elastic), recursive=True)
  assert (elastic / "checkpoints" / str(CKPT) / "commit_success.txt").exists()

  # --- the same command on 2 processes resumes the bucket's run and finishes -----------------
  log2 = tmp_path / "two_processes_resumed.log"
  out2 = _run([LAUNCHER, *common, f"--config.total_steps={END}"], two_procs, log2)
  phase(f"2 x 2 devices: resume at step {CKPT}, train to {END}, validate")
  examples = CKPT * BATCH
  for pid in (0, 1):
    assert re.search(rf"\[{pid}\] .*Resumed from {re.escape(WORKDIR)}/checkpoints at step "
                     rf"{CKPT} \(global example {examples}\)\.", out2), out2[-4000:]
  assert "local.sh: all 2 processes finished." in out2

  # --- 1 process x 4 devices resumes the copy of the killed job's workdir ---------------------
  log3 = tmp_path / "one_process_elastic.log"
  out3 = _run([LAUNCHER, *common, f"--config.total_steps={END}"],
              dict(env, WORKDIR=str(elastic), NUM_PROCESSES="1", DEVICES_PER_PROCESS="4"), log3)
  phase(f"1 x 4 devices: resume the copy at step {CKPT}, train to {END}, validate")
  assert (f"Checkpoint step {CKPT} was written by 2 processes, this run has 1: the data stream "
          f"continues from global example {examples}") in out3, out3[-4000:]
  assert re.search(rf"Resumed from {re.escape(str(elastic))}/checkpoints at step {CKPT} "
                   rf"\(global example {examples}\)\.", out3), out3[-4000:]
  assert "local.sh: all 1 processes finished." in out3

  # Both processes report the same metrics at every step they both logged (replicated arrays).
  for out, steps_ in ((out1, range(1, END)), (out2, range(CKPT + 1, END + 1))):
    seen = _per_process_metrics(out)
    for step in steps_:
      assert sorted(seen.get(step, {})) == [0, 1], (step, seen.get(step))
      assert seen[step][0] == seen[step][1], (step, seen[step])

  # Train rows: every step reads the global stream positions it owns (no example repeated or
  # skipped by the kill or either resume), and the resumed steps equal what the killed job had
  # logged for them (restored parameters, optimiser state and data order), on either layout.
  two, one = _train_rows(metrics), _train_rows(str(elastic / "metrics.jsonl"))
  assert sorted(two) == sorted(one) == list(range(1, END + 1)), (sorted(two), sorted(one))
  lines = ["step | killed job loss | 2-proc resumed | 1-proc resumed | data_index_sum"]
  for step in range(1, END + 1):
    for rows in (two, one):
      assert rows[step]["data_index_sum"] == sum(range((step - 1) * BATCH, step * BATCH)), (
          step, rows[step])
    lines.append(f"{step} | {before[step]['loss']:.9g} | {two[step]['loss']:.9g} | "
                 f"{one[step]['loss']:.9g} | {two[step]['data_index_sum']:.0f}")
  print("\n".join(lines))
  for step in range(CKPT + 1, END + 1):
    assert two[step]["time"] > before[step]["time"]  # logged again, by the resumed run
    for k in ("loss", "mse", "adv", "freq", "d_loss", "d_real", "d_fake", "g_grad_norm"):
      for name, rows in (("2 processes resumed", two), ("1 process resumed", one)):
        np.testing.assert_allclose(rows[step][k], before[step][k], rtol=RTOL, atol=1e-7,
                                   err_msg=f"step {step} {k}: {name} vs the killed job")

  # Checkpoints: both runs trained on a 4 x 1 (data x fsdp) mesh; one data-state file per process.
  for workdir, procs in ((WORKDIR, 2), (str(elastic), 1)):
    ckpt = epath.Path(workdir) / "checkpoints" / str(END)
    # Finalized: on GCS Orbax writes commit_success.txt; on a file system it renames a temp dir.
    on_gcs = workdir.startswith("gs://")
    assert (ckpt / "commit_success.txt").exists() if on_gcs else ckpt.is_dir(), ckpt
    assert sorted(p.name for p in (ckpt / "data").iterdir()) == ["commit_success.txt"] + [
        f"process_{i}-of-{procs}.json" for i in range(procs)], workdir
    assert _checkpoint_mesh(workdir, END) == [4, 1], workdir
    assert (epath.Path(workdir) / "samples" / f"step_{END:07d}.png").exists(), workdir

  # Validation over 2 processes (each its own images, sums gathered) gives the 1-process table,
  # and so do the per-task routing means.
  val_two = json.loads(epath.Path(f"{WORKDIR}/validation.json").read_text())
  val_one = json.loads((elastic / "validation.json").read_text())
  assert val_two["step"] == val_one["step"] == END
  assert sorted(val_two["tasks"]) == sorted(val_one["tasks"])
  assert sum(r["n"] for r in val_one["tasks"].values()) == 4
  for task, r in val_one["tasks"].items():
    assert val_two["tasks"][task]["n"] == r["n"]
    for k in ("degraded_psnr", "restored_psnr"):
      np.testing.assert_allclose(val_two["tasks"][task][k], r[k], rtol=1e-4, err_msg=task)
  assert val_two["routing"].keys() == val_one["routing"].keys() and val_one["routing"]
  for task, r in val_one["routing"].items():
    assert val_two["routing"][task].keys() == r.keys() and r, task
    for layer, w in r.items():
      np.testing.assert_allclose(val_two["routing"][task][layer], w, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{task} {layer}")

  # Built once, read by every process of all three runs.
  assert _store_files(data_dir_) == stores
  assert "first run only" not in out1 + out2 + out3
  # Process 0 either fails in its next collective (gloo: the peer reset the connection) and
  # exits through the fail-fast hook, or waits in it until the launcher's SIGKILL (KILL_GRACE_S
  # after its SIGTERM, which a process inside a collective cannot act on): both happen here.
  how = ("process 0 failed on its own" if re.search(r"^\[0\] .*JaxRuntimeError", out1, re.M)
         else "process 0 ended by the launcher's signals")
  print(f"process 1 killed -> launcher exited: {stopped_s:.1f} s ({how})")
