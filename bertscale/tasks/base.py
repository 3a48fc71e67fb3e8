"""The Task contract: everything the trainer, the CLI, `predict` and `plan` need to know about one job.

A task is one class in one file: it registers itself with `@register` (tasks/__init__.py), says
which `--task` names it answers to, which flags it adds (its `Args` dataclass, shown under its own
heading in --help), which files it writes, how it predicts and what `plan` counts. It knows its
data, model head, collate and metrics, and nothing about DeepSpeed, ranks or checkpoints; the
trainer knows nothing about any task. A user's own task is the same: a subclass in a file of
theirs, run with `--task path/to/file.py:ClassName` (see examples/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..args import DataArgs, NoArgs
from ..errors import UserError


@dataclass
class EvalSet:
    """Evaluation inputs: `features` are model rows (a datasets.Dataset); `examples` is whatever
    compute_metrics needs to turn per-feature outputs into answers (e.g. SQuAD contexts)."""

    features: Any
    examples: Any = None


class Task:
    # --- what the CLI and the registry read ---------------------------------------------------
    names: ClassVar[tuple[str, ...]] = ()  # --task names; "prefix:*" matches e.g. every glue:NAME
    title: ClassVar[str] = "Task"  # heading of the task's own flags in --help
    Args: ClassVar[type] = NoArgs  # the task's own flags: a dataclass with args.opt(...) fields
    command: ClassVar[str] = "finetune"  # the CLI command that trains it
    is_default: ClassVar[bool] = False  # what `finetune` and `plan` run without --task
    Predict: ClassVar[type | None] = None  # inputs of `bertscale predict` (a dataclass), if it predicts
    architectures: ClassVar[tuple[str, ...]] = ()  # model class name endings it can evaluate and predict with
    output_files: ClassVar[tuple[str, ...]] = ()  # what compute_metrics writes besides eval_results.json
    # --- what `bertscale plan` reads (None: plan does not know this task) ----------------------
    plan_model_class: ClassVar[str | None] = None  # transformers class whose parameters are counted
    plan_head: ClassVar[str] = "span"  # activations of the head: span (per token), masked_lm, pooled
    plan_rows_per_epoch: ClassVar[int | None] = None  # default schedule length: rows of a usual data set

    main_metric = "loss"
    greater_is_better = False
    metrics: ClassVar[tuple[str, ...]] = ()  # names compute_metrics reports (checked for --metric-for-best)
    default_max_seq_length = 128
    # Columns of the feature datasets that go to the model; the rest stay for post-processing.
    model_input_names = ("input_ids", "token_type_ids", "attention_mask")
    # How the built model takes its batches: None (padded, as collated), or for an unpadded model
    # (unpad/) add_packing's keywords. engine.build_model sets it; evaluation.model_inputs reads it.
    packing: dict | None = None

    def __init__(
        self,
        tokenizer,
        *,
        name: str | None = None,
        args=None,
        data: DataArgs | None = None,
        seed: int = 42,
        metric_for_best: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.name = name or self.names[0]
        self.args = args if args is not None else self.Args()
        self.data = data or DataArgs()
        self.seed = seed
        if metric_for_best is not None:
            if self.metrics and metric_for_best not in self.metrics:
                raise UserError(
                    f"--metric-for-best {metric_for_best}: --task {self.name} reports {', '.join(self.metrics)}"
                )
            self.main_metric = metric_for_best

    @classmethod
    def matches(cls, name: str) -> bool:
        return any(name == n or (n.endswith(":*") and name.startswith(n[:-1])) for n in cls.names)

    @classmethod
    def for_model(cls, tokenizer, model_config, **settings) -> Task:
        """The task for scoring or using an already trained model (whose config may hold e.g. labels)."""
        return cls(tokenizer, **settings)

    @property
    def max_seq_length(self) -> int:
        return self.data.max_seq_length or self.default_max_seq_length

    def higher_is_better(self, metric: str) -> bool:
        return self.greater_is_better if metric == self.main_metric else "loss" not in metric

    # --- model -------------------------------------------------------------------------------
    def model_class(self):
        """The transformers class to build (AutoModelForQuestionAnswering, BertForPreTraining...)."""
        raise NotImplementedError

    def model_config_overrides(self) -> dict:
        """Extra config values for the head (num_labels, id2label, ...)."""
        return {}

    # --- data --------------------------------------------------------------------------------
    def train_features(self):
        """A datasets.Dataset of training rows (model inputs + label columns), or a datasets
        IterableDataset for a stream."""
        raise NotImplementedError

    def prepare_train_data(self, share: int, shares: int) -> str | None:
        """Called by every process of a training run at the same time, before train_features: a task
        whose data is prepared ahead of training (pretraining's corpus cache) makes its `share` of
        `shares` here and returns when all of it is ready. The processes must wait for each other
        through files, not collectives, so that no collective timeout runs out however long it takes.
        An error that every process meets (a bad flag) is raised with echo only in share 0, so that
        it is printed once. Returns a line saying where the training data comes from (printed
        once), or None."""
        return None

    def describe_train_data(self, rows: int) -> str:
        """What the training data amounts to, for messages ("--train-file x.json: 3 questions, 4 windows")."""
        return f"--task {self.name}: {rows} training rows"

    def eval_set(self) -> EvalSet | None:
        return None

    def lengths(self, features) -> list[int]:
        """Sequence length of every row (for length-grouped batching), read in arrow: iterating
        a datasets column row by row costs seconds on a full SQuAD set."""
        import pyarrow.compute as pc

        column = features.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(column).to_pylist()

    def collate(self, rows: list[dict]) -> dict:
        """Pad a list of rows to the batch's longest sequence (multiple of 8)."""
        return pad_batch(rows, self.tokenizer.pad_token_id, self.label_names())

    def label_names(self) -> tuple[str, ...]:
        return ("labels",)

    # --- train/eval hooks --------------------------------------------------------------------
    def loss(self, output, inputs):
        """The loss the trainer backpropagates, from the model's output and the inputs it was given
        (on the device): the model's own loss unless the task defines it otherwise."""
        return output.loss

    def loss_parts(self, output, batch) -> dict:
        """Extra loss components worth logging (mlm_loss, nsp_loss, ...), as floats or detached
        tensors (the trainer converts them when it logs, so GPU steps need not sync)."""
        return {}

    def eval_examples(self, eval_set: EvalSet) -> int:
        """What "eval examples/s" counts: one per eval row here; SQuAD counts questions."""
        return len(eval_set.features)

    def eval_outputs(self, output, batch) -> dict[str, list]:
        """Per-row results of one eval forward pass, as lists of numpy arrays or scalars.

        The evaluation loop gathers them from all ranks in feature order for compute_metrics.
        """
        raise NotImplementedError

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Path | None) -> dict:
        """Rank 0 only: metrics from gathered outputs; writes `output_files` into output_dir if given."""
        raise NotImplementedError

    def save_extra(self, model_dir: Path) -> None:
        """Hook to save anything besides model and tokenizer into an exported model dir."""

    # --- prepare ---------------------------------------------------------------------------------
    def prepare(
        self,
        output_dir: Path,
        *,
        workers: int,
        overwrite: bool = False,
        part: int | None = None,
        parts: int = 1,
        finalize: bool = False,
    ) -> dict | None:
        """`bertscale prepare`: make the task's data once into `output_dir` (whole, or not at all) with
        `workers` processes, for training runs to read without preparing it again. With `parts` > 1
        (a Slurm array) make only share `part`, and publish all of them with `finalize`. Returns a
        description of what was made (None for one part of several). A task that prepares overrides
        this; `bertscale prepare --task` offers the tasks that do."""
        raise UserError(f"--task {self.name} has nothing to prepare: it reads its data when it trains.")

    # --- predict -------------------------------------------------------------------------------
    @classmethod
    def predict(cls, model_dir: str, inputs, max_seq_length: int) -> str:
        """Answer `inputs` (a `Predict` instance) with the exported model in model_dir; returns
        the line `bertscale predict` prints."""
        raise UserError(f"--task {cls.names[0] if cls.names else cls.__name__}: this task does not predict")


def first_rows(data, n: int | None):
    """The first n rows (all when n is None): what --max-train-samples / --max-eval-samples mean for
    every task."""
    return data if n is None else data.select(range(min(n, len(data))))


def pad_batch(rows: list[dict], pad_id: int, label_names=("labels",), multiple: int = 8) -> dict:
    """Dynamic padding: every sequence column padded to the batch max, rounded up to `multiple`
    (tensor cores like multiples of 8). Labels that are sequences are padded with -100."""
    import numpy as np
    import torch

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
