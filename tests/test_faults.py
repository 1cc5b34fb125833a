"""The fault matrix: what a user sees when something goes wrong, the exit code, and what is kept.

Each case asserts the message, the exit code (in-process: the `FapeError` that every entry point's
`errors.exit_on_user_error` turns into its message and exit 2, or a partial failure's exit 1) and
that nothing was lost: the inputs, the earlier checkpoints, the stores. README.md's "When things
go wrong" table lists them. Here: a failed checkpoint write, a corrupt training pair (strict and
`data.skip_bad`), a non-finite loss, an ablation variant that fails, a run whose config.json no
longer describes its checkpoints (restore, evaluate) or a resume with another config (train) as
one line from the real CLIs, and one process of a multi-process run failing. Tested next to the
code they exercise:
  a resume with another model config         test_train (refused, run untouched), test_run_dir
  a second trainer in the same --workdir     test_train, test_run_dir (stale lock taken over)
  a truncated newest checkpoint              test_train (falls back to the previous step)
  SIGTERM mid-run                            test_train (exit 143, checkpoint, exact resume)
  a mistyped flag or --config.KEY            test_errors (one line, exit 2)
  restore: corrupt / odd inputs, output=input  test_restore (exit 1 with the rest written; 2)
  evaluate: one set that cannot be read      test_evaluate (exit 1, the other sets written)
  bad benchmark folders (corrupt, truncated, mismatched, unpaired, empty, missing)
                                             test_builders (named, or skipped with skip_bad)
  a plan store missing ids or from another encoder   test_plan_store
  one of the processes of launch/local.sh fails      test_distributed (the others are stopped)

Run as a script, this file is one process of the 2-process fail-fast test (see `_worker`).
"""
import argparse
import contextlib
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_train import snapshot_files  # pylint: disable=wrong-import-order (helper shared with test_train)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An absl log line ("I1201 12:00:00.000000 1234 file.py:12] ..."): a log, not the failure's message.
LOG_LINE = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]")


# --- a disk that fills during a checkpoint write --------------------------------------------------

@contextlib.contextmanager
def _max_file_size(limit: int):
  """Writes past `limit` bytes into any file fail with EFBIG, as on a full disk (works as root)."""
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failed_checkpoint_write_keeps_the_earlier_checkpoints(tmp_path):
  from fape_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from fape_jax.errors import FapeError  # pylint: disable=g-import-not-at-top
  noise = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MiB, and
  state = lambda step: {"w": jnp.asarray(noise + step), "step": jnp.int32(step)}  # incompressible
  directory = tmp_path / "checkpoints"
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=3)
  ckpt.save(1, state(1), force=True)
  before = snapshot_files(directory / "1")
  with pytest.raises(FapeError) as e, _max_file_size(1 << 20):
    ckpt.save(2, state(2), force=True)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"Could not write the checkpoint of step 2 in {directory} (")
  assert "File too large" in message  # the OS error, kept from the end of TensorStore's message
  assert message.endswith("The earlier checkpoints ([1]) are intact: free space or fix the "
                          "folder, then run the same command to resume from step 1.")
  ckpt.close()
  # Step 2 never became a checkpoint; step 1 is byte for byte what it was and restores.
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=3)
  assert ckpt.all_steps() == [1] and snapshot_files(directory / "1") == before
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state(1))
  step, restored = ckpt.restore(target)
  assert step == 1 and int(restored["step"]) == 1
  np.testing.assert_array_equal(np.asarray(restored["w"]), noise + 1)
  # With space again, the same step saves (Orbax clears the failed attempt's temporary folder).
  ckpt.save(2, state(2), force=True)
  assert ckpt.all_steps() == [1, 2] and sorted(os.listdir(directory)) == ["1", "2"]
  ckpt.close()


# --- a corrupt training pair: strict by default, skipped and counted with data.skip_bad -----------

def _gopro_folder(root):
  """GoPro layout, 3 train + 1 test pairs; train pair 1's blurred image is corrupt."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 3), ("test", 1)):
    for i in range(n):
      for sub in ("blur", "sharp"):
        path = root / split / "seq" / sub / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.uniform(size=(16, 16, 3)) * 255).astype(np.uint8)).save(path)
  (root / "train" / "seq" / "blur" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  return root


def test_a_corrupt_training_pair_fails_strictly_or_is_skipped_with_a_count(tmp_path, caplog):
  from configs import base  # pylint: disable=g-import-not-at-top
  from fape_jax.data import pairs  # pylint: disable=g-import-not-at-top
  from fape_jax.errors import FapeError  # pylint: disable=g-import-not-at-top
  assert base.get_config("tiny").data.skip_bad is False  # the default stays strict
  raw = _gopro_folder(tmp_path / "gopro")
  inputs = snapshot_files(raw)
  bad = raw / "train" / "seq" / "blur" / "1.png"
  with pytest.raises(FapeError, match=rf"^Cannot read image {re.escape(str(bad))}: .* build with "
                                      r"skip_bad=True to skip such files\.$"):
    pairs.prepare_folder(tmp_path / "data", "gopro", raw)
  with pytest.raises(FapeError, match="No gopro pairs store"):  # nothing half-built is left
    pairs.open_pairs(tmp_path / "data", "gopro", "train")
  with caplog.at_level(logging.WARNING):
    pairs.prepare_folder(tmp_path / "data", "gopro", raw, skip_bad=True)
  assert re.search(rf"Skipped 1 bad file\(s\) or pair\(s\) of {re.escape(str(raw))} "
                   r"\(data.skip_bad=True\); the gopro store in .* holds the others. First: "
                   rf"Cannot read image {re.escape(str(bad))}", caplog.text)
  train = pairs.open_pairs(tmp_path / "data", "gopro", "train")
  assert sorted(train[i]["id"] for i in range(len(train))) == ["gopro/train/train/seq/blur/0",
                                                               "gopro/train/train/seq/blur/2"]
  assert len(pairs.open_pairs(tmp_path / "data", "gopro", "test")) == 1
  assert snapshot_files(raw) == inputs  # the inputs are only read


# --- a non-finite loss ----------------------------------------------------------------------------

def test_a_non_finite_loss_stops_naming_the_kept_checkpoint():
  from fape_jax import train_lib  # pylint: disable=g-import-not-at-top
  from fape_jax.errors import FapeError  # pylint: disable=g-import-not-at-top
  check = train_lib._check_finite  # pylint: disable=protected-access (the loop's own check)
  check(9, {"loss": 1.0}, 6)
  with pytest.raises(FapeError, match=r"^Non-finite training metrics at step 9: \{'loss': nan\}; "
                                      r"the last good checkpoint \(step 6\) is kept and nothing "
                                      r"was saved after it\."):
    check(9, {"loss": float("nan"), "mse": 1.0}, 6)


# --- exit codes -----------------------------------------------------------------------------------

def test_a_fape_error_is_one_line_and_exit_2_and_tells_the_failure_hooks(capsys, monkeypatch):
  from fape_jax import errors  # pylint: disable=g-import-not-at-top
  told = []
  monkeypatch.setattr(errors, "on_failure", [lambda code, message, report: told.append(
      (code, message))])
  with pytest.raises(SystemExit) as e, errors.exit_on_user_error():
    raise errors.FapeError("the message")
  assert e.value.code == errors.USAGE_EXIT_CODE == 2
  assert capsys.readouterr().err == "error: the message\n"
  assert told == [(2, "the message")]
  # Anything else keeps its traceback (absl prints it, exit 1); the hooks still hear of it.
  with pytest.raises(ZeroDivisionError), errors.exit_on_user_error():
    1 / 0  # pylint: disable=pointless-statement
  assert told[-1] == (1, "ZeroDivisionError: division by zero")


def test_an_ablation_with_a_failing_variant_exits_1_and_tabulates_the_others(tmp_path, capsys):
  from configs import base  # pylint: disable=g-import-not-at-top
  from fape_jax import ablate_lib  # pylint: disable=g-import-not-at-top
  from fape_jax.errors import FapeError  # pylint: disable=g-import-not-at-top
  from fape_jax.tasks import TASKS  # pylint: disable=g-import-not-at-top
  table = {t: {"degraded_psnr": 20.0, "restored_psnr": 21.0} for t in TASKS}

  broken = {"dense"}

  def train(cfg, workdir):
    if os.path.basename(os.path.dirname(workdir)) in broken:
      raise FapeError("Non-finite training metrics at step 2: {'loss': nan}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "validation.json"), "w") as f:
      json.dump({"step": cfg.total_steps}, f)
    return table

  cfg = base.get_config("tiny")
  cfg.total_steps = 2
  result = ablate_lib.run_ablation(cfg, tmp_path, "full,dense", "0", train_fn=train)
  assert ablate_lib.exit_code(result) == 1  # the CLI's exit status (and no --results/--out)
  assert result["failed"] == [{"variant": "dense", "seed": 0, "error": "Non-finite training "
                               "metrics at step 2: {'loss': nan}"}]
  assert [r["variant"] for r in result["rows"]] == ["full"]
  assert json.loads((tmp_path / "ablation.json").read_text())["failed"] == result["failed"]
  err = capsys.readouterr().err
  assert "error: [ablation] dense/seed_0: Non-finite training metrics at step 2" in err
  assert "error: 1 of 2 run(s) failed (exit code 1); the table holds the others." in err
  # Fixed, the same command trains only the failed run.
  broken.clear()
  seen = []
  result = ablate_lib.run_ablation(cfg, tmp_path, "full,dense", "0",
                                   train_fn=lambda c, w: seen.append(w) or train(c, w))
  assert seen == [os.fspath(tmp_path / "dense" / "seed_0")] and ablate_lib.exit_code(result) == 0


# --- one line from the real command lines ---------------------------------------------------------

@pytest.fixture(scope="module")
def stale_run(tmp_path_factory):
  """A run directory whose config.json no longer describes its checkpoint: the tiny config next to
  a checkpoint of another tree (as a hand edit, or an older version's refused resume, left it)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from fape_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  run = tmp_path_factory.mktemp("stale_run")
  cfg = base.get_config("tiny")
  cfg.data.data_dir = str(tmp_path_factory.getbasetemp() / "tiny_data")
  ckpt = ckpt_lib.Checkpointer(run / "checkpoints", save_every=1, keep=1)
  ckpt.save(3, {"gen": {"params": {"w": jnp.zeros((4,))}}}, force=True)
  ckpt.close()
  (run / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
  Image.fromarray(np.full((40, 48, 3), 99, np.uint8)).save(run / "photo.png")
  return run


@pytest.mark.slow
@pytest.mark.parametrize("module, args, message", [
    ("fape_jax.restore", ["--input={run}/photo.png", "--output={out}/photo.png"],
     "error: None of the checkpoints in {run}/checkpoints could be restored (steps [3]); last "
     "error: ValueError: User-provided restore item and on-disk value metadata tree structures "
     "do not match (first: "),
    ("fape_jax.evaluate", ["--out={out}"], "error: None of the checkpoints in {run}/checkpoints"),
    ("fape_jax.train", ["--config=configs/base.py:tiny", "--config.model.lora.alpha=2.0"],
     "error: --workdir {run} holds a run with another config: model.lora.alpha (1.0 -> 2.0). A "
     "resume may change only step counts, cadences, budgets, paths and the mesh; start the new "
     "config in a new --workdir (nothing in this one was changed)."),
])
def test_a_failing_command_prints_one_line_and_exits_2(stale_run, module, args, message,
                                                        tmp_path):
  before = snapshot_files(stale_run)
  fill = lambda s: s.format(run=stale_run, out=tmp_path / "out")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
  proc = subprocess.run([sys.executable, "-m", module, f"--workdir={stale_run}",
                         *map(fill, args)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  logs = [LOG_LINE.match(line) for line in lines]
  said = [line for line, log in zip(lines, logs) if not log]
  assert len(said) == 1 and said[0].startswith(fill(message)), proc.stderr[-3000:]
  # No library chatter (Orbax, TensorStore, absl, Grain): the log lines left are this package's.
  own = {f for f in os.listdir(os.path.join(REPO, "fape_jax")) if f.endswith(".py")}
  assert {log.group(1) for log in logs if log} <= own, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and proc.stdout == ""
  after = snapshot_files(stale_run)
  after.pop(".lock", None)  # the trainer's run lock (reused, not part of the run)
  assert after == before  # the run, its checkpoint and the input, untouched
  assert not os.path.exists(tmp_path / "out" / "photo.png")


# --- one process of a multi-process run fails -----------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("failing, kind, code, message", [
    (1, "usage", 2, "process 1 cannot read its data"),
    (0, "bug", 1, "RuntimeError: process 0 hit a bug"),  # process 0 hosts jax's service
])
def test_one_failing_process_ends_the_others_within_seconds(failing, kind, code, message):
  """2 processes x 1 CPU device, started directly (as srun would, no launcher to kill them): one
  fails while the other waits in a collective for it. Before, both sat out jax's 300-s shutdown
  barrier and then aborted with a C++ stack dump."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", f"--failing={failing}", f"--kind={kind}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  ended = {}
  deadline = time.time() + 120
  while len(ended) < 2 and time.time() < deadline:
    for i, p in enumerate(procs):
      if i not in ended and p.poll() is not None:
        ended[i] = time.time()
    time.sleep(0.05)
  outs = []
  for p in procs:
    if p.poll() is None:
      p.kill()
    outs.append(p.communicate())
  assert len(ended) == 2, outs
  failed_at = float(re.search(r"FAILING at (\S+)", outs[failing][0]).group(1))
  other = 1 - failing
  assert [p.returncode for p in procs] == [code, code], outs
  assert max(ended.values()) - failed_at < 15, (ended, failed_at)  # was 300 s
  # The failing process reports its own error; the other names it and who failed.
  if kind == "usage":
    assert f"error: {message}\n" in outs[failing][1]
  else:
    assert "Traceback" in outs[failing][1] and message in outs[failing][1]
  assert f"error: process {failing} failed: {message} (process {other} stops too)" in outs[other][1]
  assert "Traceback" not in outs[other][1] and "Check failure" not in "".join(outs[0] + outs[1])


def _worker(argv):
  """One process of the fail-fast test: both join, then `--failing` fails while the other waits
  in a collective (an all-gather) that it will never complete."""
  parser = argparse.ArgumentParser()
  for name in ("coordinator_address", "kind"):
    parser.add_argument(f"--{name}")
  for name in ("num_processes", "process_id", "failing"):
    parser.add_argument(f"--{name}", type=int)
  a = parser.parse_args(argv)
  from fape_jax import distributed  # pylint: disable=g-import-not-at-top
  from fape_jax import errors  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with errors.exit_on_user_error():
    distributed.initialize(a.coordinator_address, a.num_processes, a.process_id,
                           initialization_timeout=60)
    multihost_utils.process_allgather(np.int32(a.process_id))  # both are up
    if a.process_id == a.failing:
      time.sleep(1)  # the other is inside the next collective by now
      print(f"FAILING at {time.time()}", flush=True)
      if a.kind == "usage":
        raise errors.FapeError(f"process {a.process_id} cannot read its data")
      raise RuntimeError(f"process {a.process_id} hit a bug")
    multihost_utils.process_allgather(np.int32(a.process_id))
  print("the collective returned: the peer did not fail", flush=True)


if __name__ == "__main__":
  _worker(sys.argv[1:])
