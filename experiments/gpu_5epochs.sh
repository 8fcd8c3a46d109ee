#!/usr/bin/env bash
# Issue 20, item 6, in one GPU call of at most 10 minutes: train.py's step timed at ELECTRA-base's shape
# (experiments/base_step_time.py: what the paper's full run would take), then the gpu-5epochs plan (the
# five-task mix for 5 epochs), all its trainings side by side, through gpu_session.sh (results packed
# into OUT_DIR/results.tgz every minute and at the end).
#
#   bash experiments/gpu_5epochs.sh GLUE_DIR MODEL_DIR OUT_DIR [SECONDS]
set -uo pipefail
data=$(realpath "$1") model=$(realpath "$2") out=$(realpath -m "$3") seconds=${4:-540}
cd "$(dirname "$0")/.."
mkdir -p "$out" /tmp/gpu-results/base-step-time
start=$(date +%s)
timeout 120 python3 experiments/base_step_time.py --glue "$data" --model "$model" --device "${DEVICE:-cuda}" \
    --out /tmp/gpu-results/base-step-time ${BASE_FLAGS:-} 2>&1 | tee "$out/base_step_time.txt"
left=$((seconds - ($(date +%s) - start)))
PLAN=experiments/plans/gpu-5epochs.json PLAN2=none INFERENCE=0 \
    bash experiments/gpu_session.sh "$data" "$model" "$out" "$left" 8
