"""--unpad and --no-unpad train the same model on the CPU. From the same seed, with dropout on, the
unpadded model draws the stock model's dropout masks (over the padded grid) and both modes take the
squad task's loss over real positions, so the two runs' losses agree step by step up to the order of
float sums. Random (not length-grouped) batches, so that much of each batch is padding."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, one_rank_env

DEMO = ROOT / "bertscale" / "assets" / "squad_demo"

SCRIPT = r"""
import sys
from bertscale import tasks, trainer
run = tasks.make_run("squad", model="tiny", train_file=sys.argv[1], eval_file=sys.argv[2], output_dir=sys.argv[3],
                     unpad=sys.argv[4] == "unpad", hidden_dropout=0.1, attention_dropout=0.1, seed=3,
                     max_train_samples=48, max_eval_samples=8, max_steps=8, micro_batch_size=6,
                     max_seq_length=128, doc_stride=32, group_by_length=False, log_every=1, save_every=0,
                     wandb_mode="disabled")
trainer.train(run)
"""


def step_losses(tmp_path, mode: str) -> list[float]:
    env = one_rank_env()
    out = tmp_path / mode
    args = [sys.executable, "-c", SCRIPT, str(DEMO / "train.json"), str(DEMO / "dev.json"), str(out), mode]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row and "eval" not in row]


def test_unpad_and_no_unpad_train_the_same_model_on_the_cpu(tmp_path):
    unpadded, padded = step_losses(tmp_path, "unpad"), step_losses(tmp_path, "no-unpad")
    assert len(unpadded) == len(padded) == 8
    assert unpadded == pytest.approx(padded, rel=1e-4)
    assert max(unpadded) - min(unpadded) > 1e-2  # the losses move: the comparison is not of constants
