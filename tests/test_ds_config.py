"""DeepSpeed config loading: presets, "auto" filling, and one clear message per mistake."""

import json

import pytest

from bertscale import ds_config
from bertscale.args import OptimArgs
from bertscale.errors import UserError


def fill(cfg, tmp_path, world=2, steps=100, **run_kw):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    p, raw = ds_config.load(str(path))
    return ds_config.fill(p, raw, OptimArgs(**run_kw), world, steps)


@pytest.mark.parametrize(
    "preset", ["zero2", "zero3", "zero3_offload", "single_node", "ds_configs/zero2.json", "zero3.json"]
)
def test_presets_resolve_every_auto(preset):
    path, raw = ds_config.load(preset)
    run = OptimArgs(micro_batch_size=4, grad_accum=3, learning_rate=5e-5, precision="bf16")
    cfg = ds_config.fill(path, raw, run, world_size=2, total_steps=1000)
    assert "auto" not in json.dumps(cfg) and "_comment" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["optimizer"]["type"] in ("Adam", "AdamW") and cfg["optimizer"]["params"]["lr"] == 5e-5
    assert cfg["scheduler"]["type"] == "WarmupDecayLR"
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 100
    assert cfg["scheduler"]["params"]["total_num_steps"] == 1000
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling when fp16 is chosen


@pytest.mark.parametrize("preset", ["zero2", "zero3", "zero3_offload", "single_node", "pretrain_lamb"])
def test_bf16_presets_turn_off_the_per_step_overflow_check(preset):
    """bf16.check_grad_overflow (DeepSpeed >= 0.17.1, on by default since 0.19.3) is accepted by the
    installed DeepSpeed and off in every preset; the note saying why is stripped before DeepSpeed."""
    from deepspeed.runtime.config import DeepSpeedConfig

    path, raw = ds_config.load(preset)
    assert raw["bf16"]["_comment"].startswith("check_grad_overflow false")
    cfg = ds_config.fill(path, raw, OptimArgs(micro_batch_size=4, precision="bf16"), world_size=1, total_steps=10)
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert DeepSpeedConfig(cfg).bfloat16_config.check_grad_overflow is False


@pytest.mark.parametrize("precision,stage", [("bf16", 1), ("fp16", 1), ("fp32", 0), (None, 0)])
def test_single_node_preset_is_zero1_in_16_bits_and_zero0_in_fp32_with_fused_adam(precision, stage):
    """16-bit weights: ZeRO-1 keeps the fp32 master weights; fp32 has nothing to keep a master copy in,
    so stage 0 (no second fp32 copy, no gradient buckets). None: the precision default (fp32 here)."""
    path, raw = ds_config.load("single_node")
    assert raw["zero_optimization"]["stage"] == "auto"
    assert raw["optimizer"]["type"] == "AdamW" and "torch_adam" not in raw["optimizer"]["params"]  # FusedAdam
    cfg = ds_config.fill(path, raw, OptimArgs(micro_batch_size=4, precision=precision), world_size=2, total_steps=10)
    assert cfg["zero_optimization"]["stage"] == stage
    cfg = ds_config.fill(path, raw, OptimArgs(micro_batch_size=4, precision=precision, zero_stage=2), 2, 10)
    assert cfg["zero_optimization"]["stage"] == 2  # --zero-stage still decides


def test_zero_stage_and_precision_flags_override(tmp_path):
    _, raw = ds_config.load("zero2")
    cfg = fill(raw, tmp_path, zero_stage=3, precision="fp16")
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    cfg = fill(raw, tmp_path, precision="fp32")
    assert not cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (
            lambda c: c.update(gradient_acumulation_steps=2),
            "unknown key 'gradient_acumulation_steps'; did you mean 'gradient_accumulation_steps'?",
        ),
        (lambda c: c["zero_optimization"].update(overlap_com=True), "zero_optimization.overlap_com"),
        (lambda c: c["fp16"].update(initial_scale=8), "unknown key 'fp16.initial_scale'"),
        (lambda c: c.update(train_batch_size=48), "'train_batch_size' is 48 but"),
        (lambda c: c.update(steps_per_print="auto"), "'steps_per_print' is \"auto\""),
        (lambda c: (c["fp16"].update(enabled=True), c["bf16"].update(enabled=True)), "both true"),
        # nested sections that DeepSpeed reads key by key, and ones its pydantic models check
        (
            lambda c: c.update(activation_checkpointing={"partition_activations": True, "cpu_checkpointng": True}),
            "unknown key 'activation_checkpointing.cpu_checkpointng'; "
            "did you mean 'activation_checkpointing.cpu_checkpointing'?",
        ),
        (
            lambda c: c["zero_optimization"].update(offload_optimizer={"device": "cpu", "pin_memry": True}),
            "unknown key 'zero_optimization.offload_optimizer.pin_memry'",
        ),
        (lambda c: c["zero_optimization"].update(stage=7), "zero_optimization.stage: Input should be"),
        (lambda c: c.update(gradient_acumulation_steps="auto"), "unknown key 'gradient_acumulation_steps'"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, mutate, expected):
    _, raw = ds_config.load("zero2")
    mutate(raw)
    with pytest.raises(UserError) as err:
        fill(raw, tmp_path, micro_batch_size=8)
    assert expected in str(err.value)
    assert str(tmp_path / "ds.json") in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="no such file, and not a preset"):
        ds_config.load(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,,}')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON \(line 1"):
        ds_config.load(str(bad))


def test_accepted_keys_come_from_the_installed_deepspeed(tmp_path):
    """Keys DeepSpeed reads are accepted without bertscale listing them (these were missing from the list
    once pinned to 0.19), and notes for humans ("_comment") are allowed anywhere."""
    _, raw = ds_config.load("zero2")
    raw.update(
        _comment="tuned for 8 GPUs",
        gradient_predivide_factor=2.0,
        checkpoint={"load_universal": False},
        flops_profiler={"enabled": False},
        data_types={"grad_accum_dtype": "fp32"},
        comet={"enabled": False, "api_key": "k"},
    )  # a section DeepSpeed hands whole to its model
    raw["zero_optimization"]["_comment"] = "overlap on"
    cfg = fill(raw, tmp_path, micro_batch_size=8)
    assert cfg["gradient_predivide_factor"] == 2.0 and cfg["checkpoint"] == {"load_universal": False}


def test_warmup_in_steps_overrides_the_ratio():
    path, raw = ds_config.load("zero2")
    cfg = ds_config.fill(path, raw, OptimArgs(warmup_steps=37, warmup_ratio=0.5), world_size=1, total_steps=1000)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 37
    cfg = ds_config.fill(path, raw, OptimArgs(warmup_ratio=0.5), world_size=1, total_steps=1000)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 500
