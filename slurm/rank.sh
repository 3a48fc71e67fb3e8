#!/bin/bash
# One task of the srun step in common.sh: runs "$@" (the trainer) and reports how it ended.
# Slurm signals every process of a step, so this shell traps USR1/TERM to outlive the trainer.
trap : USR1 TERM
"$@"
rc=$?
if [ "$rc" -eq 124 ]; then
    # Checkpoint saved after a preemption signal. Report success to srun, or --kill-on-bad-exit
    # would kill the ranks still finishing the same checkpoint; the batch script requeues.
    touch "$BERTSCALE_JOB_STATUS/preempted"
    exit 0
fi
if [ "$rc" -ne 0 ]; then
    msg="rank $SLURM_PROCID (node $SLURMD_NODENAME, local rank $SLURM_LOCALID) exit code $rc"
    echo "[bertscale-slurm] $msg" >&2  # labelled by srun; the batch script sums these up
    echo "$msg" >> "$BERTSCALE_JOB_STATUS/failures"
fi
exit "$rc"
