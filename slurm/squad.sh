#!/bin/bash
# SQuAD fine-tuning on Slurm, one task per GPU, requeued after preemption. Submit from the repo root:
#   sbatch slurm/squad.sh                      # settings below, overridable per run:
#   MODEL=bert-base-uncased OUTPUT_DIR=runs/squad-base EXTRA_ARGS="--epochs 3" sbatch slurm/squad.sh
# Logs: slurm/logs/<job name>-<job id>.out, each line prefixed with its rank (a requeued run appends).
#SBATCH --job-name=squad
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --partition=gpu
##SBATCH --account=my-account
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@300

OUTPUT_DIR=${OUTPUT_DIR:-runs/squad}
source "${BERTSCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

args=(finetune --task "${TASK:-squad}" --model "${MODEL:-bert-large-cased-whole-word-masking}"
      --ds-config "${DS_CONFIG:-zero2}" --output-dir "$OUTPUT_DIR" --resume auto)
[ -n "${TRAIN_FILE:-}" ] && args+=(--train-file "$TRAIN_FILE")
[ -n "${EVAL_FILE:-}" ] && args+=(--eval-file "$EVAL_FILE")
run_bertscale "${args[@]}"
