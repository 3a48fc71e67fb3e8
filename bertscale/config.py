"""RunConfig: every setting of a run, typed, in one place.

Each field carries its help text and the commands that expose it; cli.py turns the fields into
click options (with env-var fallbacks BERTSCALE_<NAME>) so flags, defaults and docs never drift.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TRAIN = ("finetune", "pretrain")
FINETUNE = ("finetune",)
PRETRAIN = ("pretrain",)
EVAL = ("finetune", "evaluate")
ALL_RUN = ("finetune", "pretrain", "evaluate")


def opt(default, help, commands=TRAIN, **click_kwargs):
    return field(default=default, metadata={"help": help, "commands": commands, "click": click_kwargs})


@dataclass
class RunConfig:
    # --- what to train -------------------------------------------------------------------------
    task: str = opt("squad", "Task: squad, squad_v2, classify, glue:sst2, glue:rte, glue:mrpc, ... "
                    "(pretrain always uses the MLM/NSP task).", commands=EVAL)
    model: str = opt("bert-large-cased-whole-word-masking",
                     "Hub id, local directory, 'tiny' (2-layer random BERT for tests), or "
                     "random:<dir or hub id> (that architecture, fresh weights).", commands=ALL_RUN)
    output_dir: str = opt("runs/latest", "Where checkpoints, metrics.jsonl, predictions and final/ go.",
                          commands=ALL_RUN)
    overwrite_output_dir: bool = opt(False, "Start over in an output dir that holds another run's checkpoints.")
    # --- data ----------------------------------------------------------------------------------
    dataset: Optional[str] = opt(None, "Hub dataset name (default for squad/glue when no file is given).",
                                 commands=ALL_RUN)
    dataset_config: Optional[str] = opt(None, "Hub dataset config name.", commands=ALL_RUN)
    train_file: Optional[str] = opt(None, "Local training file (SQuAD .json/.json.gz; CSV/TSV/JSONL for classify).",
                                    commands=FINETUNE)
    eval_file: Optional[str] = opt(None, "Local evaluation file.", commands=EVAL)
    max_train_samples: Optional[int] = opt(None, "Use only the first N training examples.")
    max_eval_samples: Optional[int] = opt(None, "Use only the first N evaluation examples.", commands=ALL_RUN)
    max_seq_length: Optional[int] = opt(None, "Tokens per sequence (default: 384 squad, 128 pretrain/classify).",
                                        commands=ALL_RUN)
    preprocessing_workers: int = opt(min(4, os.cpu_count() or 1), "Processes for datasets.map tokenisation.",
                                     commands=ALL_RUN)
    # --- squad ---------------------------------------------------------------------------------
    doc_stride: int = opt(128, "SQuAD: overlap between context windows.", commands=EVAL)
    max_query_length: int = opt(64, "SQuAD: question tokens kept.", commands=EVAL)
    n_best_size: int = opt(20, "SQuAD: start/end candidates per window in post-processing.", commands=EVAL)
    max_answer_length: int = opt(30, "SQuAD: longest answer in tokens.", commands=EVAL)
    null_score_diff_threshold: float = opt(0.0, "SQuAD v2: predict no-answer when null score - best > this.",
                                           commands=EVAL)
    # --- classify ------------------------------------------------------------------------------
    text_column: Optional[str] = opt(None, "Classify: column with the text (default: sentence/text).",
                                     commands=EVAL)
    text_pair_column: Optional[str] = opt(None, "Classify: column with the second text of a pair.", commands=EVAL)
    label_column: Optional[str] = opt(None, "Classify: column with the label (default: label).", commands=EVAL)
    early_stopping_patience: int = opt(0, "Stop after N evaluations without improvement (0: off).",
                                       commands=FINETUNE)
    metric_for_best: Optional[str] = opt(None, "Metric that picks the best checkpoint (default: task's main).",
                                         commands=FINETUNE)
    # --- pretraining ---------------------------------------------------------------------------
    train_files: tuple = opt((), "Pretrain: text globs (.txt, .txt.gz, .jsonl); repeat the flag for more.",
                             commands=PRETRAIN, multiple=True)
    eval_files: tuple = opt((), "Pretrain: held-out text globs (else a split of the training docs).",
                            commands=PRETRAIN, multiple=True)
    validation_split_percentage: float = opt(5.0, "Pretrain: percent of documents held out.", commands=PRETRAIN)
    document_separator: str = opt("blank-line", "Pretrain: how documents are split in .txt files: "
                                  "blank-line, file (one document per file), or heading (WikiText ' = T = ').",
                                  commands=PRETRAIN)
    text_field: str = opt("text", "Pretrain: field holding the text in .jsonl files and hub datasets.",
                          commands=PRETRAIN)
    streaming: bool = opt(False, "Pretrain: stream a hub dataset instead of downloading it whole.",
                          commands=PRETRAIN)
    short_seq_prob: float = opt(0.1, "Pretrain: share of pairs built shorter than max length.", commands=PRETRAIN)
    mlm_probability: float = opt(0.15, "Pretrain: share of tokens masked.", commands=PRETRAIN)
    whole_word_masking: bool = opt(True, "Pretrain: mask all WordPieces of a word together.", commands=PRETRAIN)
    max_predictions_per_seq: int = opt(20, "Pretrain: cap on masked tokens per sequence (80 for seq 512).",
                                       commands=PRETRAIN)
    # --- optimisation --------------------------------------------------------------------------
    ds_config: str = opt("zero2", "DeepSpeed JSON: a path, or a preset in ds_configs/ "
                         "(zero2, zero3, zero3_offload, pretrain_lamb).", commands=ALL_RUN)
    zero_stage: Optional[int] = opt(None, "Override the ZeRO stage of --ds-config (0-3).", commands=ALL_RUN)
    precision: Optional[str] = opt(None, "fp16, bf16 or fp32 (default: what --ds-config says).",
                                   commands=ALL_RUN, type_choices=("fp16", "bf16", "fp32"))
    gradient_checkpointing: Optional[bool] = opt(None, "Activation checkpointing (default: on for models "
                                                 "with 24+ layers).")
    learning_rate: float = opt(3e-5, "Peak learning rate.")
    epochs: float = opt(2.0, "Passes over the training data.")
    max_steps: int = opt(-1, "Stop after N optimizer steps (overrides --epochs when > 0).")
    micro_batch_size: int = opt(8, "Sequences per GPU per forward pass.")
    grad_accum: int = opt(1, "Micro batches per optimizer step.")
    warmup_ratio: float = opt(0.1, "Share of steps with linear warmup.")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    seed: int = opt(42, "Random seed (data order, masking, dropout).", commands=ALL_RUN)
    group_by_length: bool = opt(True, "Batch windows of similar length together (less padding).")
    # --- evaluation, checkpoints ---------------------------------------------------------------
    eval_every: int = opt(0, "Evaluate every N steps (0: only at the end).")
    eval_on_start: bool = opt(False, "Also evaluate before the first step (the starting model's baseline).")
    eval_batch_size: int = opt(64, "Sequences per GPU per evaluation forward pass.", commands=ALL_RUN)
    save_every: int = opt(500, "Save a checkpoint every N steps (and always at the end).")
    keep: int = opt(3, "Checkpoints kept (newest).")
    resume: str = opt("auto", "auto (newest checkpoint in output dir), none, or a checkpoint path.")
    # --- tracking ------------------------------------------------------------------------------
    log_every: int = opt(10, "Log metrics every N steps.")
    wandb_project: str = opt("bertscale", "W&B project.")
    wandb_entity: Optional[str] = opt(None, "W&B entity (team or user).")
    wandb_group: Optional[str] = opt(None, "W&B group (one per multi-node job; default SLURM_JOB_ID).")
    wandb_mode: Optional[str] = opt(None, "online, offline or disabled (default: online if an API key is "
                                    "configured, else offline).", type_choices=("online", "offline", "disabled"))
    run_name: Optional[str] = opt(None, "Run name in W&B and logs (default: output dir name).")
    peak_tflops: Optional[float] = opt(None, "Device peak TFLOP/s for MFU (default: known GPU table).")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


def fields_for(command: str):
    return [f for f in dataclasses.fields(RunConfig) if command in f.metadata.get("commands", ())]


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON via a temp file + rename so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
