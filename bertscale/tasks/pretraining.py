"""Continued MLM/NSP pretraining of BERT (transformers' BertForPreTraining).

Documents come from local text files (--train-files) or a hub dataset (--dataset, optionally
streamed); pretraining_data.py turns them into NSP sentence pairs and masking.py masks each batch
afresh. Evaluation uses held-out documents with masks fixed once from --seed, so evaluations of
one run (and of runs with different batch sizes or world sizes) are comparable.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import EvalSet, Task
from .masking import IGNORE_INDEX, MaskingCollator
from .pretraining_data import (build_pairs, clean_document, hold_out, load_hub_documents, read_documents,
                               streamed_pairs)

STREAM_EVAL_PER_MILLE = 10  # a stream has no length: --validation-split-percentage 5 holds out its first 50 docs


class PretrainingTask(Task):
    name = "pretrain"
    main_metric = "mlm_loss"
    greater_is_better = False
    default_max_seq_length = 128

    def __init__(self, run, tokenizer, world_size: Optional[int] = None):
        super().__init__(run, tokenizer)
        self.world_size = world_size  # None: ask torch.distributed when the data is built
        self.collator = MaskingCollator.from_tokenizer(
            tokenizer, mlm_probability=run.mlm_probability, max_predictions=run.max_predictions_per_seq,
            whole_word=run.whole_word_masking)
        self._documents = None  # (train docs, held-out docs, summary), read once

    # --- model -------------------------------------------------------------------------------
    def model_class(self):
        from .pretraining_model import BertForPreTrainingOnMasked

        # Missing MLM/NSP heads are created and the decoder tied to the embeddings, as from_pretrained
        # does for BertForPreTraining; the MLM head scores only masked positions.
        return BertForPreTrainingOnMasked

    # --- data --------------------------------------------------------------------------------
    def train_features(self):
        run = self.run
        if run.streaming and run.dataset:
            stream = load_hub_documents(run.dataset, run.dataset_config, run.text_field, streaming=True)
            if not run.eval_files:
                stream = stream.skip(self._stream_eval_docs())
            pairs = streamed_pairs(stream, run.text_field, self.tokenizer, self.max_seq_length,
                                   run.short_seq_prob, run.seed)
            return pairs.take(run.max_train_samples) if run.max_train_samples else pairs
        from datasets import Dataset

        train_docs, held_docs, summary = self._split()
        features = Dataset.from_dict(build_pairs(train_docs, self.tokenizer, self.max_seq_length,
                                                 run.short_seq_prob, run.seed))
        if run.max_train_samples:
            features = features.select(range(min(run.max_train_samples, len(features))))
        world_size = self.world_size or _world_size()
        needed = run.micro_batch_size * world_size
        if len(features) < needed:
            held = f" ({len(held_docs)} held out for evaluation)" if held_docs else ""
            fewer = ", or hold out fewer (--validation-split-percentage, --eval-files)" if held_docs else ""
            raise UserError(f"{summary}{held}: {len(features)} training pairs of up to {self.max_seq_length} "
                            f"tokens, fewer than one batch (--micro-batch-size {run.micro_batch_size} x "
                            f"{world_size} processes = {needed}). Add documents, lower --micro-batch-size{fewer}.")
        return features

    def eval_set(self) -> Optional[EvalSet]:
        from datasets import Dataset

        _, held_docs, _ = self._split()
        if not held_docs:
            return None
        run = self.run
        pairs = build_pairs(held_docs, self.tokenizer, self.max_seq_length, run.short_seq_prob, run.seed + 1)
        if run.max_eval_samples:
            pairs = {k: v[: run.max_eval_samples] for k, v in pairs.items()}
        if not pairs["input_ids"]:
            return None
        word_start = pairs.pop("word_start")
        pairs["input_ids"], pairs["labels"] = self.collator.fixed_masks(pairs["input_ids"], word_start, run.seed)
        return EvalSet(features=Dataset.from_dict(pairs))

    def _split(self):
        """(train documents, held-out documents, summary for messages), read once. When streaming,
        only the held-out head of the stream is read here; training pairs are built on the fly."""
        if self._documents is None:
            run = self.run
            streamed = bool(run.dataset and run.streaming)
            docs, summary = self._read_documents(head_only=streamed)
            if run.eval_files:
                held, _ = read_documents(run.eval_files, run.document_separator, run.text_field, "--eval-files")
            elif streamed:
                docs, held = [], docs
            else:
                docs, held = hold_out(docs, run.validation_split_percentage, run.seed)
            self._documents = (docs, held, summary)
        return self._documents

    def _read_documents(self, head_only: bool):
        run = self.run
        if run.dataset and head_only:
            n = 0 if run.eval_files else self._stream_eval_docs()
            stream = load_hub_documents(run.dataset, run.dataset_config, run.text_field, streaming=True)
            docs = [d for d in (clean_document(r[run.text_field] or "") for r in stream.take(n)) if d]
            return docs, f"--dataset {run.dataset} (streamed): first {n} documents held out"
        if run.dataset:
            docs = load_hub_documents(run.dataset, run.dataset_config, run.text_field)
            return docs, f"--dataset {run.dataset}: {len(docs)} documents with text"
        if run.train_files:
            return read_documents(run.train_files, run.document_separator, run.text_field)
        raise UserError("pretrain needs text: pass --train-files 'corpus/*.txt' or --dataset NAME.")

    def _stream_eval_docs(self) -> int:
        if self.run.validation_split_percentage <= 0:
            return 0
        return max(1, round(self.run.validation_split_percentage * STREAM_EVAL_PER_MILLE))

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
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
        columns = {"mlm_loss_sum": loss_sum, "mlm_count": masked.sum(1), "mlm_correct": correct,
                   "nsp_correct": (nsp_logits.argmax(-1) == nsp_labels).long(), "nsp_loss": nsp_loss}
        return {k: list(v.detach().cpu().numpy()) for k, v in columns.items()}

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Optional[Path]) -> dict:
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


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


TASKS = {"pretrain": PretrainingTask}
