"""A DeepSpeed engine around the task's BERT model: config, precision check, ZeRO-3 construction,
unpadded execution (unpad/), activation checkpointing, optimizer parameter groups."""

from __future__ import annotations

import sys

from . import distributed as dist
from . import ds_config, models
from .errors import UserError


def default_precision() -> str:
    """fp16 on GPUs (the configs' dynamic loss scaling), fp32 on CPU where 16-bit is emulated."""
    from deepspeed.accelerator import get_accelerator

    return "fp16" if get_accelerator().device_name() == "cuda" else "fp32"


def resolve_config(optim, world_size: int) -> dict:
    """The run's DeepSpeed config (`optim`: the optimisation flags), checked, with the schedule's
    lengths left for ds_config.fill_schedule: this runs before any slow work, so a bad config fails fast."""
    path, raw = ds_config.load(optim.ds_config)
    cfg = ds_config.fill(path, raw, optim, world_size, default_precision=default_precision())
    check_precision_supported(ds_config.precision_of(cfg))
    return cfg


def check_precision_supported(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}
    if not supported.get(precision, lambda: True)():
        other = [p for p in ("bf16", "fp16") if p != precision and supported[p]()]
        use = " or ".join(f"--{p}" for p in other + ["fp32"])
        raise UserError(
            f"this machine's accelerator ({acc.device_name()}) cannot train in {precision}; use {use} instead"
        )


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def build_model(model_args, task, cfg: dict):
    """The task's model (`model_args`: the model flags, dropout included); under ZeRO-3 partitioned as
    it is built (HF's DeepSpeed integration)."""
    hf_ds = None
    if zero_stage(cfg) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(cfg)  # noqa: F841 -- must stay alive while the model is built
    overrides = {**task.model_config_overrides(), **model_args.config_overrides()}
    model_class = choose_model_class(model_args, task, models.load_config(model_args.model, **overrides))
    try:
        model = models.build_model(model_args.model, model_class, **overrides)
    finally:
        if hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
    checkpointing = model_args.gradient_checkpointing
    if checkpointing is None:
        checkpointing = model.config.num_hidden_layers >= 24
    if checkpointing:
        models.enable_activation_checkpointing(model)
    from .unpad import packing_options

    task.packing = packing_options(model)  # what evaluation.model_inputs adds to its batches
    return model


def choose_model_class(model_args, task, config) -> type:
    """The task's model class, or with --unpad (the default) its unpadded version (unpad/); a head
    without one runs padded, and rank 0 says so."""
    model_class = task.model_class()
    if not model_args.unpad:
        return model_class
    from .unpad import unpadded_class

    unpadded = unpadded_class(model_class, config)
    if unpadded is None:
        say(
            f"unpadding: {model_class.__name__} ({config.model_type}) has no unpadded version; "
            "it runs on padded batches"
        )
        return model_class
    return unpadded


def say(line: str) -> None:
    """One line in the run's log, from rank 0."""
    if dist.is_main():
        print(f"[bertscale] {line}", file=sys.stderr, flush=True)


def log_attention_kernel(model, device, precision: str, training: bool = True) -> None:
    """Rank 0 names the varlen attention kernel of an unpadded model, and whether it applies
    attention dropout; nothing for a padded model."""
    from .unpad import describe_backend, packing_options

    if packing_options(model) is None:
        return
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    say(describe_backend(device, dtype, model.config.attention_probs_dropout_prob, training=training))


def param_groups(model, weight_decay: float):
    """No weight decay on biases and LayerNorm weights, as in BERT's original recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(model_args, weight_decay: float, task, cfg: dict):
    """A DeepSpeed engine for the task's model with the resolved config `cfg`."""
    import deepspeed

    model = build_model(model_args, task, cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay), config=cfg)
    log_attention_kernel(engine.module, engine.device, ds_config.precision_of(cfg))
    return engine
