# Sourced by squad.sh and pretrain.sh: rendezvous, fail-fast settings, one srun step, requeue.
# Settings come from the environment (sbatch passes the submitting shell's environment on):
#   PYTHON (default: python), DIST_TIMEOUT (seconds, default 600), OUTPUT_DIR, EXTRA_ARGS.
set -u
BERTSCALE_ROOT=${BERTSCALE_ROOT:-$SLURM_SUBMIT_DIR}
cd "$BERTSCALE_ROOT"
PYTHON=${PYTHON:-python}
unset RANK LOCAL_RANK WORLD_SIZE  # srun's SLURM_PROCID/LOCALID/NTASKS decide them, not the submit shell

# Rank 0 runs on the first node. Its NodeAddr is the address Slurm itself uses to reach it, so it
# resolves wherever Slurm works (it is the host name unless the admin set another address).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))

# A rank that hangs in a collective errors out after this many seconds instead of forever.
export BERTSCALE_DIST_TIMEOUT=${DIST_TIMEOUT:-600}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

say() { echo "[bertscale-slurm] $*"; }

# Tasks of this allocation: SLURM_TASKS_PER_NODE ("8(x2)", "2,1") is computed for the nodes this run
# got. SLURM_NTASKS is not: a job requeued onto fewer nodes (scontrol update JobId=N NumNodes=M while
# it waits) keeps the task count of its first run there, and srun would pack those tasks onto the
# nodes it has left.
allocation_tasks() {
    local total=0 part count repeat parts
    IFS=, read -ra parts <<< "${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS:-1}}"
    for part in "${parts[@]}"; do
        count=${part%%(*} repeat=1
        [[ $part == *"(x"* ]] && repeat=${part##*(x} && repeat=${repeat%)}
        total=$((total + count * repeat))
    done
    echo "$total"
}

# run_bertscale ARGS...: `python -m bertscale ARGS $EXTRA_ARGS` on every task of the allocation.
# Ends the batch script: exit 0 when done or requeued after a preemption checkpoint, else srun's code.
run_bertscale() {
    # rank.sh reports here: a file "preempted" when the trainer exits 124 (checkpoint saved after
    # USR1/TERM), and one line per failed rank in "failures", in the order they failed.
    export BERTSCALE_JOB_STATUS="$OUTPUT_DIR/.slurm-job-$SLURM_JOB_ID"
    rm -rf "$BERTSCALE_JOB_STATUS" && mkdir -p "$BERTSCALE_JOB_STATUS"
    local nodes=$SLURM_JOB_NUM_NODES tasks
    tasks=$(allocation_tasks)
    say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s), $tasks task(s)," \
        "master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"
    # This allocation's counts, not the first run's: a checkpoint of another rank count resumes
    # through a universal checkpoint (--global-batch-size keeps the global batch).
    # shellcheck disable=SC2086  # EXTRA_ARGS is meant to split into words
    srun --label --kill-on-bad-exit=1 --nodes="$nodes" --ntasks="$tasks" bash "$BERTSCALE_ROOT/slurm/rank.sh" \
        "$PYTHON" -u -m bertscale "$@" ${EXTRA_ARGS:-}
    local rc=$? failures preempted
    failures=$(paste -sd ';' "$BERTSCALE_JOB_STATUS/failures" 2>/dev/null | sed 's/;/; /g')
    preempted=$([ -e "$BERTSCALE_JOB_STATUS/preempted" ] && echo yes)
    rm -rf "$BERTSCALE_JOB_STATUS"
    if [ "$rc" -ne 0 ]; then
        say "job $SLURM_JOB_ID FAILED (srun exit code $rc); failed ranks in order: ${failures:-see the srun errors above}"
        exit "$rc"
    fi
    if [ -n "$preempted" ]; then
        say "checkpoint saved after a preemption signal; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        say "scontrol requeue failed: resubmit this script to resume (--resume auto)"
        exit 124
    fi
    say "job $SLURM_JOB_ID finished"
    exit 0
}
