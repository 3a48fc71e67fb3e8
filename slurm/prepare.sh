#!/bin/bash
# Prepare a pretraining corpus on Slurm, once, on many nodes: each task of this array job prepares a
# disjoint set of the files (balanced by size), and a job that starts when all of them have succeeded
# writes the manifest and publishes the directory. Submit from the repo root:
#   TRAIN_FILES='corpus/**/*.txt' OUTPUT_DIR=data/corpus-bert MODEL=bert-base-uncased \
#       sbatch --array=0-7 slurm/prepare.sh
#   EXTRA_ARGS="--max-seq-length 512 --short-seq-prob 0.1" ...   # any other `bertscale prepare` flags
# The same inputs give the same shards for any number of array tasks. A failed or preempted task
# can run again (parts already done are skipped); until the last step has run, OUTPUT_DIR does not
# exist, so no training run can pick up a half-prepared corpus.
# Logs: slurm/logs/<job name>-<array job id>_<task>.out, and <job name>-finalize-<job id>.out.
#SBATCH --job-name=prepare
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --partition=cpu
##SBATCH --account=my-account
#SBATCH --output=slurm/logs/%x-%A_%a.out
#SBATCH --requeue
set -u
BERTSCALE_ROOT=${BERTSCALE_ROOT:-$SLURM_SUBMIT_DIR}
cd "$BERTSCALE_ROOT" || exit 1
PYTHON=${PYTHON:-python}
say() { echo "[bertscale-slurm] $*"; }

args=(prepare --task pretrain --model "${MODEL:-bert-large-cased-whole-word-masking}"
      --output-dir "${OUTPUT_DIR:?set OUTPUT_DIR to the directory for the prepared corpus}")
# TRAIN_FILES / EVAL_FILES: space-separated globs, expanded by bertscale (read does not glob them).
read -ra globs <<< "${TRAIN_FILES:?set TRAIN_FILES to the corpus globs}"
for g in "${globs[@]}"; do args+=(--train-files "$g"); done
read -ra globs <<< "${EVAL_FILES:-}"
for g in "${globs[@]}"; do args+=(--eval-files "$g"); done
read -ra extra <<< "${EXTRA_ARGS:-}"
args+=("${extra[@]}")

if [ "${1:-}" = finalize ]; then
    say "job $SLURM_JOB_ID: publishing $OUTPUT_DIR from ${PARTS:?} parts"
    exec "$PYTHON" -u -m bertscale "${args[@]}" --parts "$PARTS" --finalize
fi

parts=${SLURM_ARRAY_TASK_COUNT:?submit as an array job: sbatch --array=0-N slurm/prepare.sh}
part=$(( (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / ${SLURM_ARRAY_TASK_STEP:-1} ))

# The first task submits the last step once (not again when it is requeued). afterok: it runs only
# when every task of the array has succeeded; a failed task cancels it (--kill-on-invalid-dep).
if [ "$part" -eq 0 ] && [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
    log_dir=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/.*StdOut=\([^ ]*\).*/\1/p')
    log_dir=$(dirname "${log_dir:-slurm/logs/x}")
    finalize=$(sbatch --parsable --array=0 --cpus-per-task=1 --job-name="$SLURM_JOB_NAME-finalize" \
        --partition="$SLURM_JOB_PARTITION" ${SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"} \
        --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes --export="ALL,PARTS=$parts" \
        --output="$log_dir/$SLURM_JOB_NAME-finalize-%j.out" "$BERTSCALE_ROOT/slurm/prepare.sh" finalize) || {
        say "could not submit the last step; when all tasks are done run: python -m bertscale ${args[*]}" \
            "--parts $parts --finalize"
        exit 1
    }
    say "array job $SLURM_ARRAY_JOB_ID: job $finalize publishes $OUTPUT_DIR when all $parts tasks have succeeded"
fi

say "array job $SLURM_ARRAY_JOB_ID task $SLURM_ARRAY_TASK_ID (restart ${SLURM_RESTART_COUNT:-0}):" \
    "part $part of $parts on $(hostname), ${SLURM_CPUS_PER_TASK:-1} workers"
exec "$PYTHON" -u -m bertscale "${args[@]}" --part "$part" --parts "$parts" \
    --preprocessing-workers "${SLURM_CPUS_PER_TASK:-1}"
