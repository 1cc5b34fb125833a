"""Two processes x 2 fake CPU devices (jax.distributed over gloo on 127.0.0.1), via launch/local.sh.

The 2-process run of the `tiny` config stops after 2 steps (checkpoint saved) and the same command
resumes it to step 4 (Grain's per-process state restored exactly). Both processes must log the same
metrics at every step, and every step must read the global stream positions it owns
(`data_index_sum`). The 2-process step-2 checkpoint also resumes on 1 process x 4 fake devices
(elastic resume: arrays resharded, the data stream rebuilt from the saved global position): from
the same state on the same global mesh size and batch, its steps 3-4 (losses, data order) and its
final validation table must equal the 2-process run's, so one process computes what two do.
(An uninterrupted 1-process run used to be the reference as well; it repeated what the elastic run
checks at the cost of a fourth training launch, about 2 minutes of `make test`.)

Every run compiles from scratch (JAX_COMPILATION_CACHE_DIR is dropped): on CPU, process 1's cache
keys differ from process 0's and only process 0 writes entries, so a resumed 2-process run with a
cache loads on process 0 and compiles on process 1, and process 0 gives up at the first collective
after Gloo's 30 s rendezvous timeout.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from fape_jax import run_log

pytestmark = pytest.mark.slow  # subprocess runs: `make test`, not `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
ARGS = [f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.ckpt_every=2",
        f"--config.eval_every={STEPS}", "--config.num_eval_images=4",
        "--config.num_sample_images=1"]
METRICS_LINE = re.compile(r"process (\d+) step (\d+) metrics (\{[^}]*\})")
# 1 vs 2 processes: the same program, but the cross-device reductions (gloo across processes vs
# in-process) may add in another order, so the values may differ in the last float32 bits.
RTOL = 1e-5
# Launcher and cluster variables that would make a child join a process group it was not meant to.
_GROUP_VARS = ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "MASTER_ADDR", "MASTER_PORT",
               "NUM_PROCESSES", "JAX_NUM_PROCESSES", "WORLD_SIZE", "PROCESS_ID", "JAX_PROCESS_ID",
               "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "JAX_LOCAL_DEVICE_IDS",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def _child_env(devices: int | None = None) -> dict:
  """This environment without pytest's 8-device XLA flag or any process-group variables."""
  env = {k: v for k, v in os.environ.items() if k not in _GROUP_VARS
         and not k.startswith("SLURM_") and k != "JAX_COMPILATION_CACHE_DIR"}
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                 env.get("XLA_FLAGS", "")).split()
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.update(PYTHONPATH=REPO, PYTHON=sys.executable, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             JAX_ENABLE_COMPILATION_CACHE="false")
  return env


def _run(cmd, env, what: str, log_path) -> str:
  """Runs `cmd`; returns stdout + stderr, also kept in `log_path` (read it when this fails)."""
  t0 = time.monotonic()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  out = proc.stdout + proc.stderr
  log_path.write_text(out)
  print(f"{what}: {time.monotonic() - t0:.0f} s, exit {proc.returncode}")
  if proc.returncode != 0:
    errors = "\n".join(line for line in out.splitlines()
                       if re.search(r"Error|error:|Traceback|^\S* ?F\d{4} ", line))
    pytest.fail(f"{what} failed (exit {proc.returncode}); full output in {log_path}.\n"
                f"Error lines:\n{errors[-6000:]}\nLast output:\n{out[-6000:]}")
  return out


def _per_process_metrics(out: str) -> dict:
  """{step: {process: metrics}} from the "process N step S metrics {...}" log lines."""
  seen = {}
  for pid, step, blob in METRICS_LINE.findall(out):
    seen.setdefault(int(step), {})[int(pid)] = json.loads(blob)
  return seen


def _train_rows(workdir: str) -> dict:
  rows = {}
  for r in run_log.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if r["split"] == "train":
      assert r["step"] not in rows, f"step {r['step']} logged twice in {workdir}"
      rows[r["step"]] = r
  return rows


def _checkpoint_mesh(workdir: str, step: int) -> list:
  """Mesh shape of the state checkpointed at `step` (from Orbax's sharding metadata)."""
  with open(os.path.join(workdir, "checkpoints", str(step), "state", "_sharding")) as f:
    shapes = {json.dumps(json.loads(v)["shape"]) for v in json.load(f).values()}
  assert len(shapes) == 1, shapes
  return json.loads(shapes.pop())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The pairs and plan stores, built once here so that the runs below only read them."""
  from configs import base
  from fape_jax import train_data
  d = tmp_path_factory.mktemp("data")
  c = base.get_config("tiny")
  c.data.data_dir = str(d)
  train_data.prepare_data(c)
  return str(d)


def test_two_processes_resume_and_match_one_process(data_dir, tmp_path):
  common = [f"--config.data.data_dir={data_dir}", *ARGS]
  two = str(tmp_path / "two")

  # --- 2 processes x 2 devices: steps 1-2, then the same command resumes to step 4 ---
  env = dict(_child_env(), NUM_PROCESSES="2", DEVICES_PER_PROCESS="2",
             CONFIG="configs/base.py:tiny", WORKDIR=two, MODULE="fape_jax.train")
  launcher = os.path.join(REPO, "launch", "local.sh")
  first = _run([launcher, *common, "--config.stop_after=2"], env, "2 processes, steps 1-2",
               tmp_path / "two_first.log")
  assert "local.sh: 2 x 2 CPU devices" in first
  assert "joined as process 1 of 2, 2 local / 4 global devices" in first
  assert "Stopping at step 2" in first
  assert sorted(_train_rows(two)) == [1, 2]
  elastic = str(tmp_path / "elastic")  # the 2-process checkpoint of step 2, resumed on 1 below
  shutil.copytree(two, elastic)
  second = _run([launcher, *common], env, "2 processes, resumed, steps 3-4",
                tmp_path / "two_resumed.log")
  assert re.search(r"\[0\] .*Resumed from .* at step 2 \(global example 8\)\.", second), \
      second[-4000:]
  assert re.search(r"\[1\] .*Resumed from .* at step 2 \(global example 8\)\.", second), \
      second[-4000:]
  assert "local.sh: all 2 processes finished." in second

  # Both processes report the same metrics at every step (they are replicated arrays).
  seen = _per_process_metrics(first) | _per_process_metrics(second)
  assert sorted(seen) == list(range(1, STEPS + 1)), seen
  for step, by_proc in seen.items():
    assert sorted(by_proc) == [0, 1], (step, by_proc)
    assert by_proc[0] == by_proc[1], (step, by_proc)

  # --- elastic: the 2-process run's step-2 checkpoint resumed by 1 process x 4 devices ---
  third = _run([sys.executable, "-m", "fape_jax.train", "--config=configs/base.py:tiny",
                f"--workdir={elastic}", "--num_processes=1", *common], _child_env(4),
               "1 process x 4 devices, resumed from 2 processes, steps 3-4",
               tmp_path / "elastic.log")
  assert ("Checkpoint step 2 was written by 2 processes, this run has 1: the data stream "
          "continues from global example 8") in third
  assert re.search(r"Resumed from .* at step 2 \(global example 8\)\.", third), third[-4000:]
  # Both runs trained on a 4 x 1 (data x fsdp) mesh, as their checkpoints record.
  assert _checkpoint_mesh(two, STEPS) == _checkpoint_mesh(elastic, STEPS) == [4, 1]
  assert sorted(os.listdir(os.path.join(two, "checkpoints", str(STEPS), "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  got, one = _train_rows(two), _train_rows(elastic)
  assert sorted(got) == sorted(one) == list(range(1, STEPS + 1))
  batch = 4  # the tiny config's global batch
  lines = ["step | 2 proc loss | 1 proc loss | rel. diff | data_index_sum"]
  for step in sorted(got):
    g, w = got[step], one[step]
    lines.append(f"{step} | {g['loss']:.9g} | {w['loss']:.9g} | "
                 f"{abs(g['loss'] - w['loss']) / abs(w['loss']):.2e} | {g['data_index_sum']:.0f}")
    # The same examples in the same order (sum of the batch's global stream positions): step s
    # reads positions [(s - 1) * B, s * B), none repeated or skipped by either resume.
    assert g["data_index_sum"] == w["data_index_sum"] == sum(
        range((step - 1) * batch, step * batch)), (step, g, w)
    assert seen[step][0]["loss"] == pytest.approx(g["loss"], rel=1e-7)  # logged == jsonl
  print("\n".join(lines))
  for step in (1, 2):  # copied with the checkpoint: the same rows
    assert one[step] == got[step], step
  for step in (3, 4):  # one process from the same state: to float tolerance, the same step
    for k in ("loss", "mse", "adv", "freq", "d_loss", "d_real", "d_fake", "g_grad_norm"):
      np.testing.assert_allclose(one[step][k], got[step][k], rtol=RTOL, atol=1e-7,
                                 err_msg=f"elastic step {step} {k}")

  # Validation over 2 processes (each its own images, sums gathered) gives the 1-process table.
  val_two = json.loads(open(os.path.join(two, "validation.json")).read())
  val_one = json.loads(open(os.path.join(elastic, "validation.json")).read())
  assert val_two["step"] == val_one["step"] == STEPS
  assert sorted(val_two["tasks"]) == sorted(val_one["tasks"])
  assert sum(r["n"] for r in val_one["tasks"].values()) == 4
  for task, r in val_one["tasks"].items():
    assert val_two["tasks"][task]["n"] == r["n"]
    for k in ("degraded_psnr", "restored_psnr"):
      np.testing.assert_allclose(val_two["tasks"][task][k], r[k], rtol=1e-4, err_msg=task)
  # So are the per-task routing means (each process's own rows, sums gathered to process 0).
  assert val_two["routing"].keys() == val_one["routing"].keys() and val_one["routing"]
  for task, r in val_one["routing"].items():
    assert val_two["routing"][task].keys() == r.keys() and r, task
    for layer, w in r.items():
      np.testing.assert_allclose(val_two["routing"][task][layer], w, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{task} {layer}")
