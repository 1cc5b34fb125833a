"""The run directory cannot be broken by a resume: a changed config is refused before anything is
written, allowed changes are recorded, and a second trainer is kept out by the lock."""
import json
import os
import subprocess
import sys

import pytest

from configs import base
from fape_jax import run_dir
from fape_jax import tasks
from fape_jax.errors import FapeError


def _config(**overrides):
  c = base.get_config("tiny")
  c.update_from_flattened_dict(overrides)
  return c


def _started(tmp_path, config):
  run_dir.record_config(tmp_path, config, {}, step=0)
  return (tmp_path / run_dir.CONFIG_FILE).read_text()


def test_new_run_has_nothing_to_compare(tmp_path):
  assert run_dir.check_resume(tmp_path, _config()) == {}


def test_model_change_is_refused_naming_the_fields_and_nothing_is_written(tmp_path):
  before = _started(tmp_path, _config())
  files = sorted(os.listdir(tmp_path))
  with pytest.raises(FapeError) as e:
    run_dir.check_resume(tmp_path, _config(**{"model.unet.block_out_channels": (32, 64),
                                              "optim.g.lr": 0.5}))
  msg = str(e.value)
  assert "model.unet.block_out_channels ([16, 32] -> [32, 64])" in msg
  assert "optim.g.lr (1.0 -> 0.5)" in msg and "new --workdir" in msg
  assert (tmp_path / run_dir.CONFIG_FILE).read_text() == before
  assert sorted(os.listdir(tmp_path)) == files


def test_budget_changes_are_allowed_and_recorded(tmp_path):
  _started(tmp_path, _config())
  new = _config(total_steps=12, max_wall_minutes=5.0, eval_every=4)
  changes = run_dir.check_resume(tmp_path, new)
  assert changes == {"eval_every": (6, 4), "max_wall_minutes": (0.0, 5.0), "total_steps": (6, 12)}
  run_dir.record_config(tmp_path, new, changes, step=6)
  assert json.loads((tmp_path / run_dir.CONFIG_FILE).read_text())["total_steps"] == 12
  entry = json.loads((tmp_path / run_dir.RESUMES_FILE).read_text().splitlines()[-1])
  assert entry["step"] == 6 and entry["changed"]["total_steps"] == [6, 12]
  assert not (tmp_path / f"{run_dir.CONFIG_FILE}.tmp").exists()


def test_a_run_from_before_an_added_field_resumes_only_with_its_old_behaviour(tmp_path):
  old = json.loads(_started(tmp_path, _config()))
  del old["optim"]["ema_decay"]  # written before the field existed (no weight average)
  del old["data"]["task_slots"]   # nor task weights (every task once per cycle)
  (tmp_path / run_dir.CONFIG_FILE).write_text(json.dumps(old))
  one_slot_each = {f"data.task_slots.{t}": 1 for t in tasks.TASKS}
  assert run_dir.check_resume(tmp_path, _config(**one_slot_each)) == {}
  with pytest.raises(FapeError, match=r"optim.ema_decay \(null -> 0.999\)"):
    run_dir.check_resume(tmp_path, _config(**one_slot_each, **{"optim.ema_decay": 0.999}))
  # Today's default weighs some tasks twice: not what such a run trained with.
  with pytest.raises(FapeError, match=r"data.task_slots.deblur \(null -> 2\)"):
    run_dir.check_resume(tmp_path, _config())


def test_unreadable_config_json_is_refused(tmp_path):
  (tmp_path / run_dir.CONFIG_FILE).write_text("{not json")
  with pytest.raises(FapeError, match="not valid JSON"):
    run_dir.check_resume(tmp_path, _config())


def test_second_trainer_is_refused_with_the_holder(tmp_path):
  with run_dir.RunLock(tmp_path):
    with pytest.raises(FapeError) as e:
      run_dir.RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in str(e.value) and "Another trainer" in str(e.value)
  # Released: the next trainer gets it.
  run_dir.RunLock(tmp_path).acquire().release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  # A process that takes the lock and dies without releasing it (as a killed trainer would).
  code = ("import os, pathlib, sys; sys.path.insert(0, sys.argv[2]); from fape_jax import run_dir; "
          "run_dir.RunLock(pathlib.Path(sys.argv[1])).acquire(); os._exit(9)")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), repo], timeout=120)
  assert proc.returncode == 9
  assert "pid" in (tmp_path / run_dir.LOCK_FILE).read_text()
  lock = run_dir.RunLock(tmp_path).acquire()
  assert f"pid {os.getpid()}" in (tmp_path / run_dir.LOCK_FILE).read_text()
  lock.release()


def test_frozen_base_without_init_from_is_refused_with_the_way_out():
  from fape_jax import train_lib
  c = base.get_config("sd21")
  with pytest.raises(FapeError, match="init_from is empty.*allow_random_base"):
    train_lib.check_base_weights(c)
