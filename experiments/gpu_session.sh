#!/usr/bin/env bash
# One short GPU session's experiments in one command: the inference cost of every compared method on
# the GPU (fp32 and bf16), then the gpu-table and gpu-ablation plans side by side (JOBS and 3 trainings
# at a time), stopped at a deadline. Everything but checkpoints is packed into OUT_DIR/results.tgz
# every minute and at the end, so a session cut short loses only the trainings in flight. Started
# again on the same machine (its /tmp intact), the script skips the finished runs and the inference
# cost already measured, and run.py continues the unfinished trainings from their checkpoints.
#
#   bash experiments/gpu_session.sh GLUE_DIR MODEL_DIR OUT_DIR [SECONDS] [JOBS]
#
# SECONDS: the whole script's budget (default 480); JOBS: gpu-table trainings side by side (default 12).
# Unpack here with `tar xzf OUT_DIR/results.tgz -C DIR`: DIR/gpu-results/<plan>/*.json are run.py's
# results (copy them to experiments/results/), DIR/gpu-work holds each training's stdout.txt and log.jsonl.
# MTOP_COMMIT names the code's commit (run.py records it in each result; the copy's git may say another).
# PLAN, PLAN2 (paths from the repository's root), DEVICE and TEXTS, from the environment, change the
# plans, the device and the texts of the inference cost, to try the script on a CPU first; PLAN2=none runs
# no second plan, JOBS2 (default 3) sets its trainings side by side, and INFERENCE=0 measures no inference
# cost.
set -uo pipefail
data=$(realpath "$1") model=$(realpath "$2") out=$(realpath -m "$3") seconds=${4:-480} jobs=${5:-12}
plan=${PLAN:-experiments/plans/gpu-table.json} plan2=${PLAN2:-experiments/plans/gpu-ablation.json}
device=${DEVICE:-cuda} texts=${TEXTS:-4096} inference=${INFERENCE:-1}
cd "$(dirname "$0")/.."
mkdir -p "$out" /tmp/gpu-results /tmp/gpu-work
export PYTHONUNBUFFERED=1
deadline=$(($(date +%s) + seconds))

pack() {  # results, logs and dev evaluations, never checkpoints; written whole, then renamed
    (cd /tmp && find gpu-results gpu-work \( -name '*.json' -o -name '*.jsonl' -o -name '*.txt' \) -print0 \
        | tar czf "$out/.results.tgz" --null -T - 2>/dev/null) && mv "$out/.results.tgz" "$out/results.tgz"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda)"
  nproc; free -g | head -2; } | tee "$out/machine.txt"
nvidia-smi dmon -s um -d 10 > "$out/dmon.txt" 2>&1 &
dmon=$!

for dtype in $([ "$inference" = 1 ] && echo fp32 bf16); do
    [ -f "/tmp/gpu-results/inference-gpu-$dtype/inference.json" ] && continue  # measured by an earlier call
    timeout 100 python3 experiments/inference_cost.py --glue "$data" --model "$model" --device "$device" \
        --dtype "$dtype" --texts "$texts" --out "/tmp/gpu-results/inference-gpu-$dtype" 2>&1 \
        | tee -a "$out/inference.txt"
done
pack

(while sleep 60; do pack; done) </dev/null >/dev/null 2>&1 &
packer=$!
left=$((deadline - $(date +%s) - 20))
if [ "$left" -lt 10 ]; then echo "no time left to train ($left s)" | tee -a "$out/run.txt"; left=10; fi
echo "training for at most $left s, $jobs side by side" | tee -a "$out/run.txt"
[ "$plan2" = none ] || timeout "$left" python3 experiments/run.py "$plan2" --glue "$data" --model "$model" --results /tmp/gpu-results \
    --work /tmp/gpu-work --jobs "${JOBS2:-3}" --threads 1 > "$out/run2.txt" 2>&1 &
second=$!
timeout "$left" python3 experiments/run.py "$plan" --glue "$data" --model "$model" --results /tmp/gpu-results \
    --work /tmp/gpu-work --jobs "$jobs" --threads 1 2>&1 | tee -a "$out/run.txt"
echo "run.py ended with $?" | tee -a "$out/run.txt"
wait "$second"; echo "second run.py ended with $?" | tee -a "$out/run2.txt"
pkill -f "train.py .*--output-dir /tmp/gpu-work/"; sleep 2  # trainings still in flight at the deadline
pkill -P "$packer"; kill "$packer" "$dmon" 2>/dev/null; wait "$packer" 2>/dev/null
pack
ls /tmp/gpu-results/*/ | tee -a "$out/run.txt"
