"""The console a first-time user sees: `make demo`'s script on a reduced budget prints bertscale's
lines once, no library chatter, and at most 40 lines besides progress; --verbose shows the rest."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SQUAD, bertscale_single, cpu_env

PROGRESS = re.compile(r"^\[bertscale\] step \d+/\d+ loss ")
THIRD_PARTY = re.compile(r"warn|\[INFO\]|^wandb:|LOAD REPORT|built successfully|Loading weights|it/s\]|\d+%\|", re.I)
OURS = re.compile(r"^(\[bertscale\] |\[demo\] |  Q: |     answer: )")


@pytest.mark.slow
def test_demo_console_is_short_clean_and_said_once(tmp_path, minilm_path):
    bin_dir, out = Path(sys.executable).parent, tmp_path / "demo"
    env = {**cpu_env(), "WANDB_MODE": "offline", "BIN": str(bin_dir), "DEMO_DIR": str(out), "DEMO_QUESTIONS": "1"}
    budget = ["--max-train-samples", "48", "--max-eval-samples", "24", "--max-steps", "3", "--log-every", "1"]
    proc = subprocess.run(["examples/demo.sh", *budget], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-60:])
    text = "\n".join(lines)
    assert not [line for line in lines if THIRD_PARTY.search(line)], text
    assert all(OURS.match(line) for line in lines), text  # every line is bertscale's own (rank 0 only)
    assert len(lines) == len(set(lines)), text  # nothing said twice (by two ranks, or twice by one)
    assert len([line for line in lines if not PROGRESS.match(line)]) <= 40, text
    assert len([line for line in lines if PROGRESS.match(line)]) == 3
    assert re.search(r"^\[bertscale\] step 3/3 loss [\d.]+ lr [\d.e-]+ [\d.]+ samples/s eta 0:00$", text, re.M)
    assert "[bertscale] qa_outputs: new (not in the pretrained model), trained from scratch on this task" in lines
    assert re.search(r"^\[bertscale\] final: exact_match=[\d.]+ f1=[\d.]+ ", text, re.M)
    assert f"[bertscale] model: {out / 'final'}" in lines
    assert re.search(r"^\[bertscale\] W&B: saved in .*offline-run-.* \(upload: wandb sync ", text, re.M)
    assert text.count("     answer: '") == 1
    assert re.search(r"^\[demo\] plots \(bertscale report .*\): .*loss\.png", text, re.M)


def test_verbose_shows_what_the_default_silences(tmp_path):
    flags = [
        "finetune", "--task", "squad", "--model", "tiny", "--train-file", str(SQUAD / "train-v1.1-first44.json"),
        "--max-train-samples", "8", "--max-seq-length", "128", "--doc-stride", "32", "--micro-batch-size", "4",
        "--max-steps", "1", "--save-every", "0", "--wandb-mode", "disabled", "--preprocessing-workers", "1",
    ]  # fmt: skip
    quiet = bertscale_single([*flags, "--output-dir", str(tmp_path / "q")])
    loud = bertscale_single([*flags, "--output-dir", str(tmp_path / "v"), "--verbose"])
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    quiet_out, loud_out = quiet.stdout + quiet.stderr, loud.stdout + loud.stderr
    assert "built successfully" not in quiet_out and "built successfully" in loud_out  # DeepSpeed's shm op
    assert "[bertscale] rank 0/1 local_rank 0 host " in loud_out and "rank 0/1" not in quiet_out
    assert "[bertscale] 1 rank on 1 host" in quiet_out
