"""Continued MLM/NSP pretraining of BERT (transformers' BertForPreTraining).

Documents come from local text files (--train-files), a corpus made by `bertscale prepare`
(--prepared-data) or a hub dataset (--dataset, optionally streamed). Text files are prepared once
into a cache (pretraining_prepare.py, keyed by a fingerprint of the files and settings) and, like a
prepared corpus, memory-mapped (pretraining_prepared.py); a hub dataset is read into memory, or
streamed, by pretraining_data.py. masking.py masks each batch afresh. Evaluation uses held-out
documents with masks fixed once from --seed, so evaluations of one run (and of runs with different
batch sizes or world sizes) are comparable.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..args import PRETRAIN, opt
from ..errors import UserError
from . import register
from .base import EvalSet, Task, first_rows
from .masking import IGNORE_INDEX, MaskingCollator
from .pretraining_data import build_pairs, clean_document, hold_out, load_hub_documents, read_documents, streamed_pairs
from .pretraining_manifest import read_manifest
from .pretraining_prepared import PreparedCorpus, check_flags, load_prepared, masked_eval_features, prepare_or_reuse

STREAM_EVAL_PER_MILLE = 10  # a stream has no length: --validation-split-percentage 5 holds out its first 50 docs
PAIRS = ("pretrain", "prepare")  # flags that decide the pairs: `bertscale prepare` takes them too


@dataclass
class PretrainArgs:
    train_files: tuple = opt(
        (),
        "Pretrain: text globs (.txt, .txt.gz, .jsonl); repeat the flag for more. pretrain prepares them "
        "once into --prepared-cache and reuses them while the files and settings stay the same.",
        commands=PAIRS,
        multiple=True,
    )
    eval_files: tuple = opt(
        (), "Pretrain: held-out text globs (else a split of the training docs).", commands=PAIRS, multiple=True
    )
    prepared_data: str | None = opt(
        None,
        "Pretrain: a corpus made by `bertscale prepare` (instead of --train-files or --dataset): "
        "its pairs are memory-mapped, nothing is tokenised.",
        commands=PRETRAIN,
    )
    prepared_cache: str | None = opt(
        None,
        "Pretrain: where --train-files are prepared (default ~/.cache/bertscale; with several nodes, "
        "a directory that all of them see).",
        commands=PRETRAIN,
    )
    validation_split_percentage: float = opt(5.0, "Pretrain: percent of documents held out.", commands=PAIRS)
    document_separator: str = opt(
        "blank-line",
        "Pretrain: how documents are split in .txt files: blank-line, file (one document per file, and "
        "per book in a file of concatenated Project Gutenberg books), or heading (WikiText ' = T = '). "
        "Gutenberg licence headers and footers are dropped.",
        commands=PAIRS,
    )
    text_field: str = opt("text", "Pretrain: field holding the text in .jsonl files and hub datasets.", commands=PAIRS)
    streaming: bool = opt(False, "Pretrain: stream a hub dataset instead of downloading it whole.", commands=PAIRS)
    short_seq_prob: float = opt(0.1, "Pretrain: share of pairs built shorter than max length.", commands=PAIRS)
    shard_size_mb: float = opt(
        4.0, "Prepare: MB of text per shard (what one worker holds at a time).", commands=("prepare",)
    )
    mlm_probability: float = opt(0.15, "Pretrain: share of tokens masked.", commands=PRETRAIN)
    whole_word_masking: bool = opt(True, "Pretrain: mask all WordPieces of a word together.", commands=PRETRAIN)
    max_predictions_per_seq: int = opt(
        20, "Pretrain: cap on masked tokens per sequence (80 for seq 512).", commands=PRETRAIN
    )


def log_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@register
class PretrainingTask(Task):
    names = ("pretrain",)
    command = "pretrain"
    title = "Pretraining (MLM + NSP)"
    Args = PretrainArgs
    architectures = ("ForPreTraining",)
    plan_model_class = "BertForPreTraining"
    plan_head = "masked_lm"
    main_metric = "mlm_loss"
    greater_is_better = False
    default_max_seq_length = 128

    def __init__(self, tokenizer, **settings):
        super().__init__(tokenizer, **settings)
        args = self.args
        self.collator = MaskingCollator.from_tokenizer(
            tokenizer,
            mlm_probability=args.mlm_probability,
            max_predictions=args.max_predictions_per_seq,
            whole_word=args.whole_word_masking,
        )
        self._documents = None  # hub datasets: (train docs, held-out docs, summary), read once
        self._manifest = None  # of --prepared-data, read once
        self._prepared_dir = None  # --prepared-data, or where --train-files were prepared
        self._corpus: PreparedCorpus | None = None  # that corpus, memory-mapped

    @property
    def max_seq_length(self) -> int:
        if self.data.max_seq_length is None and self.args.prepared_data:
            return self._prepared_manifest()["settings"]["max_seq_length"]  # what its pairs were made for
        return super().max_seq_length

    def _prepared_manifest(self) -> dict:
        """--prepared-data's manifest, after refusing the flags it makes meaningless."""
        if self._manifest is None:
            self._manifest = check_flags(self.args.prepared_data, self.args, self.data)
        return self._manifest

    # --- model -------------------------------------------------------------------------------
    def model_class(self):
        from .pretraining_model import BertForPreTrainingOnMasked

        # Missing MLM/NSP heads are created and the decoder tied to the embeddings, as from_pretrained
        # does for BertForPreTraining; the MLM head scores only masked positions.
        return BertForPreTrainingOnMasked

    # --- prepare -------------------------------------------------------------------------------
    def prepare(self, output_dir, *, workers, overwrite=False, part=None, parts=1, finalize=False):
        from .pretraining_prepare import prepare

        settings = dict(workers=workers, overwrite=overwrite, part=part, parts=parts, finalize=finalize)
        return prepare(output_dir, self.tokenizer, log=log_line, **settings, **self._corpus_flags())

    def _corpus_flags(self) -> dict:
        """What decides the pairs, as prepare() takes it."""
        args, data = self.args, self.data
        return dict(
            train_files=args.train_files,
            eval_files=args.eval_files,
            dataset=data.dataset,
            dataset_config=data.dataset_config,
            streaming=args.streaming,
            max_seq_length=self.max_seq_length,
            short_seq_prob=args.short_seq_prob,
            seed=self.seed,
            document_separator=args.document_separator,
            text_field=args.text_field,
            validation_split_percentage=args.validation_split_percentage,
            shard_size_mb=args.shard_size_mb,
        )

    def prepare_train_data(self, share: int, shares: int) -> str | None:
        """--train-files: each process prepares its share of the files into the cache (once; a rerun
        finds them there), then all memory-map the result. --prepared-data: check it fits the run."""
        args = self.args
        if args.prepared_data:
            self._prepared_dir = Path(args.prepared_data).expanduser().absolute()
            try:
                manifest = self._prepared_manifest()
            except UserError as e:
                raise UserError(str(e), echo=share == 0) from None  # every process meets it: one says it
            return _note(f"--prepared-data {self._prepared_dir}", manifest, self.seed)
        if not args.train_files:
            return None  # a hub dataset: read or streamed as it comes
        self._prepared_dir = prepare_or_reuse(
            self.tokenizer,
            rank=share,
            world_size=shares,
            cache_root=args.prepared_cache,
            workers=self.data.preprocessing_workers,
            log=log_line,
            **self._corpus_flags(),
        )
        manifest = read_manifest(self._prepared_dir, "--prepared-cache")
        return _note(f"--train-files as prepared in {self._prepared_dir}", manifest, self.seed)

    def _prepared(self) -> PreparedCorpus | None:
        """The memory-mapped corpus of --prepared-data or --train-files; None for hub datasets."""
        if self._corpus is None and (self._prepared_dir or self.args.prepared_data or self.args.train_files):
            if self._prepared_dir is None:  # not called by the trainer: prepare as one process
                self.prepare_train_data(0, 1)
            flag = "--prepared-data" if self.args.prepared_data else "--prepared-cache"
            self._corpus = load_prepared(self._prepared_dir, self.tokenizer, self.max_seq_length, flag)
        return self._corpus

    # --- data --------------------------------------------------------------------------------
    def train_features(self):
        args, data = self.args, self.data
        corpus = self._prepared()
        if corpus is not None:
            return first_rows(corpus.train, data.max_train_samples)
        if args.streaming and data.dataset:
            stream = load_hub_documents(data.dataset, data.dataset_config, args.text_field, streaming=True)
            if not args.eval_files:
                stream = stream.skip(self._stream_eval_docs())
            pairs = streamed_pairs(
                stream, args.text_field, self.tokenizer, self.max_seq_length, args.short_seq_prob, self.seed
            )
            return pairs.take(data.max_train_samples) if data.max_train_samples else pairs
        from datasets import Dataset

        train_docs, _, _ = self._split()
        features = Dataset.from_dict(
            build_pairs(train_docs, self.tokenizer, self.max_seq_length, args.short_seq_prob, self.seed)
        )
        return first_rows(features, data.max_train_samples)

    def describe_train_data(self, rows: int) -> str:
        corpus = self._prepared()
        if corpus is not None:
            summary, held = corpus.summary, corpus.manifest["totals"]["held_out_documents"]
        else:
            _, held_docs, summary = self._split()
            held = len(held_docs)
        if held:
            summary += (
                f" ({held} held out for evaluation; hold out fewer with --validation-split-percentage or --eval-files)"
            )
        return f"{summary}: {rows} training pairs of up to {self.max_seq_length} tokens"

    def eval_set(self) -> EvalSet | None:
        from datasets import Dataset

        corpus = self._prepared()
        if corpus is not None:
            features = masked_eval_features(corpus.eval, self.collator, self.seed, self.data.max_eval_samples)
            return None if features is None else EvalSet(features=features)
        _, held_docs, _ = self._split()
        if not held_docs:
            return None
        pairs = build_pairs(held_docs, self.tokenizer, self.max_seq_length, self.args.short_seq_prob, self.seed + 1)
        if self.data.max_eval_samples is not None:
            pairs = {k: v[: self.data.max_eval_samples] for k, v in pairs.items()}
        if not pairs["input_ids"]:
            return None
        word_start = pairs.pop("word_start")
        pairs["input_ids"], pairs["labels"] = self.collator.fixed_masks(pairs["input_ids"], word_start, self.seed)
        return EvalSet(features=Dataset.from_dict(pairs))

    def _split(self):
        """(train documents, held-out documents, summary for messages) of a hub dataset, read once.
        When streaming, only the held-out head of the stream is read here; training pairs are built
        on the fly."""
        if self._documents is None:
            args, data = self.args, self.data
            if not data.dataset:
                raise UserError("pretrain needs text: pass --train-files 'corpus/*.txt' or --dataset NAME.")
            docs, summary = self._read_documents(head_only=args.streaming)
            if args.eval_files:
                held, _ = read_documents(args.eval_files, args.document_separator, args.text_field, "--eval-files")
            elif args.streaming:
                docs, held = [], docs
            else:
                docs, held = hold_out(docs, args.validation_split_percentage, self.seed)
            self._documents = (docs, held, summary)
        return self._documents

    def _read_documents(self, head_only: bool):
        args, data = self.args, self.data
        if head_only:
            n = 0 if args.eval_files else self._stream_eval_docs()
            stream = load_hub_documents(data.dataset, data.dataset_config, args.text_field, streaming=True)
            docs = [d for d in (clean_document(r[args.text_field] or "") for r in stream.take(n)) if d]
            return docs, f"--dataset {data.dataset} (streamed): first {n} documents held out"
        docs = load_hub_documents(data.dataset, data.dataset_config, args.text_field)
        return docs, f"--dataset {data.dataset}: {len(docs)} documents with text"

    def _stream_eval_docs(self) -> int:
        if self.args.validation_split_percentage <= 0:
            return 0
        return max(1, round(self.args.validation_split_percentage * STREAM_EVAL_PER_MILLE))

    def collate(self, rows: list[dict]) -> dict:
        """Pad and mask afresh (torch's global RNG); evaluation rows come masked already."""
        return self.collator(rows)

    def label_names(self) -> tuple[str, ...]:
        return ("labels", "next_sentence_label")

    # --- train/eval hooks --------------------------------------------------------------------
    # The model's prediction_logits hold one row per masked token (pretraining_model.py).
    def loss_parts(self, output, batch) -> dict:
        # The model's own parts of the loss, detached: the trainer reads them only when it logs.
        return {"mlm_loss": output.mlm_loss.detach(), "nsp_loss": output.nsp_loss.detach()}

    def eval_outputs(self, output, batch) -> dict[str, list]:
        import torch
        import torch.nn.functional as F

        device = output.prediction_logits.device
        labels = batch["labels"].to(device)
        masked = labels != IGNORE_INDEX
        logits = output.prediction_logits.float()
        targets = labels[masked]
        row_of = masked.nonzero()[:, 0]
        size = labels.shape[0]
        per_row = torch.zeros(size, device=labels.device)
        loss_sum = per_row.index_add(0, row_of, F.cross_entropy(logits, targets, reduction="none"))
        correct = per_row.index_add(0, row_of, (logits.argmax(-1) == targets).float())
        nsp_logits = output.seq_relationship_logits.float()
        nsp_labels = batch["next_sentence_label"].to(device)
        nsp_loss = F.cross_entropy(nsp_logits, nsp_labels, reduction="none")
        columns = {
            "mlm_loss_sum": loss_sum,
            "mlm_count": masked.sum(1),
            "mlm_correct": correct,
            "nsp_correct": (nsp_logits.argmax(-1) == nsp_labels).long(),
            "nsp_loss": nsp_loss,
        }
        return {k: list(v.detach().cpu().numpy()) for k, v in columns.items()}

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Path | None) -> dict:
        count = float(np.sum(outputs["mlm_count"]))
        mlm_loss = float(np.sum(outputs["mlm_loss_sum"])) / max(count, 1.0)
        return {
            "mlm_loss": mlm_loss,
            "mlm_accuracy": float(np.sum(outputs["mlm_correct"])) / max(count, 1.0),
            "perplexity": math.exp(min(mlm_loss, 700.0)),  # exp overflows a float past ~709
            "nsp_loss": float(np.mean(outputs["nsp_loss"])),
            "nsp_accuracy": float(np.mean(outputs["nsp_correct"])),
            "mlm_majority_baseline": majority_baseline(eval_set.features["labels"][: len(outputs["mlm_count"])]),
        }


def majority_baseline(label_rows) -> float:
    """Accuracy of always predicting the most frequent masked token id (a floor MLM must beat)."""
    counts = Counter(t for row in label_rows for t in row if t != IGNORE_INDEX)
    total = sum(counts.values())
    return counts.most_common(1)[0][1] / total if total else 0.0


def _note(source: str, manifest: dict, seed: int) -> str:
    """One line saying which prepared corpus a run trains on, and anything in it that differs from the run."""
    t, settings = manifest["totals"], manifest["settings"]
    seeds = ""
    if settings["seed"] != seed:
        seeds = f"; its pairs were made with --seed {settings['seed']}, this run's --seed {seed} orders and masks them"
    return (
        f"pretrain: training on {source} (made {manifest['created']}; {t['train_rows']} pairs of up to "
        f"{settings['max_seq_length']} tokens, {t['eval_rows']} held-out pairs, {t['shards']} "
        f"shard{'s' * (t['shards'] != 1)}{seeds})"
    )
