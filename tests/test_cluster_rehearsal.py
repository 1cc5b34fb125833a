"""Cluster rehearsal: a multi-process job on a gs:// workdir loses a process, then resumes on
another process count, all on this machine (4.5-5.5 minutes on 2 loaded cores, mostly compiling).

- Object store: gcp-storage-emulator on 127.0.0.1 (tests/test_object_store.py, `start_emulator`),
  reached by the same client code as a real bucket: gcsfs (epath: logs, config, samples, Orbax's
  metadata), the GCS client (TensorBoard events) and TensorStore's GCS driver (Orbax's arrays).
- Stores: the pairs and plan stores are built once before the job (the `data_dir` fixture of
  tests/test_multiprocess.py) in a local folder every process reads (stores need a file system:
  preflight refuses URLs); the test checks that no run rebuilt or changed them.
- Job: launch/local.sh, 2 processes x 2 fake CPU devices (jax.distributed over gloo on 127.0.0.1),
  the `cluster_smoke` config (the tiny model; 2 rows per data-parallel shard, so a global batch
  of 8 on both layouts), a checkpoint every CKPT steps. Process 1 is killed (SIGKILL) once
  process 0 has logged step CKPT + 2 (after the step-CKPT checkpoint, seconds before the next):
  the launcher must exit with process 1's status within seconds, having stopped process 0 (which
  either fails in its next collective or is killed after the launcher's grace, KILL_GRACE_S).
- Resume: 1 process x 4 devices, the same command on the same gs:// workdir, resumes from the
  step-CKPT checkpoint (elastic: arrays resharded, the data stream rebuilt from the saved global
  example position), trains to CKPT + 2 with the same losses as the 2-process job had logged for
  those steps, checkpoints and validates.

A timeline (seconds per phase) is printed; run with -s to see it.
"""
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from test_multiprocess import REPO, RTOL, _child_env, data_dir  # noqa: F401 (data_dir: a fixture)
from test_object_store import start_emulator

from etils import epath  # noqa: E402  (after the skips in test_object_store)

from fape_jax import preflight  # noqa: E402
from fape_jax import run_log  # noqa: E402

pytestmark = pytest.mark.slow  # subprocess runs: `make test`, not `make test-fast`

BUCKET = "fape-rehearsal"
WORKDIR = f"gs://{BUCKET}/run"
LAUNCHER = os.path.join(REPO, "launch", "local.sh")
BATCH = 8  # cluster_smoke: 2 rows per data-parallel shard, 4 devices in both layouts
CKPT = 4  # the checkpoint the resume starts from; process 1 is killed after step CKPT + 2
# The 2-process job is given far more steps than it runs (it never ends on its own); the resume
# sets the end, CKPT + 2. Constant learning rates: the schedule then does not depend on
# total_steps, so the resumed steps must equal those the 2-process job logged before the kill.
# No validation before the end, one sample image, few eval images (as test_multiprocess).
ARGS = ["--config.total_steps=1000", "--config.log_every=1", f"--config.ckpt_every={CKPT}",
        "--config.eval_every=1000", "--config.num_eval_images=4", "--config.num_sample_images=1",
        "--config.optim.g.schedule=constant", "--config.optim.d.schedule=constant"]
STOP_WITHIN_S = 15  # the launcher's grace for the survivors (KILL_GRACE_S, 10 s by default) + 5


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


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


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


def test_kill_one_process_then_resume_on_another_process_count(data_dir, bucket_env, tmp_path):
  timeline, t_phase = [], [time.monotonic()]

  def phase(name):
    now = time.monotonic()
    timeline.append((name, now - t_phase[0]))
    t_phase[0] = now

  try:
    _rehearse(data_dir, bucket_env, tmp_path, phase)
  finally:
    phase("checks" if len(timeline) == 3 else "(failed here)")
    print("\n".join(["cluster rehearsal timeline (s):"]
                    + [f"  {s:6.1f}  {name}" for name, s in timeline]
                    + [f"  {sum(s for _, s in timeline):6.1f}  total"]))


def _rehearse(data_dir_, bucket_env_, tmp_path, phase):
  stores = _store_files(data_dir_)
  assert stores, data_dir_
  env = dict(_child_env(), **bucket_env_, MODULE="fape_jax.train", WORKDIR=WORKDIR,
             CONFIG="configs/base.py:cluster_smoke")
  common = [f"--config.data.data_dir={data_dir_}", *ARGS]
  metrics = f"{WORKDIR}/metrics.jsonl"

  # --- 2 processes x 2 devices; process 1 killed after step CKPT + 2 --------------------------
  log1 = tmp_path / "two_processes.log"
  with open(log1, "w") as f:
    job = subprocess.Popen([LAUNCHER, *common], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env=dict(env, NUM_PROCESSES="2", DEVICES_PER_PROCESS="2"))
  try:
    deadline = time.monotonic() + 600
    # Process 0 logs step CKPT + 2 after the step-CKPT checkpoint (saves block the loop) and
    # seconds before the next one (two steps and a save): kill then, and the resume is at CKPT.
    while not any(r["step"] >= CKPT + 2 for r in _read_jsonl_fresh(metrics)):
      if job.poll() is not None:
        _fail(f"the 2-process job ended (exit {job.returncode}) before step {CKPT + 2}", log1,
              log1.read_text())
      if time.monotonic() > deadline:
        _fail(f"no step {CKPT + 2} in {metrics} after 600 s", log1, log1.read_text())
      time.sleep(0.2)
    victim, survivor = (_child_pid(job.pid, f"--process_id={i}") for i in (1, 0))
    assert victim and survivor, (victim, survivor)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    phase(f"2 x 2 devices: start, compile, train {CKPT + 2} steps (checkpoint at {CKPT})")
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
  assert "joined as process 1 of 2, 2 local / 4 global devices" in out1
  assert rc == 128 + signal.SIGKILL, (rc, out1[-3000:])
  assert (f"local.sh: process 1 exited with status {128 + signal.SIGKILL}; stopping the others."
          in out1), out1[-3000:]
  assert stopped_s < STOP_WITHIN_S, (stopped_s, out1[-3000:])
  assert not _alive(survivor), f"process 0 ({survivor}) outlived the launcher"
  steps = _committed_steps()
  assert steps == [CKPT], (f"committed checkpoints {steps}: the kill came after the next "
                           "checkpoint (a very loaded machine?)")
  before = {}  # the 2-process job's rows, first line of each step
  for r in run_log.read_jsonl(metrics):
    before.setdefault(r["step"], r)
  assert max(before) >= CKPT + 2, sorted(before)

  # --- 1 process x 4 devices resumes the same gs:// workdir and finishes ----------------------
  end = CKPT + 2
  log2 = tmp_path / "one_process.log"
  proc = subprocess.run([LAUNCHER, *common, f"--config.total_steps={end}"], cwd=REPO,
                        capture_output=True, text=True, timeout=900,
                        env=dict(env, NUM_PROCESSES="1", DEVICES_PER_PROCESS="4"))
  out2 = proc.stdout + proc.stderr
  log2.write_text(out2)
  phase(f"1 x 4 devices: resume at step {CKPT}, train to {end}, validate")
  if proc.returncode != 0:
    _fail(f"the 1-process resume failed (exit {proc.returncode})", log2, out2)
  examples = CKPT * BATCH
  assert (f"Checkpoint step {CKPT} was written by 2 processes, this run has 1: the data stream "
          f"continues from global example {examples}") in out2, out2[-4000:]
  assert re.search(rf"Resumed from {re.escape(WORKDIR)}/checkpoints at step {CKPT} "
                   rf"\(global example {examples}\)\.", out2), out2[-4000:]
  assert "local.sh: all 1 processes finished." in out2

  # The bucket: the train rows continue at the checkpoint's global example, and the steps after
  # it equal the 2-process job's (restored parameters, optimiser state and data order; gloo vs
  # in-process reductions differ in the last bits), the final checkpoint is the 1-process run's,
  # the validation table is there.
  after = {}
  for r in run_log.read_jsonl(metrics):
    if r["split"] == "train":
      after[r["step"]] = r  # the last line of a step wins: the resumed run's
  assert sorted(after) == list(range(1, end + 1)), sorted(after)
  for step, r in after.items():
    assert r["data_index_sum"] == sum(range((step - 1) * BATCH, step * BATCH)), (step, r)
  for step in range(CKPT + 1, end + 1):
    assert after[step]["time"] > before[step]["time"]  # logged again, by the resumed run
    for k in ("loss", "mse", "d_loss", "g_grad_norm"):
      np.testing.assert_allclose(after[step][k], before[step][k], rtol=RTOL, atol=1e-7,
                                 err_msg=f"step {step} {k}: resumed vs 2 processes")
  ckpt = epath.Path(f"{WORKDIR}/checkpoints/{end}")
  assert (ckpt / "commit_success.txt").exists()
  assert sorted(p.name for p in (ckpt / "data").iterdir()) == [
      "commit_success.txt", "process_0-of-1.json"]
  assert json.loads(epath.Path(f"{WORKDIR}/validation.json").read_text())["step"] == end
  assert (epath.Path(WORKDIR) / "samples" / f"step_{end:07d}.png").exists()
  # Built once, read by every process of both runs.
  assert _store_files(data_dir_) == stores
  assert "first run only" not in out1 + out2
  # Process 0 either fails in its next collective (gloo: the peer reset the connection) and
  # exits through the fail-fast hook, or waits in it until the launcher's SIGKILL (KILL_GRACE_S
  # after its SIGTERM, which a process inside a collective cannot act on): both happen here.
  how = ("process 0 failed on its own" if re.search(r"^\[0\] .*JaxRuntimeError", out1, re.M)
         else "process 0 ended by the launcher's signals")
  print(f"process 1 killed -> launcher exited: {stopped_s:.1f} s ({how})")
