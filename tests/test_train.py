"""End-to-end training on the tiny config: checkpoints, exact resume, preemption, corrupt steps.

One uninterrupted 6-step run is shared by the module (training compiles once per process, and
compiling dominates a tiny run).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from PIL import Image

from configs import base
from fape_jax import checkpoint as ckpt_lib
from fape_jax import model_state
from fape_jax import run_dir
from fape_jax import run_log
from fape_jax import sharding
from fape_jax import train_lib
from fape_jax.errors import FapeError
from fape_jax.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
  c = base.get_config("tiny")
  c.data.data_dir = str(data_dir)
  c.data.batch_size = 8    # one example per fake device (conftest sets 8)
  c.data.eval_batch_size = 8
  c.log_every = 1
  c.ckpt_every = 3
  c.update_from_flattened_dict(overrides)
  return c


def train_lines(workdir):
  return {r["step"]: r for r in run_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("full"))
  table = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  return workdir, table


def test_run_writes_checkpoints_logs_validation_and_samples(full_run):
  workdir, table = full_run
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=3, keep=3)
  assert ckpt.all_steps() == [3, 6]
  lines = train_lines(workdir)
  assert sorted(lines) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in lines.values())
  # Validation covers every task, with finite PSNRs, and is logged and saved.
  assert set(table) == set(TASKS)
  assert all(np.isfinite(r["restored_psnr"]) for r in table.values())
  saved = json.loads(open(os.path.join(workdir, "validation.json")).read())
  assert saved["step"] == 6 and saved["tasks"].keys() == table.keys()
  # Mean routing per task over the same adapted layers (issue 14), and its summary.
  layers = set(saved["routing"]["deraining"])
  assert saved["routing"].keys() == table.keys() and layers
  assert all(r.keys() == layers and all(abs(sum(w) - 1) < 1e-4 for w in r.values())
             for r in saved["routing"].values())
  assert saved["routing_summary"]["layers"] == len(layers)
  assert isinstance(saved["routing_summary"]["premise_holds"], bool)
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_0000006.json",
                                                                   "step_0000006.png"]
  # The grid's sidecar names each row (fape_jax.report cuts the grid back into labelled images).
  side = json.loads(open(os.path.join(workdir, "samples", "step_0000006.json")).read())
  grid = Image.open(os.path.join(workdir, "samples", "step_0000006.png"))
  assert {r["task"] for r in side["rows"]} == set(TASKS) and side["step"] == 6
  assert sum(r["height"] for r in side["rows"]) == grid.height
  assert max(3 * r["width"] for r in side["rows"]) == grid.width
  assert all(r["plan"].startswith("Task: ") and r["id"] for r in side["rows"])
  assert os.listdir(os.path.join(workdir, "tb"))
  assert json.loads(open(os.path.join(workdir, "config.json")).read())["variant"] == "tiny"


def test_restart_resumes_exactly(full_run, data_dir, tmp_path):
  """Crash after step 3's checkpoint: the restart replays steps 4-6 with the same data and losses."""
  workdir, _ = full_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
    for r in run_log.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
      if r["split"] == "train" and r["step"] <= 3:
        f.write(json.dumps(r) + "\n")
  train_lib.train_and_evaluate(tiny_config(data_dir), resumed)
  want, got = train_lines(workdir), train_lines(resumed)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    # The data order is the same (stream positions fingerprint) ...
    assert got[step]["data_index_sum"] == want[step]["data_index_sum"]
    # ... and so are the losses, to float tolerance.
    for k in ("loss", "mse", "freq", "d_loss"):
      np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_spent_wall_clock_budget_stops_after_one_step_checkpointed_and_validated(
    full_run, data_dir, tmp_path):
  """`max_wall_minutes`, the `make train` safety net on slow machines.

  It counts from the start of the job, so a tiny budget is spent before the loop starts: one step
  runs, is checkpointed (off the `ckpt_every` cadence) and validated, and the job returns
  normally; the same command then resumes from that checkpoint.
  """
  workdir, _ = full_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  table = train_lib.train_and_evaluate(tiny_config(data_dir, max_wall_minutes=1e-6), resumed)
  ckpt = ckpt_lib.Checkpointer(os.path.join(resumed, "checkpoints"), save_every=3, keep=3)
  assert ckpt.all_steps() == [3, 4]
  assert sorted(train_lines(resumed)) == [4]
  np.testing.assert_allclose(train_lines(resumed)[4]["loss"], train_lines(workdir)[4]["loss"],
                             rtol=1e-5)
  saved = json.loads(open(os.path.join(resumed, "validation.json")).read())
  assert saved["step"] == 4 and set(table) == set(TASKS)


def test_corrupt_latest_checkpoint_falls_back_to_previous(full_run, data_dir, tmp_path, caplog):
  workdir, _ = full_run
  broken = str(tmp_path / "broken")
  shutil.copytree(workdir, broken)
  # Truncate every array file of the newest step.
  for root, _, files in os.walk(os.path.join(broken, "checkpoints", "6", "state")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(0)
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  abstract, _ = model_state.abstract_state(config)
  target = model_state.restore_target(abstract, model_state.state_shardings(abstract, mesh, config),
                                      config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(broken, "checkpoints"), save_every=3, keep=3)
  with caplog.at_level("WARNING"):
    step, state = ckpt.restore(target)
  assert step == 3
  assert int(state["step"]) == 3
  assert "could not be restored" in caplog.text


def snapshot_files(root) -> dict:
  """Every file under `root` with its bytes (what a refused resume or a failure must leave as it
  was; tests/test_faults.py uses it too)."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_resume_with_another_model_is_refused_and_the_run_is_untouched(full_run, data_dir,
                                                                        tmp_path):
  workdir, _ = full_run
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  before = snapshot_files(run)
  other = tiny_config(data_dir, **{"model.unet.block_out_channels": (32, 32)})
  changed = r"model\.unet\.block_out_channels \(\[16, 32\] -> \[32, 32\]\)"
  with pytest.raises(FapeError, match=changed):
    train_lib.train_and_evaluate(other, run)
  after = snapshot_files(run)
  after.pop(run_dir.LOCK_FILE, None)  # the lock file is (re)used, not part of the run
  before.pop(run_dir.LOCK_FILE, None)
  assert after == before
  # A longer budget is a resume, recorded: nothing to train past the end of this run here.
  assert run_dir.check_resume(epath.Path(run), tiny_config(data_dir, total_steps=12)) == {
      "total_steps": (6, 12)}


def test_second_trainer_in_the_same_run_directory_is_refused(full_run, data_dir, tmp_path):
  workdir, _ = full_run
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  with run_dir.RunLock(epath.Path(run)):  # a trainer is running there
    with pytest.raises(FapeError, match=rf"Another trainer is running in {run} \(host .*, pid "
                                        rf"{os.getpid()}\)"):
      train_lib.train_and_evaluate(tiny_config(data_dir), run)


@pytest.mark.slow
def test_sigterm_saves_a_complete_checkpoint_and_exits_143(data_dir, tmp_path):
  workdir = str(tmp_path / "preempted")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "fape_jax.train", "--config=configs/base.py:tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         "--config.total_steps=100000", "--config.ckpt_every=100000", "--config.log_every=1",
         "--config.eval_every=100000"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  try:
    # Until the first step is logged: start-up and compiling took 240 s on a loaded 2-core VM,
    # where a 240 s deadline failed once; this is a guard, not a speed check.
    deadline = time.time() + 600
    while not train_lines(workdir) and time.time() < deadline and proc.poll() is None:
      time.sleep(0.5)
    assert train_lines(workdir), proc.stdout.read().decode()[-3000:] if proc.poll() else "no step"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, out.decode()[-3000:]
  steps = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                                keep=3).all_steps()
  assert len(steps) == 1 and steps[0] >= max(train_lines(workdir))
  assert b"SIGTERM received" in out
