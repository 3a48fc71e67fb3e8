"""A DeepSpeed engine around the task's BERT model: config, precision check, ZeRO-3 construction,
activation checkpointing, optimizer parameter groups."""

from __future__ import annotations

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
    try:
        overrides = {**task.model_config_overrides(), **model_args.config_overrides()}
        model = models.build_model(model_args.model, task.model_class(), **overrides)
    finally:
        if hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
    checkpointing = model_args.gradient_checkpointing
    if checkpointing is None:
        checkpointing = model.config.num_hidden_layers >= 24
    if checkpointing:
        models.enable_activation_checkpointing(model)
    return model


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
    return engine
