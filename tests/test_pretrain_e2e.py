"""MLM/NSP pretraining end to end: 2 real ranks on WikiText (ZeRO-2 and ZeRO-3), losses fall, the
held-out evaluation runs, and final/ feeds straight into SQuAD fine-tuning."""

import json

import pytest

from conftest import DATA, bertscale, bertscale_single, read_metrics, train_rows

pytestmark = pytest.mark.slow
WIKI = str(DATA / "corpus" / "wikitext-2-raw" / "wiki.test.raw")


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_pretrain_learns_and_exports(tmp_path, ds_config):
    out = tmp_path / "pt"
    proc = bertscale(
        [
            "pretrain",
            "--model",
            "tiny",
            "--train-files",
            WIKI,
            "--document-separator",
            "heading",
            "--max-seq-length",
            "64",
            "--micro-batch-size",
            "16",
            "--max-steps",
            "30",
            "--learning-rate",
            "2e-3",
            "--warmup-ratio",
            "0.05",
            "--log-every",
            "5",
            "--eval-on-start",
            "--max-eval-samples",
            "256",
            "--ds-config",
            ds_config,
            "--wandb-mode",
            "disabled",
            "--output-dir",
            str(out),
        ]
    )
    # The text was prepared into the cache once, by both ranks, and rank 0 says where it trains from.
    assert proc.stderr.count("[bertscale] pretrain: training on --train-files as prepared in ") == 1
    rows = train_rows(out)
    assert all("mlm_loss" in r and "nsp_loss" in r for r in rows)
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"] - 1.0
    evals = [r for r in read_metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"] - 1.0
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("mlm_loss", "mlm_accuracy", "perplexity", "nsp_accuracy", "mlm_majority_baseline"):
        assert key in results
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    from transformers import AutoModelForQuestionAnswering, BertForPreTraining

    pre = BertForPreTraining.from_pretrained(out / "final")
    assert pre.cls.predictions.decoder.weight.data_ptr() == pre.bert.embeddings.word_embeddings.weight.data_ptr()
    qa = AutoModelForQuestionAnswering.from_pretrained(out / "final")  # what finetune --model OUT/final loads
    assert (
        qa.bert.encoder.layer[0].attention.self.query.weight == pre.bert.encoder.layer[0].attention.self.query.weight
    ).all()


def test_corpus_errors_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for files, expected in ((str(tmp_path / "nothing-*.txt"), "nothing-*.txt"), (str(empty), "empty.txt")):
        proc = bertscale_single(
            ["pretrain", "--model", "tiny", "--train-files", files, "--output-dir", str(tmp_path / "out")]
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()
