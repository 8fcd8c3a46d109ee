#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run: the encoder against transformers, MTOP's one pass
# against N passes, train.py's step throughput, and a short bf16 train.py run on real weights.
#
#   bash benchmarks/gpu_run.sh GLUE_DIR MODEL_DIR OUT_DIR
#
# GLUE_DIR: the GLUE TSVs; MODEL_DIR: a BERT/ELECTRA folder (config.json, model.safetensors, vocab.txt).
set -euo pipefail
data=$1 model=$2 out=$3
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
python3 benchmarks/bench_electra.py --device cuda --repeats 20 2>/dev/null | tee "$out/bench_electra.txt"
python3 benchmarks/bench_mtop.py --device cuda --dtype bf16 --repeats 20 --separate-repeats 5 2>/dev/null \
    | tee "$out/bench_mtop.txt"
python3 benchmarks/bench_train.py --device cuda --model "$model" --data-dir "$data" --steps 200 2>/dev/null \
    | tee "$out/bench_train.txt"
python3 train.py --device cuda --dtype bf16 --data-dir "$data" --model "$model" --tasks RTE,MRPC,STS-B,CoLA,SST-2 \
    --lr 1e-4 --max-steps 4000 --interval 250 --eval-every 2000 --log-every 500 --no-test \
    --output-dir /tmp/gpu-run --cache-dir /tmp/gpu-cache 2>&1 | tee "$out/train.txt"
