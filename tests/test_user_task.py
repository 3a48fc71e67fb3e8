"""A user's own task in one file outside the package (examples/pair_regression.py): its flags in --help,
trained on 2 real ranks by the deepspeed launcher, evaluated under torchrun, predicted with, and its
export reloaded by plain transformers with the same outputs."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import DATA, ROOT, bertscale, bertscale_single, cpu_env, free_port, read_metrics

EXAMPLE = ROOT / "examples" / "pair_regression.py"
SPEC = f"{EXAMPLE.relative_to(ROOT)}:PairRegression"


def overlap_pairs(path, rows: int) -> list[dict]:
    """RTE sentence pairs scored by their word overlap (Jaccard): a real, learnable regression target."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : rows + 1]
    out = []
    for line in lines:
        _, a, b, _ = line.split("\t")
        wa, wb = set(a.lower().split()), set(b.lower().split())
        out.append({"sentence1": a, "sentence2": b, "score": round(len(wa & wb) / len(wa | wb), 4)})
    return out


def write_csv(path, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence1", "sentence2", "score"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    return (
        write_csv(tmp / "train.csv", overlap_pairs(DATA / "glue" / "RTE" / "train.tsv", 256)),
        write_csv(tmp / "dev.csv", overlap_pairs(DATA / "glue" / "RTE" / "dev.tsv", 48)),
    )


def test_help_lists_the_user_tasks_own_flags():
    proc = bertscale_single(["finetune", "--task", SPEC, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "Sentence-pair regression (examples/pair_regression.py) (--task pair-regression) options" in proc.stdout
    assert "--score-column" in proc.stdout


def test_bad_user_task_specs_are_one_line(tmp_path):
    for spec, message in [
        ("examples/nope.py:X", "no such file examples/nope.py"),
        (f"{SPEC[: -len('PairRegression')]}Missing", "Missing is not found in"),
        ("json:loads", "loads is not a subclass of bertscale.tasks.base.Task"),
        ("no_such_module_xyz:Task", "cannot import no_such_module_xyz"),
    ]:
        proc = bertscale_single(["finetune", "--task", spec, "--model", "tiny", "--output-dir", str(tmp_path / "o")])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"bertscale: error: --task {spec}: {message}" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_user_task_trains_on_two_ranks_and_its_export_reloads(tmp_path, data_files):
    train_csv, dev_csv = data_files
    out = tmp_path / "run"
    bertscale(
        [
            "finetune",
            "--task",
            SPEC,
            "--model",
            "tiny",
            "--train-file",
            train_csv,
            "--eval-file",
            dev_csv,
            "--max-seq-length",
            "96",
            "--micro-batch-size",
            "16",
            "--max-steps",
            "16",
            "--learning-rate",
            "2e-3",
            "--log-every",
            "2",
            "--eval-every",
            "8",
            "--ds-config",
            "zero2",
            "--wandb-mode",
            "disabled",
            "--output-dir",
            str(out),
        ]
    )
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r and "eval" not in r]
    assert losses[-1] < losses[0], losses  # MSE falls
    results = json.loads((out / "eval_results.json").read_text())
    assert {"mse", "pearson", "spearman", "step"} <= set(results) and results["step"] == 16
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 48

    # The export is a plain transformers model that knows its task and gives the run's predictions.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = json.loads((out / "final" / "config.json").read_text())
    assert config["bertscale_task"] == f"{EXAMPLE}:PairRegression" and config["problem_type"] == "regression"
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    batch = tokenizer(
        [r["text"] for r in rows],
        [r["text_pair"] for r in rows],
        truncation=True,
        max_length=96,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        reloaded = model(**batch).logits[:, 0]
    torch.testing.assert_close(reloaded, torch.tensor([r["prediction"] for r in rows]), atol=1e-4, rtol=1e-4)

    # predict and evaluate find the task in the model; evaluate runs under torchrun on 2 ranks.
    proc = bertscale_single(
        [
            "predict",
            "--model",
            str(out / "final"),
            "--text",
            rows[0]["text"],
            "--text-pair",
            rows[0]["text_pair"],
            "--max-seq-length",
            "96",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert abs(float(proc.stdout.split("score:")[1]) - rows[0]["prediction"]) < 1e-3
    scored = tmp_path / "scored"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "bertscale",
        "evaluate",
        "--model",
        str(out / "final"),
        "--eval-file",
        dev_csv,
        "--max-seq-length",
        "96",
        "--output-dir",
        str(scored),
    ]
    proc = subprocess.run(torchrun, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((scored / "eval_results.json").read_text())
    assert again["pearson"] == pytest.approx(results["pearson"], abs=1e-4)
