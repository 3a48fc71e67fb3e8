"""The CUDA path (run with `make gpu-test` on a GPU box; skipped without CUDA): FusedAdam's CUDA
kernel, fp16 dynamic loss scaling with no test fixture, bf16, ZeRO-2/3 with activation
checkpointing, and a ZeRO-3 fine-tune whose exported model matches."""

import json
import os

import pytest
import torch

from conftest import ROOT, SQUAD, bertscale, launch, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def steps_of(proc):
    return [json.loads(line.split("STEP ", 1)[1]) for line in proc.stdout.splitlines() if "STEP " in line]


def test_fused_adam_cuda_kernel_builds_and_steps():
    from deepspeed.ops.adam import FusedAdam

    p = torch.nn.Parameter(torch.ones(1000, device="cuda"))
    opt = FusedAdam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(p.detach(), torch.full_like(p, 0.9), atol=1e-3)  # Adam's first step moves by lr


def test_fp16_loss_scale_backs_off_on_gpu(tmp_path):
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["fp16"].update(initial_scale_power=24, hysteresis=1)
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(cfg))
    rows = steps_of(launch(["tests/workers/engine_steps.py", "20", f"{path}:fp16"], ranks=1, env=gpu_env()))
    assert rows[0]["dtype"] == "torch.float16"
    scales = [r["scale"] for r in rows]
    assert scales[0] <= 2.0**23 and rows[-1]["skipped"] >= 1, scales
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]


@pytest.mark.parametrize("ds_config,precision", [("zero2", "bf16"), ("zero3", "bf16"), ("zero3", "fp16")])
def test_zero_with_activation_checkpointing_learns(ds_config, precision):
    rows = steps_of(launch(["tests/workers/engine_steps.py", "12", f"{ds_config}:{precision}"], ranks=1, env=gpu_env()))
    assert rows[0]["zero"] == int(ds_config[-1])
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [r["loss"] for r in rows]


def test_zero3_finetune_exports_matching_model(tmp_path):
    out = tmp_path / "run"
    bertscale(
        [
            "finetune",
            "--task",
            "squad",
            "--model",
            "tiny",
            "--train-file",
            str(SQUAD / "train-v1.1-first44.json"),
            "--eval-file",
            str(SQUAD / "dev-v1.1-part1.json"),
            "--max-train-samples",
            "400",
            "--max-eval-samples",
            "100",
            "--max-seq-length",
            "256",
            "--micro-batch-size",
            "16",
            "--max-steps",
            "20",
            "--ds-config",
            "zero3",
            "--bf16",
            "--gradient-checkpointing",
            "--learning-rate",
            "1e-3",
            "--log-every",
            "5",
            "--output-dir",
            str(out),
        ],
        ranks=1,
        env=gpu_env(),
    )
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and "mem_peak_gib" in rows[-1]
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(out / "final")
    assert all(p.numel() > 0 and p.abs().sum() > 0 for p in model.parameters())  # gathered, not empty
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["f1"] <= 100
