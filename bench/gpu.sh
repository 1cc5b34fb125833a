#!/usr/bin/env bash
# SD-2.1-scale benchmark on one GPU host, in under 8 minutes: train step time, MFU and peak
# memory at 512^2 in bfloat16 (configs/base.py:sd21: SD-2.1 UNet + VAE + frequency LoRA-MoE +
# discriminator, random weights: time and memory depend on shapes only), and the restore
# latency of one 512^2 image. Prints one JSON object on stdout; the full results are written to
# bench/results/gpu_train_step.json and bench/results/gpu_restore.json.
#
# Prerequisites (this script installs nothing):
#   make setup                                   # .venv from requirements.txt
#   .venv/bin/pip install -U "jax[cuda12]"       # CUDA-enabled jaxlib in the same .venv
# Usage, from anywhere:
#   bash bench/gpu.sh
# Knobs (environment): BATCH_PER_DEVICE (default 1, the paper's batch per GPU), ROUNDS (5),
# STEPS (3), TRAIN_TIMEOUT (330 s), RESTORE_TIMEOUT (120 s). The two timeouts bound the run:
# 330 + 120 s plus start-up stays under 8 minutes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
if [[ ! -x "$PY" ]]; then
  echo "gpu.sh: $PY not found; run 'make setup' first (see the header of this script)." >&2
  exit 2
fi

BATCH_PER_DEVICE="${BATCH_PER_DEVICE:-1}"
ROUNDS="${ROUNDS:-5}"
STEPS="${STEPS:-3}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-330}"
RESTORE_TIMEOUT="${RESTORE_TIMEOUT:-120}"

# Fail early, with a clear message, when jax sees no GPU (e.g. the CPU-only jaxlib).
if ! NDEV=$("$PY" -c 'import jax; d = jax.devices(); assert d[0].platform == "gpu"; print(len(d))' \
    2>/dev/null); then
  echo "gpu.sh: jax finds no GPU; install the CUDA jaxlib: .venv/bin/pip install -U \"jax[cuda12]\"" >&2
  exit 2
fi
BATCH=$((NDEV * BATCH_PER_DEVICE))

# One mesh axis of size 1 for fsdp: every device holds the whole (frozen) UNet and a slice of
# the batch; sd21's default (-1, 8) needs 8 devices.
COMMON=(
  --config=configs/base.py:sd21
  "--config.mesh.shape=(-1, 1)"
  --config.model.dtype=bfloat16
  --config.data.crop=512
  "--config.data.batch_size=$BATCH"
)

echo "gpu.sh: $NDEV GPU(s), global batch $BATCH at 512^2, bfloat16" >&2
timeout "$TRAIN_TIMEOUT" "$PY" bench/train_step.py "${COMMON[@]}" \
  --torch=false --matched=false --peak_dtype=bfloat16 --peak_n=8192 --peak_calls=20 \
  --rounds="$ROUNDS" --steps="$STEPS" --name=gpu_train_step >/dev/null
timeout "$RESTORE_TIMEOUT" "$PY" bench/restore.py "${COMMON[@]}" \
  --sizes=512 --whole_max=512 --tile=512 --repeats=5 --max_temp_gb=1000 \
  --name=gpu_restore >/dev/null

"$PY" - <<'EOF'
import json
import pathlib

res = pathlib.Path("bench/results")
train = json.loads((res / "gpu_train_step.json").read_text())
restore = json.loads((res / "gpu_restore.json").read_text())
lib = train["library_step"]
whole = [r for r in restore["executor"] if r.get("mode") == "whole" and r.get("size") == 512]
r512 = whole[0] if whole else {}
print(json.dumps({
    "device": train["machine"]["device_kind"],
    "devices": train["machine"]["devices"],
    "config": "configs/base.py:sd21 at 512^2, bfloat16, batch %d" % train["config"]["batch_size"],
    "step_s": lib["step_s"],
    "images_per_s": lib["images_per_s"],
    "compile_s": lib["compile_s"],
    "flops_per_step": lib["flops_per_step"],
    "mfu_measured_peak": lib["flop_fraction"],
    "mfu_nominal_peak": lib.get("mfu_nominal"),
    "peak_matmul_flop_per_s": train["peak_matmul"]["flop_per_s"],
    "train_peak_device_bytes": train["peak_memory"]["device_bytes"],
    "restore_512_latency_s": r512.get("latency_s"),
    "restore_512_peak_device_bytes": r512.get("device_peak_bytes"),
    "restore_error": r512.get("error") or r512.get("skipped"),
}, indent=2))
EOF
