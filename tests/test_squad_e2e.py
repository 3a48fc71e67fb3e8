"""SQuAD end to end: 2 real ranks (ZeRO-2 and ZeRO-3), tiny BERT, real SQuAD files; every output a
user reads, scored again by the official v1.1 script and reloaded through transformers."""

import json
import subprocess
import sys

import pytest
from official.evaluate_v1_1 import evaluate as official_v1

from conftest import ROOT, SQUAD, bertscale, cpu_env, read_metrics, train_rows

pytestmark = pytest.mark.slow
N_EVAL = 120
COMMON = [
    "finetune",
    "--task",
    "squad",
    "--model",
    "tiny",
    "--train-file",
    str(SQUAD / "train-v1.1-first44.json"),
    "--eval-file",
    str(SQUAD / "dev-v1.1-part1.json"),
    "--max-train-samples",
    "240",
    "--max-eval-samples",
    str(N_EVAL),
    "--max-seq-length",
    "256",
    "--doc-stride",
    "128",
    "--micro-batch-size",
    "8",
    "--max-steps",
    "14",
    "--learning-rate",
    "1e-3",
    "--log-every",
    "2",
    "--eval-every",
    "7",
    "--save-every",
    "7",
]


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def run_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    proc = bertscale(COMMON + ["--ds-config", request.param, "--output-dir", str(out)])
    out.joinpath("stdout.txt").write_text(proc.stdout + proc.stderr)
    return out


def first_questions(path, n):
    data = json.loads(path.read_text())["data"]
    kept, count = [], 0
    for article in data:
        paragraphs = []
        for p in article["paragraphs"]:
            qas = p["qas"][: max(0, n - count)]
            count += len(qas)
            if qas:
                paragraphs.append({**p, "qas": qas})
        if paragraphs:
            kept.append({**article, "paragraphs": paragraphs})
    return kept


def test_all_outputs_written(run_dir):
    for name in (
        "predictions.json",
        "eval_results.json",
        "metrics.jsonl",
        "run_config.json",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer_config.json",
        "checkpoints/latest",
    ):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["run"]["model"] == "tiny" and config["world_size"] == 2
    assert config["deepspeed"]["train_batch_size"] == 16  # micro 8 x 2 ranks, "auto" filled
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(2, 15, 2))
    for key in ("step", "epoch", "loss", "lr", "samples_per_s"):
        assert all(key in r for r in rows), key
    evals = [r for r in read_metrics(run_dir) if "eval" in r]
    assert [r["step"] for r in evals] == [7, 14] and "eval_f1" in evals[0]
    assert "final: exact_match=" in (run_dir / "stdout.txt").read_text()


def test_eval_results_match_official_script(run_dir):
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert len(predictions) == N_EVAL
    official = official_v1(first_questions(SQUAD / "dev-v1.1-part1.json", N_EVAL), predictions)
    ours = json.loads((run_dir / "eval_results.json").read_text())
    assert round(ours["exact_match"], 2) == round(official["exact_match"], 2)
    assert round(ours["f1"], 2) == round(official["f1"], 2)
    assert ours["f1"] > 0  # the tiny model learned to point into the context at all


def test_exported_model_scores_the_same_through_evaluate(run_dir, tmp_path):
    """final/ holds the gathered weights (ZeRO-3 included): re-scoring it without DeepSpeed
    training gives the eval results the engine produced."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bertscale",
            "evaluate",
            "--task",
            "squad",
            "--model",
            str(run_dir / "final"),
            "--eval-file",
            str(SQUAD / "dev-v1.1-part1.json"),
            "--max-eval-samples",
            str(N_EVAL),
            "--max-seq-length",
            "256",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval_results.json").read_text())
    ours = json.loads((run_dir / "eval_results.json").read_text())
    assert again["f1"] == pytest.approx(ours["f1"], abs=1e-6)
    assert json.loads((tmp_path / "predictions.json").read_text()) == json.loads(
        (run_dir / "predictions.json").read_text()
    )


def test_predict_gives_the_same_answers(run_dir):
    """transformers 5 removed the question-answering pipeline; `bertscale predict` is its
    replacement: plain from_pretrained model, one question at a time, same answers as the run."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from bertscale import tasks
    from bertscale.tasks.squad import answer

    model = AutoModelForQuestionAnswering.from_pretrained(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    predictions = json.loads((run_dir / "predictions.json").read_text())
    task = tasks.build(tasks.make_run("squad", max_seq_length=256, doc_stride=128), tokenizer)
    questions = [
        (q["id"], q["question"], p["context"])
        for a in first_questions(SQUAD / "dev-v1.1-part1.json", 30)
        for p in a["paragraphs"]
        for q in p["qas"]
    ]
    with torch.no_grad():
        got = {qid: answer(model, tokenizer, question, context, task)[0] for qid, question, context in questions}
    assert got == {qid: predictions[qid] for qid, _, _ in questions}
    qid, question, context = questions[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bertscale",
            "predict",
            "--model",
            str(run_dir / "final"),
            "--question",
            question,
            "--context",
            context,
            "--max-seq-length",
            "256",
        ],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.startswith(f"answer: {predictions[qid]!r}  score: "), proc.stdout


def test_unpadded_by_default_and_its_exports_load_in_stock_transformers(run_dir, tmp_path):
    """The run trained the unpadded model (the default) and said which attention kernel it used; its
    final/ and a `bertscale export` of its newest checkpoint name and load the stock class."""
    from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering

    log = (run_dir / "stdout.txt").read_text()
    assert "[bertscale] unpadded attention on cpu/float32: cpu_rows in training (attention dropout 0.1" in log
    proc = subprocess.run(
        [sys.executable, "-m", "bertscale", "export", "--checkpoint", str(run_dir), "--output", str(tmp_path / "hf")],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model_dir in (run_dir / "final", tmp_path / "hf"):
        assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
        assert type(AutoModelForQuestionAnswering.from_pretrained(model_dir)) is BertForQuestionAnswering
