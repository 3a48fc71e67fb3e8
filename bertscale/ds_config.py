"""Load a DeepSpeed JSON, fill its "auto" values from the RunConfig, and check it.

Every error names the file and the key, because a DeepSpeed config error otherwise surfaces as a
pydantic traceback or, worse, as a silently ignored key.
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from .errors import UserError

PRESET_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/constants.py and friends). DeepSpeed
# ignores anything else, so a typo like "gradient_acumulation_steps" would silently do nothing.
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "steps_per_print", "wall_clock_breakdown",
    "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "communication_data_type",
    "seq_parallel_communication_data_type", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "aio", "data_efficiency", "compression_training", "checkpoint", "data_types", "elasticity", "autotuning",
    "dump_state", "memory_breakdown", "disable_allgather", "torch_autocast", "compile", "comms_logger",
    "pipeline", "dataloader_drop_last", "zero_quantized_weights", "zero_quantized_gradients", "timers",
    "graph_harvesting", "use_data_before_expert_parallel_", "weight_quantization", "hybrid_engine",
    "nebula", "sparse_attention", "curriculum_learning", "progressive_layer_drop", "eigenvalue", "mics_shard_size",
    "mics_hierarchical_params_gather", "load_universal_checkpoint", "use_node_local_storage",
    "checkpoint_parallel_write_pipeline", "step_on_overflow",
}
SECTION_KEYS = {
    "fp16": {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
    "bf16": {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
             "bf16_optimizer_states"},
    "optimizer": {"type", "params"},
    "scheduler": {"type", "params"},
    "activation_checkpointing": {"partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                                 "number_checkpoints", "synchronize_checkpoint_boundary", "profile"},
}


def resolve_path(name: str) -> Path:
    """A path, or a preset name from ds_configs/ (zero2, zero3.json, ds_configs/zero3.json...)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (PRESET_DIR / p.name, PRESET_DIR / f"{p.name}.json"):
        if cand.is_file():
            return cand
    presets = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.json")))
    raise UserError(f"--ds-config {name}: no such file, and not a preset (presets: {presets})")


def load(name: str) -> tuple[Path, dict]:
    path = resolve_path(name)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: the top level must be a JSON object")
    return path, cfg


def _unknown(path, where, key, known):
    hint = difflib.get_close_matches(key, sorted(known), n=1)
    did = f"; did you mean '{hint[0]}'?" if hint else ""
    return UserError(f"{path}: unknown key '{where}{key}'{did}")


def validate_keys(path, cfg: dict) -> None:
    for key, value in cfg.items():
        if key.startswith("_"):  # "_comment" and friends: notes for humans, ignored by DeepSpeed
            continue
        if key not in KNOWN_KEYS:
            raise _unknown(path, "", key, KNOWN_KEYS)
        if key in SECTION_KEYS and isinstance(value, dict):
            for sub in value:
                if sub not in SECTION_KEYS[key]:
                    raise _unknown(path, f"{key}.", sub, SECTION_KEYS[key])
    zero = cfg.get("zero_optimization")
    if zero is not None:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        import pydantic

        try:
            DeepSpeedZeroConfig(**zero)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise UserError(f"{path}: zero_optimization.{loc}: {err['msg']}") from None


def _set_auto(section: dict, key: str, value) -> None:
    if section.get(key) == "auto":
        section[key] = value


def fill(path, cfg: dict, run, world_size: int, total_steps: int, default_precision: str = "fp32") -> dict:
    """Return a copy of cfg with every "auto" replaced from run; check batch arithmetic.

    A precision left "auto" by both the file and the flags becomes default_precision (the
    caller picks fp16 on GPUs, fp32 on CPU).
    """
    cfg = copy.deepcopy(cfg)
    validate_keys(path, cfg)
    _set_auto(cfg, "train_micro_batch_size_per_gpu", run.micro_batch_size)
    _set_auto(cfg, "gradient_accumulation_steps", run.grad_accum)
    _set_auto(cfg, "train_batch_size", run.micro_batch_size * run.grad_accum * world_size)
    _set_auto(cfg, "gradient_clipping", run.max_grad_norm)
    opt = cfg.get("optimizer", {}).get("params", {})
    _set_auto(opt, "lr", run.learning_rate)
    _set_auto(opt, "weight_decay", run.weight_decay)
    sched = cfg.get("scheduler", {}).get("params", {})
    warmup = max(1, int(run.warmup_ratio * total_steps))  # DeepSpeed rejects 0
    _set_auto(sched, "warmup_max_lr", run.learning_rate)
    _set_auto(sched, "warmup_num_steps", warmup)
    _set_auto(sched, "total_num_steps", max(total_steps, warmup + 1))
    _set_auto(sched, "warmup_min_lr", 0.0)
    if run.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = run.zero_stage
    for prec in ("fp16", "bf16"):
        sec = cfg.get(prec)
        if isinstance(sec, dict):
            if run.precision is not None:
                sec["enabled"] = run.precision == prec
            elif sec.get("enabled") == "auto":
                sec["enabled"] = default_precision == prec
    _check_no_auto(path, cfg, "")
    _check_batch(path, cfg, world_size)
    # The trainer batches its data with the flags, so a number in the file must agree with them.
    for key, flag, value in (("train_micro_batch_size_per_gpu", "--micro-batch-size", run.micro_batch_size),
                             ("gradient_accumulation_steps", "--grad-accum", run.grad_accum)):
        if int(cfg.get(key, value)) != value:
            raise UserError(f"{path}: '{key}' is {cfg[key]} but {flag} is {value}; "
                            f"pass {flag} {cfg[key]} or set the key to \"auto\"")
    if _enabled(cfg, "fp16") and _enabled(cfg, "bf16"):
        raise UserError(f"{path}: fp16.enabled and bf16.enabled are both true; choose one (--fp16 or --bf16)")
    return cfg


def _enabled(cfg, key):
    return bool(cfg.get(key, {}).get("enabled", False))


def precision_of(cfg: dict) -> str:
    return "fp16" if _enabled(cfg, "fp16") else "bf16" if _enabled(cfg, "bf16") else "fp32"


def _check_no_auto(path, node, where):
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_auto(path, v, f"{where}{k}.")
    elif node == "auto":
        raise UserError(f"{path}: '{where.rstrip('.')}' is \"auto\" but bertscale has no value for it; "
                        "set a number in the file")


def _check_batch(path, cfg, world):
    try:
        micro = int(cfg["train_micro_batch_size_per_gpu"])
        accum = int(cfg.get("gradient_accumulation_steps", 1))
        total = int(cfg.get("train_batch_size", micro * accum * world))
    except KeyError:
        raise UserError(f"{path}: 'train_micro_batch_size_per_gpu' is missing (use \"auto\")") from None
    except (TypeError, ValueError):
        raise UserError(f"{path}: batch sizes must be integers or \"auto\"") from None
    if total != micro * accum * world:
        raise UserError(
            f"{path}: 'train_batch_size' is {total} but train_micro_batch_size_per_gpu * "
            f"gradient_accumulation_steps * world size = {micro} * {accum} * {world} = {micro * accum * world}; "
            "set it to \"auto\" or fix the arithmetic")
