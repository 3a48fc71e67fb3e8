"""Turn a RunConfig + Task into a DeepSpeed engine around a BERT model."""
from __future__ import annotations

from . import ds_config, models
from .errors import UserError


def default_precision() -> str:
    """fp16 on GPUs (the configs' dynamic loss scaling), fp32 on CPU where 16-bit is emulated."""
    from deepspeed.accelerator import get_accelerator

    return "fp16" if get_accelerator().device_name() == "cuda" else "fp32"


def resolve_config(run, world_size: int, total_steps: int) -> dict:
    path, raw = ds_config.load(run.ds_config)
    cfg = ds_config.fill(path, raw, run, world_size, total_steps, default_precision())
    check_precision_supported(ds_config.precision_of(cfg))
    return cfg


def check_precision_supported(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    ok = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}.get(precision, lambda: True)()
    if not ok:
        other = [p for p in ("bf16", "fp16") if p != precision and
                 {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}[p]()]
        use = " or ".join(f"--{p}" for p in other + ["fp32"])
        raise UserError(f"this machine's accelerator ({acc.device_name()}) cannot train in {precision}; "
                        f"use {use} instead")


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def build_model(run, task, cfg: dict):
    """The task's model; under ZeRO-3 partitioned as it is built (HF's DeepSpeed integration)."""
    hf_ds = None
    if zero_stage(cfg) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(cfg)  # noqa: F841 -- must stay alive while the model is built
    try:
        model = models.build_model(run.model, task.model_class(), **task.model_config_overrides())
    finally:
        if hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
    checkpointing = run.gradient_checkpointing
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


def build(run, task, world_size: int, total_steps: int):
    """Returns (engine, resolved DeepSpeed config)."""
    import deepspeed

    cfg = resolve_config(run, world_size, total_steps)
    model = build_model(run, task, cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, run.weight_decay),
                                      config=cfg)
    return engine, cfg
