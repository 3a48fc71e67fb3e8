"""`bertscale plan`: memory sizes, parameter counts, the activation formula against a measured
step (the issue's bar: within 20%), the recommendation and the DeepSpeed JSON it writes."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import BertForQuestionAnswering

from bertscale import memory_model, models
from bertscale.cli import main
from bertscale.errors import UserError
from bertscale.plan import GiB, count_params, load_model_config, model_state_bytes, parse_memory, plan, plan_command

LARGE = "bert-large-cased-whole-word-masking"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GB", 16 * GiB),
        ("80GiB", 80 * GiB),
        ("24g", 24 * GiB),
        ("512MB", 512 * 2**20),
        ("1.5TB", int(1.5 * 2**40)),
        ("40", 40 * GiB),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["16XB", "GB", "-4GB", "0GB", "16 GB GB", "iB16"])
def test_parse_memory_rejects_nonsense(text):
    with pytest.raises(UserError, match="--gpu-memory"):
        parse_memory(text)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(gpu_memory="16XB"), "--gpu-memory"),
        (dict(gpus=0), "--gpus"),
        (dict(seq_len=1024), "--seq-len"),
        (dict(micro_batch=0), "--micro-batch"),
        (dict(gpus=8, global_batch=4), "--global-batch"),
        (dict(model="/no/such/dir"), "--model"),
    ],
)
def test_bad_inputs_are_user_errors(kwargs, flag):
    args = dict(model=LARGE, gpus=1, gpu_memory="16GB", seq_len=384) | kwargs
    with pytest.raises(UserError, match=flag):
        plan_command(**args)


def test_cli_reports_bad_memory_in_one_line():
    result = CliRunner().invoke(main, ["plan", "--model", "tiny", "--gpu-memory", "16XB"])
    assert result.exit_code == 2
    assert "--gpu-memory 16XB" in result.output and "Traceback" not in result.output


def test_meta_device_count_matches_the_built_models(minilm_path):
    for name in ("tiny", str(minilm_path)):
        built = models.build_model(name, BertForQuestionAnswering)
        assert count_params(load_model_config(name))[0] == sum(p.numel() for p in built.parameters())


def test_offline_presets_have_the_published_sizes():
    # BertModel of bert-base-uncased has 109,482,240 parameters; the QA head drops the pooler
    # (768*768 + 768) and adds a 768 -> 2 projection.
    total, largest = count_params(load_model_config("bert-base-uncased"))
    assert total == 109_482_240 - 768 * 768 - 768 + 768 * 2 + 2
    assert largest == 30522 * 768  # the word embeddings
    assert count_params(load_model_config("google-bert/bert-large-cased"))[1] == 28996 * 1024


def test_model_states_shrink_with_partitioning():
    total, largest = count_params(load_model_config(LARGE))
    zero2 = model_state_bytes("ZeRO-2", total, largest, 8, 1, "fp16")[0]
    zero3 = model_state_bytes("ZeRO-3", total, largest, 8, 1, "fp16")[0]
    offload = model_state_bytes("ZeRO-3+offload", total, largest, 8, 1, "fp16")[0]
    assert zero2 == 2 * total + int(18 * total / 8)  # 16-bit weights replicated, the rest split 8 ways
    assert offload < zero3 < zero2
    assert model_state_bytes("ZeRO-2", total, largest, 1, 1, "fp32")[0] == 16 * total


def _measured_vs_estimated(name, seq_len, micro_batch, checkpointing):
    torch.manual_seed(0)
    model = models.build_model(name, BertForQuestionAnswering)
    if checkpointing:
        models.enable_activation_checkpointing(model)
    batch = memory_model.synthetic_batch(model.config, seq_len, micro_batch)
    measured = memory_model.measure_step_peak(model, batch)
    estimate = memory_model.estimate(
        memory_model.BertShape.of(model.config), seq_len, micro_batch, "fp32", memory_model.CPU
    ).peak(checkpointing)
    return estimate, measured


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("model, seq_len, micro_batch", [("tiny", 384, 4), ("minilm", 384, 2)])
def test_activation_estimate_within_20_percent_of_measured_peak(
    model, seq_len, micro_batch, checkpointing, minilm_path
):
    name = str(minilm_path) if model == "minilm" else model
    estimate, measured = _measured_vs_estimated(name, seq_len, micro_batch, checkpointing)
    assert 0.8 < estimate / measured < 1.2, (estimate, measured)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("micro_batch", [4, 16])  # 4: the embeddings' backward is the peak
def test_pretraining_estimate_within_20_percent_of_measured_peak(micro_batch, checkpointing):
    from bertscale.tasks.pretraining_model import BertForPreTrainingOnMasked

    torch.manual_seed(0)
    model = models.build_model("tiny", BertForPreTrainingOnMasked)
    if checkpointing:
        models.enable_activation_checkpointing(model)
    batch = memory_model.synthetic_batch(model.config, 128, micro_batch, "masked_lm")
    measured = memory_model.measure_step_peak(model, batch)
    estimate = memory_model.estimate(
        memory_model.BertShape.of(model.config),
        128,
        micro_batch,
        "fp32",
        memory_model.CPU,
        "masked_lm",
        masked_tokens=int((batch["labels"] != -100).sum()),
    ).peak(checkpointing)
    assert 0.8 < estimate / measured < 1.2, (estimate, measured)


def test_recommends_single_node_when_the_model_states_fit_one_gpu(tmp_path, capsys):
    from deepspeed.runtime.config import DeepSpeedConfig

    out = tmp_path / "plan.json"
    result = plan_command(LARGE, gpus=1, gpu_memory="16GB", seq_len=384, output=str(out))
    c = result.choice
    assert c.stage == "ZeRO-1" and not c.checkpointing and c.fits
    assert c.micro_batch * result.grad_accum == 32 and c.micro_batch in (4, 8, 16, 32)
    assert c.total <= 16 * GiB * 0.9
    printed = capsys.readouterr().out
    assert "recommended: ZeRO-1 (preset single_node" in printed and "ZeRO-3+offload" in printed
    cfg = json.loads(out.read_text())
    assert "auto" not in out.read_text() and "_comment" not in out.read_text()
    ds = DeepSpeedConfig(cfg)  # DeepSpeed's own parser accepts it
    assert (ds.zero_optimization_stage, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (
        1,
        c.micro_batch,
        result.grad_accum,
    )
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    assert cfg["optimizer"]["type"] == "AdamW"


def test_single_node_counts_the_model_states_unpartitioned():
    total, largest = count_params(load_model_config(LARGE))
    for gpus in (1, 8):
        result = plan(LARGE, gpus, "80GB", 384, global_batch=256)
        one_gpu = model_state_bytes("ZeRO-2", total, largest, 1, 1, "fp16")[0]
        assert result.options["ZeRO-1"][0].model_states == one_gpu
        assert result.choice.stage == "ZeRO-1"


def test_single_node_in_fp32_is_planned_and_configured_as_zero0():
    """fp32: 4 + 4 + 8 bytes a parameter (no second fp32 copy), the gradients all-reduced through one
    flat copy instead of ZeRO-1's two 2e8-element buckets; the config written runs stage 0."""
    total, _ = count_params(load_model_config(LARGE))
    result = plan(LARGE, 1, "80GB", 384, global_batch=32, precision="fp32")
    option = result.options["ZeRO-1"][0]
    assert option.model_states == 16 * total and option.buffers == 4 * total
    assert result.choice.stage == "ZeRO-1" and result.ds_config["zero_optimization"]["stage"] == 0
    fp16 = plan(LARGE, 1, "80GB", 384, global_batch=32, precision="fp16").options["ZeRO-1"][0]
    assert fp16.buffers == 2 * 200_000_000 * 2  # overlap_comm's two reduce buckets


def test_zero2_when_the_model_states_need_partitioning():
    """8 GPUs of 6 GB: BERT-large's states (20 bytes a parameter, 6.2 GiB) do not fit one GPU whole,
    ZeRO-2 splits them 8 ways."""
    result = plan(LARGE, gpus=8, gpu_memory="6GB", seq_len=384, global_batch=256, precision="bf16")
    assert not any(o.fits for o in result.options["ZeRO-1"])
    assert result.choice.stage == "ZeRO-2"
    assert result.ds_config["zero_optimization"]["stage"] == 2


def test_less_memory_moves_to_checkpointing_then_zero3_then_offload():
    roomy = plan(LARGE, 1, "80GB", 384).choice
    tight = plan(LARGE, 1, "9GB", 384).choice
    zero3 = plan(LARGE, 1, "8GB", 384).choice
    offload = plan(LARGE, 1, "4GB", 384).choice
    assert (roomy.stage, roomy.micro_batch, roomy.checkpointing) == ("ZeRO-1", 32, False)
    assert (tight.stage, tight.checkpointing) == ("ZeRO-1", True)
    assert zero3.stage == "ZeRO-3"
    assert offload.stage == "ZeRO-3+offload"


def test_multi_node_plan_splits_the_global_batch():
    result = plan(LARGE, gpus=4, gpu_memory="32GB", seq_len=384, nodes=2, global_batch=256)
    assert "ZeRO-1" not in result.options  # the single_node preset is for one node
    assert result.choice.stage == "ZeRO-2"
    assert result.global_batch == 256
    assert result.choice.micro_batch * result.grad_accum * 8 == 256
    assert result.ds_config["train_batch_size"] == 256


def test_a_micro_batch_that_cannot_fit_is_a_clear_error(capsys):
    with pytest.raises(UserError, match="does not fit"):
        plan_command(LARGE, gpus=1, gpu_memory="2GB", seq_len=512, micro_batch=32)
    assert "NO" in capsys.readouterr().out  # the table is still printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_activation_estimate_within_20_percent(checkpointing):
    config = load_model_config("bert-base-uncased")
    config._attn_implementation = "sdpa"
    model = BertForQuestionAnswering(config).to("cuda", torch.float16)
    if checkpointing:
        models.enable_activation_checkpointing(model)
    batch = memory_model.synthetic_batch(config, 384, 16, device="cuda")
    measured = memory_model.measure_step_peak(model, batch)
    estimate = memory_model.estimate(memory_model.BertShape.of(config), 384, 16, "fp16").peak(checkpointing)
    assert 0.8 < estimate / measured < 1.2, (estimate, measured)
