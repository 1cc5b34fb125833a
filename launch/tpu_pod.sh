#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): create the slice unless it exists, copy this
# repository's tracked files to every worker, set up the virtualenv there once, then start the same
# command on all workers. jax finds the pod by itself (fape_jax.distributed), so no coordinator flags.
#
# Usage (from a machine with the Google Cloud SDK, logged in):
#   TPU_NAME=fape-v5e ZONE=us-west4-a WORKDIR=gs://my-bucket/fape/run1 \
#     launch/tpu_pod.sh [--config.x=y ...]
#   TPU_NAME=fape-v5e ZONE=us-west4-a WORKDIR=gs://my-bucket/fape/run1 \
#     CONFIG=configs/base.py:sd21 DETACH=1 launch/tpu_pod.sh --config.total_steps=20000
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
#   CONFIG            config file[:variant] (default configs/base.py)
#   MODULE            module run on every worker (default fape_jax.train)
#   REMOTE_DIR        checkout directory on the workers, relative to the home directory
#                     (default fape_jax)
#   TPU_JAX           pip requirement that adds TPU support to the venv (default "jax[tpu]", the
#                     [tpu] extra: libtpu for the installed jax; `make setup` installs the CPU
#                     jaxlib only). Installed once per worker, then checked on every call.
#   EXPECT_BACKEND    passed as --expect_backend (default tpu: a worker whose jax finds no TPU
#                     stops with an error instead of training on its CPU); empty: not passed
#   DETACH            1: run in the background on the workers (log in ~/REMOTE_DIR/train.log),
#                     so closing this terminal does not stop training (default 0)
# Arguments are passed on to MODULE on every worker. The workers need python3 with venv and make;
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
CONFIG="${CONFIG:-configs/base.py}"
MODULE="${MODULE:-fape_jax.train}"
REMOTE_DIR="${REMOTE_DIR:-fape_jax}"
TPU_JAX="${TPU_JAX:-jax[tpu]}"
DETACH="${DETACH:-0}"
EXPECT_BACKEND="${EXPECT_BACKEND-tpu}"
[[ "$DETACH" == 0 || "$DETACH" == 1 ]] || die "DETACH=$DETACH must be 0 or 1."
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "MODULE=$MODULE is not a Python module name."
[[ -z "$EXPECT_BACKEND" || "$EXPECT_BACKEND" =~ ^(any|cpu|gpu|tpu)$ ]] ||
  die "EXPECT_BACKEND=$EXPECT_BACKEND must be any, cpu, gpu, tpu or empty."
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "REMOTE_DIR=$REMOTE_DIR: use a plain relative path."
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not gs://; it must be a file system shared by" \
    "all workers, or each worker writes its own partial checkpoints." >&2
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

# 2. Copy the tracked files (working-tree contents; untracked files, runs and .venv stay here).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$repo" && git ls-files -z | tar --null -T - -czf "$tmp/fape_jax.tgz")
gcloud compute tpus tpu-vm scp "$tmp/fape_jax.tgz" "$TPU_NAME:fape_jax.tgz" --worker=all "${gc[@]}"

# 3. Unpack and set up the venv on every worker (make skips the install when it is up to date).
setup="set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/fape_jax.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR"
setup+=" && make setup && { .venv/bin/python -c 'import libtpu' 2>/dev/null"
setup+=" || .venv/bin/python -m pip install $(printf '%q' "$TPU_JAX"); }"
# Then the jaxlib check (package metadata only; each process checks its devices on start-up).
if [[ -n "$EXPECT_BACKEND" ]]; then
  setup+=" && .venv/bin/python -m fape_jax.backend $EXPECT_BACKEND"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gc[@]}" --command="$setup"

# 4. Start the run on every worker at once.
run="cd ~/$REMOTE_DIR && .venv/bin/python -m $MODULE"
expect=()
if [[ -n "$EXPECT_BACKEND" ]]; then expect=("--expect_backend=$EXPECT_BACKEND"); fi
run+=" $(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" ${expect[@]+"${expect[@]}"} "$@")"
if [[ "$DETACH" == 1 ]]; then
  run="cd ~/$REMOTE_DIR && nohup ${run#*&& } > train.log 2>&1 < /dev/null &"
fi
echo "tpu_pod.sh: running on all workers: $run" >&2
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gc[@]}" --command="$run"
