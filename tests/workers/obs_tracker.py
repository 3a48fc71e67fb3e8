"""Worker for test_tracking.py: one Tracker (rank 0, no launcher) logging a few rows to
OUTPUT_DIR with the W&B mode the environment and flags choose; prints the run id it used."""

import sys

from bertscale import tracking
from bertscale.args import LogArgs


def main(output_dir: str):
    tracker = tracking.Tracker(LogArgs(run_name="obs-worker"), output_dir, {}, total_steps=4)
    for step in (2, 4):
        tracker.log(step, {"loss": 1.0 / step, "lr": 1e-4, "samples_per_s": 10.0})
    tracker.summary({"best_metric": None})
    tracker.finish()
    if tracker.wandb is not None:
        print("RUN_ID", tracker.wandb.id)


if __name__ == "__main__":
    main(sys.argv[1])
