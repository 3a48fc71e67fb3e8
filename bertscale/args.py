"""Every setting of a run, in typed groups (after litgpt's args.py).

Each field carries its help text and the commands that show it; cli.py turns the fields into
click options (with env-var fallbacks BERTSCALE_<NAME>) so flags, defaults and docs never drift.
A task adds its own group: the dataclass in its `Args` attribute (see tasks/base.py).
Functions take the group they use, not the whole run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

TRAIN = ("finetune", "pretrain")
FINETUNE = ("finetune",)
PRETRAIN = ("pretrain",)
EVAL = ("finetune", "evaluate")
ALL_RUN = ("finetune", "pretrain", "evaluate")
WITH_PREPARE = (*ALL_RUN, "prepare")  # also what `bertscale prepare` reads (model = its tokenizer)


def opt(default, help, commands=TRAIN, minimum=None, **click_kwargs):
    """A flag: its default, help, the commands that show it, the smallest value it takes, and extra
    click settings (multiple=True, type_choices=(...))."""
    meta = {"help": help, "commands": commands, "click": click_kwargs, "minimum": minimum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    model: str = opt(
        "bert-large-cased-whole-word-masking",
        "Hub id, local directory, 'tiny' (2-layer random BERT for tests), or "
        "random:<dir or hub id> (that architecture, fresh weights).",
        commands=WITH_PREPARE,
    )
    gradient_checkpointing: bool | None = opt(
        None, "Activation checkpointing (default: on for models with 24+ layers)."
    )
    hidden_dropout: float | None = opt(
        None, "Dropout of the hidden layers and embeddings (default: the model config's hidden_dropout_prob)."
    )
    attention_dropout: float | None = opt(
        None, "Dropout of the attention probabilities (default: the model config's attention_probs_dropout_prob)."
    )
    unpad: bool = opt(
        True,
        "Compute on real tokens only: pack each batch's real tokens and run variable-length attention "
        "(heads without an unpadded version run padded, and the log says so). --no-unpad: padded batches.",
        commands=ALL_RUN,
    )

    def config_overrides(self) -> dict:
        """The model config values these flags set (dropout), for the model's construction."""
        values = {"hidden_dropout_prob": self.hidden_dropout, "attention_probs_dropout_prob": self.attention_dropout}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class DataArgs:
    dataset: str | None = opt(
        None, "Hub dataset name (default for squad/glue when no file is given).", commands=WITH_PREPARE
    )
    dataset_config: str | None = opt(None, "Hub dataset config name.", commands=WITH_PREPARE)
    train_file: str | None = opt(
        None, "Local training file (SQuAD .json/.json.gz; CSV/TSV/JSONL for classify).", commands=FINETUNE
    )
    eval_file: str | None = opt(None, "Local evaluation file.", commands=EVAL)
    max_train_samples: int | None = opt(
        None,
        "Use only the first N training examples (SQuAD questions, classification rows, pretraining pairs).",
        minimum=1,
    )
    max_eval_samples: int | None = opt(None, "Use only the first N evaluation examples.", commands=ALL_RUN, minimum=1)
    max_seq_length: int | None = opt(
        None,
        "Tokens per sequence (default: 384 squad, 128 pretrain/classify; pretrain --prepared-data: its length).",
        commands=WITH_PREPARE,
    )
    preprocessing_workers: int = opt(
        min(4, os.cpu_count() or 1),
        "Processes for tokenisation (datasets.map; pretrain --train-files: per rank, preparing them).",
        commands=ALL_RUN,
        minimum=1,
    )
    group_by_length: bool = opt(True, "Batch windows of similar length together (less padding).")
    dataloader_workers: int | None = opt(
        None,
        "Processes per rank that build batches ahead of the step (default: the cores the node's ranks leave "
        "free, at most 4; on CPU the ranks' compute threads keep theirs; 0: in the rank itself).",
        minimum=0,
    )


@dataclass
class OptimArgs:
    ds_config: str = opt(
        "zero2",
        "DeepSpeed JSON: a path, or a preset in ds_configs/ (single_node, zero2, zero3, zero3_offload, pretrain_lamb).",
        commands=ALL_RUN,
    )
    zero_stage: int | None = opt(None, "Override the ZeRO stage of --ds-config (0-3).", commands=ALL_RUN)
    precision: str | None = opt(
        None,
        "fp16, bf16 or fp32 (default: what --ds-config says).",
        commands=ALL_RUN,
        type_choices=("fp16", "bf16", "fp32"),
    )
    learning_rate: float = opt(3e-5, "Peak learning rate.")
    epochs: float = opt(2.0, "Passes over the training data.")
    max_steps: int = opt(-1, "Stop after N optimizer steps (overrides --epochs when > 0).")
    micro_batch_size: int = opt(8, "Sequences per GPU per forward pass.", minimum=1)
    grad_accum: int = opt(1, "Micro batches per optimizer step.", minimum=1)
    global_batch_size: int | None = opt(
        None,
        "Sequences per optimizer step over all ranks; sets --grad-accum to N / (micro batch x ranks), so a job "
        "resumed on another number of GPUs or nodes keeps its global batch.",
        minimum=1,
    )
    warmup_ratio: float = opt(0.1, "Share of steps with linear warmup (see --warmup-steps).")
    warmup_steps: int | None = opt(
        None, "Steps of linear warmup, as recipes give it (overrides --warmup-ratio).", minimum=0
    )
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    seed: int = opt(42, "Random seed (data order, held-out split, NSP pairs, masking, dropout).", commands=WITH_PREPARE)


@dataclass
class EvalArgs:
    eval_every: int = opt(0, "Evaluate every N steps (0: only at the end).")
    eval_on_start: bool = opt(False, "Also evaluate before the first step (the starting model's baseline).")
    eval_batch_size: int = opt(64, "Sequences per GPU per evaluation forward pass.", commands=ALL_RUN, minimum=1)
    early_stopping_patience: int = opt(0, "Stop after N evaluations without improvement (0: off).", commands=FINETUNE)
    metric_for_best: str | None = opt(
        None, "Metric that picks the best checkpoint (default: task's main).", commands=FINETUNE
    )


@dataclass
class CheckpointArgs:
    output_dir: str = opt(
        "runs/latest", "Where checkpoints, metrics.jsonl, predictions and final/ go.", commands=ALL_RUN
    )
    overwrite_output_dir: bool = opt(False, "Start over in an output dir that holds another run's checkpoints.")
    save_every: int = opt(500, "Save a checkpoint every N steps (and always at the end).")
    keep: int = opt(3, "Checkpoints kept (newest).")
    resume: str = opt("auto", "auto (newest checkpoint in output dir), none, or a checkpoint path.")


@dataclass
class LogArgs:
    log_every: int = opt(10, "Log metrics every N steps.", minimum=1)
    wandb_project: str = opt("bertscale", "W&B project.")
    wandb_entity: str | None = opt(None, "W&B entity (team or user).")
    wandb_group: str | None = opt(None, "W&B group (one per multi-node job; default SLURM_JOB_ID).")
    wandb_mode: str | None = opt(
        None,
        "online, offline or disabled (default: online if an API key is configured, else offline).",
        type_choices=("online", "offline", "disabled"),
    )
    run_name: str | None = opt(None, "Run name in W&B and logs (default: output dir name).")
    peak_tflops: float | None = opt(None, "Device peak TFLOP/s for MFU (default: known GPU table).")
    verbose: bool = opt(
        False,
        "Show the libraries' own log lines, progress bars and warnings, and every rank's start line "
        "(also BERTSCALE_LOG=debug).",
        commands=WITH_PREPARE,
    )


# (attribute of Run, class, heading in --help)
GROUPS = (
    ("model", ModelArgs, "Model"),
    ("data", DataArgs, "Data"),
    ("optim", OptimArgs, "Optimisation"),
    ("eval", EvalArgs, "Evaluation"),
    ("ckpt", CheckpointArgs, "Checkpointing"),
    ("log", LogArgs, "Logging"),
)


@dataclass
class NoArgs:
    """A task without flags of its own."""


@dataclass
class Run:
    """One run: the task (as named on the command line), its own flags, and the shared groups."""

    task: str = ""
    task_args: Any = field(default_factory=NoArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    ckpt: CheckpointArgs = field(default_factory=CheckpointArgs)
    log: LogArgs = field(default_factory=LogArgs)

    @property
    def out(self) -> Path:
        return Path(self.ckpt.output_dir)

    def flags(self) -> dict:
        """Every setting as one flat {flag name: value} dict, as typed (run_config.json, W&B config)."""
        values = {"task": self.task}
        for attr, _, _ in GROUPS:
            values.update(dataclasses.asdict(getattr(self, attr)))
        values.update(dataclasses.asdict(self.task_args))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def fields_for(group_class, command: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(group_class) if command in f.metadata.get("commands", ())]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def split_values(values: dict, task_args_class) -> Run:
    """A Run from one flat {field name: value} dict (what click hands over). Fields a group does not
    get keep their defaults; a name no group knows is a programming error."""
    values = dict(values)
    groups = {}
    for attr, cls, _ in (*GROUPS, ("task_args", task_args_class, "")):
        names = {f.name for f in dataclasses.fields(cls)}
        taken = {k: values.pop(k) for k in list(values) if k in names}
        check_minimums(cls, taken)
        groups[attr] = cls(**taken)
    task = values.pop("task")
    if values:
        raise TypeError(f"unknown settings {sorted(values)}")
    return Run(task=task, **groups)


def check_minimums(cls, values: dict) -> None:
    for f in dataclasses.fields(cls):
        minimum, value = f.metadata.get("minimum"), values.get(f.name)
        if minimum is not None and value is not None and value < minimum:
            raise UserError(
                f"{flag_name(f.name)} {value}: must be {minimum} or more"
                + (" (leave it out to use all)" if f.name.startswith("max_") else "")
            )
