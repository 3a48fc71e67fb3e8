"""Classification end to end on the shared GLUE files: 2 real ranks (ZeRO-2 and ZeRO-3), outputs a
user reads, the exported model through transformers, and early stopping that keeps the best model."""

import json

import pytest
import torch

from conftest import DATA, bertscale, bertscale_single, read_metrics

pytestmark = pytest.mark.slow
SST2, RTE = DATA / "glue" / "SST-2", DATA / "glue" / "RTE"


@pytest.mark.parametrize(
    "ds_config,data,extra",
    [
        ("zero2", SST2, []),
        ("zero3", RTE, ["--text-column", "sentence1", "--text-pair-column", "sentence2"]),
    ],
)
def test_classify_writes_outputs_and_exports(tmp_path, ds_config, data, extra):
    out = tmp_path / "run"
    bertscale(
        [
            "finetune",
            "--task",
            "classify",
            "--model",
            "tiny",
            "--train-file",
            str(data / "train.tsv"),
            "--eval-file",
            str(data / "dev.tsv"),
            "--max-train-samples",
            "256",
            "--max-eval-samples",
            "96",
            "--micro-batch-size",
            "16",
            "--max-steps",
            "8",
            "--learning-rate",
            "1e-3",
            "--log-every",
            "4",
            "--ds-config",
            ds_config,
            "--wandb-mode",
            "disabled",
            "--output-dir",
            str(out),
            *extra,
        ]
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert {"accuracy", "macro_f1", "f1", "confusion_matrix", "labels"} <= set(results)
    assert sum(map(sum, results["confusion_matrix"])) == 96
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 96
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert list(model.config.id2label.values()) == results["labels"]  # label map saved with the model
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    clf = pipeline("text-classification", model=model, tokenizer=tokenizer)
    for row in rows[:12]:
        text = {"text": row["text"], "text_pair": row["text_pair"]} if row.get("text_pair") else row["text"]
        got = clf(text)
        assert (got[0] if isinstance(got, list) else got)["label"] == row["prediction"]
    proc = bertscale_single(
        [
            "predict",
            "--model",
            str(out / "final"),
            "--text",
            rows[0]["text"],
            *(["--text-pair", rows[0]["text_pair"]] if rows[0].get("text_pair") else []),
        ]
    )
    assert proc.returncode == 0 and proc.stdout.startswith(f"label: {rows[0]['prediction']}  probability: ")


def test_early_stopping_exports_the_best_model(tmp_path):
    """A learning rate too small to move accuracy: evaluations stall, the run stops after the
    patience runs out, and final/ is the first (best) evaluated checkpoint, not the last step."""
    out = tmp_path / "run"
    bertscale(
        [
            "finetune",
            "--task",
            "classify",
            "--model",
            "tiny",
            "--train-file",
            str(SST2 / "train.tsv"),
            "--eval-file",
            str(SST2 / "dev.tsv"),
            "--max-train-samples",
            "512",
            "--max-eval-samples",
            "64",
            "--micro-batch-size",
            "8",
            "--max-steps",
            "40",
            "--learning-rate",
            "1e-9",
            "--eval-every",
            "2",
            "--early-stopping-patience",
            "2",
            "--keep",
            "1",
            "--wandb-mode",
            "disabled",
            "--output-dir",
            str(out),
        ]
    )
    evals = [r for r in read_metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]  # stopped after 2 evaluations without improvement
    assert json.loads((out / "eval_results.json").read_text())["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-6"]  # best is kept
    from safetensors.torch import load_file

    from bertscale.checkpoint import consolidated_state_dict

    final = load_file(out / "final" / "model.safetensors")
    best = consolidated_state_dict(out / "checkpoints" / "step-2")
    last = consolidated_state_dict(out / "checkpoints" / "step-6")
    key = "classifier.weight"
    assert torch.equal(final[key], best[key]) and not torch.equal(final[key], last[key])


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--text-column", "review"], "columns found: sentence, label"),
        (["--eval-file", "EMPTY"], "empty"),
    ],
)
def test_bad_classification_input(tmp_path, args, expected):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    proc = bertscale_single(
        [
            "finetune",
            "--task",
            "classify",
            "--model",
            "tiny",
            "--train-file",
            str(SST2 / "train.tsv"),
            "--output-dir",
            str(tmp_path / "o"),
            *args,
        ]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert expected in proc.stderr.lower() or expected in proc.stderr, proc.stderr[-1500:]
