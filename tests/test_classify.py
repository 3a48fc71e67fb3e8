"""Classification task: GLUE TSV loading, columns, label maps, metrics, and a tiny BERT forward pass."""

import json
import math
from pathlib import Path

import pytest
import torch

from bertscale import tasks
from bertscale.errors import UserError
from bertscale.models import build_model, load_tokenizer
from bertscale.tasks.classify import ClassifyTask, predict_texts
from bertscale.tasks.classify_metrics import classification_metrics

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
SST2, RTE = GLUE / "SST-2", GLUE / "RTE"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def make_run(**kw):
    kw.setdefault("preprocessing_workers", 1)
    return tasks.make_run(**kw)


def task_of(run, tokenizer, id2label=None) -> ClassifyTask:
    """The run's task; with `id2label`, as evaluation builds it for a trained model."""
    return (
        ClassifyTask(tokenizer, id2label=id2label, **tasks.settings(run)) if id2label else tasks.build(run, tokenizer)
    )


def tsv_rows(path: Path, n: int) -> list[list[str]]:
    """The first n data rows, split on tabs exactly as GLUE means them."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : n + 1]
    return [line.split("\t") for line in lines]


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- loading -----------------------------------------------------------------------------------
def test_sst2_single_sentences_from_local_tsv(tokenizer):
    task = task_of(make_run(task="glue:sst2", train_file=str(SST2 / "train.tsv"), max_train_samples=5), tokenizer)
    assert task.labels == ["0", "1"]
    assert task.main_metric == "accuracy" and task.greater_is_better
    features = task.train_features()
    assert len(features) == 5
    assert set(features.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    for row, (sentence, label) in zip(features, tsv_rows(SST2 / "train.tsv", 5)):
        assert row["input_ids"] == tokenizer(sentence, truncation=True, max_length=128)["input_ids"]
        assert row["labels"] == int(label)
        assert set(row["token_type_ids"]) == {0}


def test_rte_pairs_keep_quotes_and_map_label_names(tokenizer):
    run = make_run(
        task="glue:rte",
        train_file=str(RTE / "train.tsv"),
        eval_file=str(RTE / "dev.tsv"),
        max_eval_samples=20,
        max_seq_length=64,
    )
    task = task_of(run, tokenizer)
    assert task.labels == ["entailment", "not_entailment"]
    assert task.model_config_overrides() == {
        "num_labels": 2,
        "id2label": {0: "entailment", 1: "not_entailment"},
        "label2id": {"entailment": 0, "not_entailment": 1},
    }
    train = task.train_features()
    expected = tsv_rows(RTE / "train.tsv", 13)
    assert len(train) == 2490
    # Row 12 holds bare double quotes ("extensive"): TSV must not treat them as CSV quoting.
    assert '"extensive"' in expected[12][1]
    for i in (0, 12):
        _, s1, s2, label = expected[i]
        assert train[i]["input_ids"] == tokenizer(s1, s2, truncation=True, max_length=64)["input_ids"]
        assert train[i]["labels"] == task.labels.index(label)
        assert 1 in train[i]["token_type_ids"]
    assert max(len(ids) for ids in train["input_ids"]) == 64
    eval_set = task.eval_set()
    assert len(eval_set.features) == 20
    dev = tsv_rows(RTE / "dev.tsv", 20)
    assert eval_set.examples.texts == [r[1] for r in dev] and eval_set.examples.pairs == [r[2] for r in dev]


def test_csv_and_jsonl_files_with_default_columns(tmp_path, tokenizer):
    csv_file = write(tmp_path / "t.csv", 'text,label\n"good, really",pos\nbad,neg\nNA,pos\n')
    task = task_of(make_run(task="classify", train_file=csv_file), tokenizer)
    assert task.labels == ["neg", "pos"]
    rows = task.train_features()
    assert rows["labels"] == [1, 0, 1]
    assert rows[0]["input_ids"] == tokenizer("good, really")["input_ids"]
    assert rows[2]["input_ids"] == tokenizer("NA")["input_ids"]  # 'NA' is text, not a missing value

    lines = [
        {"sentence1": "a cat", "sentence2": "an animal", "label": 10},
        {"sentence1": "a dog", "sentence2": "a plant", "label": 2},
        {"sentence1": "x", "sentence2": "y", "label": 1},
    ]
    jsonl = write(tmp_path / "t.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    task = task_of(make_run(task="classify", train_file=jsonl), tokenizer)
    assert task.labels == ["1", "2", "10"]  # numeric labels keep numeric order
    rows = task.train_features()
    assert rows["labels"] == [2, 1, 0]
    assert rows[0]["input_ids"] == tokenizer("a cat", "an animal")["input_ids"]


def test_explicit_columns_and_column_errors(tmp_path, tokenizer):
    path = write(tmp_path / "d.tsv", "id\tpremise\thypo\tgold\n1\tit rains\tit is wet\tyes\n2\tsun\tnight\tno\n")
    run = make_run(
        task="classify", train_file=path, text_column="premise", text_pair_column="hypo", label_column="gold"
    )
    rows = task_of(run, tokenizer).train_features()
    assert rows[0]["input_ids"] == tokenizer("it rains", "it is wet")["input_ids"] and rows["labels"] == [1, 0]

    with pytest.raises(
        UserError,
        match=r"d\.tsv: no column 'sentence' or 'text'; columns found: "
        r"id, premise, hypo, gold",
    ):
        task_of(make_run(task="classify", train_file=path), tokenizer).train_features()
    bad = make_run(task="classify", train_file=path, text_column="premise", label_column="lab")
    with pytest.raises(UserError, match=r"d\.tsv: no column 'lab' \(--label-column\); columns found: id, premise"):
        task_of(bad, tokenizer).train_features()


def test_bad_files_are_user_errors_naming_the_file(tmp_path, tokenizer):
    cases = {
        "empty.tsv": ("", "the file is empty"),
        "header.tsv": ("sentence\tlabel\n", "a header but no rows"),
        "ragged.tsv": ("sentence\tlabel\nok\t1\ntoo\tmany\tfields\n", "cannot read it as TSV"),
        "data.txt": ("sentence\tlabel\n", "unknown file type"),
    }
    for name, (content, message) in cases.items():
        path = write(tmp_path / name, content)
        with pytest.raises(UserError, match=f"{name}: .*{message}"):
            task_of(make_run(task="classify", train_file=path), tokenizer).train_features()

    one_label = write(tmp_path / "one.tsv", "sentence\tlabel\na\tx\nb\tx\n")
    with pytest.raises(UserError, match="one.tsv: only the label .* at least two"):
        task_of(make_run(task="classify", train_file=one_label), tokenizer).train_features()


def test_eval_label_not_seen_in_training(tmp_path, tokenizer):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\tpos\nb\tneg\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\nc\tpos\nd\tneutral\n")
    task = task_of(make_run(task="classify", train_file=train, eval_file=dev), tokenizer)
    with pytest.raises(
        UserError,
        match=r"dev\.tsv: label\(s\) 'neutral' not among the labels the model knows "
        r"\(neg, pos\)",
    ):
        task.eval_set()


def test_evaluation_only_takes_labels_from_the_model_config(tokenizer):
    # 'classify' (not glue:rte, which would go to the hub for its training split)
    run = make_run(task="classify", eval_file=str(RTE / "dev.tsv"), max_eval_samples=6)
    with pytest.raises(UserError, match="no training data to take the labels from"):
        task_of(run, tokenizer).eval_set()
    # JSON-saved configs may carry string keys.
    task = task_of(run, tokenizer, id2label={"1": "not_entailment", "0": "entailment"})
    eval_set = task.eval_set()
    dev = tsv_rows(RTE / "dev.tsv", 6)
    assert eval_set.features["labels"] == [["entailment", "not_entailment"].index(r[3]) for r in dev]


def test_task_names_and_main_metric(tokenizer):
    assert tasks.resolve("classify") is ClassifyTask and tasks.resolve("glue:mrpc") is ClassifyTask
    assert tasks.resolve("squad") is not ClassifyTask
    with pytest.raises(UserError, match="unknown GLUE task; choose one of glue:sst2"):
        tasks.resolve("glue:sts")
    assert task_of(make_run(task="glue:mrpc"), tokenizer).main_metric == "f1"
    assert task_of(make_run(task="glue:qqp", metric_for_best="macro_f1"), tokenizer).main_metric == "macro_f1"
    with pytest.raises(UserError, match="--metric-for-best em"):
        task_of(make_run(task="classify", metric_for_best="em"), tokenizer)
    with pytest.raises(UserError, match="metric f1 needs two labels, found 3"):
        task_of(make_run(task="classify", metric_for_best="f1"), tokenizer, id2label={0: "a", 1: "b", 2: "c"})


# --- metrics -----------------------------------------------------------------------------------
def test_binary_metrics_worked_by_hand():
    # true 0 0 1 1 1, predicted 0 1 1 1 0: TP(1)=2, FP(1)=1, FN(1)=1; TP(0)=1, FP(0)=1, FN(0)=1
    m = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2/3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 * 1 / (2 + 1 + 1)) / 2)  # (2/3 + 1/2) / 2
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["labels"] == ["neg", "pos"]


def test_multiclass_metrics_skip_absent_labels_and_have_no_binary_f1():
    # label 'c' is neither true nor predicted: macro-F1 averages over a and b only.
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 0], ["a", "b", "c"])
    assert "f1" not in m
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    m = classification_metrics([2, 2, 0], [2, 1, 0], ["a", "b", "c"])
    # a: F1 1; b: never true, predicted once: F1 0; c: TP 1, FN 1: F1 2/3
    assert m["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


# --- model -------------------------------------------------------------------------------------
def test_tiny_model_forward_eval_metrics_and_predictions(tmp_path, tokenizer):
    run = make_run(
        task="glue:rte",
        train_file=str(RTE / "train.tsv"),
        eval_file=str(RTE / "dev.tsv"),
        max_train_samples=8,
        max_eval_samples=5,
        max_seq_length=48,
    )
    task = task_of(run, tokenizer)
    torch.manual_seed(0)
    model = build_model("tiny", task.model_class(), **task.model_config_overrides())
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}

    train = task.train_features()
    batch = task.collate([train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 48)
    assert batch["labels"].tolist() == train["labels"][:4]
    out = model(**batch)
    assert out.logits.shape == (4, 2) and math.isfinite(out.loss.item())
    out.loss.backward()  # labels fit the head: a real gradient reaches the classifier
    assert model.classifier.weight.grad.abs().sum() > 0

    model.eval()
    eval_set = task.eval_set()
    rows = [eval_set.features[i] for i in range(len(eval_set.features))]
    outputs = {"logits": [], "labels": []}
    with torch.no_grad():
        for chunk in (rows[:3], rows[3:]):
            batch = task.collate(chunk)
            for key, values in task.eval_outputs(model(**batch), batch).items():
                outputs[key] += values
    metrics = task.compute_metrics(eval_set, outputs, tmp_path)
    predicted = [int(x.argmax()) for x in outputs["logits"]]
    assert metrics["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, outputs["labels"])) / 5)
    assert sum(map(sum, metrics["confusion_matrix"])) == 5 and "f1" in metrics

    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    dev = tsv_rows(RTE / "dev.tsv", 5)
    assert [x["text"] for x in lines] == [r[1] for r in dev] and [x["label"] for x in lines] == [r[3] for r in dev]
    assert [x["prediction"] for x in lines] == [task.labels[p] for p in predicted]
    assert all(0.5 <= x["probability"] <= 1 for x in lines)

    # predict_texts: same answers one by one as in a padded batch, from the config's label names
    texts, pairs = [r[1] for r in dev[:3]], [r[2] for r in dev[:3]]
    together = predict_texts(model, tokenizer, texts, pairs)
    alone = [predict_texts(model, tokenizer, [t], [p])[0] for t, p in zip(texts, pairs)]
    assert [name for name, _ in together] == [name for name, _ in alone]
    assert [p for _, p in together] == pytest.approx([p for _, p in alone], abs=1e-5)
    assert all(name in task.labels for name, _ in together)
    with pytest.raises(UserError, match="2 --text but 1 --text-pair"):
        predict_texts(model, tokenizer, texts[:2], pairs[:1])
