"""Prepared pretraining corpora: the same pairs as the in-memory path, sharded, in parallel, checked on load.

Real files, real tokenizers, real worker processes (spawned pools of 2) and real Arrow files.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertscale import tasks
from bertscale.errors import UserError
from bertscale.models import load_tokenizer
from bertscale.tasks import pretraining_data as data
from bertscale.tasks.masking import IGNORE_INDEX, MaskingCollator
from bertscale.tasks.pretraining_prepare import plan_job, prepare
from bertscale.tasks.pretraining_prepared import (
    interleaved_order,
    load_prepared,
    masked_eval_features,
    prepare_or_reuse,
    prepared_cache_dir,
)

from conftest import DATA, ROOT, cpu_env

CORPUS = DATA / "corpus"
WIKI = str(CORPUS / "wikitext-2-raw" / "wiki.test.raw")
BOOKS = sorted(str(p) for p in (CORPUS / "gutenberg").glob("*.txt"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def rows(dataset) -> dict:
    return dataset[:] if dataset is not None else None


def prepared(tmp_path, tokenizer, name="out", **kw):
    out = tmp_path / name
    settings = {"workers": 1, "log": lambda line: None, **kw}
    manifest = prepare(out, tokenizer, **settings)
    return out, manifest


# --- the same pairs -----------------------------------------------------------------------------
def test_one_shard_gives_the_in_memory_pairs(tmp_path, tokenizer):
    out, manifest = prepared(tmp_path, tokenizer, train_files=[WIKI], document_separator="heading", seed=5, workers=2)
    assert manifest["totals"]["shards"] == 1
    corpus = load_prepared(out, tokenizer, 128)
    docs, _ = data.read_documents([WIKI], "heading", "text")
    train_docs, held_docs = data.hold_out(docs, 5, seed=5)
    assert rows(corpus.train) == data.build_pairs(train_docs, tokenizer, 128, 0.1, seed=5)
    expected_eval = data.build_pairs(held_docs, tokenizer, 128, 0.1, seed=6)
    assert rows(corpus.eval) == expected_eval
    # Fixed evaluation masks, as the in-memory task makes them.
    collator = MaskingCollator.from_tokenizer(tokenizer)
    features = masked_eval_features(corpus.eval, collator, seed=5, max_eval_samples=100)[:]
    masked, labels = collator.fixed_masks(expected_eval["input_ids"][:100], expected_eval["word_start"][:100], 5)
    assert features["input_ids"] == masked and features["labels"] == labels
    assert features["next_sentence_label"] == expected_eval["next_sentence_label"][:100]
    assert sum(t != IGNORE_INDEX for row in labels for t in row) > 1000


def test_eval_files_and_hub_datasets_give_the_in_memory_pairs(tmp_path, tokenizer):
    out, _ = prepared(tmp_path, tokenizer, train_files=[BOOKS[0]], eval_files=[BOOKS[1]], seed=3)
    corpus = load_prepared(out, tokenizer, 128)
    assert rows(corpus.train) == data.build_pairs(
        data.read_documents([BOOKS[0]], "blank-line", "text")[0], tokenizer, 128, 0.1, seed=3
    )  # nothing held out of training
    assert rows(corpus.eval) == data.build_pairs(
        data.read_documents([BOOKS[1]], "blank-line", "text")[0], tokenizer, 128, 0.1, seed=4
    )
    hub = tmp_path / "hub"
    hub.mkdir()
    records = [json.dumps({"text": doc}) + "\n" for doc in data.read_documents([WIKI], "heading", "text")[0]]
    (hub / "train.jsonl").write_text("".join(records))
    docs = data.load_hub_documents(str(hub), None, "text")
    train_docs, held_docs = data.hold_out(docs, 5, seed=1)
    for streaming in (False, True):
        out, _ = prepared(tmp_path, tokenizer, f"hub-{streaming}", dataset=str(hub), streaming=streaming, seed=1)
        corpus = load_prepared(out, tokenizer, 128)
        assert rows(corpus.train) == data.build_pairs(train_docs, tokenizer, 128, 0.1, seed=1)
        assert rows(corpus.eval) == data.build_pairs(held_docs, tokenizer, 128, 0.1, seed=2)


def test_any_number_of_workers_gives_the_same_shards(tmp_path, tokenizer):
    one, m1 = prepared(tmp_path, tokenizer, "one", train_files=BOOKS[:3], shard_size_mb=0.25, workers=1)
    two, m2 = prepared(tmp_path, tokenizer, "two", train_files=BOOKS[:3], shard_size_mb=0.25, workers=2)
    assert m1["totals"]["shards"] >= 6 and m1["fingerprint"] == m2["fingerprint"]
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in m1["shards"]] == [
        {k: v for k, v in s.items() if k != "seconds"} for s in m2["shards"]
    ]
    for shard in m1["shards"]:
        for split in ("train", "eval"):
            if shard[split]:
                path = shard[split]["path"]
                assert (one / path).read_bytes() == (two / path).read_bytes(), path


def test_nsp_share_and_lengths_hold_across_shards(tmp_path, tokenizer):
    docs, _ = data.read_documents([WIKI], "heading", "text")
    whole = data.build_pairs(docs, tokenizer, 128, 0.1, seed=0)
    out, manifest = prepared(
        tmp_path,
        tokenizer,
        train_files=[WIKI],
        document_separator="heading",
        shard_size_mb=0.15,
        validation_split_percentage=0,
        seed=0,
        workers=2,
    )
    assert manifest["totals"]["shards"] >= 8 and manifest["totals"]["documents"] == len(docs)
    train = rows(load_prepared(out, tokenizer, 128).train)
    assert abs(len(train["input_ids"]) - len(whole["input_ids"])) < 0.03 * len(whole["input_ids"])
    share = sum(train["next_sentence_label"]) / len(train["next_sentence_label"])
    assert 0.45 <= share <= 0.56 and manifest["totals"]["random_next_share"] == pytest.approx(share, abs=1e-4)

    def mean_length(cols):
        return sum(map(len, cols["input_ids"])) / len(cols["input_ids"])

    assert mean_length(train) == pytest.approx(mean_length(whole), rel=0.02)
    for ids, types in zip(train["input_ids"], train["token_type_ids"]):
        seps = [i for i, t in enumerate(ids) if t == tokenizer.sep_token_id]
        assert len(ids) <= 128 and ids[0] == tokenizer.cls_token_id and len(seps) == 2 and seps[1] == len(ids) - 1
        assert types == [0] * (seps[0] + 1) + [1] * (len(ids) - seps[0] - 1)


def test_held_out_share_across_many_shards(tmp_path, tokenizer):
    out, manifest = prepared(tmp_path, tokenizer, train_files=BOOKS, shard_size_mb=0.1, seed=2, workers=2)
    totals = manifest["totals"]
    assert totals["shards"] >= 20
    assert 0.04 < totals["held_out_documents"] / totals["documents"] < 0.06  # not one document per shard
    corpus = load_prepared(out, tokenizer, 128)
    assert len(corpus.eval) == totals["eval_rows"] and len(corpus.train) == totals["train_rows"]
    # The first evaluation pairs come from every shard, not only from the first one.
    first = masked_eval_features(corpus.eval, MaskingCollator.from_tokenizer(tokenizer), 2, max_eval_samples=20)
    shard_rows = [s["eval"]["rows"] for s in manifest["shards"] if s["eval"]]
    assert len(first) == 20 and len(shard_rows) >= 15


def test_interleaved_order():
    assert interleaved_order([3, 1, 2]).tolist() == [0, 3, 4, 1, 5, 2]
    assert interleaved_order([4]).tolist() == [0, 1, 2, 3]


# --- bad input ----------------------------------------------------------------------------------
def test_concatenated_gutenberg_books_are_all_prepared(tmp_path, tokenizer):
    joined = tmp_path / "books.txt"
    joined.write_bytes(b"".join(Path(b).read_bytes() for b in BOOKS))
    _, manifest = prepared(tmp_path, tokenizer, train_files=[str(joined)], document_separator="file")
    per_book = [data.read_file_documents(Path(b), "file", "text")[0] for b in BOOKS]
    assert manifest["totals"]["documents"] == 4
    assert manifest["totals"]["characters"] == sum(map(len, per_book))


def test_prepared_data_made_for_another_tokenizer_or_length_is_refused(tmp_path, tokenizer):
    from transformers import BertTokenizer

    def bert_tokenizer(vocab: str, lower: bool):
        folder = tmp_path / f"{vocab}-{lower}"
        folder.mkdir()
        (folder / "vocab.txt").write_bytes((DATA / "vocab" / f"bert-base-{vocab}-vocab.txt").read_bytes())
        return BertTokenizer.from_pretrained(str(folder), do_lower_case=lower)

    out, _ = prepared(tmp_path, tokenizer, train_files=[BOOKS[0]], max_seq_length=64)
    with pytest.raises(
        UserError,
        match=r"prepared with tokenizer .*30522 tokens.* has tokenizer .*cased-False' "
        r"\(BertTokenizer, 28996 tokens.*Prepare again with --model",
    ):
        load_prepared(out, bert_tokenizer("cased", False), 64)
    with pytest.raises(UserError, match=r"prepared with tokenizer"):  # the same vocabulary, but not lower-cased
        load_prepared(out, bert_tokenizer("uncased", False), 64)
    assert len(load_prepared(out, bert_tokenizer("uncased", True), 64).train) > 100  # the same ids: accepted
    with pytest.raises(UserError, match=r"prepared with --max-seq-length 64, but this run uses 128"):
        load_prepared(out, tokenizer, 128)
    assert len(load_prepared(out, tokenizer, 64).train) > 100
    with pytest.raises(UserError, match=r"--prepared-data .*nowhere: no such directory.*bertscale prepare"):
        load_prepared(tmp_path / "nowhere", tokenizer, 64)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"not a finished prepared corpus \(no manifest.json\): it was not made by"):
        load_prepared(tmp_path / "plain", tokenizer, 64)
    shard = next((out / "train").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"shard train/.*\.arrow has 1000 bytes, not \d+: the directory is damaged"):
        load_prepared(out, tokenizer, 64)


def test_output_dir_with_other_content_is_refused(tmp_path, tokenizer):
    out, first = prepared(tmp_path, tokenizer, train_files=[BOOKS[0]])
    again = prepare(out, tokenizer, train_files=[BOOKS[0]], workers=1, log=lambda line: None)
    assert again["fingerprint"] == first["fingerprint"] and again["created"] == first["created"]  # reused, not redone
    with pytest.raises(UserError, match=r"holds a corpus prepared from other inputs or settings.*--overwrite"):
        prepare(out, tokenizer, train_files=[BOOKS[0]], seed=7, workers=1)
    replaced = prepare(out, tokenizer, train_files=[BOOKS[0]], seed=7, workers=1, overwrite=True, log=lambda line: None)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == replaced["fingerprint"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"mine: exists and is not a prepared corpus"):
        prepare(tmp_path / "mine", tokenizer, train_files=[BOOKS[0]], workers=1, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_file_mid_corpus_is_named_and_nothing_is_published(tmp_path, tokenizer):
    bad = tmp_path / "zz-latin.txt"
    bad.write_bytes("Un caf\xe9.\n".encode("latin-1"))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"zz-latin\.txt: not UTF-8 text \(line 1, byte 6\)"):
        prepare(out, tokenizer, train_files=[*BOOKS[:2], str(bad)], shard_size_mb=0.2, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zz-latin.txt"]  # no output, no staging left
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match=r"--train-files '.*empty\.txt': 1 file, 0.0 MB: 0 documents with text"):
        prepare(out, tokenizer, train_files=[str(empty)], workers=1)
    assert not out.exists()


def test_killed_prepare_leaves_nothing_a_run_trusts(tmp_path, tokenizer):
    out = tmp_path / "out"
    files = [WIKI, *BOOKS]
    script = (
        f"from bertscale.tasks.pretraining_prepare import prepare\n"
        f"if __name__ == '__main__':\n"
        f"    prepare({str(out)!r}, 'tiny', train_files={files!r}, shard_size_mb=0.3, workers=1)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.prepare-*/train/*.arrow")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    out.mkdir()  # even a directory created by hand where the corpus was going is refused on load
    with pytest.raises(UserError, match=r"no manifest.json\): a `bertscale prepare` into it was interrupted"):
        load_prepared(out, tokenizer, 128)
    out.rmdir()
    manifest = prepare(out, tokenizer, train_files=files, shard_size_mb=0.3, workers=2, log=lambda line: None)
    assert manifest["totals"]["shards"] >= 10 and not list(tmp_path.glob(".out.prepare-*"))
    assert len(load_prepared(out, tokenizer, 128).train) == manifest["totals"]["train_rows"]


# --- the cache of pretrain --train-files --------------------------------------------------------
def run_ranks(cache: Path, corpus: dict, ranks: int = 2) -> list[subprocess.CompletedProcess]:
    """prepare_or_reuse in `ranks` processes at once, as the ranks of a training run call it."""
    script = (
        "import sys\nfrom bertscale.tasks.pretraining_prepared import prepare_or_reuse\n"
        "if __name__ == '__main__':\n"
        f"    print(prepare_or_reuse('tiny', cache_root={str(cache)!r}, rank=int(sys.argv[1]), world_size={ranks}, "
        f"workers=1, poll_s=0.2, **{corpus!r}))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r)],
            cwd=ROOT,
            env=cpu_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(ranks)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_cache_is_keyed_by_fingerprint_and_prepared_once_across_ranks(tmp_path, tokenizer):
    corpus = {"train_files": [WIKI, *BOOKS[:2]], "shard_size_mb": 0.5, "seed": 3}
    cache = tmp_path / "cache"
    done = run_ranks(cache, corpus)
    assert [r.returncode for r in done] == [0, 0], [r.stderr for r in done]
    expected = prepared_cache_dir(plan_job(tmp_path, tokenizer, **corpus).fingerprint, cache)
    assert [r.stdout.strip().splitlines()[-1] for r in done] == [str(expected)] * 2
    assert "part 0 of 2" in done[0].stdout and "part 1 of 2" in done[1].stdout
    # The same shards as one process preparing everything; the next run reuses them without work.
    _, whole = prepared(tmp_path, tokenizer, **corpus)
    cached = json.loads((expected / "manifest.json").read_text())
    assert cached["fingerprint"] == whole["fingerprint"]
    assert [s["train"] for s in cached["shards"]] == [s["train"] for s in whole["shards"]]
    started = time.monotonic()
    assert prepare_or_reuse(tokenizer, cache_root=cache, log=lambda line: None, **corpus) == expected
    assert time.monotonic() - started < 5
    touched = tmp_path / "book.txt"
    touched.write_bytes(Path(BOOKS[0]).read_bytes())
    fingerprints = {
        plan_job(tmp_path, tokenizer, train_files=[str(touched)], **kw).fingerprint
        for kw in ({}, {"seed": 1}, {"max_seq_length": 64}, {"document_separator": "file"})
    }
    os.utime(touched, ns=(0, 0))
    fingerprints.add(plan_job(tmp_path, tokenizer, train_files=[str(touched)]).fingerprint)
    assert len(fingerprints) == 5


def test_a_rank_that_fails_names_the_file_and_stops_the_others(tmp_path):
    (tmp_path / "a.txt").write_text("A first document. It has two sentences.\n\nAnother one here.\n" * 3000)
    (tmp_path / "b.txt").write_bytes("Un caf\xe9 noir.\n".encode("latin-1") * 200)
    cache = tmp_path / "cache"
    done = run_ranks(cache, {"train_files": [str(tmp_path / "*.txt")], "shard_size_mb": 0.1})
    assert [r.returncode for r in done] == [1, 1]
    own, relayed = sorted((r.stderr.strip().splitlines()[-1] for r in done), key=lambda e: "another rank" in e)
    assert "b.txt: not UTF-8 text (line 1, byte 6)" in own and "another rank" not in own, own
    assert "failed on another rank: " in relayed and "b.txt: not UTF-8 text" in relayed, relayed
    assert not list(cache.glob("pretraining/*/manifest.json"))


def pretrain_task(tokenizer, **flags):
    return tasks.build(tasks.make_run("pretrain", model="tiny", **flags), tokenizer)


def test_pretrain_trains_from_the_cache_of_its_train_files(tmp_path, tokenizer):
    flags = dict(train_files=(BOOKS[0],), max_seq_length=64, prepared_cache=str(tmp_path), seed=4)
    task = pretrain_task(tokenizer, **flags, max_train_samples=100, max_eval_samples=30)
    note = task.prepare_train_data(0, 1)
    assert note.startswith(f"pretrain: training on --train-files as prepared in {tmp_path}/pretraining/")
    train, eval_set = task.train_features(), task.eval_set()
    assert len(train) == 100 and len(eval_set.features) == 30
    docs, _ = data.read_documents([BOOKS[0]], "blank-line", "text")
    train_docs, held_docs = data.hold_out(docs, 5, seed=4)
    assert train[:] == {k: v[:100] for k, v in data.build_pairs(train_docs, tokenizer, 64, 0.1, seed=4).items()}
    assert task.describe_train_data(100).startswith(
        f"--train-files {BOOKS[0]!r}: 1 file, {len(docs)} documents with text ({len(held_docs)} held out"
    )
    again = pretrain_task(tokenizer, **flags)  # a requeued run: the same directory, nothing prepared again
    started = time.monotonic()
    assert again.prepare_train_data(0, 1) == note and time.monotonic() - started < 5


def test_pretrain_from_prepared_data_and_the_flags_it_refuses(tmp_path, tokenizer):
    out, manifest = prepared(tmp_path, tokenizer, train_files=[BOOKS[0]], max_seq_length=64, seed=9, short_seq_prob=0.2)
    task = pretrain_task(tokenizer, prepared_data=str(out))
    note = task.prepare_train_data(0, 1)
    assert note.startswith(f"pretrain: training on --prepared-data {out} (made {manifest['created']};")
    assert "pairs were made with --seed 9, this run's --seed 42 orders and masks them" in note
    assert task.max_seq_length == 64 and len(task.train_features()) == manifest["totals"]["train_rows"]
    assert task.describe_train_data(5).startswith(f"--prepared-data {out}: 1 shard, ")
    same = dict(prepared_data=str(out), short_seq_prob=0.2, validation_split_percentage=5.0, max_seq_length=64)
    assert pretrain_task(tokenizer, **same).prepare_train_data(1, 2) is not None  # the values it was made with
    refused = {
        "--train-files would be another": dict(train_files=(BOOKS[1],)),
        "--dataset and --streaming would be another": dict(dataset="x", streaming=True),
        r"holds its own \d+ evaluation pairs \(from documents held out of its text\); --eval-files": dict(
            eval_files=(BOOKS[1],)
        ),
        "prepared with --short-seq-prob 0.2, --document-separator blank-line; this run's --short-seq-prob 0.3, "
        "--document-separator file cannot change its pairs": dict(short_seq_prob=0.3, document_separator="file"),
    }
    for message, flags in refused.items():
        with pytest.raises(UserError, match=message) as e:
            pretrain_task(tokenizer, prepared_data=str(out), **flags).prepare_train_data(1, 2)
        assert not e.value.echo  # every rank meets it: only the first says it
    with pytest.raises(UserError, match="prepared with --max-seq-length 64, but this run uses 128"):
        pretrain_task(tokenizer, prepared_data=str(out), max_seq_length=128).train_features()


# --- the CLI --------------------------------------------------------------------------------------
def test_cli_prepare(tmp_path, tokenizer):
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "bertscale", "prepare", "--task", "pretrain", "--model", "tiny"]
    flags = ["--train-files", BOOKS[0], "--output-dir", str(out), "--preprocessing-workers", "1"]
    done = subprocess.run(
        [*cmd, *flags, "--max-seq-length", "64"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"prepared {out}: 1470 documents (74 held out)" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["max_seq_length"] == 64 and manifest["tokenizer"]["vocab_size"] == len(tokenizer)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    # --task left out: pretrain is the one task that prepares
    done = subprocess.run(
        [*cmd[:4], "--model", "tiny", "--train-files", str(bad), "--output-dir", str(tmp_path / "x")],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"bertscale: error: {bad}: not UTF-8 text (line 1, byte 0). "
        "Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), or leave it out."
    ]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_two_ranks_learn_from_prepared_data(tmp_path, tokenizer):
    from conftest import bertscale, read_metrics, train_rows

    prepared_dir, _ = prepared(
        tmp_path,
        tokenizer,
        train_files=[WIKI],
        document_separator="heading",
        max_seq_length=64,
        shard_size_mb=0.3,
        workers=2,
    )
    out = tmp_path / "run"
    args = ["pretrain", "--model", "tiny", "--prepared-data", str(prepared_dir), "--micro-batch-size", "16"]
    args += ["--max-steps", "30", "--learning-rate", "2e-3", "--warmup-ratio", "0.05", "--log-every", "5"]
    args += ["--eval-on-start", "--max-eval-samples", "256", "--wandb-mode", "disabled", "--output-dir", str(out)]
    proc = bertscale(args)  # --max-seq-length left out: the prepared corpus's 64
    assert proc.stderr.count(f"[bertscale] pretrain: training on --prepared-data {prepared_dir}") == 1
    rows = train_rows(out)
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"] - 1.0
    evals = [r for r in read_metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 30] and evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"] - 1.0
    config = json.loads((out / "run_config.json").read_text())["run"]
    assert config["prepared_data"] == str(prepared_dir) and config["max_seq_length"] is None
