#!/usr/bin/env bash
# Run N cooperating JAX processes on this machine, each with its own fake CPU devices: the same
# multi-process code path as a pod or cluster, for tests and debugging.
#
# Usage (from anywhere; the script runs from the repository root):
#   launch/local.sh [ARGS...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 CONFIG=configs/base.py:tiny WORKDIR=/tmp/run \
#     launch/local.sh --config.total_steps=10
#   MODULE=my_module PYTHONPATH=tests launch/local.sh --my_flag=1
#
# Settings (environment variables):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   MODULE               the `python -m` module to run (default fape_jax.train); the
#                        single-process tools (fape_jax.evaluate, restore, report, export, demo)
#                        run as one process without the coordinator flags
#   CONFIG               passed as --config=...; default configs/base.py for fape_jax.train,
#                        configs/plan_cache.py for fape_jax.plan_cache, not passed otherwise
#   WORKDIR              passed as --workdir=...; default runs/local for fape_jax.train, not
#                        passed otherwise
#   PYTHON               interpreter (default .venv/bin/python)
#   COORDINATOR_PORT     port of process 0 on 127.0.0.1 (default: a free port)
#   KILL_GRACE_S         seconds between SIGTERM and SIGKILL for the survivors of a failure (10)
# ARGS are passed to every process after --config/--workdir and before the coordinator flags
# (--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I), which are always added.
# Each output line is prefixed with "[I] ". Exits 0 when all processes succeed; when one fails,
# the others are stopped and the script exits with the first failure's status.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { usage >&2; echo "local.sh: error: $*" >&2; exit 2; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."

requested_processes="${NUM_PROCESSES:-}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
MODULE="${MODULE:-fape_jax.train}"
PYTHON="${PYTHON:-.venv/bin/python}"
KILL_GRACE_S="${KILL_GRACE_S:-10}"
group=1  # 0: a single-process tool, which takes no coordinator flags
case "$MODULE" in
  fape_jax.train) CONFIG="${CONFIG-configs/base.py}"; WORKDIR="${WORKDIR-runs/local}" ;;
  fape_jax.plan_cache) CONFIG="${CONFIG-configs/plan_cache.py}"; WORKDIR="${WORKDIR-}" ;;
  fape_jax.evaluate | fape_jax.restore | fape_jax.report | fape_jax.export | fape_jax.demo)
    [[ -z "$requested_processes" || "$requested_processes" == 1 ]] ||
      die "$MODULE runs as a single process; NUM_PROCESSES=$requested_processes."
    group=0; NUM_PROCESSES=1; CONFIG="${CONFIG-}"; WORKDIR="${WORKDIR-}" ;;
  *) CONFIG="${CONFIG-}"; WORKDIR="${WORKDIR-}" ;;
esac

[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES=$NUM_PROCESSES is not a positive integer."
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] ||
  die "DEVICES_PER_PROCESS=$DEVICES_PER_PROCESS is not a positive integer."
[[ "$KILL_GRACE_S" =~ ^[0-9]+$ ]] || die "KILL_GRACE_S=$KILL_GRACE_S is not a whole number of seconds."
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "MODULE=$MODULE is not a Python module name."
if [[ "$PYTHON" == */* ]]; then
  [[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable (run 'make setup' or set PYTHON)."
else
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found on PATH."
fi

if [[ -z "${COORDINATOR_PORT:-}" ]]; then
  # The OS hands out a free port; the short window before process 0 binds it is acceptable here.
  COORDINATOR_PORT="$("$PYTHON" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$COORDINATOR_PORT" =~ ^[0-9]+$ ]] || die "COORDINATOR_PORT=$COORDINATOR_PORT is not a port number."

# Fake CPU devices: every process is a CPU-only JAX with DEVICES_PER_PROCESS devices.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
export PYTHONUNBUFFERED=1

args=()
if [[ -n "$CONFIG" ]]; then args+=("--config=$CONFIG"); fi
if [[ -n "$WORKDIR" ]]; then args+=("--workdir=$WORKDIR"); fi
if (($# > 0)); then args+=("$@"); fi

pids=()       # process id of process I
finished=()   # set to 1 once process I has been waited for (its pid may be reused after that)
# Sends signal $1 to every process still running; returns 1 when none was.
signal_running() {
  local i any=1
  for i in ${pids[@]+"${!pids[@]}"}; do
    [[ -n "${finished[i]:-}" ]] && continue
    if kill "-$1" "${pids[i]}" 2>/dev/null; then any=0; fi
  done
  return "$any"
}
on_exit() {
  local ticks=0
  signal_running TERM || return 0
  while ((ticks < KILL_GRACE_S * 10)) && signal_running 0; do
    sleep 0.1
    ticks=$((ticks + 1))
  done
  signal_running KILL || return 0
  # A SIGKILLed process is not gone at once (a large one takes a moment to tear down): wait for
  # each, so no process of the job outlives the launcher.
  local i
  for i in "${!pids[@]}"; do
    [[ -n "${finished[i]:-}" ]] || wait "${pids[i]}" 2>/dev/null || true
  done
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "local.sh: $NUM_PROCESSES x $DEVICES_PER_PROCESS CPU devices," \
  "coordinator 127.0.0.1:$COORDINATOR_PORT, python -m $MODULE ${args[*]-}" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  coordinator=()
  if ((group)); then
    coordinator=("--coordinator_address=127.0.0.1:$COORDINATOR_PORT"
      "--num_processes=$NUM_PROCESSES" "--process_id=$i")
  fi
  "$PYTHON" -m "$MODULE" ${args[@]+"${args[@]}"} ${coordinator[@]+"${coordinator[@]}"} \
    > >(awk -v p="[$i] " '{ print p $0; fflush() }') \
    2> >(awk -v p="[$i] " '{ print p $0; fflush() }' >&2) &
  pids+=("$!")
done

# Poll rather than `wait -n`: it must say which process ended, and work on bash 3.2 (macOS).
remaining=$NUM_PROCESSES
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    if [[ -n "${finished[i]:-}" ]] || kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
    rc=0
    wait "${pids[i]}" || rc=$?
    finished[i]=1
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      echo "local.sh: process $i exited with status $rc; stopping the others." >&2
      exit "$rc"
    fi
  done
  if ((remaining > 0)); then sleep 0.2; fi
done
echo "local.sh: all $NUM_PROCESSES processes finished." >&2
