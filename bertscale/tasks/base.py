"""The Task contract: everything the trainer needs to know about one kind of job.

A task knows its data, model head, collate and metrics; it knows nothing about DeepSpeed, ranks
or checkpoints. The trainer knows nothing about SQuAD or MLM. A new task is one file in tasks/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import RunConfig


@dataclass
class EvalSet:
    """Evaluation inputs: `features` are model rows (a datasets.Dataset); `examples` is whatever
    compute_metrics needs to turn per-feature outputs into answers (e.g. SQuAD contexts)."""

    features: Any
    examples: Any = None


class Task:
    name = "task"
    main_metric = "loss"
    greater_is_better = False
    default_max_seq_length = 128
    # Columns of the feature datasets that go to the model; the rest stay for post-processing.
    model_input_names = ("input_ids", "token_type_ids", "attention_mask")

    def __init__(self, run: RunConfig, tokenizer):
        self.run = run
        self.tokenizer = tokenizer

    @classmethod
    def for_evaluation(cls, run: RunConfig, tokenizer, model_config):
        """The task for scoring an already trained model (whose config may hold e.g. labels)."""
        return cls(run, tokenizer)

    @property
    def max_seq_length(self) -> int:
        return self.run.max_seq_length or self.default_max_seq_length

    # --- model -------------------------------------------------------------------------------
    def model_class(self):
        """The transformers class to build (AutoModelForQuestionAnswering, BertForPreTraining...)."""
        raise NotImplementedError

    def model_config_overrides(self) -> dict:
        """Extra config values for the head (num_labels, id2label, ...)."""
        return {}

    # --- data --------------------------------------------------------------------------------
    def train_features(self):
        """A datasets.Dataset of training rows (model inputs + label columns)."""
        raise NotImplementedError

    def eval_set(self) -> Optional[EvalSet]:
        return None

    def lengths(self, features) -> list[int]:
        """Sequence length of every row (for length-grouped batching), read in arrow: iterating
        a datasets column row by row costs seconds on a full SQuAD set."""
        import pyarrow.compute as pc

        column = features.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(column).to_pylist()

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Pad a list of rows to the batch's longest sequence (multiple of 8)."""
        return pad_batch(rows, self.tokenizer.pad_token_id, self.label_names())

    def label_names(self) -> tuple[str, ...]:
        return ("labels",)

    # --- train/eval hooks --------------------------------------------------------------------
    def loss_parts(self, output, batch) -> dict:
        """Extra loss components worth logging (mlm_loss, nsp_loss, ...), as floats or detached
        tensors (the trainer converts them when it logs, so GPU steps need not sync)."""
        return {}

    def eval_examples(self, eval_set: EvalSet) -> int:
        """What "eval examples/s" counts: one per eval row here; SQuAD counts questions."""
        return len(eval_set.features)

    def eval_outputs(self, output, batch) -> dict[str, list]:
        """Per-row results of one eval forward pass, as lists of numpy arrays or scalars.

        The trainer gathers them from all ranks in feature order and hands them to compute_metrics.
        """
        raise NotImplementedError

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Optional[Path]) -> dict:
        """Rank 0 only: metrics from gathered outputs; writes predictions into output_dir if given."""
        raise NotImplementedError

    def save_extra(self, model_dir: Path) -> None:
        """Hook to save anything besides model and tokenizer into an exported model dir."""


def pad_batch(rows: list[dict], pad_id: int, label_names=("labels",), multiple: int = 8) -> dict:
    """Dynamic padding: every sequence column padded to the batch max, rounded up to `multiple`
    (tensor cores like multiples of 8). Labels that are sequences are padded with -100."""
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // multiple) * multiple
    batch = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if isinstance(vals[0], (list, np.ndarray, torch.Tensor)) and np.ndim(vals[0]) == 1:
            fill = pad_id if key == "input_ids" else -100 if key in label_names else 0
            out = torch.full((len(rows), width), fill, dtype=torch.long)
            for i, v in enumerate(vals):
                out[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
            batch[key] = out
        elif isinstance(vals[0], (int, np.integer, bool)):
            batch[key] = torch.tensor(vals, dtype=torch.long)
        elif isinstance(vals[0], (float, np.floating)):
            batch[key] = torch.tensor(vals, dtype=torch.float)
    if "attention_mask" not in batch:
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, : len(r["input_ids"])] = 1
        batch["attention_mask"] = mask
    return batch
