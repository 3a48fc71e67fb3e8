#!/bin/bash
# MLM/NSP pretraining on Slurm, one task per GPU, requeued after preemption. Submit from the repo root:
#   TRAIN_FILES='corpus/*.txt' sbatch slurm/pretrain.sh
#   TRAIN_FILES='a/*.txt b/*.jsonl' DS_CONFIG=zero3 EXTRA_ARGS="--max-steps 100000" sbatch slurm/pretrain.sh
#   PREPARED_DATA=data/corpus-bert sbatch slurm/pretrain.sh     # a corpus made by slurm/prepare.sh
# TRAIN_FILES are prepared once into the cache (--prepared-cache, default ~/.cache/bertscale: it must
# be a directory every node sees), so a requeued job starts training in seconds.
# Logs: slurm/logs/<job name>-<job id>.out, each line prefixed with its rank (a requeued run appends).
#SBATCH --job-name=pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --partition=gpu
##SBATCH --account=my-account
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@600

OUTPUT_DIR=${OUTPUT_DIR:-runs/pretrain}
source "${BERTSCALE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

args=(pretrain --model "${MODEL:-bert-large-cased-whole-word-masking}" --ds-config "${DS_CONFIG:-zero2}"
      --output-dir "$OUTPUT_DIR" --resume auto)
if [ -n "${PREPARED_DATA:-}" ]; then
    args+=(--prepared-data "$PREPARED_DATA")
else
    # TRAIN_FILES / EVAL_FILES: space-separated globs, expanded by bertscale (read does not glob them).
    read -ra globs <<< "${TRAIN_FILES:?set TRAIN_FILES to the corpus globs, or PREPARED_DATA to a prepared corpus}"
    for g in "${globs[@]}"; do args+=(--train-files "$g"); done
    read -ra globs <<< "${EVAL_FILES:-}"
    for g in "${globs[@]}"; do args+=(--eval-files "$g"); done
fi
run_bertscale "${args[@]}"
