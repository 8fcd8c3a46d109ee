#!/usr/bin/env bash
# CoLA alone, MiniLM, 2000 steps: how the prompt settings start from a pre-trained encoder.
# (Run on a GPU: each line takes well under a minute there.)
#
#   bash benchmarks/cola_prompts.sh GLUE_DIR MODEL_DIR
set -uo pipefail
data=$1 model=$2
export PYTHONUNBUFFERED=1
run() {  # mode, lr, prompt lr (0: the same as lr)
  echo "== mode $1 lr $2 prompt-lr $3"
  python3 train.py --device cuda --data-dir "$data" --model "$model" --tasks CoLA --mode "$1" --lr "$2" \
    --prompt-lr "$3" --max-steps 2000 --eval-every 1000 --log-every 1000 --sampler uniform --no-test \
    --output-dir "/tmp/cola-$1-$2-$3" 2>&1 | grep -E "dev at|step 2000"
}
run none 1e-4 0; run none 3e-5 0; run mtop 1e-4 0; run mtop 3e-5 0
run mtop 1e-4 1e-3; run mtop 1e-4 1e-2; run separate 1e-4 0
