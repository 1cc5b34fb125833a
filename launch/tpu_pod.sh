#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): create the slice unless it exists, copy this
# repository's tracked files to every worker, set up a Python >= 3.11 virtualenv there once, clear
# what a previous run left holding the TPU, then start the same command on every worker, one log
# per worker. jax finds the pod by itself (fape_jax.distributed), so no coordinator flags.
#
# Usage (from a machine with the Google Cloud SDK, logged in):
#   TPU_NAME=fape-v5e ZONE=us-west4-a WORKDIR=gs://my-bucket/fape/smoke launch/tpu_pod.sh
#   TPU_NAME=fape-v5e ZONE=us-west4-a WORKDIR=gs://my-bucket/fape/sd21 \
#     CONFIG=configs/base.py:sd21 DETACH=1 launch/tpu_pod.sh --config.init_from=/mnt/sd-turbo \
#     --config.data.data_dir=/mnt/shared/data
#
# A gs:// WORKDIR: the workers' venv also gets the [cloud] extra (gcsfs, the GCS client).
# Python: TPU VM images ship Python 3.10 and flax needs 3.11+. When the worker's python3 is older
# than PYTHON_VERSION, the setup installs uv (`python3 -m pip install --user uv`, from PyPI) and
# lets it install a standalone CPython PYTHON_VERSION (`uv python install`, python-build-standalone
# builds), then `make setup PYTHON=that interpreter` creates .venv from it; a .venv left by an
# older Python is removed first.
# Relaunch: before starting, every worker ends the processes that hold its TPU devices (`lsof` on
# /dev/accel* and /dev/vfio/*: a previous run, or one that hung) and removes /tmp/libtpu_lockfile,
# which libtpu leaves behind and which makes the next run fail with "TPU in use".
# Logs and failures: the command runs through one ssh per worker; worker W's output goes to
# LOG_DIR/worker-W.log here. When a worker's command fails, the others are stopped (their TPU
# processes ended) and this script exits with that worker's status. With DETACH=1 the command runs
# in the background on the workers, its log in ~/REMOTE_DIR/logs/worker-W.log there; the run's own
# fail-fast (fape_jax.distributed) then stops every process when one fails.
#
# Settings (environment variables):
#   TPU_NAME          name of the TPU VM slice (required)
#   ZONE              its zone, e.g. us-west4-a (required)
#   WORKDIR           run directory, shared by all workers: a gs:// path (Orbax writes there
#                     directly) or a shared file system (required)
#   PROJECT           Google Cloud project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  slice type used when creating it (default v5litepod-16: 4 hosts x 4 chips)
#   RUNTIME_VERSION   TPU VM image used when creating it (default v2-alpha-tpuv5-lite, for v5e)
#   CREATE_ARGS       extra arguments for `tpu-vm create`, e.g. "--spot" (default none)
#   CONFIG            config file[:variant] (default configs/base.py:cluster_smoke)
#   MODULE            module run on every worker (default fape_jax.train)
#   REMOTE_DIR        checkout directory on the workers, relative to the home directory
#                     (default fape_jax)
#   PYTHON_VERSION    minimum Python for the workers' venv (default 3.11)
#   TPU_JAX           pip requirement that adds TPU support to the venv (default "jax[tpu]", the
#                     [tpu] extra: libtpu for the installed jax; `make setup` installs the CPU
#                     jaxlib only). Installed once per worker, then checked on every call.
#   EXPECT_BACKEND    passed as --expect_backend (default tpu: a worker whose jax finds no TPU
#                     stops with an error instead of training on its CPU); empty: not passed
#   EXPECT_DEVICES    passed to fape_jax.train as --expect_devices (default: the chips of
#                     ACCELERATOR_TYPE for v5litepod-N/v5e-N/v6e-N, N; for v4-N/v5p-N, N/2;
#                     empty or another type: not passed)
#   NUM_WORKERS       hosts of the slice (default: read from `tpu-vm describe`)
#   LOG_DIR           where the workers' logs go here (default logs/TPU_NAME)
#   CLEAR_STALE       1 (default): end stale TPU processes and remove the libtpu lock first
#   DETACH            1: run in the background on the workers, so closing this terminal does not
#                     stop training (default 0)
# Arguments are passed on to MODULE on every worker. The workers need python3 with pip, and make;
# `make setup` runs on every call but only installs when requirements.txt, pyproject.toml or
# constraints.txt changed.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { usage >&2; echo "tpu_pod.sh: error: $*" >&2; exit 2; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi

for tool in gcloud git tar; do
  command -v "$tool" >/dev/null ||
    die "'$tool' not found on PATH (gcloud: https://cloud.google.com/sdk/docs/install)."
done
[[ -n "${TPU_NAME:-}" ]] || die "TPU_NAME is not set (the TPU VM slice to create or reuse)."
[[ -n "${ZONE:-}" ]] || die "ZONE is not set (the zone of the TPU slice, e.g. us-west4-a)."
[[ -n "${WORKDIR:-}" ]] ||
  die "WORKDIR is not set (a gs:// path or shared directory that every worker can write)."
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
CONFIG="${CONFIG:-configs/base.py:cluster_smoke}"
MODULE="${MODULE:-fape_jax.train}"
REMOTE_DIR="${REMOTE_DIR:-fape_jax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
TPU_JAX="${TPU_JAX:-jax[tpu]}"
DETACH="${DETACH:-0}"
CLEAR_STALE="${CLEAR_STALE:-1}"
LOG_DIR="${LOG_DIR:-logs/$TPU_NAME}"
EXPECT_BACKEND="${EXPECT_BACKEND-tpu}"
if [[ -z "${EXPECT_DEVICES+set}" ]]; then
  # Chips of the slice: v5e/v6e types count chips, v4/v5p types count TensorCores (2 per chip).
  case "$ACCELERATOR_TYPE" in
    v5litepod-* | v5e-* | v6e-*) EXPECT_DEVICES="${ACCELERATOR_TYPE##*-}" ;;
    v4-* | v5p-*) EXPECT_DEVICES="$((${ACCELERATOR_TYPE##*-} / 2))" ;;
    *) EXPECT_DEVICES="" ;;
  esac
fi
[[ "$DETACH" == 0 || "$DETACH" == 1 ]] || die "DETACH=$DETACH must be 0 or 1."
[[ "$CLEAR_STALE" == 0 || "$CLEAR_STALE" == 1 ]] || die "CLEAR_STALE=$CLEAR_STALE must be 0 or 1."
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "MODULE=$MODULE is not a Python module name."
[[ -z "$EXPECT_BACKEND" || "$EXPECT_BACKEND" =~ ^(any|cpu|gpu|tpu)$ ]] ||
  die "EXPECT_BACKEND=$EXPECT_BACKEND must be any, cpu, gpu, tpu or empty."
[[ -z "$EXPECT_DEVICES" || "$EXPECT_DEVICES" =~ ^[0-9]+$ ]] ||
  die "EXPECT_DEVICES=$EXPECT_DEVICES is not a device count."
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] || die "PYTHON_VERSION=$PYTHON_VERSION is not like 3.11."
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "REMOTE_DIR=$REMOTE_DIR: use a plain relative path."
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not gs://; it must be a file system shared by" \
    "all workers (training checks it and stops otherwise)." >&2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gc=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gc+=(--project="$PROJECT"); fi

# 1. Create the slice, or reuse it.
if gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gc[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing TPU slice $TPU_NAME in $ZONE." >&2
else
  echo "tpu_pod.sh: creating TPU slice $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE." >&2
  read -r -a create_args <<<"${CREATE_ARGS:-}"
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${gc[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${create_args[@]+"${create_args[@]}"}
fi
if [[ -z "${NUM_WORKERS:-}" ]]; then
  # One network endpoint per host; gcloud joins a list's values with ';'.
  endpoints="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gc[@]}" \
    --format='value(networkEndpoints[].ipAddress)')"
  NUM_WORKERS="$(awk -F';' '{ print NF }' <<<"$endpoints")"
fi
[[ "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] ||
  die "NUM_WORKERS=$NUM_WORKERS: could not read the slice's hosts; set NUM_WORKERS."

# 2. Copy the tracked files (working-tree contents; untracked files, runs and .venv stay here).
tmp="$(mktemp -d)"
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
(cd "$repo" && git ls-files -z | tar --null -T - -czf "$tmp/fape_jax.tgz")
gcloud compute tpus tpu-vm scp "$tmp/fape_jax.tgz" "$TPU_NAME:fape_jax.tgz" --worker=all "${gc[@]}"

# 3. On every worker: unpack, a Python >= PYTHON_VERSION venv (uv's CPython where the image's is
# older), the TPU jaxlib, then clear what a previous run left holding the TPU.
want="$(printf '%q' "$PYTHON_VERSION")"
new_enough="import sys; sys.exit(sys.version_info < tuple(map(int, '$PYTHON_VERSION'.split('.'))))"
setup="set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/fape_jax.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR"
setup+="; py=python3; if ! python3 -c \"$new_enough\" 2>/dev/null; then"
setup+=" python3 -m pip install --user --quiet uv && ~/.local/bin/uv python install $want"
setup+=" && py=\$(~/.local/bin/uv python find $want); fi"
setup+="; if [ -x .venv/bin/python ] && ! .venv/bin/python -c \"$new_enough\"; then rm -rf .venv; fi"
setup+="; make setup PYTHON=\"\$py\" && { .venv/bin/python -c 'import libtpu' 2>/dev/null"
setup+=" || .venv/bin/python -m pip install $(printf '%q' "$TPU_JAX"); }"
if [[ "$WORKDIR" == gs://* ]]; then  # gcsfs and the GCS client for the workdir: the [cloud] extra
  setup+=" && { .venv/bin/python -c 'import gcsfs' 2>/dev/null"
  setup+=" || .venv/bin/python -m pip install -e '.[cloud]'; }"
fi
# Then the jaxlib check (package metadata only; each process checks its devices on start-up).
if [[ -n "$EXPECT_BACKEND" ]]; then
  setup+=" && .venv/bin/python -m fape_jax.backend $EXPECT_BACKEND"
fi
# Processes holding the TPU (a previous or hung run) and libtpu's stale lock file.
stop="pids=\$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u);"
stop+=" if [ -n \"\$pids\" ]; then echo \"stopping TPU processes \$pids\"; sudo kill \$pids || true;"
stop+=" sleep 5; sudo kill -9 \$pids 2>/dev/null || true; fi; sudo rm -f /tmp/libtpu_lockfile"
if [[ "$CLEAR_STALE" == 1 ]]; then setup+=" && { $stop; }"; fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gc[@]}" --command="$setup"

# 4. Start the run on every worker at once, one ssh (and one log) per worker.
expect=()
if [[ -n "$EXPECT_BACKEND" ]]; then expect+=("--expect_backend=$EXPECT_BACKEND"); fi
if [[ -n "$EXPECT_DEVICES" && "$MODULE" == fape_jax.train ]]; then
  expect+=("--expect_devices=$EXPECT_DEVICES")
fi
cmd=".venv/bin/python -m $MODULE"
cmd+=" $(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" ${expect[@]+"${expect[@]}"} "$@")"
mkdir -p "$LOG_DIR"
pids=()
for ((w = 0; w < NUM_WORKERS; w++)); do
  if [[ "$DETACH" == 1 ]]; then
    run="cd ~/$REMOTE_DIR && mkdir -p logs && nohup $cmd > logs/worker-$w.log 2>&1 < /dev/null &"
  else
    run="cd ~/$REMOTE_DIR && $cmd"
  fi
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$w" "${gc[@]}" --command="$run" \
    > "$LOG_DIR/worker-$w.log" 2>&1 < /dev/null &
  pids+=("$!")
done
echo "tpu_pod.sh: started on $NUM_WORKERS workers: $cmd (logs: $LOG_DIR/worker-W.log)" >&2

# Poll rather than `wait -n`: it must say which worker ended (and work on bash 3.2).
finished=()
remaining=$NUM_WORKERS
while ((remaining > 0)); do
  for w in "${!pids[@]}"; do
    if [[ -n "${finished[w]:-}" ]] || kill -0 "${pids[w]}" 2>/dev/null; then continue; fi
    rc=0
    wait "${pids[w]}" || rc=$?
    finished[w]=1
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      echo "tpu_pod.sh: worker $w exited with status $rc (see $LOG_DIR/worker-$w.log); stopping" \
        "the others." >&2
      for v in "${!pids[@]}"; do
        if [[ -z "${finished[v]:-}" ]]; then kill "${pids[v]}" 2>/dev/null || true; fi
      done
      gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gc[@]}" --command="$stop" || true
      exit "$rc"
    fi
  done
  if ((remaining > 0)); then sleep 1; fi
done
if [[ "$DETACH" == 1 ]]; then
  echo "tpu_pod.sh: running detached; logs on the workers in ~/$REMOTE_DIR/logs/." >&2
else
  echo "tpu_pod.sh: all $NUM_WORKERS workers finished." >&2
fi
